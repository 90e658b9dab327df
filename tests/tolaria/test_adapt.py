"""A user's own nn.Module as a host: growth points found or marked, checked, and grown by Kasmina."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import esper
from esper.kasmina import GrowthMode, IdentityBlock, SeedManager, UnitGroup
from esper.leyline import ManualClock, SignatureVerifier, pb
from esper.tolaria.adapt import AdaptedHost, GrowthPoint, GrowthPointError, NoGrowthPoints, adapt_model
from esper.urza import BlueprintCatalogue
from tests.kasmina.support import RUN_ID, SECRET, fast_settings, germinate, open_catalogue
from tests.kasmina.test_growth_commands import deepen, widen

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


class CustomForward(nn.Module):
    """A custom forward with two marked points: tanh between fc1 and fc2, relu before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.after_fc1 = GrowthPoint("hidden")
        self.fc2 = nn.Linear(12, 9)
        self.after_fc2 = GrowthPoint()
        self.head = nn.Linear(9, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.after_fc1(torch.tanh(self.fc1(x)))
        x = self.after_fc2(torch.relu(self.fc2(x)))
        out: Tensor = self.head(x)
        return out


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 9), nn.GELU(), nn.Linear(9, 3)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    )


# (builder, example input, slot seeded, its blueprint, layer widened, layer deepened)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Tensor], str, str, str, str]] = {
    "mlp": (mlp, lambda: torch.randn(16, 10), "p1", "mlp_small", "3", "1"),
    "cnn": (cnn, lambda: torch.randn(16, 1, 8, 8), "p2", "conv_residual", "2", "0"),
    "custom": (CustomForward, lambda: torch.randn(16, 10), "hidden", "lowrank", "fc2", "fc1"),
}


def _manager(host: AdaptedHost, catalogue: BlueprintCatalogue, clock: ManualClock) -> SeedManager:
    verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=clock)
    return SeedManager(host.slots(), catalogue, verifier, fast_settings(), training_run_id=RUN_ID, host=host)


@pytest.mark.parametrize("case", list(CASES))
def test_seed_widen_and_deepen_keep_the_adapted_models_function_and_new_units_learn(
    case: str, tmp_path: Path
) -> None:
    build, example, slot_id, blueprint, widened, deepened = CASES[case]
    torch.manual_seed(0)
    x = example()
    host = adapt_model(build(), x)
    with torch.no_grad():
        before = host(x)
    clock = ManualClock()
    manager = _manager(host, open_catalogue(tmp_path), clock)
    for command in (
        germinate(clock, slot_id, blueprint),
        widen(clock, widened, init=pb.GROWTH_INIT_RANDOM),
        deepen(clock, deepened),
    ):
        result = manager.apply(command, step=1)
        assert result.accepted, result.detail
    host.train()
    slot = next(s for s in host.slots() if s.slot_id == slot_id)
    for step in (1, 2):  # germinated (G0 checks the seed's output), then training (incubating)
        host.zero_grad()
        after = host(x)
        assert torch.allclose(after, before, atol=1e-6, rtol=0.0)
        manager.advance(step)
    assert manager.stage(slot_id) == pb.SEED_STAGE_TRAINING
    after.square().sum().backward()  # type: ignore[no-untyped-call]
    assert slot.seed is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in slot.seed.parameters())
    growths = [m for m in host.modules() if isinstance(m, UnitGroup | IdentityBlock)]
    assert {type(m) for m in growths} == {UnitGroup, IdentityBlock}
    for module in growths:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), type(module).__name__


def test_a_merged_widen_keeps_the_function_of_the_units_it_carried() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 10)
    host = adapt_model(CustomForward(), x)
    site = host.widen_site("fc1")
    group = UnitGroup(site, torch.randn(3, 10), torch.randn(3))
    with torch.no_grad():
        group.fan_out_weight.normal_()
    group.attach()
    group.mode = GrowthMode.LIVE
    with torch.no_grad():
        live = host(x)
    group.merge()
    assert host.host_layers()[0][2] == 15  # fc1 is 15 wide now, and its point's slot with it
    assert next(s for s in host.slots() if s.slot_id == "hidden").width == 15
    with torch.no_grad():
        assert torch.allclose(host(x), live, atol=1e-6, rtol=0.0)


def test_found_points_keep_the_users_parameter_names() -> None:
    model = mlp()
    names = [name for name, _ in model.named_parameters()]
    host = adapt_model(model, torch.randn(4, 10))
    assert [name for name, _ in host.model.named_parameters()] == names
    assert [slot.slot_id for slot in host.slots()] == ["p1", "p2"]
    assert [layer_id for layer_id, *_ in host.host_layers()] == ["1", "3", "5"]
    topology = host.topology()
    assert [list(layer.growth_operations) for layer in topology.layers] == [
        [pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN],
        [pb.SEED_OP_WIDEN, pb.SEED_OP_DEEPEN],
        [],
    ]


def test_a_model_without_growth_points_is_refused_before_training() -> None:
    with pytest.raises(NoGrowthPoints, match="no growth point"):
        adapt_model(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))


class NormalisedBetween(nn.Module):
    """A marked point whose input is a layer norm of fc1's output, not an activation of it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.point = GrowthPoint("after_norm")
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.point(torch.relu(self.norm(self.fc1(x)))))
        return out


class GroupedProducer(nn.Module):
    """A marked point after a grouped convolution, which cannot take new channels apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1, groups=2)
        self.point = GrowthPoint("grouped")
        self.conv2 = nn.Conv1d(8, 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv2(self.point(torch.relu(self.conv1(x))))
        return out


class NoConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.point = GrowthPoint("last")

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.point(torch.relu(self.fc(x)))
        return out


class SameNames(CustomForward):
    """Two marked points given one name."""

    def __init__(self) -> None:
        super().__init__()
        self.after_fc2 = GrowthPoint("hidden")


@pytest.mark.parametrize(
    ("model", "example", "point", "reason"),
    [
        (SameNames, lambda: torch.randn(5, 10), "hidden", "another growth point has the same name"),
        (NormalisedBetween, lambda: torch.randn(5, 6), "after_norm", "something\\s+else happens between"),
        (GroupedProducer, lambda: torch.randn(5, 4, 7), "grouped", "'conv1' cannot be widened: .*grouped"),
        (NoConsumer, lambda: torch.randn(5, 4), "last", "no Linear/Conv layer runs after it"),
    ],
)
def test_a_marked_point_that_cannot_be_grown_names_itself_and_the_reason(
    model: Callable[[], nn.Module], example: Callable[[], Tensor], point: str, reason: str
) -> None:
    with pytest.raises(GrowthPointError, match=reason) as caught:
        adapt_model(model(), example())
    assert caught.value.point == point


def test_esper_growth_point_is_lazy_and_leaves_pyg_and_the_controller_unloaded() -> None:
    assert esper.GrowthPoint is GrowthPoint
    assert "GrowthPoint" in esper.__all__
    code = (
        "import sys, esper\n"
        "heavy = [m for m in sys.modules if m.startswith(('torch', 'google', 'pydantic', 'esper.leyline'))]\n"
        "assert not heavy, heavy\n"
        "esper.GrowthPoint()\n"
        "assert not [m for m in sys.modules if m.startswith(('torch_geometric', 'esper.tamiyo'))]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_a_refused_model_is_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    before = [type(m) for m in model.modules()]
    with pytest.raises(GrowthPointError, match="a Linear on every token"):
        adapt_model(model, torch.randn(3, 5, 4))  # [N, T, C]: a Linear applied per token
    assert [type(m) for m in model.modules()] == before
    marked = GroupedProducer()
    with pytest.raises(GrowthPointError):
        adapt_model(marked, torch.randn(5, 4, 7))
    assert marked.point.slot is None
