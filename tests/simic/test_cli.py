"""`esper simic train`, `esper policy show`: a round from a recorded bus, and the lineage it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.leyline import pb
from esper.oona import EmbeddedBus, OonaSettings, Streams, envelope_for
from esper.tamiyo.model.policy import GNNPolicy
from tests.simic.support import gnn_records
from tests.tamiyo.packets import settings

runner = CliRunner()


@pytest.fixture
def recorded_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SIMIC_MIN_TRANSITIONS", "8")
    monkeypatch.setenv("SIMIC_UPDATE_EPOCHS", "1")
    monkeypatch.setenv("SIMIC_REGRESSION_TOLERANCE", "1.0")
    monkeypatch.setenv("SIMIC_MAX_KL", "1.0")
    run_dir = tmp_path / "run"
    bus = EmbeddedBus(run_dir / "bus.sqlite3", OonaSettings())
    try:
        for message in gnn_records(GNNPolicy(settings()), 12):
            stream = Streams.DECISIONS if isinstance(message, pb.DecisionRecord) else Streams.FIELD_REPORTS
            bus.publish(stream, envelope_for(message))
    finally:
        bus.close()
    return run_dir


def test_simic_train_from_a_run_directory_then_policy_show(recorded_run: Path, tmp_path: Path) -> None:
    state = tmp_path / "simic"
    result = runner.invoke(
        app,
        ["simic", "train", "--from", str(recorded_run), "--state-dir", str(state), "--no-publish", "--json"],
    )
    assert result.exit_code == 0, result.output
    round_ = json.loads(result.stdout.strip().splitlines()[-1])
    assert round_["mode"] == "ppo" and round_["transitions"] == 12
    assert round_["published"], round_["reasons"]
    shown = runner.invoke(app, ["policy", "show", "--state-dir", str(state), "--json"])
    assert shown.exit_code == 0, shown.output
    view = json.loads(shown.stdout)
    assert view["current"]["tamiyo_policy_version"] == round_["version"]
    assert view["current"]["sequence"] == "1"
    table = runner.invoke(app, ["policy", "show", "--state-dir", str(state)])
    assert round_["version"] in table.stdout


def test_simic_train_distils_the_runs_it_is_given_whichever_policy_made_them(
    recorded_run: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        [
            "simic",
            "train",
            "--from",
            str(recorded_run),
            "--mode",
            "distil",
            "--state-dir",
            str(tmp_path / "simic"),
            "--no-publish",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    round_ = json.loads(result.stdout.strip().splitlines()[-1])
    # The GNN's own decisions: PPO material, cloned here as they were taken.
    assert round_["mode"] == "distil" and round_["on_policy"] == 12 and round_["published"], round_
    assert "imitation.agreement" in round_["metrics"]


def test_simic_train_refuses_a_source_that_is_not_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    result = runner.invoke(app, ["simic", "train", "--from", str(tmp_path / "nothing"), "--no-publish"])
    assert result.exit_code == 1
    assert "neither a run directory nor a bus file" in " ".join(result.output.split())


def test_policy_show_without_state_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["policy", "show", "--state-dir", str(tmp_path / "none")])
    assert result.exit_code == 1 and "no Simic state" in result.output


def test_simic_report_plots_the_recorded_rounds(recorded_run: Path, tmp_path: Path) -> None:
    state = tmp_path / "simic"
    trained = runner.invoke(
        app, ["simic", "train", "--from", str(recorded_run), "--state-dir", str(state), "--no-publish"]
    )
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(
        app, ["simic", "report", "--state-dir", str(state), "--out", str(tmp_path / "png")]
    )
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (tmp_path / "png").iterdir())
    assert written == ["critic.png", "entropy.png", "kl.png", "losses.png"]
    for name in written:
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simic_report_without_rounds_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simic", "report", "--state-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert "records no round" in result.output
