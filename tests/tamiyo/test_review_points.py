"""One test per review point and pull-request item of issue 4 that no other Tamiyo test file covers.

Each docstring names the point (review file and bullet, or PR item). Points already covered elsewhere:
gnn.py edge_attr=None, device and schema (test_gnn.py); bp-unknown, edge caps, missing values and the
normaliser error (test_graph.py); placeholders, synthetic PAUSE, compile/runtime failure surfaced and the
CPU fallback fix at policy level (test_policy.py); evaluate_epoch, future.cancel, settings read once,
`__all__` and the docstring (test_service.py); the persistent worker (test_worker.py); one risk gate
golden test each (test_risk.py); event table and blend switch (test_telemetry.py).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import esper.tamiyo
from esper.leyline import ConfigurationError, EsperError, SignatureVerifier, pb
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.checkpoint import CheckpointIncompatible
from esper.tamiyo.model.gnn import TamiyoGNN, TamiyoGNNConfig
from esper.tamiyo.model.normalizer_state import InMemoryNormalizerStore, NormalizerState
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.runtime.worker import DeadlineExceeded
from esper.tamiyo.settings import TamiyoSettings
from tests.tamiyo.packets import (
    PUBLIC_FACE,
    SECRET,
    SMALL,
    ScriptedPolicy,
    make_packet,
    settings,
    small_policy,
)


def _assert_same_output(a: Any, b: Any, tol: float = 1e-4) -> None:
    for name in a.__dataclass_fields__:
        left, right = getattr(a, name), getattr(b, name)
        assert left.shape == right.shape, name
        assert torch.allclose(left, right, atol=tol, rtol=tol), f"{name}: {(left - right).abs().max()}"


def _events(sent: list[pb.TelemetryPacket], name: str) -> list[pb.TelemetryEvent]:
    return [event for packet in sent for event in packet.events if event.name == name]


# -- gnn.py -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(4, 3, 2), (9, 6, 3), (0, 0, 0), (3, 0, 2), (2, 5, 2), (1, 3, 0)])
def test_p7_dense_attention_kernel_computes_what_pyg_gatconv_computes(size: tuple[int, int, int]) -> None:
    """P7 + gnn.py (edge features on every relation): the dense inference kernel chosen in the decision
    record is the same function as PyG's HeteroConv/SAGEConv/GATConv path, zero edge features included."""
    torch.manual_seed(1)
    model = TamiyoGNN(SMALL).eval()
    packet = make_packet(*size, stages={0: pb.SEED_STAGE_BLENDING} if size[1] else None)
    graph = GraphBuilder(settings()).build(packet)
    reference = model.forward_message_passing(graph)
    with torch.inference_mode():
        dense = model(graph)
        adjacency = model.dense_adjacency(graph, model.edge_attrs(graph, model.device), model.device)
    _assert_same_output(reference, dense)
    assert adjacency is not None
    for rel in TAMIYO_SCHEMA.relations:
        assert adjacency[rel.key].attr.shape[-1] == rel.edge_dim
        if not rel.edge_features:
            assert torch.count_nonzero(adjacency[rel.key].attr) == 0


def test_dense_kernel_refuses_repeated_edges_and_message_passing_takes_over() -> None:
    """gnn.py: a graph the dense blocks cannot represent (an edge twice) is not approximated."""
    model = TamiyoGNN(SMALL).eval()
    graph = GraphBuilder(settings()).build(make_packet())
    key = ("layer", "hosts", "slot")
    graph.edge_index[key] = torch.cat([graph.edge_index[key], graph.edge_index[key][:, :1]], dim=1)
    graph.edge_attr[key] = torch.cat([graph.edge_attr[key], graph.edge_attr[key][:1]])
    with torch.inference_mode():
        assert model.dense_adjacency(graph, model.edge_attrs(graph, model.device), model.device) is None
        out = model(graph)
    _assert_same_output(model.forward_message_passing(graph), out)


def test_folded_attention_cache_follows_new_weights() -> None:
    """gnn.py: cached attention maps never outlive the weights they were folded from (load or train)."""
    model = TamiyoGNN(SMALL).eval()
    graph = GraphBuilder(settings()).build(make_packet())
    with torch.inference_mode():
        before = model(graph)
    torch.manual_seed(7)
    other = TamiyoGNN(SMALL)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        after = model(graph)
    assert not torch.allclose(before.action_logits, after.action_logits)
    _assert_same_output(model.forward_message_passing(graph), after)


def test_dense_blocks_follow_changed_edges_and_in_place_edits() -> None:
    """gnn.py: the cached dense blocks of a relation are reused only for the same edges and features; a
    new seed's in-use edge feature, or an in-place edit of a cached tensor, rebuilds them."""
    torch.manual_seed(3)
    model = TamiyoGNN(SMALL).eval()
    builder = GraphBuilder(settings())
    before = builder.build(make_packet(4, 3, 2), update_stats=False)
    after = builder.build(make_packet(4, 3, 2, stages={1: pb.SEED_STAGE_TRAINING}), update_stats=False)
    key = ("blueprint", "offered_to", "slot")
    assert not torch.equal(before.edge_attr[key], after.edge_attr[key])
    with torch.inference_mode():
        model(before)
        dense = model(after)
    _assert_same_output(model.forward_message_passing(after), dense)
    # Edit the features the blocks were built from in place: the same tensor object must not hit the cache.
    reference = model.forward_message_passing(after)
    after.edge_attr[key].add_(2.0)
    with torch.inference_mode():
        dense = model(after)
    edited = model.forward_message_passing(after)
    assert not torch.allclose(reference.slot_scores, edited.slot_scores)
    _assert_same_output(edited, dense)


def test_inference_and_training_paths_agree_for_a_full_size_network() -> None:
    """P7 at full width (256 / 128 x 4): the dense kernel (project-first SAGE, single-edge attention, packed
    heads) and message passing give the same outputs on a medium graph."""
    torch.manual_seed(5)
    model = TamiyoGNN(TamiyoGNNConfig(schema=TAMIYO_SCHEMA)).eval()
    graph = GraphBuilder(settings()).build(make_packet(12, 6, 3, stages={0: pb.SEED_STAGE_BLENDING}))
    with torch.inference_mode():
        dense = model(graph)
    _assert_same_output(model.forward_message_passing(graph), dense, tol=1e-4)


# -- graph_builder.py -----------------------------------------------------------------------------------


def test_normalizer_write_keeps_failing_loudly_until_it_succeeds() -> None:
    """graph_builder.py: a flush that keeps failing is an ERROR event every time and is retried, never
    silently abandoned while the statistics drift."""

    class FlakyStore(InMemoryNormalizerStore):
        failing = True

        def save(self, states: dict[str, NormalizerState]) -> None:
            if self.failing:
                raise OSError("disk full")
            super().save(states)

    store = FlakyStore()
    sent: list[pb.TelemetryPacket] = []
    config = settings(normalizer_flush_every=1)
    service = TamiyoService(
        config, small_policy(config, normalizer_store=store), SECRET, telemetry_sink=sent.append
    )
    try:
        for _ in range(3):
            service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        assert len(_events(sent, "normalizer_flush_failed")) == 3
        assert all(e.level == pb.TELEMETRY_LEVEL_ERROR for e in _events(sent, "normalizer_flush_failed"))
        store.failing = False
        service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        assert store.saves == 1 and len(_events(sent, "normalizer_flush_failed")) == 3
    finally:
        service.close()


def test_blueprint_ids_are_never_derived_from_packet_or_run_ids() -> None:
    """graph_builder.py: no `bp-unknown`, no `packet_id or training_run_id` as a blueprint id; without an
    offered blueprint no GERMINATE can be issued at all."""
    policy = small_policy()
    service = TamiyoService(settings(), policy, SECRET)
    try:
        packet = make_packet(n_blueprints=0)
        for _ in range(25):
            command = service.evaluate_step(packet)
            assert command.seed_operation.operation != pb.SEED_OP_GERMINATE
            assert command.seed_operation.blueprint_id in ("", "bp-elsewhere")
        graph = policy.builder.build(packet)
        assert graph.blueprint_ids == ()
    finally:
        service.close()


def test_missing_value_is_masked_counted_and_named_in_an_event() -> None:
    """graph_builder.py: a missing value goes into the mask *and* into coverage metrics and an event that
    names the key (no silent 0.0)."""
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(settings(), small_policy(), SECRET, telemetry_sink=sent.append)
    try:
        packet = make_packet()
        del packet.training_metrics["grad_norm"]
        service.evaluate_step(packet)
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        (event,) = _events(sent, "graph_missing_features")
        assert "training_metrics[grad_norm]" in event.attributes["missing"]
        coverage = {m.name: m.value for p in sent for m in p.metrics}
        assert 0.0 < coverage["tamiyo.graph.coverage.global"] < 1.0
    finally:
        service.close()


def test_p4_vectorised_edges_match_the_relations_they_declare() -> None:
    """P4: edges built from tensors keep the semantics: depth order for `feeds`, each slot on its layer,
    the complete slot x blueprint relation with `in_use` set exactly where a seed uses the blueprint."""
    packet = make_packet(n_layers=4, n_slots=3, n_blueprints=2, stages={1: pb.SEED_STAGE_TRAINING})
    depths = [2, 0, 3, 1]
    for layer, depth in zip(packet.topology.layers, depths, strict=True):
        layer.depth = depth
    graph = GraphBuilder(settings()).build(packet)
    by_depth = sorted(range(4), key=lambda i: depths[i])
    feeds = graph.edge_index[("layer", "feeds", "layer")].t().tolist()
    assert feeds == [[by_depth[i], by_depth[i + 1]] for i in range(3)]
    hosts = graph.edge_index[("layer", "hosts", "slot")].t().tolist()
    assert hosts == [[int(s.layer_id.split("-")[1]), i] for i, s in enumerate(packet.topology.slots)]
    offered = graph.edge_index[("blueprint", "offered_to", "slot")].t().tolist()
    assert sorted(offered) == sorted([b, s] for b in range(2) for s in range(3))
    in_use = graph.edge_attr[("blueprint", "offered_to", "slot")][:, 0].tolist()
    assert [pair for pair, used in zip(offered, in_use, strict=True) if used] == [[0, 1]]


# -- service.py ---------------------------------------------------------------------------------------


class CatalogueDown(EsperError):
    """Stand-in for an Urza failure."""


def test_metadata_fetch_failure_is_surfaced_not_paused() -> None:
    """service.py: a failed Urza lookup reaches the caller as an error with an event; no COMMAND_PAUSE."""

    def lookup(_blueprint: str) -> pb.BlueprintDescriptor | None:
        raise CatalogueDown("urza unreachable")

    sent: list[pb.TelemetryPacket] = []
    policy = small_policy(blueprint_metadata=lookup)
    service = TamiyoService(settings(), policy, SECRET, telemetry_sink=sent.append)
    try:
        with pytest.raises(CatalogueDown):
            service.evaluate_step(make_packet())
        assert service.last_decision is None
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        assert "urza unreachable" in _events(sent, "policy_inference_failed")[0].description
    finally:
        service.close()


def test_hanging_metadata_fetch_misses_the_deadline_without_blocking_the_next_decision() -> None:
    """service.py: a hanging lookup is not left running behind a pretend cache miss: the decision fails
    CRITICAL at its deadline and the next decision does not wait for the hung one."""
    release = threading.Event()
    calls = {"n": 0}

    def lookup(_blueprint: str) -> pb.BlueprintDescriptor | None:
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(10)
        return pb.BlueprintDescriptor(blueprint_id=_blueprint, tier=pb.BLUEPRINT_TIER_SAFE)

    sent: list[pb.TelemetryPacket] = []
    config = settings(step_timeout_ms=300.0)
    policy = small_policy(config, blueprint_metadata=lookup)
    policy.warm_up(sizes=((2, 1, 1),))  # warm the weights before the timed decisions
    calls["n"] = 0
    service = TamiyoService(config, policy, SECRET, telemetry_sink=sent.append)
    try:
        with pytest.raises(DeadlineExceeded):
            service.evaluate_step(make_packet(n_blueprints=1))
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        assert _events(sent, "decision_deadline_exceeded")[0].level == pb.TELEMETRY_LEVEL_CRITICAL
        command = service.evaluate_step(make_packet(n_blueprints=1))
        assert command.signature
    finally:
        release.set()
        service.close()


def test_p1_step_budget_comes_from_the_environment_and_the_constructor_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """P1: `TAMIYO_STEP_TIMEOUT_MS` (default 5.0) sets the budget; the constructor override is kept, and is
    the budget health reports."""
    monkeypatch.delenv("TAMIYO_STEP_TIMEOUT_MS", raising=False)
    assert TamiyoSettings().step_timeout_ms == 5.0
    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "7.5")
    from_env = TamiyoSettings()
    for override, expected in ((None, 7.5), (12.0, 12.0)):
        service = TamiyoService(
            from_env, ScriptedPolicy(Proposal(pb.POLICY_ACTION_WAIT)), SECRET, step_timeout_ms=override
        )
        try:
            assert service.step_timeout_ms == expected
            assert service.telemetry.health().indicators["step_timeout_ms"] == expected
        finally:
            service.close()


def test_p2_compile_warm_up_metric_and_fallback_event_through_the_service() -> None:
    """P2: a compiled warm-up sets `tamiyo.gnn.compile_warm_ms`; a failed compile is a WARNING event with
    its reason and a fallback count, and the policy keeps deciding eagerly (never a silent switch)."""

    def working(module: torch.nn.Module) -> Any:
        return module

    def broken(_module: torch.nn.Module) -> Any:
        raise RuntimeError("inductor unavailable")

    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(settings(), small_policy(compiler=working), SECRET, telemetry_sink=sent.append)
    try:
        service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        metrics = {m.name: m.value for p in sent for m in p.metrics}
        assert metrics["tamiyo.gnn.compile_warm_ms"] > 0.0
        assert service.telemetry.compile_warm_ms._value.get() > 0.0
        assert _events(sent, "gnn_compile_warm")
    finally:
        service.close()

    sent.clear()
    service = TamiyoService(settings(), small_policy(compiler=broken), SECRET, telemetry_sink=sent.append)
    try:
        service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        (event,) = _events(sent, "gnn_compile_fallback")
        assert (
            event.level == pb.TELEMETRY_LEVEL_WARNING and "inductor unavailable" in event.attributes["reason"]
        )
        assert service.telemetry.compile_fallbacks._value.get() == 1.0
        health = service.telemetry.health()
        assert health.indicators["compile_enabled"] == 0.0 and "inductor unavailable" in health.summary
    finally:
        service.close()


def test_cpu_fallback_fix_service_issues_the_policys_real_decision_after_a_caught_failure() -> None:
    """CPU fallback fix (regression): after a caught compile failure the successful eager output is used;
    the command is the GNN's own decision, not a PAUSE."""

    def broken(_module: torch.nn.Module) -> Any:
        raise RuntimeError("cuda path failed")

    packet = make_packet(stages={0: pb.SEED_STAGE_PROBATIONARY})
    reference = small_policy(greedy=True).propose(packet)
    service = TamiyoService(settings(), small_policy(compiler=broken, greedy=True), SECRET)
    try:
        command = service.evaluate_step(packet)
        decision = service.last_decision
        assert decision is not None
        assert decision.proposal == reference and decision.proposal.reason == "gnn"
        assert command.annotations["policy_action"] == pb.PolicyAction.Name(reference.action)
        assert reference.action == pb.POLICY_ACTION_PAUSE or command.command_type != pb.COMMAND_PAUSE
    finally:
        service.close()


def test_p5_deadline_miss_is_critical_priority_with_the_budgets_in_health() -> None:
    """P5: the one event table decides level and priority; health carries the timeout budgets."""

    class Slow(ScriptedPolicy):
        def propose(self, packet: pb.SystemStatePacket) -> Proposal:
            threading.Event().wait(0.2)
            return super().propose(packet)

    sent: list[pb.TelemetryPacket] = []
    config = settings(step_timeout_ms=20.0, metadata_timeout_ms=15.0)
    service = TamiyoService(config, Slow(Proposal(pb.POLICY_ACTION_WAIT)), SECRET, telemetry_sink=sent.append)
    try:
        with pytest.raises(DeadlineExceeded):
            service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        last = sent[-1]
        assert last.priority == pb.MESSAGE_PRIORITY_CRITICAL and last.level == pb.TELEMETRY_LEVEL_CRITICAL
        assert last.system_health.status == pb.HEALTH_STATUS_CRITICAL
        assert last.system_health.indicators["step_timeout_ms"] == 20.0
        assert last.system_health.indicators["metadata_timeout_ms"] == 15.0
    finally:
        service.close()


def test_p8_blend_annotations_follow_the_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """P8: `TAMIYO_ENABLE_BLEND_MODE_ANN` turns blend-mode annotations (mode, confidence params) on/off."""
    germinate = Proposal(
        action=pb.POLICY_ACTION_GERMINATE,
        slot_id="slot-0",
        blueprint_id="bp-0",
        blend_mode=pb.BLEND_MODE_CONFIDENCE,
    )
    for value, expected in (("true", True), ("false", False)):
        monkeypatch.setenv("TAMIYO_ENABLE_BLEND_MODE_ANN", value)
        config = TamiyoSettings(step_timeout_ms=10_000.0)
        service = TamiyoService(config, ScriptedPolicy(germinate), SECRET)
        try:
            command = service.evaluate_step(make_packet())
            assert command.seed_operation.operation == pb.SEED_OP_GERMINATE
            assert ("blend_gate_k" in command.annotations) is expected
            assert ("blend_mode" in command.annotations) is expected
        finally:
            service.close()


# -- __init__.py and the composition root ------------------------------------------------------------


def test_public_surface_is_the_entry_points_other_subsystems_need_only() -> None:
    """__init__.py: `__all__` is pared down to the stable entry points (the classes, one header reader and
    the outbox's statuses, which the CLI lists)."""
    assert sorted(esper.tamiyo.__all__) == sorted(PUBLIC_FACE)
    classes = set(PUBLIC_FACE) - {"read_payload_header", "OUTBOX_STATUSES"}
    assert all(isinstance(getattr(esper.tamiyo, name), type) for name in classes)
    assert callable(esper.tamiyo.read_payload_header)
    assert esper.tamiyo.OUTBOX_STATUSES == ("pending", "published", "dropped")


def test_esper_run_builds_the_gnn_controller_and_its_state_round_trips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`esper run --policy gnn`: the composition root binds the GNN behind the same Controller interface
    as the heuristic; a checkpoint loads, a missing one or another policy's state is refused."""
    from esper.cli import _build_controller

    monkeypatch.setenv("TAMIYO_STEP_TIMEOUT_MS", "10000")
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))  # never the working directory's

    controller = _build_controller("gnn", SECRET)
    command = controller.evaluate_step(make_packet())
    SignatureVerifier(SECRET).verify(command)
    controller.restore_state(controller.export_state())

    weights = tmp_path / "policy.safetensors"
    GNNPolicy(TamiyoSettings(gnn_seed=3)).save(weights)
    loaded = _build_controller("gnn", SECRET, weights)
    assert json.dumps(loaded.export_state()).count(GNNPolicy.load(weights, TamiyoSettings()).version)
    # The policy's own run state refuses weights of another version instead of mixing them.
    policy = GNNPolicy.load(weights, TamiyoSettings())
    state = policy.state()
    policy.restore(state)
    with pytest.raises(CheckpointIncompatible, match="version"):
        policy.restore({**state, "version": "gnn-other"})
    with pytest.raises(ConfigurationError, match="does not exist"):
        _build_controller("gnn", SECRET, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigurationError, match="unknown policy"):
        _build_controller("lstm", SECRET)
