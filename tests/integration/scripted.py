"""A scripted controller for integration tests: fixed rules, commands signed like Tamiyo's.

Germinates each slot of `germinate` (in order, one per decision, each once), culls the seeds of slots in
`cull` as soon as they reach `cull_stage`, and fossilises any seed whose probation gate has passed.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from esper.leyline import SYSTEM_CLOCK, pb, sign


class DecidesAtOnce:
    """A controller that decides at `submit` (its subclass's `evaluate_step`), signs with `secret` and
    keeps nothing to release or abandon; `wait` is the WAIT command each decision starts from."""

    issuer = "decides-at-once"

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.decisions = 0
        self.submitted: pb.AdaptationCommand | None = None

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """Nothing to warm up."""

    def anticipate(self) -> None:
        """Nothing to warm up."""

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        raise NotImplementedError

    def submit(self, packet: pb.SystemStatePacket) -> None:
        """Decides at once; `collect` hands the command back."""
        self.submitted = self.evaluate_step(packet)

    def collect(self) -> pb.AdaptationCommand:
        """The command decided at `submit`."""
        command, self.submitted = self.submitted, None
        assert command is not None, "collect without submit"
        return command

    def wait(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        """An unsigned WAIT for `packet`, numbered by the decision count."""
        return pb.AdaptationCommand(
            version=1,
            command_id=f"{self.issuer}-{packet.training_run_id}-{self.decisions}",
            issued_by=self.issuer,
            training_run_id=packet.training_run_id,
            command_type=pb.COMMAND_WAIT,
        )

    def signed(self, command: pb.AdaptationCommand) -> pb.AdaptationCommand:
        """`command`, stamped now and signed."""
        command.issued_at.FromNanoseconds(SYSTEM_CLOCK.wall_ns())
        return sign(command, self.secret)

    def export_state(self) -> dict[str, Any]:
        """What resumes the controller exactly."""
        return {"decisions": self.decisions}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of `export_state`."""
        self.decisions = int(state["decisions"])

    def checkpointed(self, training_run_id: str, step: int) -> None:
        """Nothing recorded to release."""

    def rewound(self, training_run_id: str, step: int) -> None:
        """Nothing recorded to abandon."""


class ScriptedController(DecidesAtOnce):
    """Deterministic rules over the packet; state is the set of slots already germinated."""

    issuer = "scripted"

    def __init__(
        self,
        secret: bytes,
        *,
        germinate: tuple[str, ...],
        blueprints: Mapping[str, str],
        cull: tuple[str, ...] = (),
        cull_stage: int = pb.SEED_STAGE_BLENDING,
        blend_mode: int = pb.BLEND_MODE_RESIDUAL,
        alpha_ramp_steps: int = 8,
        delay_s: float = 0.0,
    ) -> None:
        super().__init__(secret)
        self.germinate = germinate
        self.blueprints = dict(blueprints)
        self.cull = cull
        self.cull_stage = cull_stage
        self.blend_mode = blend_mode
        self.alpha_ramp_steps = alpha_ramp_steps
        self.delay_s = delay_s
        self.germinated: list[str] = []
        self.prepared = 0
        self.anticipated: list[int] = []  # the decision count at each call

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        """Nothing to warm up; counts the calls."""
        self.prepared += 1

    def anticipate(self) -> None:
        """Nothing to warm up; records when it was called."""
        self.anticipated.append(self.decisions)

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        """One signed command for `packet`."""
        if self.delay_s:
            time.sleep(self.delay_s)  # lets a test kill the run mid-way; changes no state
        self.decisions += 1
        command = self.wait(packet)
        states = {state.slot_id: state for state in packet.seed_states}
        for slot_id, state in states.items():
            if state.metrics.get("fossilize_ready") == 1.0:
                return self._seed(command, pb.SEED_OP_FOSSILIZE, state)
            if slot_id in self.cull and state.stage == self.cull_stage:
                return self._seed(command, pb.SEED_OP_CULL, state)
        for slot_id in self.germinate:
            if slot_id not in self.germinated and states[slot_id].stage == pb.SEED_STAGE_DORMANT:
                self.germinated.append(slot_id)
                return self._seed(command, pb.SEED_OP_GERMINATE, states[slot_id])
        return sign(command, self.secret)

    def _seed(
        self, command: pb.AdaptationCommand, operation: int, state: pb.SeedState
    ) -> pb.AdaptationCommand:
        command.command_type = pb.COMMAND_SEED
        command.target_seed_id = state.seed_id
        op = command.seed_operation
        op.operation = operation
        op.slot_id = state.slot_id
        op.blueprint_id = (
            self.blueprints[state.slot_id] if operation == pb.SEED_OP_GERMINATE else state.blueprint_id
        )
        op.blend_mode = self.blend_mode
        op.alpha_ramp_steps = self.alpha_ramp_steps
        return sign(command, self.secret)

    def export_state(self) -> dict[str, Any]:
        """What resumes the script exactly."""
        return super().export_state() | {"germinated": list(self.germinated)}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of `export_state`."""
        super().restore_state(state)
        self.germinated = [str(s) for s in state["germinated"]]
