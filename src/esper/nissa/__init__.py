"""Nissa: observability. A process's Prometheus metrics (served while it runs, a snapshot when it ends);
the run report with plots is written by Tolaria's report module from the run directory."""

from esper.nissa.metrics import MetricsServer, MetricsServerError, RunMetrics, write_snapshot
from esper.nissa.settings import NissaSettings

__all__ = ["MetricsServer", "MetricsServerError", "NissaSettings", "RunMetrics", "write_snapshot"]
