"""TamiyoService: routing only, one settings object, the persistent worker, failures surfaced."""

from __future__ import annotations

import gc
import inspect
import os
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
import torch

import esper.tamiyo
from esper.leyline import ContractViolation, ManualClock, SignatureVerifier, pb
from esper.tamiyo import GNNPolicy
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.normalizer_state import InMemoryNormalizerStore, NormalizerState
from esper.tamiyo.model.proposal import Cancellation, Proposal
from esper.tamiyo.runtime import service as service_module
from esper.tamiyo.runtime import worker as worker_module
from esper.tamiyo.runtime.risk import RiskGates
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.runtime.worker import DeadlineExceeded, InferenceWorker, WorkerSchedulingError
from esper.tamiyo.settings import TamiyoSettings
from tests.tamiyo.packets import (
    PUBLIC_FACE,
    SECRET,
    SMALL,
    ScriptedPolicy,
    Stateless,
    make_packet,
    settings,
    small_policy,
)

WAIT = Proposal(action=pb.POLICY_ACTION_WAIT)


def test_constructor_is_compatible_and_evaluate_step_signs_a_command() -> None:
    clock = ManualClock()
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET, clock=clock)
    try:
        command = service.evaluate_step(make_packet())
        assert command.command_type == pb.COMMAND_WAIT
        SignatureVerifier(SECRET, clock=clock).verify(command)
        assert command.annotations["risk_gate"] == "pass"
    finally:
        service.close()


def test_gnn_policy_end_to_end_through_risk_and_signing() -> None:
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(settings(), small_policy(), SECRET, telemetry_sink=sent.append)
    try:
        packet = make_packet(stages={0: pb.SEED_STAGE_TRAINING})
        for _ in range(5):
            command = service.evaluate_step(packet)
            assert command.signature and command.command_type != pb.COMMAND_UNSPECIFIED
        decision = service.last_decision
        assert decision is not None and decision.policy_version == service.policy_version
        assert decision.proposal.head_choices
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        names = {event.name for packet_ in sent for event in packet_.events}
        assert "graph_missing_features" in names  # bp-0 has no catalogue entry: reported, not hidden
    finally:
        service.close()


def test_evaluate_step_is_the_only_entry_point() -> None:
    assert not hasattr(TamiyoService, "evaluate_epoch")
    public = {name for name, _ in inspect.getmembers(TamiyoService) if not name.startswith("_")}
    # `prepare` and `anticipate` are warm-ups that decide nothing (see the next tests), not second ways
    # to decide.
    # `submit` and `collect` are the same step decision split in two (the trainer trains in between).
    assert public == {
        "evaluate_step",
        "submit",
        "collect",
        "in_flight",
        "prepare",
        "anticipate",
        "close",
        "policy_version",
        "swap_policy",
        "step_timeout_ms",  # the one resolved step budget (P1)
        "checkpointed",  # the trainer's word that a checkpoint is durable: releases records, decides nothing
        "rewound",  # the trainer's word that a rollback undid steps: abandons records, decides nothing
        "export_state",  # Tolaria's `Controller`: the state a checkpoint keeps, decides nothing
        "restore_state",
        "consult",  # attaches the policy-update input polled between decisions, decides nothing
    }


def test_prepare_warms_up_on_the_real_topology_and_decides_nothing() -> None:
    """The warm-up on a run's own packet builds that topology's caches outside the deadline; it signs,
    records and reports nothing, leaves the normaliser statistics and the sampler alone, so the decision
    that follows is the one an unprepared service makes."""
    packet = make_packet(stages={0: pb.SEED_STAGE_TRAINING})
    proposals = []
    for prepared in (False, True):
        torch.manual_seed(0)
        policy = small_policy()
        sent: list[pb.TelemetryPacket] = []
        service = TamiyoService(settings(), policy, SECRET, telemetry_sink=sent.append)
        try:
            if prepared:
                statistics = policy.builder.normalizer.states()
                service.prepare(packet)
                service.telemetry.drain()  # packets reach the sink from the publisher thread
                assert service.last_decision is None and not sent
                assert policy.builder.normalizer.states() == statistics
                assert policy.module._adjacency_cache  # this topology's dense blocks are built
                assert policy.module.has_plan and policy.plan_status.enabled  # and its inference is traced
            service.evaluate_step(packet)
            assert service.last_decision is not None
            proposals.append(service.last_decision.proposal)
        finally:
            service.close()
    # The same choices; the traced plan's numbers agree with the dense path's to float rounding.
    unprepared, prepared_ = proposals
    assert replace(prepared_, log_prob=0.0, value=0.0, head_log_probs={}) == replace(
        unprepared, log_prob=0.0, value=0.0, head_log_probs={}
    )
    assert prepared_.log_prob == pytest.approx(unprepared.log_prob, abs=1e-5)
    assert prepared_.value == pytest.approx(unprepared.value, abs=1e-5)
    assert prepared_.head_log_probs == pytest.approx(unprepared.head_log_probs, abs=1e-5)
    plain = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET)
    try:
        with pytest.raises(ContractViolation):  # a bad packet fails the warm-up as it fails a decision
            plain.prepare(pb.SystemStatePacket())
    finally:
        plain.close()


class WarmProbe(GNNPolicy):
    """The small GNN policy; once armed (after `prepare`, which times `warm` to measure the policy),
    `warm` is recorded, and can fail or run until cut short."""

    def __init__(self, mode: str = "plain") -> None:
        super().__init__(settings(), config=SMALL)
        self.mode = mode
        self.armed = False
        self.started = threading.Event()
        self.done = threading.Event()
        self.warmed = 0

    def warm(self, graph: TamiyoGraph, *, cancel: Cancellation) -> None:
        if not self.armed:
            super().warm(graph, cancel=cancel)
            return
        self.started.set()
        if self.mode == "fail":
            raise RuntimeError("the network broke while warming up")
        if self.mode == "slow":
            for _ in range(30_000):
                cancel.check()
                time.sleep(0.001)
        super().warm(graph, cancel=cancel)
        self.warmed += 1
        self.done.set()


def _warmups(service: TamiyoService, outcome: str) -> float | None:
    return service.telemetry.registry.get_sample_value("tamiyo_warmups_ahead_total", {"outcome": outcome})


def test_anticipate_warms_up_on_the_last_packet_in_the_background_and_changes_nothing() -> None:
    """The warm-up ahead of a decision runs the network on the inference thread on the last packet seen,
    and decides, signs, records and reports nothing: the decisions that follow are those of a service
    that never anticipated (same seed)."""
    packet = make_packet(stages={0: pb.SEED_STAGE_TRAINING})
    proposals: dict[bool, list[Proposal]] = {}
    for anticipating in (False, True):
        torch.manual_seed(0)
        policy = WarmProbe()
        sent: list[pb.TelemetryPacket] = []
        service = TamiyoService(settings(), policy, SECRET, telemetry_sink=sent.append)
        try:
            service.anticipate()  # nothing seen yet: nothing to warm up on
            assert not policy.started.is_set()
            service.prepare(packet)
            policy.armed = True
            proposals[anticipating] = []
            for _ in range(3):
                if anticipating:
                    stats, plan, rng = (
                        policy.builder.normalizer.states(),
                        policy.plan_status,
                        torch.get_rng_state(),
                    )
                    service.anticipate()
                    assert policy.done.wait(30)
                    assert policy.builder.normalizer.states() == stats and policy.plan_status == plan
                    service.telemetry.drain()  # packets reach the sink from the publisher thread
                    assert torch.equal(torch.get_rng_state(), rng) and not sent
                    policy.done.clear()
                service.evaluate_step(packet)
                assert service.last_decision is not None
                proposals[anticipating].append(service.last_decision.proposal)
                service.telemetry.drain()  # the decision's packet is delivered before the next check
                sent.clear()
            if anticipating:
                assert policy.warmed == 3 and _warmups(service, "completed") == 3.0
            else:
                assert policy.warmed == 0 and _warmups(service, "completed") is None
        finally:
            service.close()
    assert proposals[True] == proposals[False]


def test_a_decision_cuts_a_warm_up_ahead_short_and_is_decided_on_time() -> None:
    policy = WarmProbe("slow")
    service = TamiyoService(settings(step_timeout_ms=2_000.0), policy, SECRET)
    try:
        packet = make_packet()
        service.prepare(packet)
        policy.armed = True
        service.anticipate()
        assert policy.started.wait(30)
        service.anticipate()  # one at a time: the worker is busy
        assert service.evaluate_step(packet).signature
        assert _warmups(service, "cut_short") == 1.0 and _warmups(service, "skipped") == 1.0
        assert service.telemetry.registry.get_sample_value("tamiyo_deadline_misses_total") == 0.0
    finally:
        service.close()


def test_a_failed_warm_up_ahead_is_an_event_and_the_decision_still_runs() -> None:
    policy = WarmProbe("fail")
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(settings(), policy, SECRET, telemetry_sink=sent.append)
    try:
        packet = make_packet()
        service.prepare(packet)
        policy.armed = True
        service.anticipate()
        assert policy.started.wait(30)
        assert service.evaluate_step(packet).signature  # the decision path itself is sound
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        failed = [
            event for packet_ in sent for event in packet_.events if event.name == "anticipation_failed"
        ]
        assert len(failed) == 1 and "the network broke while warming up" in failed[0].description
        assert "pkt-1" in failed[0].description and _warmups(service, "failed") == 1.0
    finally:
        service.close()


def test_anticipate_does_nothing_for_a_plain_policy() -> None:
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET)
    try:
        service.evaluate_step(make_packet())
        service.anticipate()
        assert service.evaluate_step(make_packet()).signature
        assert _warmups(service, "completed") is None and _warmups(service, "skipped") is None
    finally:
        service.close()


def test_package_exports_only_what_other_subsystems_need() -> None:
    assert set(esper.tamiyo.__all__) <= set(PUBLIC_FACE)
    assert {"TamiyoService", "GNNPolicy"} <= set(esper.tamiyo.__all__)


def test_package_docstring_points_to_the_design_of_record_not_the_legacy_spec() -> None:
    doc = esper.tamiyo.__doc__ or ""
    assert "DESIGN.md" in doc and "legacy" in doc


class _GCObservingPolicy(Stateless):
    """Records whether Python's cyclic collector was enabled while it decided."""

    version = "gc-observer"

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[bool] = []
        self.fail = fail

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        self.seen.append(gc.isenabled())
        if self.fail:
            raise RuntimeError("policy broke")
        return WAIT


def test_the_collector_is_paused_for_a_decision_and_back_after_it_even_after_a_failure() -> None:
    """A collection inside a decision is a deadline miss that has nothing to do with the policy: the
    collector waits until the decision is over, and is enabled again however the decision ended."""
    assert gc.isenabled()
    for fail in (False, True):
        policy = _GCObservingPolicy(fail=fail)
        service = TamiyoService(settings(), policy, SECRET)
        try:
            if fail:
                with pytest.raises(RuntimeError, match="policy broke"):  # a policy's bug is not hidden
                    service.evaluate_step(make_packet())
            else:
                service.evaluate_step(make_packet())
        finally:
            service.close()
        assert policy.seen == [False] and gc.isenabled()
    gc.disable()  # a caller that turned the collector off keeps it off
    try:
        service = TamiyoService(settings(), _GCObservingPolicy(), SECRET)
        try:
            service.evaluate_step(make_packet())
        finally:
            service.close()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_deadline_miss_raises_critical_and_never_returns_a_pause() -> None:
    sent: list[pb.TelemetryPacket] = []
    policy = ScriptedPolicy(WAIT, block_first=True)
    service = TamiyoService(settings(), policy, SECRET, step_timeout_ms=250.0, telemetry_sink=sent.append)
    try:
        with pytest.raises(DeadlineExceeded):
            service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        critical = [e for p in sent for e in p.events if e.name == "decision_deadline_exceeded"]
        assert len(critical) == 1 and critical[0].level == pb.TELEMETRY_LEVEL_CRITICAL
        assert service.last_decision is None
    finally:
        policy.release.set()
        service.close()


def test_late_decision_does_not_block_the_next_one() -> None:
    policy = ScriptedPolicy(WAIT, block_first=True)
    tight = TamiyoService(settings(), policy, SECRET, step_timeout_ms=250.0)
    try:
        with pytest.raises(DeadlineExceeded):
            tight.evaluate_step(make_packet())
        # The first decision is still blocked inside the policy; the next one must not wait for it.
        tight.step_timeout_ms = 30_000.0
        assert tight.evaluate_step(make_packet()).command_type == pb.COMMAND_WAIT
        assert policy.calls == 2
    finally:
        policy.release.set()
        tight.close()


def test_persistent_worker_runs_every_decision_off_the_caller_thread() -> None:
    policy = ScriptedPolicy(WAIT)
    service = TamiyoService(settings(), policy, SECRET)
    try:
        for _ in range(3):
            service.evaluate_step(make_packet())
        assert len(set(policy.threads)) == 1 and policy.threads[0] != threading.get_ident()
        assert isinstance(service._worker, InferenceWorker)
    finally:
        service.close()
    assert service._worker.threads == []


def test_settings_are_resolved_once_not_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    service = TamiyoService(settings(), small_policy(), SECRET)

    def forbidden(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("settings were read on the hot path")

    monkeypatch.setattr(TamiyoSettings, "__init__", forbidden)
    monkeypatch.setattr("os.environ.get", forbidden)
    monkeypatch.setattr("os.getenv", forbidden)
    try:
        germinate = make_packet()
        for _ in range(3):
            service.evaluate_step(germinate)
    finally:
        service.close()


def test_one_settings_object_feeds_every_component() -> None:
    config = settings(step_timeout_ms=7.0, max_layers=2, risk_max_blueprint_risk=0.3)
    policy = small_policy(config)
    service = TamiyoService(config, policy, SECRET, step_timeout_ms=10_000.0)
    try:
        assert service.settings is config
        assert policy.builder.build(make_packet(n_layers=5)).num_nodes("layer") == 2
        assert service._risk._max_risk == 0.3
        # P1: the constructor's override is the one budget, health included (not the settings' 7 ms).
        health = service.telemetry.health()
        assert health.indicators["step_timeout_ms"] == 10_000.0
        assert service._risk.step_budget_ms == 10_000.0
    finally:
        service.close()


def test_service_only_routes_between_separate_components() -> None:
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET)
    try:
        assert isinstance(service._risk, RiskGates)
        source = inspect.getsource(service_module)
        for computation in ("torch.", "softmax", "validation_loss", "isolation_violations"):
            assert computation not in source
    finally:
        service.close()


def test_risk_override_is_recorded_in_the_command_annotations() -> None:
    germinate = Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id="bp-0")
    service = TamiyoService(settings(), ScriptedPolicy(germinate), SECRET, blueprint_metadata=lambda _b: None)
    try:
        command = service.evaluate_step(make_packet())
        assert command.command_type == pb.COMMAND_WAIT
        assert command.annotations["risk_gate"] == "blueprint"
        assert command.annotations["policy_action"] == "POLICY_ACTION_GERMINATE"
        assert "no catalogue entry" in command.annotations["risk_reason"]
    finally:
        service.close()


def test_germinate_carries_blend_annotations() -> None:
    germinate = Proposal(
        action=pb.POLICY_ACTION_GERMINATE,
        slot_id="slot-0",
        blueprint_id="bp-0",
        blend_mode=pb.BLEND_MODE_CHANNEL,
    )
    descriptor = pb.BlueprintDescriptor(blueprint_id="bp-0", tier=pb.BLUEPRINT_TIER_SAFE)
    service = TamiyoService(
        settings(), ScriptedPolicy(germinate), SECRET, blueprint_metadata=lambda _b: descriptor
    )
    try:
        command = service.evaluate_step(make_packet())
        assert command.seed_operation.blueprint_id == "bp-0"
        assert command.annotations["blend_mode"] == "CHANNEL"
        assert (
            command.annotations["blend_channel_alpha_init"] == "0.982"
        )  # the opening Kasmina starts each channel gate at
    finally:
        service.close()


def test_normalizer_write_failure_is_an_event_not_silence() -> None:
    class FailingStore(InMemoryNormalizerStore):
        def save(self, states: dict[str, NormalizerState]) -> None:
            raise OSError("read-only file system")

    sent: list[pb.TelemetryPacket] = []
    policy = small_policy(settings(normalizer_flush_every=1), normalizer_store=FailingStore())
    service = TamiyoService(settings(), policy, SECRET, telemetry_sink=sent.append)
    service.evaluate_step(make_packet())
    service.telemetry.drain()  # packets reach the sink from the publisher thread
    events = [e for p in sent for e in p.events if e.name == "normalizer_flush_failed"]
    assert events and "read-only file system" in events[0].description
    service._worker.close()


def test_invalid_packet_raises_and_issues_nothing() -> None:
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET)
    try:
        packet = make_packet()
        packet.packet_id = ""
        with pytest.raises(ContractViolation, match="packet_id"):
            service.evaluate_step(packet)
        assert service.last_decision is None
    finally:
        service.close()


def test_compile_disabled_reason_is_reported_at_start() -> None:
    service = TamiyoService(settings(), small_policy(), SECRET)
    try:
        assert "enable_compile=false" in service.telemetry.health().summary
    finally:
        service.close()


def _realtime_service(sent: list[pb.TelemetryPacket]) -> TamiyoService:
    """A service asking for real-time priority 10, its telemetry packets appended to `sent`."""
    return TamiyoService(
        settings(realtime_priority=10), ScriptedPolicy(WAIT), SECRET, telemetry_sink=sent.append
    )


def _unavailable(sent: list[pb.TelemetryPacket]) -> list[pb.TelemetryEvent]:
    return [e for p in sent for e in p.events if e.name == "worker_realtime_unavailable"]


def _refuse_realtime(priority: int) -> None:
    if priority:
        raise PermissionError(1, "Operation not permitted")


def test_a_refused_real_time_priority_is_announced_and_decisions_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "set_thread_priority", _refuse_realtime)
    sent: list[pb.TelemetryPacket] = []
    service = _realtime_service(sent)
    try:
        service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        events = _unavailable(sent)
        assert len(events) == 1
        assert events[0].level == pb.TELEMETRY_LEVEL_WARNING
        assert "not permitted" in events[0].attributes["reason"]
        assert "TAMIYO_REALTIME_PRIORITY" in events[0].description
        assert service.telemetry.health().indicators["worker_realtime"] == 0.0
    finally:
        service.close()


def test_a_required_real_time_priority_that_is_refused_stops_the_service_from_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "set_thread_priority", _refuse_realtime)
    before = {thread.name for thread in threading.enumerate()}
    with pytest.raises(WorkerSchedulingError) as caught:
        TamiyoService(settings(realtime_priority=10, realtime_required=True), ScriptedPolicy(WAIT), SECRET)
    assert caught.value.priority == 10 and "not permitted" in caught.value.reason
    assert "TAMIYO_REALTIME_REQUIRED" in str(caught.value)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not [name for name in leftover if name.startswith("tamiyo-inference")]  # its worker was closed


def test_a_granted_real_time_priority_shows_in_health_and_emits_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "set_thread_priority", lambda _priority: None)
    raised: list[tuple[int, int]] = []
    restored: list[int] = []

    def fake_raise(priority: int) -> Any:
        raised.append((threading.get_ident(), priority))
        return lambda: restored.append(threading.get_ident())

    monkeypatch.setattr(service_module, "raise_priority", fake_raise)
    sent: list[pb.TelemetryPacket] = []
    service = _realtime_service(sent)
    try:
        service.evaluate_step(make_packet())
        service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        assert not _unavailable(sent)
        assert service.telemetry.health().indicators["worker_realtime"] == 1.0
        # The calling thread is raised for each decision and put back after it.
        me = threading.get_ident()
        assert raised == [(me, 11), (me, 11)] and restored == [me, me]  # one above the inference thread
    finally:
        service.close()


def test_a_pipelined_decision_raises_the_caller_only_while_it_waits_for_its_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Raising and restoring the caller's priority cost more than a pipelined collect of a finished
    job: the caller is raised only when the job is still running when it comes to collect."""
    monkeypatch.setattr(worker_module, "set_thread_priority", lambda _priority: None)
    policy = ScriptedPolicy(WAIT, block_first=True)
    raised: list[int] = []

    def fake_raise(priority: int) -> Any:
        raised.append(priority)
        policy.release.set()  # the caller waits now: let the blocked job finish
        return lambda: None

    monkeypatch.setattr(service_module, "raise_priority", fake_raise)
    service = TamiyoService(
        settings(realtime_priority=10, step_timeout_ms=5000.0), policy, SECRET, telemetry_sink=lambda _p: None
    )
    try:
        service.submit(make_packet())  # its job blocks until the caller is raised
        assert service.collect().command_type == pb.COMMAND_WAIT
        assert raised == [11]
        service.submit(make_packet())
        in_flight = service._in_flight
        assert in_flight is not None
        while not in_flight.pending.finished:  # a gate on the job's own state, not a timer
            time.sleep(0.001)
        assert service.collect().command_type == pb.COMMAND_WAIT
        assert raised == [11]  # the finished job's collect left the caller as it was
    finally:
        service.close()


def test_a_calling_thread_refused_the_priority_is_announced_once_and_decisions_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "set_thread_priority", lambda _priority: None)
    calls: list[int] = []

    def refuse(priority: int) -> Any:
        calls.append(priority)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(service_module, "raise_priority", refuse)
    sent: list[pb.TelemetryPacket] = []
    service = _realtime_service(sent)
    try:
        for _ in range(3):
            assert service.evaluate_step(make_packet()).command_type == pb.COMMAND_WAIT
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        events = _unavailable(sent)
        assert len(events) == 1 and "calling thread" in events[0].attributes["reason"]
        assert calls == [11]  # not retried on every decision
    finally:
        service.close()


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="per-thread scheduling is Linux only")
def test_the_calling_thread_gets_its_own_scheduling_back_after_a_decision() -> None:
    """With the real calls: whether or not the OS grants the priority, the caller leaves
    `evaluate_step` with the policy it came in with, also when the decision fails."""
    before = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    service = TamiyoService(settings(realtime_priority=10), ScriptedPolicy(WAIT), SECRET)
    try:
        service.evaluate_step(make_packet())
        assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
        with pytest.raises(ContractViolation):
            service.evaluate_step(pb.SystemStatePacket())
        assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
    finally:
        service.close()


def test_a_thread_that_loses_its_real_time_priority_after_a_warm_up_is_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The priority is granted at start, dropped for the warm-up, and refused when taken back (a limit
    changed meanwhile): the service reports it after the warm-up, and decisions go on at normal priority."""
    calls: list[int] = []

    def granted_once(priority: int) -> None:
        calls.append(priority)
        if priority and calls.count(priority) > 1:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(worker_module, "set_thread_priority", granted_once)
    monkeypatch.setattr(service_module, "raise_priority", lambda _priority: lambda: None)
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(
        settings(realtime_priority=10), small_policy(), SECRET, telemetry_sink=sent.append
    )
    try:
        service.prepare(make_packet())
        service.evaluate_step(make_packet())
        service.telemetry.drain()  # packets reach the sink from the publisher thread
        events = _unavailable(sent)
        assert len(events) == 1 and "not permitted" in events[0].attributes["reason"]
        assert service.telemetry.health().indicators["worker_realtime"] == 0.0
        assert calls[:3] == [10, 0, 10]  # granted, dropped for the warm-up, refused when taken back
    finally:
        service.close()


class NonCooperativePolicy(Stateless):
    """Computes for `seconds` in GIL-releasing torch operations, never looking at a cancellation token."""

    version = "busy-1"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        weights = torch.ones(256, 256)
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            torch.mm(weights, weights)
        return WAIT


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux only")
def test_the_deadline_holds_on_a_single_core_at_real_time_priority() -> None:
    """Caller and inference thread on one CPU: when the deadline passes, the caller (one priority above
    the inference thread where real-time priority is granted, preempting by the OS's normal rules where
    it is not) gets the CPU back and raises at once, while the late job still computes."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})  # the worker thread inherits it when it is created
    try:
        service = TamiyoService(
            settings(realtime_priority=10), NonCooperativePolicy(0.5), SECRET, step_timeout_ms=20.0
        )
        try:
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                service.evaluate_step(make_packet())
            assert time.monotonic() - start < 0.25  # not the late job's 0.5 s
        finally:
            service.close()
    finally:
        os.sched_setaffinity(0, affinity)


class TimedWarm(GNNPolicy):
    """The small GNN policy on a manual clock: each `warm` moves the clock by the next duration (ms)."""

    def __init__(self, clock: ManualClock, durations_ms: list[float]) -> None:
        super().__init__(settings(), config=SMALL)
        self.clock = clock
        self.durations_ms = durations_ms
        self.calls = 0

    def warm(self, graph: TamiyoGraph, *, cancel: Cancellation) -> None:
        super().warm(graph, cancel=cancel)
        self.clock.advance(self.durations_ms[self.calls % len(self.durations_ms)] / 1e3)
        self.calls += 1


def _events(service: TamiyoService, sent: list[pb.TelemetryPacket]) -> list[pb.TelemetryEvent]:
    service.telemetry.flush("run")
    service.telemetry.drain()  # packets reach the sink from the publisher thread
    return [event for packet in sent for event in packet.events]


def test_prepare_warns_at_start_with_the_measured_figure_when_the_policy_cannot_meet_the_budget() -> None:
    """A graph build and forward that take 4 ms against a 5 ms budget (of which they may take half): the
    measurement is kept, and a policy_over_budget event gives the figure and what to do, before any
    decision is taken."""
    clock = ManualClock()
    policy = TimedWarm(clock, [4.0])
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(
        settings(step_timeout_ms=5.0), policy, SECRET, clock=clock, telemetry_sink=sent.append
    )
    try:
        assert service.policy_fit is None
        service.prepare(make_packet())
        fit = service.policy_fit
        assert fit is not None and not fit.fits
        assert fit.measured_ms == pytest.approx(4.0) and (fit.allowed_ms, fit.budget_ms) == (2.5, 5.0)
        assert policy.calls == fit.runs == service_module.PROBE_RUNS
        (event,) = [event for event in _events(service, sent) if event.name == "policy_over_budget"]
        assert event.level == pb.TELEMETRY_LEVEL_WARNING
        assert dict(event.attributes) == {
            "measured_ms": "4.000",
            "allowed_ms": "2.500",
            "budget_ms": "5",
            "policy_size": "custom",
        }
        assert "takes 4.00 ms per decision" in event.description
        assert "TAMIYO_STEP_TIMEOUT_MS=8 or more" in event.description
        assert "--policy heuristic" in event.description and "TAMIYO_POLICY_SIZE=default" in event.description
    finally:
        service.close()


def test_prepare_stays_quiet_when_the_policy_fits_and_forgives_one_slow_run() -> None:
    clock = ManualClock()
    policy = TimedWarm(clock, [1.0] * 15 + [40.0])  # one preempted run among sixteen
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(
        settings(step_timeout_ms=5.0), policy, SECRET, clock=clock, telemetry_sink=sent.append
    )
    try:
        service.prepare(make_packet())
        fit = service.policy_fit
        assert fit is not None and fit.fits and fit.measured_ms == pytest.approx(1.0)
        assert "policy_over_budget" not in {event.name for event in _events(service, sent)}
    finally:
        service.close()


def test_the_share_of_the_budget_the_policy_may_take_is_a_setting() -> None:
    clock = ManualClock()
    service = TamiyoService(
        settings(step_timeout_ms=5.0, prepare_budget_share=0.2), TimedWarm(clock, [1.5]), SECRET, clock=clock
    )
    try:
        service.prepare(make_packet())
        assert service.policy_fit is not None and service.policy_fit.allowed_ms == 1.0
        assert not service.policy_fit.fits
    finally:
        service.close()


def test_a_plain_policy_is_not_measured() -> None:
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET)
    try:
        service.prepare(make_packet())
        assert service.policy_fit is None
    finally:
        service.close()
