"""The counterfactual contribution of a widen's units, measured by the trainer's evaluation (the seeds'
code path): accuracy with the units minus with their contribution zeroed, on a host small enough to
work out by hand, and nothing of the host changed by measuring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from esper.kasmina import Bridge, DeepenSite, GrowthNotApplicable, SeedManager, UnitGroup, WidenSite
from esper.kasmina.lifecycle import PROBATIONARY
from esper.leyline import ManualClock, SignatureVerifier, pb
from esper.tolaria.evaluation import evaluate
from tests.kasmina.support import RUN_ID, SECRET, fast_settings, open_catalogue
from tests.kasmina.test_growth_commands import widen


class OneUnitHost(nn.Module):
    """x (1 feature) -> fc (1 unit, weights 0) -> ReLU -> head (2 classes, bias favouring class 0).

    Alone it always says class 0. Widened by one unit that passes x (fan-in 1, fan-out [0, 1]) it says
    class 1 where relu(x) > 0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.zero_()
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.1, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(torch.relu(self.fc(x)))
        return out

    def widen_site(self, layer_id: str) -> WidenSite:
        if layer_id != "fc":
            raise GrowthNotApplicable("widen", f"no layer {layer_id!r}")
        return WidenSite("fc", self.fc, self.head, "relu", Bridge(), None)

    def deepen_site(self, layer_id: str) -> DeepenSite:
        raise GrowthNotApplicable("deepen", "this host does not deepen")


def test_a_widens_contribution_is_what_zeroing_its_units_changes_and_nothing_moves(tmp_path: Path) -> None:
    clock = ManualClock()
    host = OneUnitHost()
    verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=clock)
    manager = SeedManager(
        [], open_catalogue(tmp_path), verifier, fast_settings(), training_run_id=RUN_ID, host=host
    )
    assert manager.apply(widen(clock, "fc", units=1, init=pb.GROWTH_INIT_RANDOM), step=0).accepted
    growth = manager.growth("fc:w1")
    group = growth.module
    assert isinstance(group, UnitGroup)
    with torch.no_grad():
        group.fan_in_weight.fill_(1.0)
        assert group.fan_in_bias is not None
        group.fan_in_bias.zero_()
        group.fan_out_weight.copy_(torch.tensor([[0.0], [1.0]]))
    growth.lifecycle.stage = PROBATIONARY  # what a keep sees: the units in full (alpha 1), not yet merged
    growth.sync()
    assert manager.measurable_slots() == ["fc:w1"]

    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    y = torch.tensor([0, 0, 1, 1])
    # By hand: with the unit the logits are [0.1, relu(x)], all four right; without it [0.1, 0], class 0
    # everywhere, two right.
    with_unit = torch.tensor([[0.1, 0.0], [0.1, 0.0], [0.1, 1.0], [0.1, 2.0]])
    without_unit = torch.tensor([[0.1, 0.0]] * 4)
    before = {name: value.clone() for name, value in host.state_dict().items()}
    outputs = host(x).detach().clone()
    torch.testing.assert_close(outputs, with_unit)

    evaluation = evaluate(host, manager, x, y, batch_size=3)

    assert evaluation.accuracy == 1.0
    contribution = evaluation.contributions["fc:w1"]
    assert contribution.accuracy == pytest.approx(1.0 - 0.5)
    loss_with = float(nn.functional.cross_entropy(with_unit, y))
    loss_without = float(nn.functional.cross_entropy(without_unit, y))
    assert contribution.loss == pytest.approx(loss_without - loss_with)
    # Measuring changed nothing: every weight (the units' included), the group's mode, the host's output.
    after = host.state_dict()
    assert sorted(after) == sorted(before) and any(name.startswith("growth.") for name in after)
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert (group.mode, group.alpha) == (group.mode.BLEND, 1.0)
    assert torch.equal(host(x).detach(), outputs)
