"""The run's device: resolved once, refused at start when absent, followed by every tensor of the run;
checkpoints resume on another device (simulated on `meta`: loading puts tensors where the parameters are)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from esper.assembly import run_directory
from esper.assembly.run import run_device
from esper.cli import app
from esper.kasmina import KasminaSettings, SeedManager
from esper.leyline import ConfigurationError, SignatureVerifier, load_settings, pb
from esper.nissa.layout import RunLayout
from esper.tolaria import device as device_module
from esper.tolaria.data import Dataset, make_task
from esper.tolaria.device import DeviceUnavailable, module_device, resolve_device
from esper.tolaria.hosts import build_host
from esper.tolaria.settings import TolariaSettings
from esper.tolaria.trainer import Trainer
from esper.urza import BlueprintCatalogue
from tests.tolaria.test_growth_resume import RUN_ID, SECRET, GrowthController

torch.set_num_threads(1)


def test_auto_picks_cuda_when_present_and_the_cpu_otherwise() -> None:
    assert resolve_device("auto", cuda_devices=lambda: 0) == torch.device("cpu")
    assert resolve_device("auto", cuda_devices=lambda: 2) == torch.device("cuda", 0)
    assert resolve_device("cpu", cuda_devices=lambda: 2) == torch.device("cpu")
    assert resolve_device("cuda:1", cuda_devices=lambda: 2) == torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("spec", "count", "says"),
    [
        ("cuda", 0, "CUDA is not available"),
        ("cuda:0", 0, "CUDA is not available"),
        ("cuda:2", 2, "cuda:0 to cuda:1"),
        ("gpu", 1, "use auto, cpu, cuda or cuda:N"),
    ],
)
def test_a_device_this_machine_lacks_is_a_configuration_error(spec: str, count: int, says: str) -> None:
    with pytest.raises(DeviceUnavailable, match=says) as caught:
        resolve_device(spec, cuda_devices=lambda: count)
    assert isinstance(caught.value, ConfigurationError) and caught.value.spec == spec


def test_the_setting_refuses_a_name_that_is_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLARIA_DEVICE", raising=False)
    assert load_settings(TolariaSettings).device == "auto"
    monkeypatch.setenv("TOLARIA_DEVICE", "cuda:1")
    assert load_settings(TolariaSettings).device == "cuda:1"
    monkeypatch.setenv("TOLARIA_DEVICE", "tpu")
    with pytest.raises(ConfigurationError, match="TOLARIA_DEVICE"):
        load_settings(TolariaSettings)


def test_esper_run_with_cuda_absent_fails_at_start_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device_module, "_cuda_count", lambda: 0)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["run", "--device", "cuda", "--epochs", "1", "--run-dir", str(run_dir), "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in " ".join(result.output.split())
    assert not run_dir.exists()


def test_a_resumed_run_takes_the_device_asked_for_not_the_saved_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved config wins on resume, except for where the run computes: `--device` applies (here a
    CUDA device this machine lacks, refused before the run is touched)."""
    monkeypatch.setattr(device_module, "_cuda_count", lambda: 0)
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    run_dir = tmp_path / "run"
    common = ["run", "--epochs", "1", "--run-dir", str(run_dir), "--no-progress", "--no-report"]
    first = CliRunner().invoke(app, [*common, "--device", "cpu"])
    assert first.exit_code == 0, first.output
    status = (run_dir / "status.json").read_text(encoding="utf-8")
    resumed = CliRunner().invoke(app, [*common, "--resume", "--device", "cuda"])
    assert resumed.exit_code == 2, resumed.output
    assert "CUDA is not available" in " ".join(resumed.output.split())
    assert (run_dir / "status.json").read_text(encoding="utf-8") == status
    again = CliRunner().invoke(app, [*common, "--resume", "--device", "cpu"])
    assert again.exit_code == 0, again.output


def test_a_users_model_keeps_its_device_and_a_conflicting_setting_is_refused() -> None:
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    assert run_device("auto", model) == torch.device("meta")
    with pytest.raises(DeviceUnavailable, match="lies on meta"):
        run_device("cpu", model)
    assert model.weight.device.type == "meta"  # nothing was moved


def test_a_model_spread_over_two_devices_is_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2).to("meta"))
    with pytest.raises(DeviceUnavailable, match="several devices"):
        module_device(model)


def test_a_dataset_moves_to_a_device_whole() -> None:
    dataset = make_task(0.3, 0, n_features=4, n_classes=2, n_samples=40)
    moved = dataset.to(torch.device("meta"))
    for tensor in (moved.x_train, moved.y_train, moved.x_val, moved.y_val):
        assert tensor.device.type == "meta"
    assert dataset.to(torch.device("cpu")) is dataset


def _trainer(run_dir: Path, dataset: Dataset, catalogue: BlueprintCatalogue, device: str) -> Trainer:
    settings = load_settings(
        TolariaSettings, environ={}, epochs=4, batch_size=32, decision_interval=3, seed=1, device="cpu"
    )
    torch.manual_seed(settings.seed)
    host = build_host("mlp", dataset.input_shape, dataset.num_classes).to(device)
    kasmina = load_settings(
        KasminaSettings,
        environ={},
        min_training_steps=3,
        improvement_window=1,
        min_shadowing_steps=1,
        probation_steps=2,
        growth_statistics_steps=2,
        min_contribution_loss=-1.0,
        contribution_accuracy_tolerance=1.0,
    )
    manager = SeedManager(
        host.slots(), catalogue, SignatureVerifier(SECRET), kasmina, training_run_id=RUN_ID, host=host
    )
    return Trainer(
        settings=settings,
        dataset=dataset,
        host=host,
        manager=manager,
        controller=GrowthController(pb.SEED_OP_WIDEN),
        blueprint_ids=catalogue.ids_for("mlp"),
        run_dir=run_directory(RunLayout(run_dir)),
        training_run_id=RUN_ID,
    )


def test_a_checkpoint_written_on_one_device_resumes_on_another(tmp_path: Path) -> None:
    """Trained on the CPU through a WIDEN, resumed with the host on `meta` (standing in for a GPU): the
    grown units, the optimizer's moments and every parameter land on the new device; the checkpoint's
    own tensors are on the CPU, whatever device wrote them."""
    dataset = make_task(0.3, 0, n_features=8, n_classes=3, n_samples=320)
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    try:
        trained = _trainer(tmp_path / "run", dataset, catalogue, "cpu")
        trained.fit()
        trained.run_dir.close()
        checkpoint = trained.store.latest()
        assert checkpoint is not None
        assert {tensor.device.type for tensor in checkpoint.tensors.values()} == {"cpu"}
        assert (
            checkpoint.meta["manager"]["growth"]["growths"] or checkpoint.meta["manager"]["growth"]["widths"]
        )
        resumed = _trainer(tmp_path / "run", dataset, catalogue, "meta")
        assert resumed.device == torch.device("meta")
        assert resumed.resume() and resumed.step == trained.step
        for name, tensor in [*resumed.host.named_parameters(), *resumed.host.named_buffers()]:
            assert tensor.device.type == "meta", name
        state = resumed.optimizer.optimizer.state
        assert state
        for entry in state.values():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and key != "step":  # Adam keeps its step count on the CPU
                    assert value.device.type == "meta", key
        resumed.run_dir.close()
    finally:
        catalogue.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_run_trained_on_cuda_resumes_on_the_cpu(tmp_path: Path) -> None:
    dataset = make_task(0.3, 0, n_features=8, n_classes=3, n_samples=320)
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    try:
        trained = _trainer(tmp_path / "run", dataset.to(torch.device("cuda")), catalogue, "cuda")
        assert trained.device.type == "cuda"
        trained.fit()
        trained.run_dir.close()
        for name, tensor in [*trained.host.named_parameters(), *trained.host.named_buffers()]:
            assert tensor.device.type == "cuda", name
        checkpoint = trained.store.latest()
        assert checkpoint is not None and "rng.cuda" in checkpoint.tensors
        assert {tensor.device.type for tensor in checkpoint.tensors.values()} == {"cpu"}
        resumed = _trainer(tmp_path / "run", dataset, catalogue, "cpu")
        assert resumed.resume() and resumed.step == trained.step
        for name, tensor in [*resumed.host.named_parameters(), *resumed.host.named_buffers()]:
            assert tensor.device.type == "cpu", name
        resumed.run_dir.close()
    finally:
        catalogue.close()
