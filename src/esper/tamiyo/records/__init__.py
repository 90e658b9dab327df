"""Tamiyo's records: the decision store, field reports and the outbox that publishes them."""
