"""Tamiyo's runtime under failure: telemetry that cannot hold up a decision, one step budget for every
part, a construction and a close that leave nothing running, and blend settings that reach the seed."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from esper.kasmina.blending import ConfidenceGate
from esper.leyline import ManualClock, load_settings, pb
from esper.oona import Bus, EmbeddedBus, OonaSettings, TelemetryPublisher, open_envelope
from esper.tamiyo.model.normalizer import NormalizerWriteError
from esper.tamiyo.model.normalizer_state import InMemoryNormalizerStore, NormalizerState
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.commands import CommandFactory, blend_parameters
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.runtime.telemetry import QueuedSink
from tests.kasmina import support as kasmina
from tests.tamiyo.packets import SECRET, ScriptedPolicy, Stateless, make_packet, settings, small_policy

WAIT = Proposal(action=pb.POLICY_ACTION_WAIT)
GERMINATE = Proposal(
    action=pb.POLICY_ACTION_GERMINATE,
    slot_id="slot-0",
    blueprint_id="bp-0",
    blend_mode=pb.BLEND_MODE_RESIDUAL,
)
GATE_S = 30.0  # how long a test waits for a gate before it fails (a safety net, never a measurement)


# -- item 4: telemetry never holds up a decision -------------------------------------------------------


class BlockingBus:
    """A bus whose `publish` blocks until released, as an unreachable Redis would."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.published: list[pb.BusEnvelope] = []

    def publish(self, stream: str, envelope: pb.BusEnvelope) -> str:
        self.entered.set()
        assert self.release.wait(GATE_S), "the test never released the bus"
        self.published.append(envelope)
        return f"{len(self.published)}-0"


def _dropped(service: TamiyoService) -> float | None:
    return service.telemetry.registry.get_sample_value("tamiyo_telemetry_dropped_total")


def test_decisions_return_while_the_telemetry_bus_is_blocked_and_overflow_is_counted() -> None:
    bus = BlockingBus()
    service = TamiyoService(
        settings(telemetry_queue_size=2),
        ScriptedPolicy(WAIT),
        SECRET,
        telemetry_sink=TelemetryPublisher(cast(Bus, bus)),
    )
    try:
        assert service.evaluate_step(make_packet()).command_type == pb.COMMAND_WAIT
        assert bus.entered.wait(GATE_S)  # the publisher holds the first packet inside the bus
        for _ in range(3):  # two fill the queue, the third finds it full
            assert service.evaluate_step(make_packet()).command_type == pb.COMMAND_WAIT
        assert not bus.release.is_set() and bus.published == []  # every decision returned meanwhile
        assert _dropped(service) == 1.0
        bus.release.set()
        assert service.telemetry.drain(GATE_S)
        service.evaluate_step(make_packet())  # its packet says what was dropped
        assert service.telemetry.drain(GATE_S)
    finally:
        bus.release.set()
        service.close()
    events = [e for envelope in bus.published for e in open_envelope(envelope, pb.TelemetryPacket).events]
    (dropped,) = [e for e in events if e.name == "telemetry_dropped"]
    assert dropped.attributes["dropped"] == "1" and dropped.level == pb.TELEMETRY_LEVEL_WARNING


def test_closing_the_publisher_is_bounded_and_says_what_it_dropped(caplog: pytest.LogCaptureFixture) -> None:
    bus = BlockingBus()
    sink = QueuedSink(TelemetryPublisher(cast(Bus, bus)), capacity=4)
    try:
        for index in range(3):
            assert sink.offer(pb.TelemetryPacket(packet_id=f"tel-{index}"))
        assert bus.entered.wait(GATE_S)  # one in the bus, two queued
        with caplog.at_level(logging.WARNING, logger="esper.tamiyo"):
            closed = sink.close(timeout_s=0.05)
        assert closed.stuck and closed.dropped == 2 and closed.delivered == 0
        assert "2 dropped" in caplog.text
        assert not sink.offer(pb.TelemetryPacket(packet_id="tel-late")) and sink.dropped == 3
    finally:
        bus.release.set()


def test_a_sink_that_raises_is_counted_and_reported_and_publishing_goes_on() -> None:
    calls: list[str] = []

    def sink(packet: pb.TelemetryPacket) -> None:
        calls.append(packet.packet_id)
        if len(calls) == 1:
            raise RuntimeError("serialiser bug")

    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET, telemetry_sink=sink)
    try:
        service.evaluate_step(make_packet())
        assert service.telemetry.drain(GATE_S)
        packet = service.telemetry.flush()  # reports the failure
        (event,) = [e for e in packet.events if e.name == "telemetry_publish_failed"]
        assert "serialiser bug" in event.attributes["error"]
        assert service.telemetry.drain(GATE_S) and len(calls) == 2
        failures = service.telemetry.registry.get_sample_value("tamiyo_telemetry_publish_failures_total")
        assert failures == 1.0
    finally:
        service.close()


# -- item 16 (P1): one budget for the worker, the latency gate and health ----------------------------------


class TenMillisecondPolicy(Stateless):
    """Proposes a GERMINATE and takes 10 ms on the service's (manual) clock to do it."""

    version = "ten-ms-1"

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        self.clock.advance(0.010)
        return GERMINATE


def test_an_overridden_budget_is_the_one_the_worker_the_risk_gate_and_health_use() -> None:
    clock = ManualClock()
    # The settings say 5 ms; the constructor says 1000 ms: a 10 ms decision is well within budget.
    service = TamiyoService(
        settings(step_timeout_ms=5.0),
        TenMillisecondPolicy(clock),
        SECRET,
        clock=clock,
        step_timeout_ms=1000.0,
    )
    worker_budgets: list[float] = []
    run = service._worker.run

    def recording_run(job: Any, *, timeout_ms: float, **kwargs: Any) -> Any:
        worker_budgets.append(timeout_ms)
        return run(job, timeout_ms=timeout_ms, **kwargs)

    service._worker.run = recording_run  # type: ignore[method-assign]
    try:
        for _ in range(2):
            command = service.evaluate_step(make_packet())
            assert command.command_type == pb.COMMAND_SEED  # the second is not held as "too slow"
            assert command.annotations["risk_gate"] == "pass"
        health = service.telemetry.health()
        assert health.status == pb.HEALTH_STATUS_HEALTHY
        assert health.indicators["last_latency_ms"] == pytest.approx(10.0)
        assert worker_budgets == [1000.0, 1000.0]
        assert service._risk.step_budget_ms == health.indicators["step_timeout_ms"] == 1000.0
    finally:
        service.close()


def test_changing_the_budget_changes_it_everywhere_and_a_bad_one_is_refused() -> None:
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET, step_timeout_ms=1000.0)
    try:
        service.step_timeout_ms = 2.0
        assert service._risk.step_budget_ms == service.telemetry.health().indicators["step_timeout_ms"] == 2.0
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="step_timeout_ms"):
                service.step_timeout_ms = bad
        assert service.step_timeout_ms == 2.0
    finally:
        service.close()


# -- item 19: a failed construction leaks nothing; close closes every part ------------------------------


class FailingWarmUp(ScriptedPolicy):
    """A policy whose start-up warm-up fails."""

    def warm_up(self) -> None:
        raise RuntimeError("compile exploded")


def test_a_failed_warm_up_leaves_no_thread_running() -> None:
    before = set(threading.enumerate())
    with pytest.raises(Exception, match="compile exploded"):
        TamiyoService(settings(), FailingWarmUp(WAIT), SECRET, telemetry_sink=lambda _packet: None)
    assert set(threading.enumerate()) - before == set()


class FailingNormalizerStore(InMemoryNormalizerStore):
    def save(self, states: dict[str, NormalizerState]) -> None:
        raise OSError("read-only file system")


@pytest.fixture
def store_and_bus(tmp_path: Path) -> Any:
    store = TamiyoStore(tmp_path / "tamiyo.sqlite3")
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
    yield store, bus
    store.close()
    bus.close()


def _service_threads() -> set[str]:
    return {thread.name for thread in threading.enumerate() if thread.name.startswith("tamiyo-")}


def test_a_failed_normaliser_write_at_close_still_closes_windows_and_stops_every_thread(
    store_and_bus: tuple[TamiyoStore, EmbeddedBus],
) -> None:
    store, bus = store_and_bus
    before = _service_threads()
    config = settings(normalizer_flush_every=10_000)
    policy = small_policy(config, normalizer_store=FailingNormalizerStore())
    service = TamiyoService(config, policy, SECRET, store=store, bus=bus, telemetry_sink=lambda _packet: None)
    service.evaluate_step(make_packet())
    assert store.open_windows()
    with pytest.raises(NormalizerWriteError):
        service.close()
    assert store.open_windows() == []  # closed as ABORTED all the same
    assert _service_threads() - before == set()  # outbox and telemetry publisher stopped


def test_the_first_close_failure_is_raised_and_the_others_are_logged_beside_it(
    store_and_bus: tuple[TamiyoStore, EmbeddedBus], caplog: pytest.LogCaptureFixture
) -> None:
    store, bus = store_and_bus
    config = settings(normalizer_flush_every=10_000)
    policy = small_policy(config, normalizer_store=FailingNormalizerStore())
    service = TamiyoService(config, policy, SECRET, store=store, bus=bus)
    service.evaluate_step(make_packet())
    field_reports = service._field_reports
    assert field_reports is not None
    close_reports = field_reports.close

    def failing_close(*, abort_open_windows: bool) -> None:
        close_reports(abort_open_windows=abort_open_windows)
        raise RuntimeError("outbox hung up")

    field_reports.close = failing_close  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="esper.tamiyo"), pytest.raises(NormalizerWriteError) as caught:
        service.close()
    assert "outbox hung up" in caplog.text  # logged beside the first error, never instead of it
    assert any("outbox hung up" in note for note in caught.value.__notes__)


# -- item 17 (P8): the blend settings reach the seed Kasmina builds -------------------------------------


def _germinate_in_kasmina(tmp_path: Path, mode: int = pb.BLEND_MODE_CONFIDENCE, **blend: object) -> Any:
    clock = kasmina.new_clock()
    host = kasmina.TinyHost()
    catalogue = kasmina.open_catalogue(tmp_path)
    manager = kasmina.make_manager(host, catalogue, clock)
    packet = pb.SystemStatePacket(
        packet_id="pkt-blend", training_run_id=kasmina.RUN_ID, source_subsystem="test", current_epoch=1
    )
    packet.seed_states.extend(manager.seed_states(learning_rate=0.01, steps_per_epoch=10))
    packet.blueprint_ids.append("mlp_small")
    config = settings(**blend)
    factory = CommandFactory(kasmina.SECRET, clock, blend_parameters=blend_parameters(config))
    proposal = Proposal(
        action=pb.POLICY_ACTION_GERMINATE,
        slot_id="a",
        blueprint_id="mlp_small",
        blend_mode=mode,
        alpha_ramp_steps=8,
    )
    command = factory.build(proposal, packet)
    result = manager.apply(command, step=1)
    assert result.accepted, result
    assert host.a.seed is not None
    return command, host.a.seed.blender


def test_blend_settings_reach_the_blender_of_the_seed_kasmina_builds(tmp_path: Path) -> None:
    command, blender = _germinate_in_kasmina(
        tmp_path, blend_gate_k=3.0, blend_gate_tau=0.25, blend_alpha_lo=0.1, blend_alpha_hi=0.6
    )
    assert dict(command.seed_operation.parameters) == {
        "gate_k": 3.0,
        "gate_tau": 0.25,
        "alpha_lo": 0.1,
        "alpha_hi": 0.6,
    }
    assert blender.mode == pb.BLEND_MODE_CONFIDENCE
    assert blender.confidence == ConfidenceGate(k=3.0, tau=0.25, alpha_lo=0.1, alpha_hi=0.6)
    # The blend those values give: alpha scaled between alpha_lo and alpha_hi.
    scale = blender.confidence_alpha(torch.zeros(4, 8), 1.0)
    assert torch.all((scale >= 0.1) & (scale <= 0.6))


def test_the_channel_start_setting_opens_each_channel_gate_of_the_seed_as_set(tmp_path: Path) -> None:
    command, blender = _germinate_in_kasmina(tmp_path, pb.BLEND_MODE_CHANNEL, blend_channel_alpha_init=0.25)
    assert dict(command.seed_operation.parameters) == {"channel_alpha_init": 0.25}
    assert blender.mode == pb.BLEND_MODE_CHANNEL and blender.channel_logits is not None
    gates = torch.sigmoid(blender.channel_logits)
    assert torch.allclose(gates, torch.full_like(gates, 0.25))
    # The blend it gives at full alpha: a quarter of the seed's residual on every channel.
    x, s = torch.zeros(2, gates.numel()), torch.ones(2, gates.numel())
    assert torch.allclose(blender(x, x, s, 1.0), torch.full_like(s, 0.25))


def test_without_the_blend_flag_a_command_carries_no_blend_parameters(tmp_path: Path) -> None:
    command, blender = _germinate_in_kasmina(tmp_path, enable_blend_mode_ann=False, blend_gate_k=3.0)
    assert dict(command.seed_operation.parameters) == {}
    assert blender.confidence == ConfidenceGate()  # Kasmina's defaults
