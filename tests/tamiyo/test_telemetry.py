"""P5 telemetry: one event table, health with budgets, per-service registries; P8 blend annotations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from esper.leyline import ManualClock, pb
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.telemetry import EVENTS, BlendAnnotator, TamiyoTelemetry, UnknownTelemetryEvent
from tests.tamiyo.packets import settings

SOURCE = Path(__file__).resolve().parents[2] / "src" / "esper" / "tamiyo"


def test_every_emitted_event_is_in_the_one_mapping_table() -> None:
    emitted: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        emitted |= set(re.findall(r'emit\(\s*"([a-z_]+)"', path.read_text()))
    assert emitted, "no emit sites found"
    assert emitted <= set(EVENTS)
    assert EVENTS["decision_deadline_exceeded"].level == pb.TELEMETRY_LEVEL_CRITICAL


def test_unknown_event_is_refused() -> None:
    telemetry = TamiyoTelemetry(settings(), ManualClock())
    with pytest.raises(UnknownTelemetryEvent):
        telemetry.emit("something_new", "no level was decided for this")


def test_packet_has_level_priority_health_and_budget_indicators() -> None:
    sent: list[pb.TelemetryPacket] = []
    telemetry = TamiyoTelemetry(
        settings(step_timeout_ms=5.0, metadata_timeout_ms=20.0), ManualClock(), sink=sent.append
    )
    telemetry.record_deadline_miss(5.0, 7.5, "pkt-9")
    packet = telemetry.flush("run-1")
    assert sent == [packet]
    assert packet.priority == pb.MESSAGE_PRIORITY_CRITICAL
    assert packet.level == pb.TELEMETRY_LEVEL_CRITICAL
    indicators = packet.system_health.indicators
    assert indicators["step_timeout_ms"] == 5.0 and indicators["metadata_timeout_ms"] == 20.0
    assert indicators["last_latency_ms"] == 7.5 and indicators["deadline_misses"] == 1
    assert packet.system_health.status == pb.HEALTH_STATUS_CRITICAL


def test_each_service_has_its_own_prometheus_registry() -> None:
    first = TamiyoTelemetry(settings(), ManualClock())
    second = TamiyoTelemetry(settings(), ManualClock())
    first.record_decision(Proposal(action=pb.POLICY_ACTION_WAIT), 1.0)
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("tamiyo_decisions_total", {"action": "WAIT"}) == 1.0
    assert second.registry.get_sample_value("tamiyo_decisions_total", {"action": "WAIT"}) is None


def test_compile_state_metric_and_events() -> None:
    telemetry = TamiyoTelemetry(settings(), ManualClock())
    telemetry.record_compile(False, "compile failed: boom", 0.0, 1)
    packet = telemetry.flush()
    assert [e.name for e in packet.events] == ["gnn_compile_fallback"]
    assert telemetry.registry.get_sample_value("tamiyo_gnn_compile_fallback_total") == 1.0
    assert any(m.name == "tamiyo.gnn.compile_warm_ms" for m in packet.metrics)
    assert "compile failed: boom" in packet.system_health.summary


def test_blend_annotations_on_germinate_only_and_behind_the_switch() -> None:
    germinate = Proposal(
        action=pb.POLICY_ACTION_GERMINATE, slot_id="s", blueprint_id="b", blend_mode=pb.BLEND_MODE_CONFIDENCE
    )
    notes = BlendAnnotator(settings(blend_gate_k=4.0)).annotations(germinate)
    assert notes["blend_mode"] == "CONFIDENCE" and notes["alpha_ramp_steps"] == "16"
    assert notes["blend_gate_k"] == "4" and "blend_gate_tau" in notes and "blend_alpha_hi" in notes
    assert BlendAnnotator(settings()).annotations(Proposal(action=pb.POLICY_ACTION_WAIT)) == {}
    assert BlendAnnotator(settings(enable_blend_mode_ann=False)).annotations(germinate) == {}
