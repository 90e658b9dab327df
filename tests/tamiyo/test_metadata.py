"""Tamiyo's blueprint metadata cache: filled from Urza, invalidated by its notifications, deterministic
eviction, deadline-bounded misses whose failures are events, and the risk gate refusing what it cannot vet."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from esper.leyline import ManualClock, pb
from esper.oona import Bus, EmbeddedBus, Streams, envelope_for
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.metadata import BlueprintMetadataCache, BlueprintMetadataUnavailable
from esper.tamiyo.runtime.risk import RiskContext, RiskGates
from esper.tamiyo.runtime.service import TamiyoService
from esper.urza import (
    BlueprintCatalogue,
    BusChangePublisher,
    CatalogueChangeFeed,
    CatalogueTimeout,
    UnknownBlueprint,
)
from tests.conftest import fast_oona_settings
from tests.tamiyo.packets import SECRET, ScriptedPolicy, Stateless, make_packet, settings

Event = tuple[str, str, dict[str, str]]


class Recorder:
    """An `EventSink` that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, name: str, description: str, /, **attributes: str) -> object:
        self.events.append((name, description, attributes))
        return None


class CountingSource:
    """A `BlueprintSource` over a catalogue that records every fetch and its deadline, and can fail."""

    def __init__(self, catalogue: BlueprintCatalogue) -> None:
        self.catalogue = catalogue
        self.fetches: list[tuple[str, float | None]] = []
        self.failing = False

    def get(self, blueprint_id: str, *, timeout_ms: float | None = None) -> pb.BlueprintDescriptor:
        self.fetches.append((blueprint_id, timeout_ms))
        if self.failing:
            raise CatalogueTimeout(self.catalogue.path, blueprint_id, timeout_ms or 0.0)
        return self.catalogue.get(blueprint_id, timeout_ms=timeout_ms)


@pytest.fixture
def bus(tmp_path: Path) -> Bus:
    return EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())


@pytest.fixture
def catalogue(tmp_path: Path, bus: Bus) -> BlueprintCatalogue:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3", publisher=BusChangePublisher(bus))
    catalogue.publish_pending()  # the seeding's notifications, before any cache listens
    return catalogue


def make_cache(
    source: CountingSource | BlueprintCatalogue, bus: Bus | None, recorder: Recorder, **kwargs: object
) -> BlueprintMetadataCache:
    factory = (lambda: CatalogueChangeFeed(bus)) if bus is not None else None
    return BlueprintMetadataCache(
        source,
        settings(metadata_timeout_ms=7.0),
        feed_factory=factory,
        emit=recorder,
        **kwargs,  # type: ignore[arg-type]
    )


def germinate(blueprint_id: str) -> Proposal:
    return Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id=blueprint_id)


def test_hits_are_served_from_memory_and_misses_fetched_with_the_metadata_deadline(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    source = CountingSource(catalogue)
    cache = make_cache(source, bus, Recorder())
    first = cache("mlp_small")
    assert first is not None and first.blueprint_id == "mlp_small"
    first.risk = 0.99  # a copy: the cache is not changed through it
    second = cache("mlp_small")
    assert second is not None and second.risk != 0.99
    assert source.fetches == [("mlp_small", 7.0)]
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_an_unknown_blueprint_is_none_remembered_and_held_by_the_gate(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    source = CountingSource(catalogue)
    recorder = Recorder()
    cache = make_cache(source, bus, recorder)
    assert cache("no-such-blueprint") is None and cache("no-such-blueprint") is None
    assert source.fetches == [("no-such-blueprint", 7.0)]
    decision = RiskGates(settings(), cache).evaluate(
        germinate("no-such-blueprint"), make_packet(), RiskContext()
    )
    assert decision.gate == "blueprint" and "no catalogue entry" in decision.reason
    assert decision.proposal.action == pb.POLICY_ACTION_WAIT
    assert recorder.events == []  # unknown is an answer, not a failure


def test_a_quarantine_notification_invalidates_and_the_gate_refuses_the_blueprint(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    source = CountingSource(catalogue)
    cache = make_cache(source, bus, Recorder())
    cache.warm(["mlp_small", "lowrank"])
    gates = RiskGates(settings(), cache)
    assert not gates.evaluate(germinate("mlp_small"), make_packet(), RiskContext()).overridden

    catalogue.quarantine("mlp_small", "diverged in run r-9")
    assert cache.poll() == 1
    assert cache.last_revision == catalogue.revision
    assert cache.stats.invalidations == 1
    assert source.fetches[-1] == ("mlp_small", 7.0)  # re-read at poll time, not during the decision
    fetches = len(source.fetches)
    decision = gates.evaluate(germinate("mlp_small"), make_packet(), RiskContext())
    assert decision.gate == "blueprint" and decision.reason == "blueprint 'mlp_small' is quarantined"
    assert len(source.fetches) == fetches
    assert not gates.evaluate(germinate("lowrank"), make_packet(), RiskContext()).overridden

    catalogue.unquarantine("mlp_small")
    cache.poll()
    assert not gates.evaluate(germinate("mlp_small"), make_packet(), RiskContext()).overridden


def test_a_removed_blueprint_becomes_unknown(catalogue: BlueprintCatalogue, bus: Bus) -> None:
    cache = make_cache(catalogue, bus, Recorder())
    cache.warm(["conv_se"])
    catalogue.remove("conv_se")
    cache.poll()
    assert cache("conv_se") is None


def test_notification_payloads_are_not_trusted_the_catalogue_is_reread(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    cache = make_cache(catalogue, bus, Recorder())
    cache.warm(["mlp_small"])
    forged = pb.CatalogueChange(kind=pb.CATALOGUE_CHANGE_UPDATED, blueprint_id="mlp_small", revision=999)
    forged.descriptor.CopyFrom(catalogue.get("mlp_small"))
    forged.descriptor.risk = 0.0
    forged.descriptor.tier = pb.BLUEPRINT_TIER_HIGH_RISK
    bus.publish(Streams.CATALOGUE, envelope_for(forged))
    cache.poll()
    described = cache("mlp_small")
    assert described is not None and described == catalogue.get("mlp_small")


def test_eviction_is_least_recently_used_with_ties_broken_by_id(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    cache = make_cache(catalogue, bus, Recorder(), capacity=3)
    cache.warm(["lowrank", "conv_se", "mlp_small"])  # one tick: ties
    cache("lowrank")  # now the most recent
    cache("attention_lite")  # a fourth: evicts the smaller id of the two untouched, conv_se
    assert "conv_se" not in cache and {"lowrank", "mlp_small", "attention_lite"} == {
        bid for bid in ("lowrank", "mlp_small", "attention_lite") if bid in cache
    }
    cache("conv_residual")  # evicts mlp_small (oldest tick)
    assert "mlp_small" not in cache and len(cache) == 3
    assert cache.stats.evictions == 2


def test_a_fetch_that_fails_is_an_event_and_a_refusal_never_a_pass(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    source = CountingSource(catalogue)
    recorder = Recorder()
    cache = make_cache(source, bus, recorder)
    source.failing = True
    with pytest.raises(BlueprintMetadataUnavailable, match="CatalogueTimeout"):
        cache.describe("mlp_small")
    decision = RiskGates(settings(), cache).evaluate(germinate("mlp_small"), make_packet(), RiskContext())
    assert decision.gate == "blueprint" and decision.proposal.action == pb.POLICY_ACTION_WAIT
    ((name, description, attributes),) = recorder.events
    assert name == "blueprint_metadata_unavailable" and "longer than 7 ms" in description
    assert attributes["blueprint_id"] == "mlp_small" and "CatalogueTimeout" in attributes["reason"]
    assert "mlp_small" not in cache and cache.stats.fetch_failures == 2
    source.failing = False
    assert cache("mlp_small") is not None  # not remembered as failed: fetched again


def test_a_real_catalogue_timeout_surfaces_through_the_cache(tmp_path: Path) -> None:
    class Stuck:
        def get(self, blueprint_id: str, *, timeout_ms: float | None = None) -> pb.BlueprintDescriptor:
            raise CatalogueTimeout(tmp_path, blueprint_id, timeout_ms or 0.0)

    recorder = Recorder()
    cache = BlueprintMetadataCache(Stuck(), settings(), emit=recorder)
    assert cache("x") is None and recorder.events[0][2]["blueprint_id"] == "x"
    assert isinstance(cache.last_failure, BlueprintMetadataUnavailable)


def test_unreadable_notifications_drop_everything_and_a_dead_bus_means_read_through(
    catalogue: BlueprintCatalogue, tmp_path: Path
) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())
    source = CountingSource(catalogue)
    recorder = Recorder()
    cache = BlueprintMetadataCache(
        source, settings(), feed_factory=lambda: CatalogueChangeFeed(bus), emit=recorder
    )
    cache.warm(["mlp_small", "lowrank"])
    bus.publish(Streams.CATALOGUE, envelope_for(pb.TelemetryPacket(packet_id="garbage")))
    cache.poll()
    assert len(cache) == 0 and cache.stats.resyncs == 1
    assert recorder.events[-1][2]["reason"] == "resync"

    cache("mlp_small")
    bus.close()  # the bus is gone: nothing may be trusted from now on
    cache.poll()
    cache.poll()
    assert [e[2]["reason"] for e in recorder.events].count("notifications") == 1  # one per outage
    assert len(cache) == 0
    before = len(source.fetches)
    cache("mlp_small")
    cache("mlp_small")
    assert len(source.fetches) == before + 2  # read through, nothing cached

    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())  # it comes back
    cache.poll()
    cache("mlp_small")
    cache("mlp_small")
    assert len(source.fetches) == before + 3 and "mlp_small" in cache
    cache.close()


def test_the_background_thread_applies_changes_without_being_asked(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    cache = make_cache(catalogue, bus, Recorder())
    cache.warm(["lowrank"])
    cache.start(poll_interval_s=0.01)
    try:
        catalogue.quarantine("lowrank", "background")
        deadline = time.monotonic() + 10
        while cache.last_revision < catalogue.revision and time.monotonic() < deadline:
            time.sleep(0.01)
        described = cache("lowrank")
        assert described is not None and described.quarantine
    finally:
        cache.close()
    assert [g.name for s in bus.stats() for g in s.groups] == []


def test_a_service_with_the_cache_reports_no_missing_catalogue_and_vets_blueprints(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    cache = make_cache(catalogue, bus, Recorder())
    packet = make_packet(n_blueprints=0)
    packet.blueprint_ids.extend(["mlp_small", "conv_se"])
    service = TamiyoService(  # normal scheduling: a real-time refusal would be an event (no CAP_SYS_NICE)
        settings(realtime_priority=0), ScriptedPolicy(germinate("conv_se")), SECRET, blueprint_metadata=cache
    )
    try:
        assert [e.name for e in service.telemetry.flush().events] == []
        catalogue.quarantine("conv_se", "nan gradients")
        cache.poll()
        command = service.evaluate_step(packet)
        assert command.command_type == pb.COMMAND_WAIT
        assert command.annotations["risk_gate"] == "blueprint"
        assert command.annotations["risk_reason"] == "blueprint 'conv_se' is quarantined"
    finally:
        service.close()
        cache.close()


def test_warm_surfaces_failures_and_unknown_ids_are_not_errors(
    catalogue: BlueprintCatalogue, bus: Bus
) -> None:
    source = CountingSource(catalogue)
    cache = make_cache(source, bus, Recorder())
    cache.warm(["nope"])
    assert "nope" in cache and cache("nope") is None
    source.failing = True
    with pytest.raises(BlueprintMetadataUnavailable):
        cache.warm(["lowrank"])
    with pytest.raises(UnknownBlueprint):
        catalogue.get("nope")


class SlowPolicy(Stateless):
    """Proposes `proposal` after taking `ms` on the service's manual clock."""

    version = "slow-1"

    def __init__(self, clock: ManualClock, ms: float, proposal: Proposal) -> None:
        self.clock, self.ms, self.proposal = clock, ms, proposal

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        self.clock.advance(self.ms / 1000)
        return self.proposal


def _offering(*blueprint_ids: str) -> pb.SystemStatePacket:
    packet = make_packet(n_blueprints=0)
    packet.blueprint_ids.extend(blueprint_ids)
    return packet


def test_a_catalogue_timeout_in_a_decision_is_its_own_reason_and_an_event_of_the_service(
    catalogue: BlueprintCatalogue,
) -> None:
    source = CountingSource(catalogue)
    recorder = Recorder()
    cache = make_cache(source, None, recorder)  # the production wiring's cache, built before the service
    service = TamiyoService(
        settings(realtime_priority=0),
        ScriptedPolicy(germinate("mlp_small")),
        SECRET,
        blueprint_metadata=cache,
    )
    try:
        service.telemetry.flush()
        source.failing = True
        command = service.evaluate_step(_offering("mlp_small"))
        assert command.command_type == pb.COMMAND_WAIT and command.annotations["risk_gate"] == "blueprint"
        reason = command.annotations["risk_reason"]
        assert "catalogue unavailable" in reason and "CatalogueTimeout" in reason
        assert "no catalogue entry" not in reason
        events = [e for e in service.telemetry.flush().events if e.name == "blueprint_metadata_unavailable"]
        assert events and "CatalogueTimeout" in events[0].attributes["reason"]
        assert recorder.events == []  # the service's telemetry has the cache's events now
    finally:
        service.close()
        cache.close()


def test_the_gates_catalogue_lookup_runs_within_the_decisions_remaining_budget(
    catalogue: BlueprintCatalogue,
) -> None:
    clock = ManualClock()
    source = CountingSource(catalogue)
    cache = make_cache(source, None, Recorder())  # metadata deadline 7 ms; no feed: every lookup fetches
    policy = SlowPolicy(clock, 45.0, germinate("mlp_small"))
    service = TamiyoService(
        settings(realtime_priority=0),
        policy,
        SECRET,
        clock=clock,
        step_timeout_ms=50.0,
        blueprint_metadata=cache,
    )
    try:
        command = service.evaluate_step(_offering("mlp_small"))
        assert command.annotations["risk_gate"] == "pass"
        ((_, fetch_ms),) = source.fetches
        assert fetch_ms == pytest.approx(5.0)  # what the decision had left, under the 7 ms ceiling
        policy.ms = 60.0  # the policy used the whole budget: no time is left for the catalogue
        command = service.evaluate_step(_offering("mlp_small"))
        assert len(source.fetches) == 1  # not fetched at all
        assert command.command_type == pb.COMMAND_WAIT
        assert "no time left in the decision's budget" in command.annotations["risk_reason"]
    finally:
        service.close()
        cache.close()
