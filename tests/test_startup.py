"""Commands import only what they use: PyTorch and PyG load when a model is built, not to print settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_importing_the_cli_loads_neither_torch_nor_pyg() -> None:
    loaded = _modules_after("import esper.cli")
    assert "torch_geometric" not in loaded
    assert "torch" not in loaded


@pytest.mark.parametrize("module", ["esper.tamiyo.settings", "esper.kasmina.settings", "esper.urza.errors"])
def test_a_subsystem_settings_class_comes_without_torch(module: str) -> None:
    loaded = _modules_after(f"import {module}")
    assert "torch" not in loaded


def test_esper_settings_runs_without_importing_torch() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom esper.cli import app\n"
        "result = CliRunner().invoke(app, ['settings'])\nassert result.exit_code == 0, result.output\n"
    )
    loaded = _modules_after(code)
    assert "torch" not in loaded
    assert "torch_geometric" not in loaded


def test_esper_reports_runs_without_importing_torch(tmp_path: object) -> None:
    code = (
        "from typer.testing import CliRunner\nfrom esper.cli import app\n"
        f"result = CliRunner().invoke(app, ['reports', {str(tmp_path)!r}])\n"
        "assert 'does not exist' in result.output, result.output\n"
    )
    assert "torch" not in _modules_after(code)


@pytest.mark.parametrize("state", ["missing", "empty", "published", "default"])
def test_esper_policy_show_runs_without_importing_torch(
    tmp_path: Path, state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "default": no --state-dir, so the command finds <ESPER_DATA_DIR>/simic (a published policy there).
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path))
    root = tmp_path / "simic"
    if state != "missing":
        root.mkdir()
        (root / "lineage.jsonl").write_text(
            json.dumps(
                {
                    "published": True,
                    "sequence": 1,
                    "version": "v1",
                    "parent_version": "",
                    "mode": "ppo",
                    "transitions": 9,
                    "metrics": {},
                }
            )
            + "\n"
        )
    if state in ("published", "default"):
        header = json.dumps({"tamiyo_policy_version": "v1", "sequence": "1"})
        body = json.dumps({"__metadata__": {"header": header}}).encode()
        (root / "policy.safetensors").write_bytes(len(body).to_bytes(8, "little") + body)
    args = ["policy", "show"] if state == "default" else ["policy", "show", "--state-dir", str(root)]
    code = (
        "from typer.testing import CliRunner\nfrom esper.cli import app\n"
        f"result = CliRunner().invoke(app, {args!r})\n"
        f"assert result.exit_code == {1 if state == 'missing' else 0}, result.output\n"
        f"assert {'no Simic state' if state == 'missing' else 'Lineage'!r} in result.output, result.output\n"
    )
    loaded = _modules_after(code)
    assert "torch" not in loaded
    assert "torch_geometric" not in loaded


@pytest.mark.slow
def test_a_heuristic_run_never_loads_pyg(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPER_DATA_DIR", f"{tmp_path}/data")
    monkeypatch.setenv("ESPER_SIGNING_SECRET", "startup-test-secret-0123456789")
    code = (
        "from typer.testing import CliRunner\nfrom esper.cli import app\n"
        "args = ['run', '--epochs', '1', '--no-progress', '--policy', 'heuristic', '--run-dir', "
        f"{str(tmp_path)!r} + '/run']\n"
        "result = CliRunner().invoke(app, args)\n"
        "assert result.exit_code == 0, result.output\n"
    )
    assert "torch_geometric" not in _modules_after(code)


def test_lazy_exports_still_give_every_public_name() -> None:
    import esper.kasmina
    import esper.tamiyo
    import esper.urza

    for package in (esper.tamiyo, esper.kasmina, esper.urza):
        for name in package.__all__:
            assert getattr(package, name) is not None
        with pytest.raises(AttributeError, match="no attribute"):
            getattr(package, "NoSuchName")
