"""The traced plan of the dense inference path: same function, only while its topology and weights hold."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from esper.leyline import pb
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.gnn import TamiyoGNN
from esper.tamiyo.model.graph import TamiyoGraph, collate
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.plan import PlanError
from esper.tamiyo.runtime.service import TamiyoService
from tests.tamiyo.packets import SMALL, make_packet, settings, small_policy

SECRET = b"plan-test-secret-0123456789abcdef"


def build(packet: pb.SystemStatePacket, builder: GraphBuilder | None = None) -> TamiyoGraph:
    return (builder or GraphBuilder(settings())).build(packet, update_stats=False)


def dense(model: TamiyoGNN, graph: TamiyoGraph) -> GNNOutput:
    """The untraced dense path (the plan is set aside for the call)."""
    plan, model._plan = model._plan, None
    try:
        with torch.inference_mode():
            return model(graph)
    finally:
        model._plan = plan


def assert_same(got: GNNOutput, want: GNNOutput) -> None:
    for field in fields(GNNOutput):
        torch.testing.assert_close(getattr(got, field.name), getattr(want, field.name), rtol=1e-5, atol=1e-5)


def model() -> TamiyoGNN:
    torch.manual_seed(0)
    return TamiyoGNN(SMALL).eval()


@pytest.mark.parametrize(
    ("layers", "slots", "blueprints", "stages"),
    [
        (4, 3, 2, {0: pb.SEED_STAGE_TRAINING}),
        (3, 2, 5, {}),  # digits-sized
        (2, 5, 2, {1: pb.SEED_STAGE_BLENDING, 3: pb.SEED_STAGE_PROBATIONARY}),  # several slots per layer
        (1, 3, 0, {}),  # no blueprint: empty node type, no attention over offered blueprints
    ],
)
def test_plan_computes_what_the_dense_path_computes(
    layers: int, slots: int, blueprints: int, stages: dict[int, int]
) -> None:
    net = model()
    graph = build(make_packet(layers, slots, blueprints, stages=stages))
    assert net.build_plan(graph) > 0
    assert net.has_plan and net._planned(graph) is not None
    with torch.inference_mode():
        assert_same(net(graph), dense(net, graph))


def test_plan_follows_edge_features_that_change_without_a_topology_change() -> None:
    """A seed taking a blueprint changes the `in_use` edge features, not the topology: the plan still
    serves, with the edge terms of the new features."""
    net = model()
    builder = GraphBuilder(settings())
    before = build(make_packet(4, 3, 2), builder)
    net.build_plan(before)
    after = build(make_packet(4, 3, 2, stages={1: pb.SEED_STAGE_TRAINING}), builder)
    rel = ("blueprint", "offered_to", "slot")
    assert not torch.equal(before.edge_attr[rel], after.edge_attr[rel])
    assert net._planned(after) is not None
    with torch.inference_mode():
        planned = net(after)
    assert_same(planned, dense(net, after))
    with torch.inference_mode():  # and back: the terms follow the features again
        assert_same(net(before), dense(net, before))


def test_plan_is_not_used_for_another_topology_or_changed_weights() -> None:
    net = model()
    graph = build(make_packet(4, 3, 2))
    net.build_plan(graph)
    other = build(make_packet(5, 3, 2))
    assert net._planned(other) is None  # the dense path serves another topology
    with torch.inference_mode():
        assert_same(net(other), dense(net, other))
    assert net.has_plan  # and the plan stays for its own topology
    with torch.no_grad():
        net.action_head.bias.add_(1.0)  # an optimiser step or a load changes weights in place
    assert net._planned(graph) is None and not net.has_plan
    with torch.inference_mode():
        out = net(graph)
    assert_same(out, dense(net, graph))


def test_plan_checks_cancellation_around_each_segment() -> None:
    net = model()
    graph = build(make_packet(4, 3, 2))
    net.build_plan(graph)
    calls: list[int] = []
    with torch.inference_mode():
        net(graph, lambda: calls.append(1))
    assert len(calls) == 3  # before the SAGE segment, between SAGE and GAT, after the heads

    class Late(Exception):
        pass

    def late() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise Late

    calls.clear()
    with torch.inference_mode(), pytest.raises(Late):
        net(graph, late)
    assert len(calls) == 2  # the GAT segment never ran


def test_build_plan_refuses_a_batch_and_keeps_no_plan() -> None:
    net = model()
    graph = build(make_packet(4, 3, 2))
    net.build_plan(graph)
    with pytest.raises(PlanError, match="batch of 2"):
        net.build_plan(collate([graph, graph]))
    assert not net.has_plan


def test_rehearsal_traces_the_topology_and_a_failed_trace_is_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    packet = make_packet(4, 3, 2, stages={0: pb.SEED_STAGE_TRAINING})
    sent: list[pb.TelemetryPacket] = []
    policy = small_policy()
    service = TamiyoService(settings(), policy, SECRET, telemetry_sink=sent.append)
    try:
        assert not policy.plan_status.enabled and policy.plan_status.reason == "no topology rehearsed yet"
        service.prepare(packet)
        assert policy.plan_status.enabled and policy.plan_status.builds == 1 and policy.module.has_plan
        service.evaluate_step(packet)
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        names = [event.name for telemetry in sent for event in telemetry.events]
        assert "gnn_plan_built" in names and "gnn_plan_fallback" not in names
        assert "plan: traced" in sent[-1].system_health.summary

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("tracer exploded")

        monkeypatch.setattr(torch.jit, "trace", broken)
        service.prepare(make_packet(5, 3, 2))  # a new topology: a new plan is traced, and fails
        assert not policy.module.has_plan
        status = policy.plan_status
        assert not status.enabled and status.fallbacks == 1 and "tracer exploded" in status.reason
        service.evaluate_step(make_packet(5, 3, 2))  # the dense path decides
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        events = [event for telemetry in sent for event in telemetry.events]
        fallback = [event for event in events if event.name == "gnn_plan_fallback"]
        assert len(fallback) == 1 and "tracer exploded" in fallback[0].attributes["reason"]
        assert fallback[0].level == pb.TELEMETRY_LEVEL_WARNING
        assert service.telemetry.registry.get_sample_value("tamiyo_gnn_plan_fallback_total") == 1.0
        assert "plan: plan failed" in sent[-1].system_health.summary
    finally:
        service.close()


def test_no_plan_when_disabled_by_settings() -> None:
    policy = small_policy(settings(enable_plan=False))
    service = TamiyoService(settings(enable_plan=False), policy, SECRET)
    try:
        service.prepare(make_packet())
        assert not policy.module.has_plan
        assert policy.plan_status.reason == "disabled by settings (enable_plan=false)"
    finally:
        service.close()


def test_loading_weights_drops_the_plan() -> None:
    policy = small_policy()
    service = TamiyoService(settings(), policy, SECRET)
    try:
        service.prepare(make_packet())
        assert policy.module.has_plan
        policy.load_state_bytes(small_policy(seed=7).state_bytes())
        assert not policy.module.has_plan
    finally:
        service.close()
