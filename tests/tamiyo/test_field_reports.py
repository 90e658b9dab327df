"""P9 through the service: one window per decision, reports when windows close, restart, abort, CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from esper.cli import app
from esper.leyline import ManualClock, load_settings, pb
from esper.oona import EmbeddedBus, OonaSettings, Streams, open_envelope
from esper.tamiyo.model.normalizer_state import statistics_from_proto
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.records.field_reports import SYNTH_PREFIX, judge_outcome, new_report_id
from esper.tamiyo.records.store import TamiyoStore
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.settings import TamiyoSettings
from tests.tamiyo.packets import SECRET, ScriptedPolicy, make_packet, settings, small_policy

WAIT = Proposal(action=pb.POLICY_ACTION_WAIT, log_prob=-0.25, value=0.5, head_choices={"action": 0})
GERMINATE = Proposal(
    action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id="bp-1", head_choices={"action": 1}
)


def packet(
    epoch: int, accuracy: float = 0.5, loss: float = 1.0, params: float | None = 1000.0
) -> pb.SystemStatePacket:
    message = make_packet()
    message.packet_id = f"pkt-{epoch}-{accuracy}"
    message.current_epoch = epoch
    message.validation_accuracy = accuracy
    message.validation_loss = loss
    if params is not None:
        message.training_metrics["param_count"] = params
    return message


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TamiyoStore]:
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as opened:
        yield opened


def service_for(store: TamiyoStore, proposal: Proposal = WAIT, **overrides: object) -> TamiyoService:
    return TamiyoService(settings(**overrides), ScriptedPolicy(proposal), SECRET, store=store)


def test_each_decision_opens_a_window_and_a_later_epoch_closes_it(store: TamiyoStore) -> None:
    service = service_for(store)
    try:
        first = service.evaluate_step(packet(3, accuracy=0.50, loss=1.0))
        second = service.evaluate_step(packet(3, accuracy=0.51, loss=0.9))
        assert {w.command_id for w in store.open_windows()} == {first.command_id, second.command_id}
        assert store.count_field_reports() == 0
        service.evaluate_step(packet(4, accuracy=0.60, loss=0.8, params=1100.0))
        reports = {s.report.command_id: s.report for s in store.field_reports()}
        assert set(reports) == {first.command_id, second.command_id}
        report = reports[first.command_id]
        assert report.report_id.startswith(SYNTH_PREFIX)
        assert report.outcome == pb.FIELD_REPORT_OUTCOME_SUCCESS
        assert report.observation_window_epochs == 1
        assert report.tamiyo_policy_version == "scripted-1"
        assert report.HasField("issued_at")
        assert report.metrics["accuracy_delta"] == pytest.approx(0.10)
        assert report.metrics["loss_delta"] == pytest.approx(-0.2)
        assert report.metrics["param_delta"] == pytest.approx(100.0)
        assert len(store.open_windows()) == 1  # the third decision's window
    finally:
        service.close(abort_open_windows=False)


def test_decision_record_carries_what_simic_needs(store: TamiyoStore) -> None:
    service = service_for(store)
    try:
        sent = packet(2)
        command = service.evaluate_step(sent)
    finally:
        service.close(abort_open_windows=False)
    record = store.decision(command.command_id)
    assert record is not None
    assert record.packet.packet_id == sent.packet_id
    assert (record.action, record.log_prob, record.value_estimate) == (pb.POLICY_ACTION_WAIT, -0.25, 0.5)
    assert dict(record.head_choices) == {"action": 0}
    assert record.final_command_type == pb.COMMAND_WAIT
    assert record.policy_version == "scripted-1"
    assert store.current_policy_version() == "scripted-1"


def test_a_growth_decision_records_its_layer_and_amount(store: TamiyoStore) -> None:
    from tests.tamiyo.test_heuristic_growth import host_packet

    widen = Proposal(
        action=pb.POLICY_ACTION_WIDEN,
        layer_id="fc2",
        units=4,
        head_choices={"action": 6, "layer": 1, "amount": 2},
    )
    service = service_for(store, widen)
    try:
        command = service.evaluate_step(host_packet(1.0))
    finally:
        service.close(abort_open_windows=False)
    record = store.decision(command.command_id)
    assert record is not None and record.action == pb.POLICY_ACTION_WIDEN
    assert (record.growth.layer_id, record.growth.units) == ("fc2", 4)
    assert dict(record.head_choices) == {"action": 6, "layer": 1, "amount": 2}


def test_a_gnn_decision_records_the_normaliser_statistics_its_graph_was_made_with(
    store: TamiyoStore,
) -> None:
    policy = small_policy()
    for epoch in range(5):  # the statistics drift away from a fresh builder's
        policy.propose(packet(epoch, accuracy=0.1 * epoch, loss=10.0 + epoch))
    before = policy.builder.normalizer.states()
    service = TamiyoService(settings(), policy, SECRET, store=store)
    try:
        command = service.evaluate_step(packet(6))
    finally:
        service.close(abort_open_windows=False)
    record = store.decision(command.command_id)
    assert record is not None
    assert statistics_from_proto(record.normalizer) == before
    assert policy.builder.normalizer.states() != before  # the decision's own packet joined them after


def test_window_of_n_epochs_closes_after_n(store: TamiyoStore) -> None:
    service = service_for(store, fr_obs_window_epochs=2)
    try:
        command = service.evaluate_step(packet(5, accuracy=0.5))
        service.evaluate_step(packet(6, accuracy=0.4))
        assert store.field_reports() == []
        service.evaluate_step(packet(7, accuracy=0.45, loss=1.0))
        (stored,) = store.field_reports()
        assert stored.report.command_id == command.command_id
        assert stored.report.observation_window_epochs == 2
        assert stored.report.outcome == pb.FIELD_REPORT_OUTCOME_REGRESSION
    finally:
        service.close(abort_open_windows=False)


def test_outcome_thresholds() -> None:
    config = TamiyoSettings()
    assert judge_outcome(0.01, 0.0, config) == pb.FIELD_REPORT_OUTCOME_SUCCESS
    assert judge_outcome(0.001, -0.05, config) == pb.FIELD_REPORT_OUTCOME_NEUTRAL
    assert judge_outcome(-0.02, 0.0, config) == pb.FIELD_REPORT_OUTCOME_REGRESSION
    assert judge_outcome(0.01, 0.5, config) == pb.FIELD_REPORT_OUTCOME_REGRESSION  # loss blew up
    assert judge_outcome(0.0, None, config) == pb.FIELD_REPORT_OUTCOME_NEUTRAL


def test_seed_command_report_names_the_seed_and_its_counterfactual_contribution(store: TamiyoStore) -> None:
    service = service_for(store, GERMINATE)
    try:
        command = service.evaluate_step(packet(1))
        assert command.command_type == pb.COMMAND_SEED
        later = packet(2, accuracy=0.52)
        state = later.seed_states[0]
        state.seed_id, state.stage, state.blueprint_id = "slot-0:g1", pb.SEED_STAGE_TRAINING, "bp-1"
        for key, value in (
            ("contribution_measured", 1.0),
            ("contribution_accuracy", 0.03),
            ("contribution_loss", 0.1),
        ):
            state.metrics[key] = value
        service._field_reports.lifecycle.observe(later)  # type: ignore[union-attr]
    finally:
        service.close(abort_open_windows=False)
    (stored,) = store.field_reports()
    assert stored.report.action == pb.POLICY_ACTION_GERMINATE
    assert (stored.report.seed_id, stored.report.blueprint_id) == ("slot-0:g1", "bp-1")
    assert stored.report.metrics["contribution_accuracy"] == pytest.approx(0.03)
    assert stored.report.metrics["contribution_loss"] == pytest.approx(0.1)


def test_unmeasured_contribution_is_missing_not_zero(store: TamiyoStore) -> None:
    service = service_for(store, GERMINATE)
    try:
        service.evaluate_step(packet(1))
        service.evaluate_step(packet(2, params=None))
    finally:
        service.close(abort_open_windows=False)
    report = next(s.report for s in store.field_reports())
    assert "contribution_accuracy" not in report.metrics
    assert "param_delta" not in report.metrics


def test_windows_survive_a_restart_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "tamiyo.sqlite3"
    with TamiyoStore(path) as first_store:
        service = service_for(first_store)
        command = service.evaluate_step(packet(3, accuracy=0.5))
        service.close(abort_open_windows=False)  # a crash or a halt: the window stays open
    with TamiyoStore(path) as second_store:
        assert [w.command_id for w in second_store.open_windows()] == [command.command_id]
        service = service_for(second_store)
        try:
            service.evaluate_step(packet(4, accuracy=0.5))
        finally:
            service.close(abort_open_windows=False)
        reports = [s.report for s in second_store.field_reports()]
        assert [r.command_id for r in reports] == [command.command_id]
        assert reports[0].outcome == pb.FIELD_REPORT_OUTCOME_NEUTRAL


def test_aborted_reports_claim_only_the_epochs_really_observed(store: TamiyoStore) -> None:
    service = service_for(store, fr_obs_window_epochs=5)
    early = service.evaluate_step(packet(3))
    late = service.evaluate_step(packet(5))  # two epochs into the first window, none into its own
    service.close()
    reports = {stored.report.command_id: stored.report for stored in store.field_reports()}
    assert {r.outcome for r in reports.values()} == {pb.FIELD_REPORT_OUTCOME_ABORTED}
    assert reports[early.command_id].observation_window_epochs == 2
    assert reports[early.command_id].metrics["epochs_observed"] == 2.0
    assert reports[late.command_id].observation_window_epochs == 0


def test_close_at_run_end_aborts_open_windows(store: TamiyoStore) -> None:
    sent: list[pb.TelemetryPacket] = []
    service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET, store=store, telemetry_sink=sent.append)
    command = service.evaluate_step(packet(1))
    service.close()
    (stored,) = store.field_reports()
    assert stored.report.command_id == command.command_id
    assert stored.report.outcome == pb.FIELD_REPORT_OUTCOME_ABORTED
    assert stored.report.notes
    assert store.open_windows() == []
    events = {event.name: event for p in sent for event in p.events}
    assert events["field_report_synthesised"].attributes["outcome"] == "ABORTED"
    assert "field_report_outbox_unwired" in events  # no bus: reports wait in the store, said out loud


def test_report_ids_are_unique_for_ever(tmp_path: Path) -> None:
    assert len({new_report_id() for _ in range(10_000)}) == 10_000
    path = tmp_path / "tamiyo.sqlite3"
    ids: list[str] = []
    for _ in range(2):  # two service lifetimes on one store: nothing restarts a counter
        with TamiyoStore(path) as opened:
            service = service_for(opened)
            for epoch in range(4):
                service.evaluate_step(packet(epoch))
            service.close()
            ids = [s.report.report_id for s in opened.field_reports()]
    assert len(ids) == 8 and len(set(ids)) == 8


def test_reports_and_decisions_are_published_on_the_bus(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
    with TamiyoStore(tmp_path / "tamiyo.sqlite3") as opened:
        registry_service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET, store=opened, bus=bus)
        first = registry_service.evaluate_step(packet(1))
        registry_service.evaluate_step(packet(2))
        deadline = time.monotonic() + 5  # the publisher thread sends without the decision waiting
        while opened.outbox_counts()["published"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        registry = registry_service.telemetry.registry
        registry_service.close()
        assert opened.outbox_counts() == {"pending": 0, "published": 2, "dropped": 0}
        assert registry.get_sample_value("tamiyo_field_reports_published_total") == 2
    bus.ensure_group(Streams.FIELD_REPORTS, "simic")
    bus.ensure_group(Streams.DECISIONS, "simic")
    reports = [
        open_envelope(d.envelope, pb.FieldReport)
        for d in bus.consume(Streams.FIELD_REPORTS, "simic", "s", count=10)
    ]
    decisions = bus.consume(Streams.DECISIONS, "simic", "s", count=10)
    assert first.command_id in {r.command_id for r in reports}
    assert {d.envelope.attributes["command_id"] for d in decisions} >= {r.command_id for r in reports}
    bus.close()


def test_a_bus_outage_never_fails_a_decision(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", load_settings(OonaSettings, environ={}))
    bus.close()  # every publish now fails
    clock = ManualClock()
    with TamiyoStore(tmp_path / "tamiyo.sqlite3", clock=clock) as opened:
        service = TamiyoService(settings(), ScriptedPolicy(WAIT), SECRET, store=opened, bus=bus, clock=clock)
        for epoch in range(3):
            service.evaluate_step(packet(epoch))
        service.close()
        counts = opened.outbox_counts()
        assert counts["pending"] == 3 and counts["published"] == 0  # kept for the next start
        assert all(s.attempts >= 1 and "closed" in s.last_error for s in opened.field_reports())


@pytest.mark.slow
def test_esper_run_writes_field_reports_and_esper_reports_lists_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(
        app,
        ["run", "--epochs", "3", "--no-progress", "--no-report", "--run-dir", str(run_dir), "--seed", "1"],
    )
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["reports", str(run_dir), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)["field_reports"]
    assert rows and all(row["report_id"].startswith(SYNTH_PREFIX) for row in rows)
    assert {row["status"] for row in rows} == {"published"}
    assert rows[-1]["outcome"] == "FIELD_REPORT_OUTCOME_ABORTED"  # the last window was open at the end
    aborted = runner.invoke(app, ["reports", str(run_dir), "--json", "--outcome", "aborted"])
    assert len(json.loads(aborted.stdout)["field_reports"]) == 1
    table = runner.invoke(app, ["reports", str(run_dir), "--status", "pending"])
    assert table.exit_code == 0 and "(0)" in table.stdout
    bad = runner.invoke(app, ["reports", str(run_dir), "--status", "lost"])
    assert bad.exit_code == 2
    missing = runner.invoke(app, ["reports", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
