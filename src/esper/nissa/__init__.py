"""Nissa: observability. A process's Prometheus metrics (served while it runs, a snapshot when it ends),
and everything that reads run directories: run history (`runs`, DuckDB in `sql`, `compare`), the live
terminal view (`watch`), the web dashboard (`dashboard`) and TensorBoard/CSV exports (`tensorboard`).
Those modules are imported where they are used (they pull in DuckDB, Textual, Starlette or torch). The
run report with plots is written by Tolaria's report module from the run directory."""

from esper.nissa.metrics import MetricsServer, MetricsServerError, RunMetrics, write_snapshot
from esper.nissa.settings import NissaSettings

__all__ = ["MetricsServer", "MetricsServerError", "NissaSettings", "RunMetrics", "write_snapshot"]
