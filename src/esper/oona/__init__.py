"""Oona: the message bus (streams, consumer groups, ack, reclaim, dead-letter, priority routing)."""
