"""Nissa: observability (Prometheus metrics, event log, run report)."""
