"""How Tolaria talks to its controller: a small protocol, so the trainer never imports Tamiyo."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from esper.leyline import pb


class Controller(Protocol):
    """Decides, for one state packet, the signed command the trainer hands to Kasmina."""

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """Warm up on this packet's topology, outside any decision deadline; decides nothing.

        The trainer calls it before the first decision of a process and whenever the host's topology
        changed, so the decision that follows does not pay for first-time work."""
        ...

    def anticipate(self) -> None:
        """A decision follows in a few training steps: prepare for it in the background, return at once.

        A hint (`TOLARIA_ANTICIPATION_STEPS` ahead of each decision); it decides nothing and must not
        delay the training step that follows."""
        ...

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        """The command for this packet."""
        ...

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state the controller needs to resume exactly (saved with every checkpoint)."""
        ...

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of `export_state`."""
        ...


@dataclass(frozen=True)
class BoundController:
    """A `Controller` assembled from callables (the composition root binds a service and its policy)."""

    decide: Callable[[pb.SystemStatePacket], pb.AdaptationCommand]
    save: Callable[[], dict[str, Any]]
    load: Callable[[dict[str, Any]], None]
    rehearse: Callable[[pb.SystemStatePacket], None] | None = None
    warm_ahead: Callable[[], None] | None = None

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """The bound service's warm-up on this packet (nothing to do for a controller without one)."""
        if self.rehearse is not None:
            self.rehearse(packet)

    def anticipate(self) -> None:
        """The bound service's warm-up ahead of a decision (nothing for a controller without one)."""
        if self.warm_ahead is not None:
            self.warm_ahead()

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        """The command for this packet."""
        return self.decide(packet)

    def export_state(self) -> dict[str, Any]:
        """The bound policy's state."""
        return self.save()

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Give the bound policy its saved state back."""
        self.load(dict(state))
