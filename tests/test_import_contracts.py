"""The import-linter contracts in pyproject.toml bite: layered, with indirect imports checked."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    contracts: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def test_no_contract_lets_a_forbidden_import_through_another_module() -> None:
    assert [c["name"] for c in _contracts() if c.get("allow_indirect_imports")] == []


def test_the_subsystems_are_layered_with_the_composition_roots_on_top() -> None:
    (layers,) = [c["layers"] for c in _contracts() if c["type"] == "layers"]
    # The public Python API and the Gymnasium environments are composition roots beside the CLI.
    assert layers[0] == "(esper.api) : (esper.envs) : esper.cli : esper.weatherlight : (esper.assembly)"
    assert layers[-3:] == ["esper.urza", "esper.oona", "esper.leyline"]


def test_simic_is_held_to_tamiyos_model_and_others_to_its_public_face() -> None:
    by_name = {c["name"]: c for c in _contracts()}
    simic = by_name["simic imports leyline, oona and tamiyo's model only"]
    assert {"esper.tamiyo.runtime", "esper.tamiyo.records"} <= set(simic["forbidden_modules"])
    protected = [c for c in _contracts() if c["type"] == "protected"]
    assert {m for c in protected for m in c["protected_modules"]} == {
        "esper.tamiyo.model",
        "esper.tamiyo.runtime",
        "esper.tamiyo.records",
    }
