"""Turns a final proposal into a signed `AdaptationCommand`, or refuses to.

Every id in a command comes from the packet: the slot, the seed that occupies it, the blueprint from the
catalogue offered. A proposal that names something the packet does not have is a `CommandBuildError`,
never a command with a placeholder.

P8: a GERMINATE carries the blend parameters of its mode in `seed_operation.parameters`, where Kasmina
reads them (CONFIDENCE: `gate_k`, `gate_tau`, `alpha_lo`, `alpha_hi` from `TAMIYO_BLEND_*`), behind
`TAMIYO_ENABLE_BLEND_MODE_ANN` like the annotations that repeat them for readers.
"""

from __future__ import annotations

import uuid
from typing import Any

from esper.leyline import Clock, ContractViolation, EsperError, pb, sign, validate_command, value_label
from esper.tamiyo.model.proposal import GROWTH_ACTIONS, Proposal
from esper.tamiyo.settings import TamiyoSettings

BlendParameters = dict[int, dict[str, float]]  # per blend mode, the parameters a GERMINATE carries


class CommandBuildError(EsperError):
    """A proposal cannot become a command without inventing something."""

    def __init__(self, action: int, reason: str) -> None:
        self.action = action
        self.reason = reason
        super().__init__(f"cannot build a command for {pb.PolicyAction.Name(action)}: {reason}")


_SEED_OPERATIONS = {
    pb.POLICY_ACTION_GERMINATE: pb.SEED_OP_GERMINATE,
    pb.POLICY_ACTION_FOSSILIZE: pb.SEED_OP_FOSSILIZE,
    pb.POLICY_ACTION_CULL: pb.SEED_OP_CULL,
}

_GROWTH_OPERATIONS = {
    pb.POLICY_ACTION_WIDEN: pb.SEED_OP_WIDEN,
    pb.POLICY_ACTION_DEEPEN: pb.SEED_OP_DEEPEN,
}
_GROWTH_ACTIONS_OF = {operation: action for action, operation in _GROWTH_OPERATIONS.items()}


def blend_parameters(settings: TamiyoSettings) -> BlendParameters:
    """The blend parameters of each mode from settings (none when `enable_blend_mode_ann` is off).

    What Kasmina's blender reads: CONFIDENCE's gate, and CHANNEL's starting gate opening.
    """
    if not settings.enable_blend_mode_ann:
        return {}
    return {
        pb.BLEND_MODE_CONFIDENCE: {
            "gate_k": settings.blend_gate_k,
            "gate_tau": settings.blend_gate_tau,
            "alpha_lo": settings.blend_alpha_lo,
            "alpha_hi": settings.blend_alpha_hi,
        },
        pb.BLEND_MODE_CHANNEL: {"channel_alpha_init": settings.blend_channel_alpha_init},
    }


class CommandFactory:
    """Builds and signs commands for one issuer with one key."""

    def __init__(
        self,
        secret: bytes,
        clock: Clock,
        *,
        issuer: str = "tamiyo",
        deadline_ms: int = 1000,
        blend_parameters: BlendParameters | None = None,
    ) -> None:
        self._blend_parameters = dict(blend_parameters or {})
        self._secret = secret
        self._clock = clock
        self._issuer = issuer
        self._deadline_ms = deadline_ms

    def build(
        self, proposal: Proposal, packet: pb.SystemStatePacket, annotations: dict[str, str] | None = None
    ) -> pb.AdaptationCommand:
        """The signed command for `proposal` in the context of `packet` (a growth proposal becomes
        `growth`'s command, carrying `annotations` too)."""
        if proposal.action in GROWTH_ACTIONS:
            return self.growth(
                packet,
                _GROWTH_OPERATIONS[proposal.action],
                proposal.layer_id,
                units=proposal.units,
                init=proposal.growth_init,
                hidden=proposal.hidden,
                alpha_ramp_steps=proposal.alpha_ramp_steps,
                reason=proposal.reason,
                annotations=annotations,
            )
        command = self._command(packet)
        if annotations:
            command.annotations.update(annotations)
        if proposal.reason:
            command.annotations["reason"] = proposal.reason
        action = proposal.action
        if action == pb.POLICY_ACTION_WAIT:
            command.command_type = pb.COMMAND_WAIT
        elif action == pb.POLICY_ACTION_PAUSE:
            command.command_type = pb.COMMAND_PAUSE
        elif action == pb.POLICY_ACTION_ADJUST_LR:
            if not proposal.lr_factor > 0:
                raise CommandBuildError(action, f"lr_factor must be > 0, got {proposal.lr_factor}")
            command.command_type = pb.COMMAND_OPTIMIZER
            command.optimizer_adjustment.optimizer_id = packet.training_run_id
            command.optimizer_adjustment.hyperparameters["lr_factor"] = proposal.lr_factor
        elif action in _SEED_OPERATIONS:
            self._fill_seed_operation(command, proposal, packet)
        else:
            raise CommandBuildError(action, "unknown action")
        command.issued_at.FromNanoseconds(self._clock.wall_ns())
        validate_command(command)
        return sign(command, self._secret, clock=self._clock)

    def growth(
        self,
        packet: pb.SystemStatePacket,
        operation: int,
        layer_id: str,
        *,
        units: int = 0,
        init: int = pb.GROWTH_INIT_GRADMAX,
        hidden: int = 0,
        alpha_ramp_steps: int = 0,
        reason: str = "",
        annotations: dict[str, str] | None = None,
    ) -> pb.AdaptationCommand:
        """The signed WIDEN (`units`, `init`) or DEEPEN (`hidden`) of `layer_id`, a layer of `packet`."""
        action = _GROWTH_ACTIONS_OF.get(operation, pb.POLICY_ACTION_UNSPECIFIED)
        if operation not in (pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN):
            raise CommandBuildError(action, f"{value_label(pb.SeedOperation, operation)} is not a growth")
        layers = [layer.layer_id for layer in packet.topology.layers]
        if layer_id not in layers:
            raise CommandBuildError(action, f"layer {layer_id!r} is not in the packet; layers are {layers}")
        command = self._command(packet, command_type=pb.COMMAND_SEED, target_seed_id=layer_id)
        if annotations:
            command.annotations.update(annotations)
        if reason:
            command.annotations["reason"] = reason
        seed_operation = command.seed_operation
        seed_operation.operation = operation
        seed_operation.alpha_ramp_steps = alpha_ramp_steps
        seed_operation.growth.layer_id = layer_id
        if operation == pb.SEED_OP_WIDEN:
            seed_operation.growth.units = units
            seed_operation.growth.init = init
        else:
            seed_operation.growth.hidden = hidden
        command.issued_at.FromNanoseconds(self._clock.wall_ns())
        try:
            validate_command(command)
        except ContractViolation as exc:
            raise CommandBuildError(action, str(exc)) from exc
        return sign(command, self._secret, clock=self._clock)

    def _command(self, packet: pb.SystemStatePacket, **fields: Any) -> pb.AdaptationCommand:
        """A new, unsigned command of this factory for `packet`'s run, with `fields` set."""
        return pb.AdaptationCommand(
            version=1,
            command_id=f"cmd-{uuid.uuid4().hex}",
            issued_by=self._issuer,
            execution_deadline_ms=self._deadline_ms,
            training_run_id=packet.training_run_id,
            **fields,
        )

    def _fill_seed_operation(
        self, command: pb.AdaptationCommand, proposal: Proposal, packet: pb.SystemStatePacket
    ) -> None:
        action = proposal.action
        if not proposal.slot_id:
            raise CommandBuildError(action, "no slot was chosen")
        # A growth (WIDEN/DEEPEN) is fossilised or culled by its id, as a seed by its slot.
        states = {state.slot_id: state for state in [*packet.seed_states, *packet.growth_states]}
        state = states.get(proposal.slot_id)
        if state is None:
            raise CommandBuildError(action, f"slot {proposal.slot_id!r} is not in the packet")
        operation = command.seed_operation
        operation.operation = _SEED_OPERATIONS[action]
        operation.slot_id = proposal.slot_id
        command.command_type = pb.COMMAND_SEED
        command.target_seed_id = state.seed_id
        if action == pb.POLICY_ACTION_GERMINATE:
            if not proposal.blueprint_id:
                raise CommandBuildError(action, "no blueprint was chosen")
            if proposal.blueprint_id not in packet.blueprint_ids:
                raise CommandBuildError(
                    action, f"blueprint {proposal.blueprint_id!r} is not offered by the packet"
                )
            operation.blueprint_id = proposal.blueprint_id
            operation.blend_mode = proposal.blend_mode
            operation.alpha_ramp_steps = proposal.alpha_ramp_steps
            operation.parameters.update(self._blend_parameters.get(proposal.blend_mode, {}))
        else:
            operation.blueprint_id = state.blueprint_id
