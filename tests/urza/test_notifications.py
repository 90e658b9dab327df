"""Catalogue changes on the bus: every change is published through the outbox, nothing is lost when the
bus fails, and a feed reads them back (resynchronising when it cannot know what it missed)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from esper.leyline import EsperSettings, load_settings, pb
from esper.oona import Bus, BusUnavailable, EmbeddedBus, Streams, envelope_for, open_envelope
from esper.urza import (
    BUILTIN_SPECS,
    BlueprintCatalogue,
    BusChangePublisher,
    CatalogueChangeFeed,
    CatalogueTimeout,
    InvalidDescriptor,
    NotificationFailed,
)
from tests.conftest import fast_oona_settings


@pytest.fixture
def bus(tmp_path: Path) -> Bus:
    return EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())


class FlakyPublisher:
    """Publishes to a bus, or fails like an unreachable Redis while `down` is set."""

    def __init__(self, bus: Bus) -> None:
        self.inner = BusChangePublisher(bus)
        self.down = False

    def publish(self, changes: Sequence[pb.CatalogueChange]) -> None:
        if self.down:
            raise BusUnavailable("publish to esper.catalogue", "redis://test", 4, "connection refused")
        self.inner.publish(changes)


def kinds_and_ids(feed: CatalogueChangeFeed) -> list[tuple[int, str, int]]:
    batch = feed.poll()
    assert not batch.resync
    return [(c.kind, c.blueprint_id, c.revision) for c in batch.changes]


def test_every_change_is_published_in_order_on_the_catalogue_stream(tmp_path: Path, bus: Bus) -> None:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3", publisher=BusChangePublisher(bus))
    seeded = len(BUILTIN_SPECS)
    feed = CatalogueChangeFeed(bus, group="tamiyo")
    assert catalogue.pending_notifications == seeded  # opening publishes nothing
    assert catalogue.publish_pending() == seeded
    assert [c.kind for c in feed.poll().changes] == [pb.CATALOGUE_CHANGE_ADDED] * seeded

    catalogue.quarantine("mlp_small", "diverged")
    catalogue.unquarantine("mlp_small")
    descriptor = catalogue.get("lowrank")
    descriptor.risk = 0.3
    catalogue.update(descriptor)
    catalogue.remove("lowrank")
    revision = seeded
    assert kinds_and_ids(feed) == [
        (pb.CATALOGUE_CHANGE_QUARANTINED, "mlp_small", revision + 1),
        (pb.CATALOGUE_CHANGE_UPDATED, "mlp_small", revision + 2),
        (pb.CATALOGUE_CHANGE_UPDATED, "lowrank", revision + 3),
        (pb.CATALOGUE_CHANGE_REMOVED, "lowrank", revision + 4),
    ]
    assert catalogue.pending_notifications == 0
    assert catalogue.quarantine_reason("mlp_small") is None and not catalogue.get("mlp_small").quarantine
    with pytest.raises(InvalidDescriptor, match="not quarantined"):
        catalogue.unquarantine("mlp_small")


def test_a_failed_publish_is_a_typed_error_and_the_change_is_durable_and_sent_later(
    tmp_path: Path, bus: Bus
) -> None:
    path = tmp_path / "urza.sqlite3"
    publisher = FlakyPublisher(bus)
    catalogue = BlueprintCatalogue.open_default(path, publisher=publisher)
    catalogue.publish_pending()
    feed = CatalogueChangeFeed(bus, group="tamiyo")

    publisher.down = True
    with pytest.raises(NotificationFailed) as caught:
        catalogue.quarantine("conv_se", "nan gradients")
    assert caught.value.pending == 1 and isinstance(caught.value.cause, BusUnavailable)
    with BlueprintCatalogue(path) as other_process:
        assert other_process.get("conv_se").quarantine  # committed before the publish was tried
        assert other_process.pending_notifications == 1
    assert feed.poll().changes == ()

    publisher.down = False
    catalogue.quarantine("attention_lite", "slow")  # the next change flushes the outbox, oldest first
    assert [(k, bid) for k, bid, _ in kinds_and_ids(feed)] == [
        (pb.CATALOGUE_CHANGE_QUARANTINED, "conv_se"),
        (pb.CATALOGUE_CHANGE_QUARANTINED, "attention_lite"),
    ]
    assert catalogue.pending_notifications == 0


def test_changes_made_without_a_bus_are_published_by_the_next_process_that_has_one(
    tmp_path: Path, bus: Bus
) -> None:
    path = tmp_path / "urza.sqlite3"
    with BlueprintCatalogue.open_default(path) as offline:
        offline.quarantine("mlp_small", "operator")
    feed = CatalogueChangeFeed(bus, group="g")
    with BlueprintCatalogue(path, publisher=BusChangePublisher(bus)) as online:
        assert online.publish_pending() == len(BUILTIN_SPECS) + 1
        assert online.publish_pending() == 0
    changes = feed.poll().changes
    assert changes[-1].kind == pb.CATALOGUE_CHANGE_QUARANTINED and changes[-1].blueprint_id == "mlp_small"
    assert [c.revision for c in changes] == list(range(1, len(BUILTIN_SPECS) + 2))


def test_publish_pending_needs_a_publisher(tmp_path: Path) -> None:
    with (
        BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3") as catalogue,
        pytest.raises(RuntimeError, match="no publisher"),
    ):
        catalogue.publish_pending()


def test_a_feed_sees_only_changes_after_it_was_created(tmp_path: Path, bus: Bus) -> None:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3", publisher=BusChangePublisher(bus))
    catalogue.quarantine("mlp_small", "before")
    feed = CatalogueChangeFeed(bus)
    assert feed.group.startswith("catalogue.")
    catalogue.quarantine("lowrank", "after")
    assert [bid for _, bid, _ in kinds_and_ids(feed)] == ["lowrank"]
    feed.close()
    assert [g.name for s in bus.stats() for g in s.groups] == []


def test_an_unreadable_notification_or_a_lost_group_asks_for_a_resync(bus: Bus) -> None:
    feed = CatalogueChangeFeed(bus, group="tamiyo")
    bus.publish(Streams.CATALOGUE, envelope_for(pb.TelemetryPacket(packet_id="wrong stream")))
    batch = feed.poll()
    assert batch.resync and batch.malformed == 1 and batch.changes == ()
    assert feed.poll().resync is False

    bus.delete_group(Streams.CATALOGUE, "tamiyo")  # as a Redis restart loses every group
    assert feed.poll().resync
    bus.publish(Streams.CATALOGUE, envelope_for(pb.CatalogueChange(blueprint_id="x", revision=9)))
    assert [c.blueprint_id for c in feed.poll().changes] == ["x"]


def test_a_read_with_a_deadline_gives_up_while_a_writer_waits_for_another_process(tmp_path: Path) -> None:
    path = tmp_path / "urza.sqlite3"
    catalogue = BlueprintCatalogue.open_default(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    writer = threading.Thread(target=catalogue.quarantine, args=("mlp_small", "stuck behind a lock"))
    writer.start()
    try:
        time.sleep(0.05)  # the writer now holds the catalogue while it waits for the lock
        start = time.monotonic()
        with pytest.raises(CatalogueTimeout) as caught:
            catalogue.get("mlp_small", timeout_ms=20)
        assert time.monotonic() - start < 2.0  # not the 5 s busy timeout
        assert caught.value.blueprint_id == "mlp_small" and caught.value.timeout_ms == 20
    finally:
        other.execute("COMMIT")
        writer.join()
        other.close()
    assert catalogue.get("mlp_small", timeout_ms=20).quarantine


def test_an_embedded_bus_from_settings_carries_notifications_across_processes(tmp_path: Path) -> None:
    """Two catalogue handles on one file and one bus file, as two processes would open them."""
    esper = load_settings(EsperSettings, environ={}, data_dir=tmp_path)
    first = EmbeddedBus(esper.data_dir / "bus.sqlite3", fast_oona_settings())
    second = EmbeddedBus(esper.data_dir / "bus.sqlite3", fast_oona_settings())
    feed = CatalogueChangeFeed(second, group="tamiyo")
    with BlueprintCatalogue.open_default(
        tmp_path / "urza.sqlite3", publisher=BusChangePublisher(first)
    ) as cat:
        cat.quarantine("mlp_bottleneck", "remote")
    assert [c.blueprint_id for c in feed.poll().changes][-1] == "mlp_bottleneck"


def test_the_blueprints_commands_quarantine_release_and_list(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from esper.cli import app

    runner = CliRunner()
    env = {"ESPER_DATA_DIR": str(tmp_path)}
    quarantined = runner.invoke(
        app, ["blueprints", "quarantine", "conv_se", "--reason", "nan grads"], env=env
    )
    assert quarantined.exit_code == 0, quarantined.output
    listed = json.loads(runner.invoke(app, ["blueprints", "--json"], env=env).stdout)
    assert [(e["id"], e["quarantine_reason"]) for e in listed if e["quarantine"]] == [
        ("conv_se", "nan grads")
    ]
    released = runner.invoke(app, ["blueprints", "unquarantine", "conv_se"], env=env)
    assert released.exit_code == 0, released.output
    assert runner.invoke(app, ["blueprints", "unquarantine", "conv_se"], env=env).exit_code == 2
    assert runner.invoke(app, ["blueprints", "quarantine", "nope", "--reason", "x"], env=env).exit_code == 2

    bus = EmbeddedBus(tmp_path / "bus.sqlite3", fast_oona_settings())
    bus.ensure_group(Streams.CATALOGUE, "inspect")
    deliveries = bus.consume(Streams.CATALOGUE, "inspect", "c", count=100)
    changes = [open_envelope(d.envelope, pb.CatalogueChange) for d in deliveries]
    assert len(changes) == len(BUILTIN_SPECS) + 2  # the seeding, the quarantine, the release
    assert [(c.kind, c.blueprint_id, c.descriptor.quarantine) for c in changes[-2:]] == [
        (pb.CATALOGUE_CHANGE_QUARANTINED, "conv_se", True),
        (pb.CATALOGUE_CHANGE_UPDATED, "conv_se", False),
    ]
    bus.close()
