"""Graph builder: one schema, fail-fast on misfit packets, presence masks with coverage, caps, normaliser."""

from __future__ import annotations

import pytest
import torch

from esper.leyline import ManualClock, pb
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.normalizer import NormalizerWriteError
from esper.tamiyo.model.normalizer_state import InMemoryNormalizerStore, NormalizerState
from esper.tamiyo.model.proposal import ACTIONS
from esper.tamiyo.model.schema import (
    TAMIYO_SCHEMA,
    GraphSchema,
    GraphSchemaError,
    MissingFeatureError,
    NodeSpec,
    RelationSpec,
)
from esper.tamiyo.runtime.telemetry import TamiyoTelemetry
from tests.tamiyo.packets import make_packet, settings

A = {action: index for index, action in enumerate(ACTIONS)}


def build(packet: pb.SystemStatePacket, **overrides: object) -> object:
    return GraphBuilder(settings(**overrides)).build(packet)


def test_schema_declares_every_node_type_feature_and_relation_once() -> None:
    assert TAMIYO_SCHEMA.type_names == ("global", "layer", "slot", "blueprint")
    graph = GraphBuilder(settings()).build(make_packet())
    for spec in TAMIYO_SCHEMA.node_types:
        assert graph.x[spec.name].shape[1] == spec.dim == len(spec.features)
    assert set(graph.edge_index) == {rel.key for rel in TAMIYO_SCHEMA.relations}


def test_schema_rejects_relation_to_undeclared_node_type() -> None:
    with pytest.raises(GraphSchemaError, match="not declared"):
        GraphSchema("bad", (NodeSpec("a", ("x",)),), (RelationSpec("a", "to", "ghost"),))


def test_seed_on_unknown_slot_fails_fast() -> None:
    packet = make_packet()
    packet.seed_states.add(seed_id="seed-x", slot_id="slot-missing", stage=pb.SEED_STAGE_DORMANT)
    with pytest.raises(GraphSchemaError, match="slot-missing"):
        build(packet)


def test_slot_on_unknown_layer_fails_fast() -> None:
    packet = make_packet()
    packet.topology.slots.add(slot_id="slot-x", layer_id="layer-missing", width=8)
    with pytest.raises(GraphSchemaError, match="layer-missing"):
        build(packet)


def test_duplicate_ids_fail_fast() -> None:
    packet = make_packet()
    packet.blueprint_ids.append("bp-0")
    with pytest.raises(GraphSchemaError, match="duplicate"):
        build(packet)


def test_graph_with_foreign_node_type_is_refused_by_schema_check() -> None:
    graph = GraphBuilder(settings()).build(make_packet())
    graph.x["optimizer"] = torch.zeros(1, 3)
    with pytest.raises(GraphSchemaError, match="optimizer"):
        TAMIYO_SCHEMA.check(graph)


def test_missing_values_go_to_mask_and_coverage_naming_the_keys() -> None:
    packet = make_packet(stages={0: pb.SEED_STAGE_TRAINING}, metrics=False)
    del packet.training_metrics["grad_norm"]
    packet.ClearField("hardware_context")
    graph = GraphBuilder(settings()).build(packet)
    assert graph.coverage is not None
    assert "training_metrics[grad_norm]" in graph.coverage.missing["global"]
    assert "hardware_context" in graph.coverage.missing["global"]
    assert "seed_metrics[alpha]@slot-0" in graph.coverage.missing["slot"]
    assert "descriptor[bp-0]" in graph.coverage.missing["blueprint"]
    spec = TAMIYO_SCHEMA.node("global")
    grad_column = spec.features.index("metric_grad_norm")
    assert graph.mask["global"][0, grad_column] == 0
    assert graph.x["global"][0, grad_column] == 0
    assert graph.coverage.present_fraction["global"] < 1.0
    # A dormant slot is not expected to report seed metrics: it is not "missing".
    assert not any("@slot-1" in key for key in graph.coverage.missing["slot"])


def test_strict_graph_raises_instead_of_masking() -> None:
    packet = make_packet()
    packet.ClearField("hardware_context")
    with pytest.raises(MissingFeatureError, match="hardware_context"):
        GraphBuilder(settings(strict_graph=True), blueprint_metadata=lambda _id: None).build(packet)


def test_a_device_left_unmeasured_on_purpose_is_absent_but_not_missing() -> None:
    # What Tolaria sends with TOLARIA_HARDWARE_CONTEXT=false: the device named, no memory measured.
    packet = make_packet()
    packet.hardware_context.CopyFrom(pb.HardwareContext(device_type="cpu", device_id="cpu"))
    graph = GraphBuilder(settings()).build(packet)
    spec = TAMIYO_SCHEMA.node("global")
    assert graph.mask["global"][0, spec.features.index("hw_memory_free_frac")] == 0
    assert graph.coverage is not None
    assert "hardware_context" not in graph.coverage.missing.get("global", ())


def test_caps_apply_to_nodes_and_edges_without_dangling_indices() -> None:
    packet = make_packet(n_layers=10, n_slots=10, n_blueprints=6)
    graph = GraphBuilder(settings(max_layers=4, max_seeds=3, max_blueprints=2)).build(packet)
    assert graph.num_nodes("layer") == 4
    assert graph.num_nodes("slot") == 3
    assert graph.num_nodes("blueprint") == 2
    for (src, _, dst), index in graph.edge_index.items():
        if index.numel():
            assert int(index[0].max()) < graph.num_nodes(src)
            assert int(index[1].max()) < graph.num_nodes(dst)
    assert graph.coverage is not None
    assert graph.coverage.dropped_nodes == {"layer": 6, "slot": 7, "blueprint": 4}
    assert graph.coverage.dropped_edges["blueprint__offered_to__slot"] == 10 * 6 - 3 * 2
    assert not graph.coverage.complete


def test_no_invented_blueprint_ids_without_a_catalogue_offer() -> None:
    packet = make_packet(n_blueprints=0)
    graph = GraphBuilder(settings()).build(packet)
    assert graph.blueprint_ids == ()
    assert graph.num_nodes("blueprint") == 0
    assert not bool(graph.action_mask[0, A[pb.POLICY_ACTION_GERMINATE]])


def test_ids_in_graph_are_the_packets_own() -> None:
    graph = GraphBuilder(settings()).build(make_packet())
    assert graph.slot_ids == ("slot-0", "slot-1", "slot-2")
    assert graph.seed_ids == ("seed-0", "seed-1", "seed-2")
    assert graph.blueprint_ids == ("bp-0", "bp-1")


def test_legality_masks_follow_seed_stages() -> None:
    packet = make_packet(stages={0: pb.SEED_STAGE_PROBATIONARY, 1: pb.SEED_STAGE_TRAINING})
    graph = GraphBuilder(settings()).build(packet)
    slot_mask = graph.slot_action_mask
    assert slot_mask[:, A[pb.POLICY_ACTION_FOSSILIZE]].tolist() == [True, False, False]
    assert slot_mask[:, A[pb.POLICY_ACTION_CULL]].tolist() == [True, True, False]
    assert slot_mask[:, A[pb.POLICY_ACTION_GERMINATE]].tolist() == [False, False, True]
    no_probation = GraphBuilder(settings()).build(make_packet())
    assert not bool(no_probation.action_mask[0, A[pb.POLICY_ACTION_FOSSILIZE]])
    assert not bool(no_probation.action_mask[0, A[pb.POLICY_ACTION_CULL]])


def test_to_hetero_data_carries_the_same_tensors() -> None:
    graph = GraphBuilder(settings()).build(make_packet())
    data = graph.to_hetero_data()
    assert set(data.node_types) == set(TAMIYO_SCHEMA.type_names)
    assert torch.equal(data["slot"].x, graph.x["slot"])


def test_normalizer_statistics_round_trip_through_the_store() -> None:
    store = InMemoryNormalizerStore()
    builder = GraphBuilder(settings(normalizer_flush_every=1), normalizer_store=store)
    builder.build(make_packet())
    assert builder.normalizer.flush_due
    builder.normalizer.flush()
    assert store.saves == 1 and store.states is not None
    restored = GraphBuilder(settings(), normalizer_store=store)
    assert restored.normalizer.states() == builder.normalizer.states()


def test_normalizer_write_failure_is_a_typed_error() -> None:
    class FailingStore(InMemoryNormalizerStore):
        def save(self, states: dict[str, NormalizerState]) -> None:
            raise OSError("disk full")

    builder = GraphBuilder(settings(), normalizer_store=FailingStore())
    builder.build(make_packet())
    with pytest.raises(NormalizerWriteError, match="disk full"):
        builder.normalizer.flush()


def test_normalizer_refuses_statistics_of_another_width() -> None:
    store = InMemoryNormalizerStore({"layer": NormalizerState([1.0], [0.0], [0.0])})
    with pytest.raises(GraphSchemaError, match="wrong width"):
        GraphBuilder(settings(), normalizer_store=store)


def _assert_same_graph(left: TamiyoGraph, right: TamiyoGraph) -> None:
    for name in ("x", "mask", "edge_index", "edge_attr"):
        a, b = getattr(left, name), getattr(right, name)
        assert set(a) == set(b), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert left.coverage == right.coverage


def test_topology_cache_reuses_an_unchanged_topology_and_follows_a_changed_one() -> None:
    """The static part of the graph is computed once per topology: the same edge tensors come back while the
    topology holds, and a grown or edited topology is rebuilt, never served from the cache."""
    builder = GraphBuilder(settings())
    first = builder.build(make_packet(4, 3, 2), update_stats=False)
    again = builder.build(make_packet(4, 3, 2, stages={0: pb.SEED_STAGE_TRAINING}), update_stats=False)
    key = ("layer", "feeds", "layer")
    assert again.edge_index[key] is first.edge_index[key]
    grown = make_packet(5, 4, 2)
    grown.topology.slots[1].width = 7  # an edited slot width changes its edge features
    cached = builder.build(grown, update_stats=False)
    fresh = GraphBuilder(settings()).build(grown, update_stats=False)
    _assert_same_graph(cached, fresh)
    assert cached.num_nodes("layer") == 5
    # A topology error is still raised after a valid topology was cached.
    broken = make_packet(4, 3, 2)
    broken.topology.slots[0].layer_id = "nowhere"
    with pytest.raises(GraphSchemaError, match="not in the topology"):
        builder.build(broken, update_stats=False)


def test_active_seeds_without_an_offered_blueprint_are_reported_in_coverage() -> None:
    packet = make_packet(
        n_blueprints=2,
        stages={0: pb.SEED_STAGE_TRAINING, 1: pb.SEED_STAGE_BLENDING, 2: pb.SEED_STAGE_TRAINING},
    )
    packet.seed_states[0].blueprint_id = ""  # active, names nothing
    packet.seed_states[1].blueprint_id = "bp-elsewhere"  # active, not offered
    coverage = GraphBuilder(settings()).build(packet).coverage  # slot-2 grows bp-0: linked
    assert coverage.unlinked_seeds == {
        "slot-0": "seed 'seed-0' names no blueprint",
        "slot-1": "blueprint 'bp-elsewhere' is not offered by the packet",
    }
    assert not coverage.complete
    packet_capped = make_packet(n_blueprints=2, stages={0: pb.SEED_STAGE_TRAINING})
    packet_capped.seed_states[0].blueprint_id = "bp-1"
    capped = GraphBuilder(settings(max_blueprints=1)).build(packet_capped)
    assert capped.coverage.unlinked_seeds == {"slot-0": "blueprint 'bp-1' was cut by the blueprint cap"}

    telemetry = TamiyoTelemetry(settings(), ManualClock())
    telemetry.record_coverage(coverage, packet.packet_id)
    telemetry.record_coverage(coverage, packet.packet_id)  # unchanged: reported once
    events = [e for e in telemetry.flush().events if e.name == "graph_seed_unlinked"]
    assert len(events) == 1 and events[0].attributes["slots"] == "slot-0,slot-1"
