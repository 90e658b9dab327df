"""The policy-update feed through the bus: outages are events, bad updates are refused with their reason,
and nothing valid is lost (an update is acked only after it was offered)."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.leyline import pb
from esper.oona import Bus, BusUnavailable, Delivery, EmbeddedBus, OonaSettings, Streams, envelope_for
from esper.oona.local_redis import LocalRedisServer
from esper.tamiyo.runtime.update_feed import PolicyUpdateFeed
from esper.tamiyo.runtime.updates import PolicyUpdateRejected
from tests.conftest import fast_oona_settings
from tests.tamiyo.test_updates import Rig, resign

GROUP = "tamiyo-test"


class SwitchableBus:
    """A bus whose feed operations fail with `BusUnavailable` while `down` (publishing still works)."""

    def __init__(self, inner: Bus) -> None:
        self.inner = inner
        self.down = False

    def _check(self, operation: str) -> None:
        if self.down:
            raise BusUnavailable(operation, "fake", 3, "connection refused")

    def ensure_group(self, stream: str, group: str, *, from_beginning: bool = True) -> None:
        self._check("ensure_group")
        self.inner.ensure_group(stream, group, from_beginning=from_beginning)

    def consume(
        self, stream: str, group: str, consumer: str, *, count: int = 1, block_ms: int = 0
    ) -> list[Delivery]:
        self._check("consume")
        return self.inner.consume(stream, group, consumer, count=count, block_ms=block_ms)

    def reclaim(
        self, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int = 10
    ) -> list[Delivery]:
        self._check("reclaim")
        return self.inner.reclaim(stream, group, consumer, min_idle_ms=min_idle_ms, count=count)

    def ack(self, stream: str, group: str, message_ids: list[str]) -> int:
        self._check("ack")
        return self.inner.ack(stream, group, message_ids)


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[EmbeddedBus]:
    opened = EmbeddedBus(tmp_path / "bus.sqlite3", OonaSettings())
    try:
        yield opened
    finally:
        opened.close()


def count(rig: Rig, name: str) -> int:
    return rig.event_names().count(name)


def test_an_unreachable_feed_is_one_event_and_decisions_go_on(bus: EmbeddedBus) -> None:
    switch = SwitchableBus(bus)
    rig = Rig(feed=PolicyUpdateFeed(switch, GROUP))  # type: ignore[arg-type]
    try:
        version = rig.service.policy_version
        rig.decide()
        switch.down = True
        for _ in range(4):
            command = rig.decide()  # never a BusError: the outage does not reach the decision
            assert command.command_id
            assert rig.service.last_decision is not None
            assert rig.service.last_decision.policy_version == version
        assert count(rig, "policy_feed_unavailable") == 1
        assert count(rig, "policy_feed_recovered") == 0
        assert rig.registry.get_sample_value("tamiyo_policy_feed_up") == 0.0
        assert rig.registry.get_sample_value("tamiyo_policy_feed_failures_total", {"operation": "fetch"}) == 4
        trained = rig.trained()
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(trained)))  # waits out the outage
        switch.down = False
        rig.decide()
        assert rig.service.last_decision is not None
        assert rig.service.last_decision.policy_version == trained.version
        assert count(rig, "policy_feed_unavailable") == 1
        assert count(rig, "policy_feed_recovered") == 1
        assert rig.registry.get_sample_value("tamiyo_policy_feed_up") == 1.0
    finally:
        rig.service.close()


def test_a_failed_ack_leaves_the_update_pending_and_it_is_settled_later(bus: EmbeddedBus) -> None:
    switch = SwitchableBus(bus)
    rig = Rig(feed=PolicyUpdateFeed(switch, GROUP))  # type: ignore[arg-type]
    try:
        trained = rig.trained()
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(trained)))
        ack = switch.ack

        def ack_fails(stream: str, group: str, message_ids: list[str]) -> int:
            raise BusUnavailable("ack", "fake", 3, "connection reset")

        switch.ack = ack_fails  # type: ignore[method-assign]
        rig.decide()
        assert rig.service.policy_version == trained.version
        assert count(rig, "policy_feed_unavailable") == 1
        switch.ack = ack  # type: ignore[method-assign]
        outcomes = rig.intake.poll()  # fetched again: refused as already seen, and acked this time
        assert len(outcomes) == 1 and isinstance(outcomes[0], PolicyUpdateRejected)
        assert count(rig, "policy_feed_recovered") == 1
        assert rig.intake.poll() == []
        assert rig.service.policy_version == trained.version
    finally:
        rig.service.close()


def test_an_update_not_yet_offered_when_a_poll_fails_is_offered_later(bus: EmbeddedBus) -> None:
    rig = Rig(feed=PolicyUpdateFeed(bus, GROUP))
    try:
        first, second = rig.trained(1), rig.trained(2)
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(first, sequence=1)))
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(second, sequence=2)))
        offer = rig.intake.offer

        def crashes(update: pb.PolicyUpdate) -> object:
            raise RuntimeError("injected crash while offering")

        rig.intake.offer = crashes  # type: ignore[assignment,method-assign]
        with pytest.raises(RuntimeError):
            rig.intake.poll()  # the newest (sequence 2) was offered and crashed; sequence 1 was not offered
        rig.intake.offer = offer  # type: ignore[method-assign]
        outcomes = rig.intake.poll()
        assert [getattr(o, "sequence", None) for o in outcomes] == [1]
        assert rig.service.policy_version == first.version
    finally:
        rig.service.close()


def _signed_with_payload(rig: Rig, payload: bytes, sequence: int) -> pb.PolicyUpdate:
    update = rig.update(rig.trained(), sequence=sequence)
    update.payload = payload
    update.payload_sha256 = hashlib.sha256(payload).hexdigest()
    return resign(update, rig.clock)


def framed(header: bytes) -> bytes:
    """A safetensors-shaped payload: the header's length, then the header (no tensors)."""
    return struct.pack("<Q", len(header)) + header


MALFORMED_HEADERS = {
    "header_is_a_number": struct.pack("<Q", 31) + b'{"__metadata__": {"header": 5}}',
    "header_is_null": framed(b'{"__metadata__": {"header": null}}'),
    "metadata_is_null": framed(b'{"__metadata__": null}'),
    "deeply_nested": framed(b"[" * 200_000),
    "nested_policy_header": framed(b'{"__metadata__": {"header": "' + b"[" * 100_000 + b'"}}'),
    "integer_too_long": framed(b"1" * 5000),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_HEADERS))
def test_a_malformed_signed_update_is_refused_and_a_valid_one_in_its_batch_is_applied(
    bus: EmbeddedBus, name: str
) -> None:
    rig = Rig(feed=PolicyUpdateFeed(bus, GROUP))
    try:
        trained = rig.trained()
        bad = _signed_with_payload(rig, MALFORMED_HEADERS[name], sequence=2)  # newest: offered first
        bus.publish(Streams.POLICY_UPDATES, envelope_for(bad))
        bus.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(trained, sequence=1)))
        rig.decide()
        assert rig.rejections("not_safetensors") == 1.0
        assert rig.service.last_decision is not None
        assert rig.service.last_decision.policy_version == trained.version
        assert rig.intake.serving.sequence == 1
        assert "policy_update_rejected" in rig.event_names()
        assert rig.intake.poll() == []  # both settled
    finally:
        rig.service.close()


def test_a_sequence_far_past_the_newest_is_refused_and_blocks_nothing() -> None:
    rig = Rig()
    try:
        with pytest.raises(PolicyUpdateRejected) as info:
            rig.intake.offer(rig.update(rig.trained(1), sequence=2**64 - 1))
        assert info.value.reason == "sequence_jump"
        assert rig.rejections("sequence_jump") == 1.0
        rig.intake.offer(rig.update(rig.trained(2), sequence=1))
        assert rig.intake.serving.sequence == 1
    finally:
        rig.service.close()


def test_the_sequence_step_is_a_setting() -> None:
    rig = Rig(update_max_sequence_step=5)
    try:
        with pytest.raises(PolicyUpdateRejected, match="sequence_jump"):
            rig.intake.offer(rig.update(rig.trained(1), sequence=6))
        rig.intake.offer(rig.update(rig.trained(2), sequence=5))  # exactly the step: taken
        with pytest.raises(PolicyUpdateRejected, match="sequence_jump"):
            rig.intake.offer(rig.update(rig.trained(3), sequence=11))
        rig.intake.offer(rig.update(rig.trained(4), sequence=10))
        assert rig.intake.serving.sequence == 10
    finally:
        rig.service.close()


def test_weights_that_cannot_be_archived_durably_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "policies"
    rig = Rig(archive=archive)
    try:
        first = rig.trained(1)
        rig.intake.offer(rig.update(first, sequence=1))
        kept = {path.name: path.read_bytes() for path in archive.iterdir()}

        def fsync_fails(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync_fails)
        with pytest.raises(PolicyUpdateRejected) as info:
            rig.intake.offer(rig.update(rig.trained(2), sequence=2))
        monkeypatch.undo()
        assert info.value.reason == "archive_failed"
        assert rig.service.policy_version == first.version  # never swapped in
        assert {path.name: path.read_bytes() for path in archive.iterdir()} == kept  # no part, no temporary
    finally:
        rig.service.close()


@pytest.mark.redis
def test_gnn_decisions_ride_out_a_redis_outage_and_take_updates_after_it(
    private_redis: LocalRedisServer, tmp_path: Path
) -> None:
    from esper.leyline import EsperSettings, load_settings
    from esper.oona import open_bus

    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path / "data", bus_url=private_redis.url)
    bus = open_bus(esper, fast_oona_settings())
    rig = Rig(feed=PolicyUpdateFeed(bus, GROUP))
    try:
        version = rig.service.policy_version
        rig.decide()
        private_redis.kill()
        for _ in range(3):
            rig.decide()
            assert rig.service.last_decision is not None
            assert rig.service.last_decision.policy_version == version
        assert count(rig, "policy_feed_unavailable") == 1
        private_redis.start()  # empty: the server kept nothing, the group is made again
        trained = rig.trained()
        publisher = open_bus(esper, fast_oona_settings())
        try:
            publisher.publish(Streams.POLICY_UPDATES, envelope_for(rig.update(trained)))
        finally:
            publisher.close()
        rig.decide()
        assert count(rig, "policy_feed_recovered") == 1
        assert rig.service.last_decision is not None
        assert rig.service.last_decision.policy_version == trained.version
    finally:
        rig.service.close()
        bus.close()


def test_signed_weights_cut_short_are_refused_as_a_failed_load() -> None:
    rig = Rig()
    try:
        payload = rig.update(rig.trained()).payload[:-4]
        with pytest.raises(PolicyUpdateRejected) as info:
            rig.intake.offer(_signed_with_payload(rig, payload, sequence=1))
        assert info.value.reason == "load_failed"
        assert "weights" in info.value.detail
    finally:
        rig.service.close()
