"""Nissa: observability. A process's Prometheus metrics (served while it runs, a snapshot when it ends),
the run directory's layout (`layout`), its JSON-lines logs (`log`), its status file (`status`) and the
run report with plots (`report`, read from the run directory)."""

from esper.nissa.metrics import MetricsServer, MetricsServerError, RunMetrics, write_snapshot
from esper.nissa.settings import NissaSettings

__all__ = ["MetricsServer", "MetricsServerError", "NissaSettings", "RunMetrics", "write_snapshot"]
