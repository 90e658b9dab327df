"""`esper.grow` on a user's own model: it grows, returns the model and writes a normal run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import esper
from esper.api import GrowInputError
from esper.cli import app
from esper.tolaria.adapt import NoGrowthPoints

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "2000")  # a shared CI core is slow; nothing is timed here
    return tmp_path / "data"


def blobs(n: int, features: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0).long()
    return x, y


def images(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    x[y == 1, :, :4] += 0.3  # class 1 is a little brighter in the top half (hard enough to plateau)
    return x, y


QUICK: dict[str, Any] = {"epochs": 20, "decision_interval": 4}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def test_grow_grows_an_mlp_and_writes_a_run_dir_esper_report_renders(tmp_path: Path) -> None:
    model = mlp()
    train = DataLoader(TensorDataset(*blobs(256)), batch_size=32, shuffle=True)
    result = esper.grow(model, train, blobs(64, seed=1), run_dir=tmp_path / "run", **QUICK)

    assert result.model is model
    assert result.summary.status == "completed"
    assert result.summary.seeds_germinated >= 1
    assert result.summary.params_final > result.summary.params_initial  # a seed was kept
    assert result.metric == ("val_accuracy", result.summary.final_val_accuracy)
    assert json.loads((result.run_dir / "status.json").read_text())["status"] == "completed"
    assert json.loads((result.run_dir / "config.json").read_text())["host"] == "user"
    rendered = CliRunner().invoke(app, ["report", str(result.run_dir)])
    assert rendered.exit_code == 0, rendered.output
    assert (result.run_dir / "report" / "report.md").is_file()
    listed = CliRunner().invoke(app, ["runs", "--runs-dir", str(tmp_path), "--json"], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert result.summary.run_id in listed.output


def test_grow_creates_the_signing_key_and_catalogue_in_the_data_dir(tmp_path: Path, data_dir: Path) -> None:
    esper.grow(mlp(), blobs(64), blobs(32, seed=1), epochs=1, run_dir=tmp_path / "run")
    assert (data_dir / "signing.key").is_file()
    assert (data_dir / "urza.sqlite3").is_file()


def test_grow_grows_a_cnn(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 2),
    )
    result = esper.grow(
        cnn, images(128), images(32, seed=1), batch_size=16, run_dir=tmp_path / "run", **QUICK
    )
    assert result.summary.seeds_germinated >= 1
    assert result.model(torch.randn(2, 1, 8, 8)).shape == (2, 2)


class CustomForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 8)
        self.point = esper.GrowthPoint("hidden")
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.point(torch.tanh(self.encoder(x))))


def test_grow_grows_a_custom_forward_at_its_growth_point(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = esper.grow(CustomForward(), blobs(256), blobs(64, seed=1), run_dir=tmp_path / "run", **QUICK)
    assert [slot.slot_id for slot in result.host.slots()] == ["hidden"]
    assert result.summary.seeds_germinated >= 1
    assert CliRunner().invoke(app, ["report", str(result.run_dir)]).exit_code == 0


def test_grow_reads_a_loader_with_a_custom_collate(tmp_path: Path) -> None:
    x, y = blobs(96)
    samples = [{"features": x[i].tolist(), "label": int(y[i])} for i in range(len(x))]

    def collate(batch: list[dict[str, Any]]) -> dict[str, Tensor]:
        return {
            "inputs": torch.tensor([s["features"] for s in batch]),
            "targets": torch.tensor([s["label"] for s in batch]),
        }

    loader = DataLoader(samples, batch_size=16, collate_fn=collate)  # type: ignore[arg-type]
    result = esper.grow(mlp(), loader, loader, epochs=2, run_dir=tmp_path / "run")
    assert result.summary.steps == 2 * 6  # 96 samples in batches of the loader's 16
    assert result.task == "classification"


def test_grow_trains_an_mse_regression_and_reports_its_loss(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=generator)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    result = esper.grow(
        model, (x[:96], y[:96]), (x[96:], y[96:]), loss_fn=nn.MSELoss(), epochs=8, run_dir=tmp_path / "run"
    )
    assert result.task == "other"
    name, value = result.metric
    assert name == "val_loss"
    assert value == result.summary.final_val_loss
    assert value < float(nn.functional.mse_loss(torch.zeros_like(y[96:]), y[96:]))  # it learned
    assert result.summary.final_val_accuracy == 0.0  # accuracy does not apply


def test_a_model_without_growth_points_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    with pytest.raises(NoGrowthPoints):
        esper.grow(nn.Sequential(nn.Linear(16, 3)), blobs(64), blobs(32), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_loader_of_the_wrong_shape_is_refused_before_training(tmp_path: Path) -> None:
    model = mlp()
    x, y = blobs(64, features=10)
    with pytest.raises(GrowInputError, match="cannot run on its inputs of shape"):
        esper.grow(model, DataLoader(TensorDataset(x, y), batch_size=16), blobs(32), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not any(isinstance(m, esper.GrowthPoint) for m in model.modules())  # left as it was


def test_targets_the_loss_cannot_take_are_refused_before_training(tmp_path: Path) -> None:
    x, _ = blobs(64)
    with pytest.raises(GrowInputError, match="the loss cannot be computed"):
        esper.grow(mlp(), (x, torch.zeros(64, 7)), blobs(32), loss_fn=nn.MSELoss(), run_dir=tmp_path / "r")


def test_batches_of_different_sample_shapes_are_refused(tmp_path: Path) -> None:
    batches = [(torch.randn(8, 16), torch.zeros(8).long()), (torch.randn(8, 12), torch.zeros(8).long())]
    with pytest.raises(GrowInputError, match="batch 1"):
        esper.grow(mlp(), batches, blobs(32), run_dir=tmp_path / "run")


def test_export_reloads_without_kasmina_with_equal_outputs(tmp_path: Path) -> None:
    result = esper.grow(mlp(), blobs(256), blobs(64, seed=1), run_dir=tmp_path / "run", **QUICK)
    out = result.export(tmp_path / "exported")
    x, _ = blobs(16, seed=2)
    result.model.eval()
    with torch.no_grad():
        expected = result.model(x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    via_cli = CliRunner().invoke(app, ["export", str(result.run_dir), "--out", str(tmp_path / "cli")])
    assert via_cli.exit_code == 0, via_cli.output
    probe = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO / 'src' / 'esper')!r})\n"
        "import portable\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        f"for d in ({str(out)!r}, {str(tmp_path / 'cli')!r}):\n"
        "    with torch.no_grad():\n"
        "        assert torch.allclose(portable.load(d)(x), expected, atol=1e-6)\n"
        "assert not any(m.startswith('esper') for m in sys.modules), sorted(sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr


def test_a_host_with_conv_and_linear_points_is_offered_blueprints_of_both_kinds(tmp_path: Path) -> None:
    from esper.assembly.run import offered_blueprints
    from esper.urza import BlueprintCatalogue

    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 2),
    )
    host = esper.adapt_model(cnn, torch.randn(2, 1, 8, 8))
    assert [slot.kind for slot in host.slots()] == ["conv", "conv", "mlp"]
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    try:
        offer = offered_blueprints(catalogue, host)
        assert set(catalogue.ids_for("conv")) | set(catalogue.ids_for("mlp")) == set(offer)
        assert len(offer) == len(set(offer))
    finally:
        catalogue.close()


def test_esper_export_of_a_user_run_without_its_saved_model_says_why(tmp_path: Path) -> None:
    result = esper.grow(mlp(), blobs(64), blobs(32, seed=1), epochs=1, run_dir=tmp_path / "run")
    for saved in (result.run_dir / "model").iterdir():
        saved.unlink()
    refused = CliRunner().invoke(app, ["export", str(result.run_dir), "--out", str(tmp_path / "out")])
    assert refused.exit_code != 0
    assert "the model it saved when it ended" in refused.output
