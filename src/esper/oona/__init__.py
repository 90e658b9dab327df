"""Oona: the message bus (streams, consumer groups, ack, reclaim, dead-letter, priority routing)."""

from esper.oona.bus import Bus, BusError, BusUnavailable, Delivery, PayloadTooLarge, Streams

__all__ = ["Bus", "BusError", "BusUnavailable", "Delivery", "PayloadTooLarge", "Streams"]
