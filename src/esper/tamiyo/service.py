"""TamiyoService: routes a packet through validation, the policy and the command factory.

The service orchestrates; each step is a component of its own. `evaluate_step` is the only entry point.
"""

from __future__ import annotations

from esper.leyline import SYSTEM_CLOCK, Clock, pb, validate_packet
from esper.tamiyo.commands import CommandFactory
from esper.tamiyo.proposal import Policy
from esper.tamiyo.settings import TamiyoSettings


class TamiyoService:
    """The controller a trainer talks to: one signed command per state packet."""

    def __init__(
        self, settings: TamiyoSettings, policy: Policy, secret: bytes, *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.settings = settings
        self._policy = policy
        self._commands = CommandFactory(secret, clock)

    @property
    def policy_version(self) -> str:
        """Version of the policy currently deciding."""
        return self._policy.version

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        """Decide for one packet and return the signed command."""
        validate_packet(packet)
        proposal = self._policy.propose(packet)
        return self._commands.build(proposal, packet)
