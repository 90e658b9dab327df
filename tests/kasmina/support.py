"""Helpers for Kasmina's tests: a tiny host with two slots, fast settings and signed commands."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import Tensor, nn

from esper.kasmina import KasminaSettings, SeedManager, SeedSlot
from esper.leyline import Clock, ManualClock, SignatureVerifier, load_settings, pb, sign
from esper.urza import BlueprintCatalogue

SECRET = b"kasmina-test-secret-0123456789"
RUN_ID = "run-test"


def fast_settings(**overrides: float) -> KasminaSettings:
    """Short dwell times so a whole lifecycle fits in a few dozen steps."""
    values: dict[str, float] = {
        "min_training_steps": 4,
        "improvement_window": 1,
        "default_alpha_ramp_steps": 6,
        "min_shadowing_steps": 2,
        "probation_steps": 3,
        "embargo_steps": 5,
    }
    values.update(overrides)
    return load_settings(KasminaSettings, environ={}, **values)


class TinyHost(nn.Module):
    """6 features -> linear(8) -> ReLU -> slot a -> linear(8) -> ReLU -> slot b -> linear(3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.a = SeedSlot("a", 8, "mlp", layer_id="fc1", depth=0)
        self.fc2 = nn.Linear(8, 8)
        self.b = SeedSlot("b", 8, "mlp", layer_id="fc2", depth=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.a(torch.relu(self.fc1(x)))
        x = self.b(torch.relu(self.fc2(x)))
        out: Tensor = self.head(x)
        return out

    def host_parameters(self) -> list[nn.Parameter]:
        """The host's own parameters (seeds excluded)."""
        return [*self.fc1.parameters(), *self.fc2.parameters(), *self.head.parameters()]


def open_catalogue(tmp_path: Path) -> BlueprintCatalogue:
    """A fresh catalogue with the built-in blueprints."""
    return BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")


def make_manager(
    host: TinyHost, catalogue: BlueprintCatalogue, clock: Clock, settings: KasminaSettings | None = None
) -> SeedManager:
    """A manager over the tiny host's slots, verifying with the test secret on `clock`."""
    verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=clock)
    return SeedManager(
        [host.a, host.b], catalogue, verifier, settings or fast_settings(), training_run_id=RUN_ID
    )


_COMMAND_IDS = itertools.count(1)


def command(
    clock: Clock,
    operation: int,
    slot_id: str,
    target_seed_id: str,
    *,
    blueprint_id: str = "",
    blend_mode: int = pb.BLEND_MODE_RESIDUAL,
    alpha_ramp_steps: int = 0,
    secret: bytes = SECRET,
    run_id: str = RUN_ID,
    parameters: dict[str, float] | None = None,
) -> pb.AdaptationCommand:
    """A signed seed command."""
    message = pb.AdaptationCommand(
        version=1,
        command_id=f"cmd-{next(_COMMAND_IDS)}",
        command_type=pb.COMMAND_SEED,
        issued_by="test",
        target_seed_id=target_seed_id,
        training_run_id=run_id,
    )
    op = message.seed_operation
    op.operation = operation
    op.slot_id = slot_id
    op.blueprint_id = blueprint_id
    op.blend_mode = blend_mode
    op.alpha_ramp_steps = alpha_ramp_steps
    if parameters:
        op.parameters.update(parameters)
    message.issued_at.FromNanoseconds(clock.wall_ns())
    return sign(message, secret, clock=clock)


def germinate(
    clock: Clock, slot_id: str = "a", blueprint_id: str = "mlp_small", **kw: object
) -> pb.AdaptationCommand:
    """A signed GERMINATE of a dormant slot."""
    return command(clock, pb.SEED_OP_GERMINATE, slot_id, slot_id, blueprint_id=blueprint_id, **kw)  # type: ignore[arg-type]


def new_clock() -> ManualClock:
    """A manual clock."""
    return ManualClock()


def task(seed: int = 0, n: int = 96) -> tuple[Tensor, Tensor]:
    """A small nonlinear 3-class problem on 6 features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = ((x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()).clamp(max=2)
    return x, y


def train_step(
    host: TinyHost,
    manager: SeedManager,
    optimizer: torch.optim.Optimizer,
    batch: tuple[Tensor, Tensor],
    step: int,
) -> float:
    """One step as Tolaria does it: forward, backward, observe, optimizer step, advance, new params in."""
    x, y = batch
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(host(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    manager.observe_backward(step)
    optimizer.step()
    manager.advance(step)
    changes = manager.drain_parameter_changes()
    for _, params in changes.added:
        optimizer.add_param_group({"params": list(params)})
    return float(loss.detach())
