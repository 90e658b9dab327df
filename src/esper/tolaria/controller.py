"""How Tolaria talks to its controller: a small protocol, so the trainer never imports Tamiyo.

A decision is pipelined: the trainer `submit`s the packet of step t and trains on; at step
t + `TOLARIA_DECISION_LAG_STEPS` it `collect`s the command, which waits at most for what is left of the
controller's budget counted from the submission. A decision not back in time raises
`DecisionDeadlineMissed` (esper.leyline): no command for that packet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from esper.leyline import EsperError, pb


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
        """The command for this packet, decided while the caller waits (tests, benchmarks, Simic)."""
        ...

    def submit(self, packet: pb.SystemStatePacket) -> None:
        """Start deciding for this packet and return at once; one decision in flight at a time."""
        ...

    def collect(self) -> pb.AdaptationCommand:
        """The command of the submitted packet, waiting at most for what is left of the budget counted
        from `submit`; `DecisionDeadlineMissed` when it is not back in time (nothing of it runs on)."""
        ...

    def export_state(self) -> dict[str, Any]:
        """JSON-ready state the controller needs to resume exactly (saved with every checkpoint)."""
        ...

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of `export_state`."""
        ...

    def checkpointed(self, training_run_id: str, step: int) -> None:
        """The run's checkpoint of `step` is durable: what the controller recorded up to that step may
        leave the process (a resume never re-decides it). Called on the checkpoint writer's thread,
        concurrently with training; must not block for long."""
        ...

    def rewound(self, training_run_id: str, step: int) -> None:
        """The run rolled back to its checkpoint of `step`: what the controller recorded after that step
        belongs to a timeline that no longer exists (never published, never learned from)."""
        ...


@dataclass
class BoundController:
    """A `Controller` assembled from callables (the composition root binds a service and its policy).

    With `start` and `finish` (a service's `submit` and `collect`) a decision runs while the trainer
    trains; without them `submit` decides at once with `decide` and `collect` hands the command back."""

    decide: Callable[[pb.SystemStatePacket], pb.AdaptationCommand]
    save: Callable[[], dict[str, Any]]
    load: Callable[[dict[str, Any]], None]
    rehearse: Callable[[pb.SystemStatePacket], None] | None = None
    warm_ahead: Callable[[], None] | None = None
    start: Callable[[pb.SystemStatePacket], None] | None = None
    finish: Callable[[], pb.AdaptationCommand] | None = None
    release: Callable[[str, int], None] | None = None
    rewind: Callable[[str, int], None] | None = None
    _decided: pb.AdaptationCommand | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.start is None) != (self.finish is None):
            raise ValueError("BoundController needs both start and finish, or neither")

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

    def submit(self, packet: pb.SystemStatePacket) -> None:
        """Start the bound service's decision (or decide at once, without one)."""
        if self.start is not None:
            self.start(packet)
            return
        if self._decided is not None:
            raise EsperError("a decision is already in flight: collect it first")
        self._decided = self.decide(packet)

    def collect(self) -> pb.AdaptationCommand:
        """The submitted packet's command."""
        if self.finish is not None:
            return self.finish()
        command, self._decided = self._decided, None
        if command is None:
            raise EsperError("no decision in flight: submit a packet first")
        return command

    def export_state(self) -> dict[str, Any]:
        """The bound policy's state."""
        return self.save()

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Give the bound policy its saved state back."""
        self.load(dict(state))

    def checkpointed(self, training_run_id: str, step: int) -> None:
        """Tell the bound service a checkpoint is durable (nothing for a controller without one)."""
        if self.release is not None:
            self.release(training_run_id, step)

    def rewound(self, training_run_id: str, step: int) -> None:
        """Tell the bound service the run rolled back (nothing for a controller without one)."""
        if self.rewind is not None:
            self.rewind(training_run_id, step)
