"""`esper.GrowthSession`: growth inside a user's own loop, with the user's optimizer kept whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import esper
from esper.api import GrowInputError, SessionClosed
from esper.tolaria.optimizer import GroupedAdam


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "2000")  # a shared CI core is slow; nothing is timed here
    return tmp_path / "data"


def blobs(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    return x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0).long()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def own_loop(
    session: esper.GrowthSession, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int
) -> None:
    x, y = blobs(448)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for i in range(0, len(x), 32):
            loss = loss_fn(model(x[i : i + 32]), y[i : i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            session.step(loss)


def test_a_session_grows_the_model_and_the_users_optimizer_trains_every_parameter(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with esper.GrowthSession(
        model,
        optimizer,
        blobs(64, seed=1),
        decision_interval=4,
        steps_per_epoch=14,
        epochs=20,
        run_dir=tmp_path / "run",
    ) as session:
        own_loop(session, model, optimizer, epochs=20)
    result = session.result
    assert result is not None
    assert result.summary.steps == 20 * 14
    assert result.summary.params_final > result.summary.params_initial  # a seed was kept
    optimised = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in optimised} == {id(p) for p in trainable}
    kept = [g for g in result.summary.growth_steps if g["outcome"] == "FOSSILIZED"]
    assert kept  # a widen or a seed was kept, and its parameters are the optimizer's
    for parameter in optimised:  # moments extended with the tensors they belong to
        for value in optimizer.state[parameter].values():
            if isinstance(value, Tensor) and value.dim():
                assert value.shape == parameter.shape
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "completed"
    assert (tmp_path / "run" / "model" / "model.json").is_file()
    with pytest.raises(SessionClosed):
        session.step(0.0)


def test_a_session_of_unknown_length_never_counts_itself_near_its_end(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    with esper.GrowthSession(
        model, optimizer, blobs(64), decision_interval=4, run_dir=tmp_path / "run"
    ) as session:
        own_loop(session, model, optimizer, epochs=1)
    decisions = (tmp_path / "run" / "decisions.jsonl").read_text().splitlines()
    assert decisions
    assert not any("of the run is done" in line for line in decisions)


def test_a_failure_in_the_users_loop_marks_the_run_failed(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match="my loop broke"),
        esper.GrowthSession(model, optimizer, blobs(64), run_dir=tmp_path / "run") as session,
    ):
        session.step(1.0)
        raise RuntimeError("my loop broke")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed"
    assert "my loop broke" in status["reason"]


def test_an_optimizer_without_all_the_models_parameters_is_refused(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model[0].parameters())
    with pytest.raises(GrowInputError, match="does not hold the model's parameters"):
        esper.GrowthSession(model, optimizer, blobs(64), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_a_widened_tensor_keeps_its_moments_in_the_users_optimizer(kind: str) -> None:
    layer = nn.Linear(4, 3)
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(layer.parameters())
        if kind == "adam"
        else torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    )
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    before = {
        k: v.clone() for k, v in optimizer.state[layer.weight].items() if isinstance(v, Tensor) and v.dim()
    }
    wrapped = GroupedAdam.wrapping(optimizer)
    assert wrapped.group_names == ["host"]
    appended = nn.Parameter(torch.zeros(2, 4))
    merged = nn.Parameter(torch.cat([layer.weight.detach(), appended.detach()]))
    wrapped.absorb(layer.weight, appended, merged, dim=0)
    state = optimizer.state[merged]
    for key, old in before.items():
        assert torch.equal(state[key][:3], old)  # the old units keep their moments
        assert torch.equal(state[key][3:], torch.zeros(2, 4))  # the new ones start at zero
    assert any(p is merged for p in optimizer.param_groups[0]["params"])
    merged.grad = torch.ones_like(merged)
    layer.bias.grad = torch.ones_like(layer.bias)
    optimizer.step()  # the user's optimizer steps on the merged tensor
