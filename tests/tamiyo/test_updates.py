"""Policy-update intake (P3): accepted updates swap in; every bad update is refused with its reason."""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from esper.leyline import ManualClock, pb, sign
from esper.oona import EmbeddedBus, OonaSettings, Streams, envelope_for
from esper.simic.updates import build_policy_update
from esper.tamiyo.model.gnn import TamiyoGNNConfig
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import PolicyInferenceError
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.runtime.service import TamiyoService
from esper.tamiyo.runtime.update_feed import PolicyUpdateFeed
from esper.tamiyo.runtime.updates import PolicyUpdateIntake, PolicyUpdateRejected, read_payload_header
from esper.tamiyo.runtime.worker import DeadlineExceeded
from tests.tamiyo.packets import SECRET, SMALL, make_packet, settings, small_policy

PROBE = make_packet(stages={0: pb.SEED_STAGE_TRAINING})


class Rig:
    """A running service with a GNN policy, its intake, and a clock both share."""

    def __init__(
        self, feed: PolicyUpdateFeed | None = None, archive: Path | None = None, **overrides: object
    ) -> None:
        self.clock = ManualClock()
        self.settings = settings(gnn_greedy=True, **overrides)
        self.policy = small_policy(self.settings)
        self.events: list[pb.TelemetryEvent] = []
        self.registry = CollectorRegistry()
        self.service = TamiyoService(
            self.settings,
            self.policy,
            SECRET,
            clock=self.clock,
            telemetry_sink=lambda packet: self.events.extend(packet.events),
            registry=self.registry,
        )
        self.intake = PolicyUpdateIntake(
            self.service,
            self.policy,
            SECRET,
            self.settings,
            clock=self.clock,
            config=SMALL,
            feed=feed,
            archive=archive,
        )

    def trained(self, seed: int = 1) -> GNNPolicy:
        """A policy with other weights (as Simic would produce)."""
        other = small_policy(self.settings, seed=seed)
        return other

    def update(self, policy: GNNPolicy, sequence: int = 1, **fields: object) -> pb.PolicyUpdate:
        update = build_policy_update(
            policy,
            SECRET,
            parent_version=self.service.policy_version,
            sequence=sequence,
            policy_id="tamiyo-gnn",
            clock=self.clock,
        )
        return update

    def decide(self) -> pb.AdaptationCommand:
        return self.service.evaluate_step(PROBE)  # the one front door: it consults the intake

    def event_names(self) -> list[str]:
        self.service.telemetry.flush()
        self.service.telemetry.drain()  # packets reach the sink from the publisher thread
        return [event.name for event in self.events]

    def rejections(self, reason: str) -> float:
        value = self.registry.get_sample_value(
            "tamiyo_policy_updates_total", {"outcome": "rejected", "reason": reason}
        )
        return value or 0.0


@pytest.fixture
def rig() -> Iterator[Rig]:
    built = Rig()
    try:
        yield built
    finally:
        built.service.close()


def probe_logits(policy: object) -> torch.Tensor:
    assert isinstance(policy, GNNPolicy)
    with torch.no_grad():
        return policy.module(policy.builder.build(PROBE, update_stats=False)).action_logits.clone()


def resign(update: pb.PolicyUpdate, clock: ManualClock) -> pb.PolicyUpdate:
    """Re-sign after an edit, as a key holder (a buggy Simic) would: only the content checks remain."""
    update.signature = ""
    update.nonce = ""
    update.ClearField("issued_at")
    return sign(update, SECRET, clock=clock)


def test_accepted_update_swaps_in_and_later_decisions_carry_its_version(rig: Rig) -> None:
    old_version = rig.service.policy_version
    before = probe_logits(rig.intake.policy)
    rig.decide()
    assert rig.service.last_decision is not None
    assert rig.service.last_decision.policy_version == old_version
    trained = rig.trained()
    serving = rig.intake.offer(rig.update(trained))
    assert serving.version == trained.version != old_version
    assert serving.sequence == 1 and serving.parent_version == old_version
    assert rig.service.policy_version == trained.version
    rig.decide()
    assert rig.service.last_decision.policy_version == trained.version
    assert not torch.allclose(before, probe_logits(rig.intake.policy))
    graph = rig.policy.builder.build(PROBE, update_stats=False)
    serving = rig.intake.policy
    assert isinstance(serving, GNNPolicy)
    with torch.no_grad():
        assert torch.equal(serving.module(graph).action_logits, trained.module(graph).action_logits)
    assert "policy_update_accepted" in rig.event_names()
    accepted = rig.registry.get_sample_value(
        "tamiyo_policy_updates_total", {"outcome": "accepted", "reason": "ok"}
    )
    assert accepted == 1.0


def test_candidate_shares_the_serving_builder_so_only_weights_change(rig: Rig) -> None:
    rig.intake.offer(rig.update(rig.trained()))
    candidate = rig.intake.policy
    assert isinstance(candidate, GNNPolicy)
    assert candidate.builder is rig.policy.builder


def assert_refused(rig: Rig, update: pb.PolicyUpdate, reason: str) -> None:
    version = rig.service.policy_version
    before = probe_logits(rig.intake.policy)
    with pytest.raises(PolicyUpdateRejected) as info:
        rig.intake.offer(update)
    assert info.value.reason == reason, info.value
    assert rig.service.policy_version == version  # the old policy keeps serving
    assert torch.equal(before, probe_logits(rig.intake.policy))
    rig.decide()
    assert rig.service.last_decision is not None and rig.service.last_decision.policy_version == version
    assert "policy_update_rejected" in rig.event_names()
    assert rig.rejections(reason) >= 1.0


def test_forged_update_is_rejected(rig: Rig) -> None:
    forged = build_policy_update(
        rig.trained(),
        b"not-the-deployment-key-0123456789",
        parent_version="",
        sequence=1,
        policy_id="x",
        clock=rig.clock,
    )
    assert_refused(rig, forged, "invalid_signature")


def test_tampered_payload_is_rejected(rig: Rig) -> None:
    update = rig.update(rig.trained())
    tampered = bytearray(update.payload)
    tampered[-1] ^= 0xFF
    update.payload = bytes(tampered)
    assert_refused(rig, update, "invalid_signature")


def test_payload_hash_mismatch_is_rejected_even_when_signed(rig: Rig) -> None:
    update = rig.update(rig.trained())
    tampered = bytearray(update.payload)
    tampered[-1] ^= 0xFF
    update.payload = bytes(tampered)
    assert_refused(rig, resign(update, rig.clock), "payload_hash_mismatch")


def test_stale_update_is_rejected(rig: Rig) -> None:
    update = rig.update(rig.trained())
    rig.clock.advance(rig.settings.update_freshness_s + 1)
    assert_refused(rig, update, "stale")


def test_replayed_update_is_rejected(rig: Rig) -> None:
    update = rig.update(rig.trained())
    rig.intake.offer(update)
    replay = pb.PolicyUpdate()
    replay.CopyFrom(update)
    assert_refused(rig, replay, "replayed_nonce")


def test_older_or_equal_sequence_is_rejected(rig: Rig) -> None:
    rig.intake.offer(rig.update(rig.trained(1), sequence=5))
    assert_refused(rig, rig.update(rig.trained(2), sequence=4), "not_newer")
    assert_refused(rig, rig.update(rig.trained(3), sequence=5), "not_newer")


def test_wrong_architecture_is_rejected(rig: Rig) -> None:
    update = rig.update(rig.trained())
    update.architecture_version = "some-other-net-v9"
    assert_refused(rig, resign(update, rig.clock), "architecture_mismatch")


def test_weights_of_another_size_are_rejected(rig: Rig) -> None:
    wider = GNNPolicy(
        rig.settings, config=TamiyoGNNConfig(schema=TAMIYO_SCHEMA, hidden_dim=48, gat_dim=16, gat_heads=4)
    )
    assert_refused(rig, rig.update(wider), "architecture_mismatch")


def test_registry_mismatch_is_rejected(rig: Rig) -> None:
    update = rig.update(rig.trained())
    update.registry_digest = "0" * 16
    assert_refused(rig, resign(update, rig.clock), "registry_mismatch")


def _with_payload(rig: Rig, payload: bytes) -> pb.PolicyUpdate:
    update = rig.update(rig.trained())
    update.payload = payload
    update.payload_sha256 = hashlib.sha256(payload).hexdigest()
    return resign(update, rig.clock)


def test_pickle_payload_is_rejected_without_unpickling(rig: Rig) -> None:
    trained = rig.trained()
    buffer = io.BytesIO()
    torch.save(trained.module.state_dict(), buffer)
    assert_refused(rig, _with_payload(rig, buffer.getvalue()), "pickle_payload")

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (exec, ("raise SystemExit('unpickled!')",))

    assert_refused(rig, _with_payload(rig, pickle.dumps(Boom())), "pickle_payload")


def test_non_safetensors_payload_is_rejected(rig: Rig) -> None:
    assert_refused(
        rig, _with_payload(rig, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"), "not_safetensors"
    )


def test_header_lineage_must_match_the_message(rig: Rig) -> None:
    update = rig.update(rig.trained(), sequence=2)
    update.sequence = 3
    assert_refused(rig, resign(update, rig.clock), "header_mismatch")


def test_read_payload_header_needs_no_unpickling() -> None:
    policy = small_policy()
    payload = build_policy_update(policy, SECRET, parent_version="p", sequence=7, policy_id="x").payload
    header = read_payload_header(payload)
    assert header["sequence"] == "7" and header["parent_version"] == "p"
    assert header["tamiyo_policy_version"] == policy.version


def test_policy_failing_after_the_swap_is_rolled_back(rig: Rig) -> None:
    old_version = rig.service.policy_version
    trained = rig.trained()
    rig.intake.offer(rig.update(trained))
    candidate = rig.intake.policy
    assert isinstance(candidate, GNNPolicy)

    def broken(*_args: object, **_kwargs: object) -> object:
        raise PolicyInferenceError("injected failure")

    candidate.propose_graph = broken  # type: ignore[method-assign]
    with pytest.raises(PolicyInferenceError):
        rig.decide()
    assert rig.service.policy_version == old_version
    assert rig.intake.serving.version == old_version and not rig.intake.on_probation
    rig.decide()
    assert rig.service.last_decision is not None and rig.service.last_decision.policy_version == old_version
    assert "policy_rolled_back" in rig.event_names()
    rolled = rig.registry.get_sample_value(
        "tamiyo_policy_updates_total", {"outcome": "rolled_back", "reason": "probation_failed"}
    )
    assert rolled == 1.0
    # The rolled-back update's sequence is not taken again; a newer one is.
    assert_refused(rig, rig.update(trained, sequence=1), "not_newer")
    rig.intake.offer(rig.update(rig.trained(5), sequence=2))


def test_policy_missing_its_deadline_after_the_swap_is_rolled_back() -> None:
    rig = Rig(step_timeout_ms=10_000.0)
    try:
        old_version = rig.service.policy_version
        rig.intake.offer(rig.update(rig.trained()))
        rig.service.step_timeout_ms = 1e-3  # the new policy cannot make this budget
        with pytest.raises(DeadlineExceeded):
            rig.decide()
        assert rig.service.policy_version == old_version
    finally:
        rig.service.close()


def test_probation_ends_after_its_window(rig: Rig) -> None:
    rig.intake.offer(rig.update(rig.trained()))
    for _ in range(rig.settings.update_probation_decisions):
        assert rig.intake.on_probation
        rig.decide()
    assert not rig.intake.on_probation


def test_feed_delivers_updates_from_the_bus_between_decisions(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    rig = Rig(feed=PolicyUpdateFeed(bus, "tamiyo-test"))
    try:
        trained = rig.trained()
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(trained)))
        bus.publish(Streams.POLICY_UPDATES, envelope_for(pb.FieldReport(report_id="x")))
        warmed: list[str] = []
        prepare = rig.service.prepare

        def spy(packet: pb.SystemStatePacket) -> None:
            warmed.append(rig.service.policy_version)
            prepare(packet)

        rig.service.prepare = spy  # type: ignore[method-assign]
        rig.decide()
        assert rig.service.last_decision is not None
        assert rig.service.last_decision.policy_version == trained.version
        assert warmed == [trained.version]  # the new policy warmed up on the packet before deciding
        assert rig.rejections("malformed") == 1.0
        assert rig.intake.poll() == []  # everything was acked
        rig.decide()
        assert warmed == [trained.version]  # no swap, no warm-up
    finally:
        rig.service.close()
        bus.close()


def test_a_resumed_run_gets_the_swapped_weights_back_from_the_archive(tmp_path: Path) -> None:
    first = Rig(archive=tmp_path / "policies")
    try:
        trained = first.trained()
        first.intake.offer(first.update(trained, sequence=3))
        saved = first.intake.export_state()
    finally:
        first.service.close()
    second = Rig(archive=tmp_path / "policies")
    try:
        second.intake.restore_state(saved)
        assert second.service.policy_version == trained.version
        assert second.intake.serving.sequence == 3
        assert_refused(second, second.update(second.trained(7), sequence=3), "not_newer")
    finally:
        second.service.close()


def test_newest_update_wins_when_several_wait(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    rig = Rig(feed=PolicyUpdateFeed(bus, "tamiyo-test"))
    try:
        older, newer = rig.trained(1), rig.trained(2)
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(older, sequence=1)))
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(newer, sequence=2)))
        rig.decide()
        assert rig.service.policy_version == newer.version
        assert rig.rejections("not_newer") == 1.0
    finally:
        rig.service.close()
        bus.close()


def test_a_trainer_rollback_after_a_swap_keeps_the_newer_policy(rig: Rig) -> None:
    before_swap = rig.intake.export_state()  # the checkpoint a loss spike would roll back to
    trained = rig.trained()
    rig.intake.offer(rig.update(trained))
    rig.intake.restore_state(before_swap)
    assert rig.service.policy_version == trained.version
    assert rig.intake.serving.sequence == 1
