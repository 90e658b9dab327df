"""The policy computes on the device of its parameters (checked on `meta`); P7's CUDA graph reports
"not available" off CUDA; policy weights load onto whatever device the network is on."""

from __future__ import annotations

import pytest
import torch

from esper.leyline import pb
from esper.tamiyo.model import policy as policy_module
from esper.tamiyo.model.cudagraph import CapturedForward, CaptureUnavailable, cuda_graphs_available
from esper.tamiyo.model.outputs import GNNOutput
from esper.tamiyo.model.plan import plan_inputs
from esper.tamiyo.model.weights import decode_weights
from esper.tamiyo.runtime.service import TamiyoService
from tests.tamiyo.packets import SECRET, make_packet, settings, small_policy

torch.set_num_threads(1)


def _outputs(out: GNNOutput) -> list[torch.Tensor]:
    return [getattr(out, name) for name in GNNOutput.__dataclass_fields__]


def test_the_network_runs_on_the_device_of_its_parameters() -> None:
    """On `meta` (no data): the message-passing path, with a graph built on the CPU as the service does.
    The dense path reads its adjacency's values once per topology (repeated edges), so it is checked on
    the CPU below, and its cache compares the graph's own CPU tensors."""
    policy = small_policy()
    graph = policy.builder.build(make_packet(), update_stats=False)
    policy.module.to("meta")
    assert policy.module.device == torch.device("meta")
    with torch.no_grad():
        out = policy.module.forward_message_passing(graph)
    for tensor in _outputs(out):
        assert tensor.device.type == "meta"


def test_the_dense_path_reuses_its_blocks_by_the_graphs_own_tensors() -> None:
    policy = small_policy()
    graph = policy.builder.build(make_packet(), update_stats=False)
    module = policy.module
    edge_attr = module.edge_attrs(graph, module.device)
    first = module.dense_adjacency(graph, edge_attr, module.device)
    again = module.dense_adjacency(graph, module.edge_attrs(graph, module.device), module.device)
    assert first is not None and again is not None
    assert all(again[key] is first[key] for key in first)
    for index, _, attr, _, _ in module._adjacency_cache.values():
        assert any(index is value for value in graph.edge_index.values())
        assert attr.device.type == "cpu"


def test_the_plans_inputs_are_put_on_the_networks_device() -> None:
    policy = small_policy()
    graph = policy.builder.build(make_packet(), update_stats=False)
    types = tuple(graph.x)
    inputs = plan_inputs(graph, types, torch.device("meta"))
    assert len(inputs) == 2 * len(types)
    assert all(tensor.device.type == "meta" for tensor in inputs)


def test_cuda_graphs_are_not_available_off_cuda_and_nothing_is_counted_as_a_fallback() -> None:
    policy = small_policy(settings(enable_cuda_graph=True))
    assert policy.plan_status.capture.reason == "no topology rehearsed yet"
    graph = policy.builder.build(make_packet(), update_stats=False)
    policy.rehearse(graph)
    capture = policy.plan_status.capture
    assert not capture.enabled and capture.reason.startswith("not available: the policy is on cpu")
    assert capture.fallbacks == 0 and capture.captures == 0
    assert policy.plan_status.enabled  # the traced plan serves as before
    assert not policy.module.has_capture
    assert cuda_graphs_available(torch.device("cpu"))
    try:
        policy.module.capture_graph(graph)
    except CaptureUnavailable as exc:
        assert "not available" in str(exc)
    else:
        raise AssertionError("a capture on the CPU must be refused")


def test_cuda_graphs_stay_off_by_default() -> None:
    policy = small_policy()
    policy.rehearse(policy.builder.build(make_packet(), update_stats=False))
    assert policy.plan_status.capture.reason == "disabled by settings (enable_cuda_graph=false)"


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_policy_weights_saved_on_one_device_load_onto_another() -> None:
    source = small_policy(seed=1)
    payload = source.state_bytes()
    target = small_policy(seed=2)
    target.module.to("meta")
    tensors = decode_weights(payload, target.module, target.config)
    assert {tensor.device.type for tensor in tensors.values()} == {"cpu"}
    target.module.load_state_dict(tensors, strict=True)
    for name, parameter in target.module.named_parameters():
        assert parameter.device.type == "meta", name
    # and back: the CPU copy of a network holds the very weights that were saved
    back = small_policy(seed=3)
    back.load_state_bytes(payload)
    for (name, want), got in zip(
        source.module.state_dict().items(), back.module.state_dict().values(), strict=True
    ):
        assert torch.equal(want, got), name


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_a_captured_forward_replays_what_the_dense_path_computes_and_misses_another_topology() -> None:
    policy = small_policy(settings(enable_cuda_graph=True, device="cuda"))
    packet = make_packet()
    policy.rehearse(policy.builder.build(packet, update_stats=False))
    capture = policy.plan_status.capture
    assert capture.enabled and capture.captures == 1, capture.reason
    packet.validation_loss, packet.training_loss = 0.3, 0.2  # new features, the same topology
    graph = policy.builder.build(packet, update_stats=False)
    with torch.inference_mode():
        replayed = policy.module(graph)
        reference = policy.module.forward_message_passing(graph)
    for want, got in zip(_outputs(reference), _outputs(replayed), strict=True):
        assert got.device.type == "cuda"
        assert torch.allclose(want, got, rtol=1e-4, atol=1e-4)
    assert policy.module.capture_misses == 0
    grown = policy.builder.build(make_packet(n_layers=5), update_stats=False)
    with torch.inference_mode():
        policy.module(grown)
    assert policy.module.capture_misses == 1 and policy.module.has_capture


def _events(sent: list[pb.TelemetryPacket], name: str) -> list[pb.TelemetryEvent]:
    return [event for telemetry in sent for event in telemetry.events if event.name == name]


def test_the_service_announces_cuda_graphs_unavailable_once_and_a_failed_capture_as_a_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[pb.TelemetryPacket] = []
    policy = small_policy(settings(enable_cuda_graph=True))
    service = TamiyoService(settings(enable_cuda_graph=True), policy, SECRET, telemetry_sink=sent.append)
    try:
        service.prepare(make_packet())
        service.prepare(make_packet())  # the same status: announced once
        service.evaluate_step(make_packet())
        service.telemetry.drain()
        unavailable = _events(sent, "gnn_cuda_graph_unavailable")
        assert len(unavailable) == 1 and unavailable[0].level == pb.TELEMETRY_LEVEL_INFO
        assert not _events(sent, "gnn_cuda_graph_fallback")
        assert not service.telemetry.registry.get_sample_value("tamiyo_gnn_cuda_graph_fallback_total")

        def refuse(cls: type[CapturedForward], model: object, graph: object) -> CapturedForward:
            raise CaptureUnavailable("capture failed: RuntimeError: operation not permitted when capturing")

        # As on a GPU whose capture fails: the plan still serves, the failure is a counted fallback.
        monkeypatch.setattr(policy_module, "cuda_graphs_available", lambda device: "")
        monkeypatch.setattr(CapturedForward, "capture", classmethod(refuse))
        service.prepare(make_packet(n_layers=5))
        status = policy.plan_status
        assert status.enabled and not status.capture.enabled and status.capture.fallbacks == 1
        service.evaluate_step(make_packet(n_layers=5))
        service.telemetry.drain()
        fallback = _events(sent, "gnn_cuda_graph_fallback")
        assert len(fallback) == 1 and "not permitted" in fallback[0].attributes["reason"]
        assert fallback[0].level == pb.TELEMETRY_LEVEL_WARNING
        assert service.telemetry.registry.get_sample_value("tamiyo_gnn_cuda_graph_fallback_total") == 1.0
    finally:
        service.close()
