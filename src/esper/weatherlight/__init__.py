"""Weatherlight: the supervisor of a node's long-lived services."""
