"""The run assembly: one bus connection and one catalogue per run, a summary counted as the run went,
the host, data and loss as inputs, and RUN_DIR/status.json for every way a run ends (issues 19, 22)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from esper.assembly import RunAssembly, RunInputs
from esper.cli import INTERRUPTED_EXIT
from esper.nissa.log import JsonlLog
from esper.oona import EmbeddedBus
from esper.tolaria.run import load_task
from esper.urza import BlueprintCatalogue
from tests.conftest import esper_run
from tests.integration.run_worker import SECRET, assembled_run, config, controller, run_settings

REPO = Path(__file__).resolve().parents[2]


def counting(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, *, classmethod_: bool = False
) -> list[int]:
    """Count the calls of `owner.name` (a method, or a classmethod) from now on."""
    calls: list[int] = []
    original = getattr(owner, name)

    if classmethod_:

        def counted_class(cls: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, classmethod(counted_class))
    else:

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


def test_esper_run_opens_one_bus_connection_and_the_catalogue_once(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buses = counting(monkeypatch, EmbeddedBus, "__init__")
    catalogues = counting(monkeypatch, BlueprintCatalogue, "open_default", classmethod_=True)
    result = esper_run("--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert len(buses) == 1
    assert len(catalogues) == 1


def test_the_summary_is_counted_as_the_run_goes_not_read_back_from_its_event_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable(self: JsonlLog) -> list[dict[str, Any]]:
        raise AssertionError(f"{self.path.name} was read back by the process that wrote it")

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(JsonlLog, "read", unreadable)
        summary = assembled_run(config(run_dir, epochs=2), controller())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    reached: dict[str, int] = {}
    for event in events:
        if event["kind"] == "transition":
            reached[event["to_stage"]] = reached.get(event["to_stage"], 0) + 1
    assert reached  # the scripted controller germinates and culls
    assert summary.transitions == reached
    assert summary.seeds_germinated == reached["GERMINATED"] and summary.seeds_culled == reached["CULLED"]
    # Fossilised seeds and growths are counted like germinated and culled ones: one lifecycle, one count.
    assert summary.seeds_fossilized == reached.get("FOSSILIZED", 0)
    assert json.loads((run_dir / "summary.json").read_text()) == summary.to_json()


def test_the_host_the_data_and_the_loss_are_inputs_of_the_assembly(tmp_path: Path) -> None:
    """A Python caller's own host and loss: the loss is what the trainer minimises and reports."""
    run_config = config(tmp_path / "run", epochs=1)
    dataset = load_task("digits", "mlp", seed=0, difficulty=0.5)
    calls: list[int] = []

    def doubled_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
        calls.append(1)
        return 2 * torch.nn.functional.cross_entropy(output, target)

    with RunAssembly(
        run_settings(tmp_path),
        run_config,
        secret=SECRET,
        inputs=RunInputs(dataset, loss=doubled_cross_entropy),
        controller=controller(),
        deployment=False,
    ) as run:
        summary = run.train()
        assert run.trainer is not None
        host = run.trainer.host.eval()
        with torch.no_grad():
            cross_entropy = torch.nn.functional.cross_entropy(host(dataset.x_val), dataset.y_val)
    assert calls and summary.task == dataset.name
    assert summary.final_val_loss == pytest.approx(2 * float(cross_entropy), rel=1e-4)


def status_of(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "status.json").read_text())
    return data


def test_a_completed_run_says_so_in_its_status_file(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = esper_run("--run-dir", str(run_dir))
    assert result.exit_code == 0, result.output
    status = status_of(run_dir)
    assert status["status"] == "completed" and status["reason"] is None
    assert status["pid"] == os.getpid() and status["started_at"] <= status["finished_at"]
    assert isinstance(status["command"], str) and status["command"]


def test_a_run_whose_host_fails_mid_run_is_marked_failed_and_says_how_to_resume(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import esper.assembly.run
    from esper.tolaria.run import config_host as real_config_host

    def failing_host(*args: Any, **kwargs: Any) -> Any:
        host = real_config_host(*args, **kwargs)
        forward = host.forward
        calls: list[int] = []

        def breaks_on_the_tenth_batch(x: Tensor) -> Tensor:
            calls.append(1)
            if len(calls) == 10:
                raise RuntimeError("the host's device went away")
            result: Tensor = forward(x)
            return result

        host.forward = breaks_on_the_tenth_batch
        return host

    monkeypatch.setattr(esper.assembly.run, "config_host", failing_host)
    run_dir = tmp_path / "run"
    result = esper_run("--run-dir", str(run_dir))
    assert isinstance(result.exception, RuntimeError)
    status = status_of(run_dir)
    assert status["status"] == "failed"
    assert status["reason"] == "RuntimeError: the host's device went away"
    assert status["finished_at"] is not None
    shown = " ".join(result.output.split())
    assert f"run directory: {run_dir}" in shown
    assert f"continue with: esper run --resume --run-dir {run_dir}" in shown
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_ctrl_c_marks_the_run_halted_and_prints_the_resume_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),  # this tree's code
        "ESPER_DATA_DIR": str(tmp_path / "data"),
        "ESPER_SIGNING_SECRET": "assembly-test-secret-0123456789",
    }
    command = [sys.executable, "-c", "from esper.cli import main; main()", "run", "--epochs", "500"]
    process = subprocess.Popen(
        [*command, "--no-progress", "--no-report", "--run-dir", str(run_dir)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("checkpoints/ckpt-*.json")):  # training has begun
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.05)
        assert status_of(run_dir)["status"] == "running"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == INTERRUPTED_EXIT, output
    status = status_of(run_dir)
    assert status["status"] == "halted" and status["reason"] == "interrupted (Ctrl-C)"
    assert status["pid"] == process.pid
    shown = " ".join(output.split())
    assert f"continue with: esper run --resume --run-dir {run_dir}" in shown
    assert "Traceback" not in output


def test_a_run_whose_summary_cannot_be_written_is_marked_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import esper.assembly.run

    real_write_json = esper.assembly.run.write_json

    def full_disk_at_the_summary(path: Path, data: dict[str, Any]) -> None:
        if path.name == "summary.json":
            raise OSError(28, "No space left on device")
        real_write_json(path, data)

    monkeypatch.setattr(esper.assembly.run, "write_json", full_disk_at_the_summary)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        assembled_run(config(run_dir, epochs=1), controller())
    status = status_of(run_dir)
    assert status["status"] == "failed" and "No space left on device" in status["reason"]
