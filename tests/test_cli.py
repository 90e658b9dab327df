"""The `esper` command line explains itself and never fakes output."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import esper
from esper.cli import _settings_classes, app, env_example
from esper.leyline import load_settings
from esper.tamiyo.settings import TamiyoSettings

ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert esper.__version__ in result.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["serve"],
        ["report"],
        ["reports"],
        ["blueprints"],
        ["simic", "train"],
        ["simic", "serve"],
        ["bus", "stats"],
        ["policy", "show"],
        ["settings"],
        ["version"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout


def test_the_committed_env_example_lists_every_setting_as_generated() -> None:
    """P6 (docs in sync): `.env.example` is what `esper settings --env-example` prints; regenerate it with
    `.venv/bin/esper settings --env-example > .env.example` when a setting changes."""
    assert (ROOT / ".env.example").read_text() == env_example()
    result = runner.invoke(app, ["settings", "--env-example"])
    assert result.exit_code == 0 and result.stdout == env_example()


def test_the_env_example_uncommented_is_a_valid_env_file_of_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        line.removeprefix("# ")
        for line in env_example().splitlines()
        if line.startswith("# ") and "=" in line
    ]
    assignments = [line for line in lines if line.split("=", 1)[0].isupper()]
    (tmp_path / ".env").write_text("\n".join(assignments) + "\n")
    monkeypatch.chdir(tmp_path)
    for cls in _settings_classes():
        for name in cls.model_fields:
            monkeypatch.delenv(str(cls.model_config.get("env_prefix", "")) + name.upper(), raising=False)
        defaults = {
            name: field.get_default(call_default_factory=True) for name, field in cls.model_fields.items()
        }
        assert dict(load_settings(cls)) == defaults, cls.__name__
    # The file is really read: a changed value comes through.
    (tmp_path / ".env").write_text(
        "\n".join(assignments).replace("TAMIYO_STEP_TIMEOUT_MS=5.0", "TAMIYO_STEP_TIMEOUT_MS=9.0")
    )
    assert load_settings(TamiyoSettings).step_timeout_ms == 9.0


def test_settings_shows_what_the_environment_resolves_and_rejects_a_bad_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "7.25")
    monkeypatch.setenv("ESPER_SIGNING_SECRET", "a-secret-that-must-not-be-printed")
    result = runner.invoke(app, ["settings"], terminal_width=240)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "TAMIYO_STEP_TIMEOUT_MS" in line)
    assert "7.25" in row and "5.0" in row
    assert "a-secret-that-must-not-be-printed" not in result.stdout
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "-1")
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 2 and "TAMIYO_STEP_TIMEOUT_MS" in result.output


def test_a_policy_that_cannot_meet_the_budget_is_announced_on_the_terminal_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The controller's warm-up prints the service's measurement when it does not fit, the first time
    only; a fitting one prints nothing."""
    from types import SimpleNamespace
    from typing import Any, cast

    from esper.cli import _announcing_misfit
    from esper.leyline import pb
    from esper.tamiyo.runtime.service import PolicyFit

    misfit = PolicyFit(measured_ms=4.0, allowed_ms=2.5, budget_ms=5.0, runs=16, policy_size="full")
    fit = PolicyFit(measured_ms=1.0, allowed_ms=2.5, budget_ms=5.0, runs=16, policy_size="default")
    service = SimpleNamespace(policy_fit=None)
    prepared: list[str] = []
    rehearse = _announcing_misfit(lambda packet: prepared.append(packet.packet_id), cast(Any, service))
    service.policy_fit = fit
    rehearse(pb.SystemStatePacket(packet_id="p0"))
    assert capsys.readouterr().err == ""
    service.policy_fit = misfit
    rehearse(pb.SystemStatePacket(packet_id="p1"))
    printed = capsys.readouterr().err
    assert "warning" in printed and "4.00 ms per decision" in printed
    assert "TAMIYO_POLICY_SIZE=default" in " ".join(printed.split())
    rehearse(pb.SystemStatePacket(packet_id="p2"))
    assert capsys.readouterr().err == ""
    assert prepared == ["p0", "p1", "p2"]
