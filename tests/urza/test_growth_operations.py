"""The catalogue's growth operations: described as blueprints are, listed by `esper blueprints operations`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.leyline import pb
from esper.urza import GROWTH_OPERATIONS, UnknownBlueprint, growth_operation, require_growth_operation


def test_widen_and_deepen_are_described_with_id_kind_cost_amounts_and_host_kinds() -> None:
    assert [(op.op_id, op.kind, op.seed_operation) for op in GROWTH_OPERATIONS] == [
        ("op:widen", "widen", pb.SEED_OP_WIDEN),
        ("op:deepen", "deepen", pb.SEED_OP_DEEPEN),
    ]
    for operation in GROWTH_OPERATIONS:
        assert operation.allowed_amounts and all(amount >= 1 for amount in operation.allowed_amounts)
        assert operation.host_kinds and operation.cost_per_unit and operation.description
        assert growth_operation(operation.op_id) is operation


def test_an_unknown_operation_is_a_typed_error_naming_the_known_ones() -> None:
    assert growth_operation("op:stack") is None
    with pytest.raises(UnknownBlueprint, match="known: op:widen, op:deepen"):
        require_growth_operation("op:stack")


def test_esper_blueprints_operations_lists_them() -> None:
    result = CliRunner().invoke(app, ["blueprints", "operations", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [entry["id"] for entry in listed] == ["op:widen", "op:deepen"]
    assert listed[0]["allowed_amounts"] == list(GROWTH_OPERATIONS[0].allowed_amounts)
    table = CliRunner().invoke(app, ["blueprints", "operations"])
    assert table.exit_code == 0 and "op:deepen" in table.output
