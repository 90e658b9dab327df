"""Urza: the blueprint library (catalogue of seed architectures and their module factories)."""
