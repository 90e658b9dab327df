"""The blueprint catalogue: CRUD, revisions, listeners, quarantine, durability and corruption."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from esper.leyline import CONTRACT_VERSION, ContractVersionMismatch, EsperError, pb
from esper.urza import (
    BUILTIN_FACTORIES,
    BUILTIN_SPECS,
    BlueprintCatalogue,
    BlueprintNotApplicable,
    BlueprintQuarantined,
    BlueprintSpec,
    CatalogueCorrupt,
    DuplicateBlueprint,
    InvalidDescriptor,
    ListenerFailed,
    UnknownBlueprint,
)
from esper.urza.modules import LowRankLinear

torch.set_num_threads(1)

BUILTIN_IDS = [spec.blueprint_id for spec in BUILTIN_SPECS]


@pytest.fixture
def catalogue(tmp_path: Path) -> BlueprintCatalogue:
    return BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")


def _tiny_spec() -> BlueprintSpec:
    descriptor = pb.BlueprintDescriptor(
        blueprint_id="tiny",
        name="Tiny adapter",
        tier=pb.BLUEPRINT_TIER_EXPERIMENTAL,
        risk=0.5,
        host_kinds=["mlp"],
        description="rank-1 map",
    )
    return BlueprintSpec(descriptor=descriptor, factory=lambda width, kind, params: LowRankLinear(width, 1))


def _with_tiny(tmp_path: Path) -> BlueprintCatalogue:
    registry = BUILTIN_FACTORIES.copy()
    registry.register(_tiny_spec())
    # Plain open: only what is added explicitly is in it.
    return BlueprintCatalogue(tmp_path / "custom.sqlite3", factories=registry)


def test_open_default_seeds_every_builtin_in_order(catalogue: BlueprintCatalogue) -> None:
    assert [d.blueprint_id for d in catalogue.list()] == BUILTIN_IDS
    assert catalogue.revision == len(BUILTIN_IDS)
    assert [d.revision for d in catalogue.list()] == list(range(1, len(BUILTIN_IDS) + 1))


def test_open_default_is_idempotent_and_a_removed_builtin_stays_removed(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    with BlueprintCatalogue.open_default(path) as first:
        first.remove("attention_lite")
        revision = first.revision
    with BlueprintCatalogue.open_default(path) as second:
        assert second.revision == revision
        assert "attention_lite" not in [d.blueprint_id for d in second.list()]
        assert len(second.list()) == len(BUILTIN_IDS) - 1


def test_ids_for_filters_by_kind_in_catalogue_order(catalogue: BlueprintCatalogue) -> None:
    mlp = catalogue.ids_for("mlp")
    conv = catalogue.ids_for("conv")
    assert mlp == [i for i in BUILTIN_IDS if "mlp" in BUILTIN_FACTORIES.get(i).descriptor.host_kinds]
    assert conv == [i for i in BUILTIN_IDS if "conv" in BUILTIN_FACTORIES.get(i).descriptor.host_kinds]
    assert "lowrank" in mlp and "lowrank" in conv
    assert catalogue.ids_for("transformer") == []


def test_get_returns_a_copy(catalogue: BlueprintCatalogue) -> None:
    descriptor = catalogue.get("mlp_small")
    descriptor.name = "changed in memory"
    assert catalogue.get("mlp_small").name == "Small MLP"


def test_unknown_ids_are_typed_errors(catalogue: BlueprintCatalogue) -> None:
    for call in (
        lambda: catalogue.get("nope"),
        lambda: catalogue.build("nope", 32, "mlp"),
        lambda: catalogue.quarantine("nope", "bad"),
        lambda: catalogue.remove("nope"),
        lambda: catalogue.update(
            pb.BlueprintDescriptor(blueprint_id="nope", name="n", tier=1, host_kinds=["mlp"])
        ),
    ):
        with pytest.raises(UnknownBlueprint, match="'nope'"):
            call()
    assert issubclass(UnknownBlueprint, EsperError)


def test_build_checks_kind_width_and_bounds(catalogue: BlueprintCatalogue) -> None:
    module = catalogue.build("mlp_bottleneck", 32, "mlp", reduction=8)
    assert module(torch.zeros(2, 32)).shape == (2, 32)
    with pytest.raises(BlueprintNotApplicable, match="not supported"):
        catalogue.build("mlp_bottleneck", 32, "conv")
    with pytest.raises(BlueprintNotApplicable, match="outside"):
        catalogue.build("mlp_bottleneck", 32, "mlp", reduction=64)


def test_tightened_bounds_from_an_update_apply_to_build(catalogue: BlueprintCatalogue) -> None:
    descriptor = catalogue.get("lowrank")
    descriptor.allowed_parameters["rank"].max_value = 2.0
    catalogue.update(descriptor)
    assert catalogue.param_count("lowrank", 32, "mlp", rank=2) == 32 * 2 + 2 * 32 + 32
    # The default rank (4) is now outside the bounds: refused, not silently clamped.
    with pytest.raises(BlueprintNotApplicable, match=r"rank=4 is outside \[1, 2\]"):
        catalogue.build("lowrank", 32, "mlp")


def test_every_change_bumps_the_revision_and_notifies_listeners(tmp_path: Path) -> None:
    catalogue = _with_tiny(tmp_path)
    changes: list[pb.CatalogueChange] = []
    catalogue.subscribe(changes.append)

    added = catalogue.add(_tiny_spec().descriptor)
    assert added.revision == 1 and catalogue.get("tiny").revision == 1
    updated = catalogue.get("tiny")
    updated.risk = 0.6
    catalogue.update(updated)
    catalogue.quarantine("tiny", "diverged in run r-1")
    catalogue.remove("tiny")

    assert [c.kind for c in changes] == [
        pb.CATALOGUE_CHANGE_ADDED,
        pb.CATALOGUE_CHANGE_UPDATED,
        pb.CATALOGUE_CHANGE_QUARANTINED,
        pb.CATALOGUE_CHANGE_REMOVED,
    ]
    assert [c.revision for c in changes] == [1, 2, 3, 4]
    assert [c.descriptor.revision for c in changes] == [1, 2, 3, 4]
    assert all(c.blueprint_id == "tiny" and c.HasField("issued_at") for c in changes)
    assert changes[1].descriptor.risk == pytest.approx(0.6)
    assert changes[2].descriptor.quarantine
    assert catalogue.revision == 4
    assert catalogue.list() == []


def test_changes_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    with BlueprintCatalogue.open_default(path) as catalogue:
        catalogue.quarantine("conv_se", "nan gradients")
        descriptor = catalogue.get("mlp_small")
        descriptor.description = "edited"
        catalogue.update(descriptor)
        revision = catalogue.revision
    with BlueprintCatalogue.open_default(path) as reopened:
        assert reopened.revision == revision
        assert reopened.get("conv_se").quarantine
        assert reopened.quarantine_reason("conv_se") == "nan gradients"
        assert reopened.get("mlp_small").description == "edited"


def test_quarantined_blueprints_are_listed_but_never_offered_or_built(catalogue: BlueprintCatalogue) -> None:
    catalogue.quarantine("conv_se", "nan gradients in run r-7")
    assert "conv_se" in [d.blueprint_id for d in catalogue.list()]
    assert "conv_se" not in catalogue.ids_for("conv")
    with pytest.raises(BlueprintQuarantined, match="nan gradients in run r-7"):
        catalogue.build("conv_se", 16, "conv")
    # Lifting the quarantine with an update makes it buildable again and forgets the reason.
    descriptor = catalogue.get("conv_se")
    descriptor.quarantine = False
    catalogue.update(descriptor)
    assert catalogue.quarantine_reason("conv_se") is None
    assert "conv_se" in catalogue.ids_for("conv")
    catalogue.build("conv_se", 16, "conv")


def test_quarantine_needs_a_reason(catalogue: BlueprintCatalogue) -> None:
    with pytest.raises(InvalidDescriptor, match="reason"):
        catalogue.quarantine("mlp_small", "")
    assert not catalogue.get("mlp_small").quarantine


def test_add_refuses_duplicates_and_ids_without_a_factory(tmp_path: Path) -> None:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    revision = catalogue.revision
    with pytest.raises(DuplicateBlueprint):
        catalogue.add(catalogue.get("mlp_small"))
    with pytest.raises(UnknownBlueprint, match="no module factory"):
        catalogue.add(_tiny_spec().descriptor)
    assert catalogue.revision == revision


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("name", "", "name"),
        ("tier", pb.BLUEPRINT_TIER_UNSPECIFIED, "tier"),
        ("risk", 1.5, "risk"),
        ("risk", float("nan"), "risk"),
        ("host_kinds", ["rnn"], "host_kinds"),
        ("host_kinds", [], "host_kinds"),
    ],
)
def test_invalid_descriptors_are_refused_and_change_nothing(
    tmp_path: Path, field: str, value: object, match: str
) -> None:
    catalogue = _with_tiny(tmp_path)
    descriptor = _tiny_spec().descriptor
    if field == "host_kinds":
        del descriptor.host_kinds[:]
        descriptor.host_kinds.extend(value)  # type: ignore[arg-type]
    else:
        setattr(descriptor, field, value)
    with pytest.raises(InvalidDescriptor, match=match):
        catalogue.add(descriptor)
    assert catalogue.revision == 0
    assert catalogue.list() == []


def test_inverted_parameter_bounds_are_refused(catalogue: BlueprintCatalogue) -> None:
    descriptor = catalogue.get("lowrank")
    descriptor.allowed_parameters["rank"].min_value = 10.0
    descriptor.allowed_parameters["rank"].max_value = 2.0
    with pytest.raises(InvalidDescriptor, match="min <= max"):
        catalogue.update(descriptor)
    assert catalogue.get("lowrank").allowed_parameters["rank"].max_value == 64.0


def test_a_failing_listener_surfaces_after_the_change_is_committed(catalogue: BlueprintCatalogue) -> None:
    seen: list[int] = []

    def broken(change: pb.CatalogueChange) -> None:
        raise RuntimeError("bus down")

    catalogue.subscribe(broken)
    catalogue.subscribe(lambda change: seen.append(change.revision))
    with pytest.raises(ListenerFailed, match="bus down") as info:
        catalogue.quarantine("mlp_small", "test")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert info.value.revision == catalogue.revision
    # The change is durable and the other listener still heard about it.
    assert catalogue.get("mlp_small").quarantine
    assert seen == [catalogue.revision]


def test_listeners_get_their_own_copy(catalogue: BlueprintCatalogue) -> None:
    received: list[pb.CatalogueChange] = []

    def meddler(change: pb.CatalogueChange) -> None:
        change.descriptor.name = "meddled"

    catalogue.subscribe(meddler)
    catalogue.subscribe(received.append)
    catalogue.quarantine("lowrank", "test")
    assert received[0].descriptor.name == "Low-rank adapter"


def test_a_file_that_is_not_sqlite_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(CatalogueCorrupt, match=str(path)):
        BlueprintCatalogue.open_default(path)


def test_a_catalogue_path_that_cannot_be_opened_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogueCorrupt, match="unable to open database file"):
        BlueprintCatalogue(tmp_path)  # a directory


def test_an_undecodable_descriptor_row_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    BlueprintCatalogue.open_default(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE blueprints SET descriptor = ? WHERE blueprint_id = 'lowrank'", (b"\xff\xff\xff",))
    catalogue = BlueprintCatalogue.open_default(path)
    with pytest.raises(CatalogueCorrupt, match="'lowrank' does not decode"):
        catalogue.list()
    with pytest.raises(CatalogueCorrupt):
        catalogue.build("lowrank", 8, "mlp")


def test_a_row_holding_another_blueprints_descriptor_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    with BlueprintCatalogue.open_default(path) as catalogue:
        blob = catalogue.get("mlp_small").SerializeToString()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE blueprints SET descriptor = ? WHERE blueprint_id = 'lowrank'", (blob,))
    with pytest.raises(CatalogueCorrupt, match="holds a descriptor for 'mlp_small'"):
        BlueprintCatalogue.open_default(path).get("lowrank")


def test_an_unknown_schema_version_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    BlueprintCatalogue.open_default(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(CatalogueCorrupt, match="schema version 99"):
        BlueprintCatalogue.open_default(path)


def test_the_database_is_in_wal_mode_with_full_sync(catalogue: BlueprintCatalogue) -> None:
    with sqlite3.connect(catalogue.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is a per-connection setting: read it on the catalogue's own connection (2 = FULL).
    assert catalogue._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_a_catalogue_of_the_first_contract_is_refused_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    BlueprintCatalogue.open_default(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE leyline_contract")  # as written before the contract version was recorded
    db.close()
    with pytest.raises(ContractVersionMismatch) as info:
        BlueprintCatalogue.open_default(path)
    assert (info.value.found, info.value.expected) == (1, CONTRACT_VERSION)
