"""An operator quarantines a blueprint from another process (`esper blueprints quarantine`, which writes the
catalogue and publishes the change on the embedded bus file); the Tamiyo of a running process refuses
that blueprint from its next decision on, with the reason in the command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esper.leyline import EsperSettings, load_settings, pb
from esper.oona import open_bus
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.runtime.metadata import BlueprintMetadataCache
from esper.tamiyo.runtime.service import TamiyoService
from esper.urza import BlueprintCatalogue, CatalogueChangeFeed
from tests.conftest import fast_oona_settings
from tests.tamiyo.packets import SECRET, ScriptedPolicy, make_packet, settings

BLUEPRINT = "lowrank"
REASON = "diverged in run r-42"


def esper_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`esper ARGS` in a process of its own, on the deployment in `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESPER_", "OONA_", "TAMIYO_"))}
    env["ESPER_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-c", "from esper.cli import main; main()", *args],
        env=env,
        cwd=data_dir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def germinating_service(cache: BlueprintMetadataCache) -> TamiyoService:
    proposal = Proposal(action=pb.POLICY_ACTION_GERMINATE, slot_id="slot-0", blueprint_id=BLUEPRINT)
    # Normal scheduling: the test counts events, and a real-time refusal is one on machines without
    # CAP_SYS_NICE.
    return TamiyoService(
        settings(realtime_priority=0), ScriptedPolicy(proposal), SECRET, blueprint_metadata=cache
    )


def offering_packet(catalogue: BlueprintCatalogue) -> pb.SystemStatePacket:
    packet = make_packet(n_blueprints=0)
    packet.blueprint_ids.extend(catalogue.ids_for("mlp"))
    return packet


def quarantine_elsewhere(data_dir: Path) -> None:
    result = esper_cli(data_dir, "blueprints", "quarantine", BLUEPRINT, "--reason", REASON)
    assert result.returncode == 0, result.stderr
    assert f"{BLUEPRINT}: quarantined" in result.stdout


def assert_refused(command: pb.AdaptationCommand) -> None:
    assert command.command_type == pb.COMMAND_WAIT
    assert command.annotations["risk_gate"] == "blueprint"
    assert command.annotations["risk_reason"] == f"blueprint {BLUEPRINT!r} is quarantined"


def test_the_next_decision_after_a_quarantine_in_another_process_refuses_the_blueprint(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    esper = load_settings(EsperSettings, environ={}, data_dir=data_dir)
    bus = open_bus(esper, fast_oona_settings())
    catalogue = BlueprintCatalogue.open_default(data_dir / "urza.sqlite3")
    cache = BlueprintMetadataCache(catalogue, settings(), feed_factory=lambda: CatalogueChangeFeed(bus))
    cache.warm(d.blueprint_id for d in catalogue.list())
    service = germinating_service(cache)
    packet = offering_packet(catalogue)
    try:
        before = service.evaluate_step(packet)
        assert before.command_type == pb.COMMAND_SEED and before.annotations["risk_gate"] == "pass"

        quarantine_elsewhere(data_dir)
        assert cache.poll() >= 1  # what the owner does between decisions

        assert_refused(service.evaluate_step(packet))
        assert catalogue.quarantine_reason(BLUEPRINT) == REASON
    finally:
        service.close()
        cache.close()
        bus.close()
        catalogue.close()


def test_the_cache_esper_run_builds_follows_a_quarantine_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from esper.cli import _blueprint_metadata

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("ESPER_DATA_DIR", str(data_dir))
    cache = _blueprint_metadata(settings())
    service = germinating_service(cache)
    try:
        assert [e.name for e in service.telemetry.flush().events] == []  # no blueprint_metadata_unavailable
        packet = make_packet(n_blueprints=0)
        packet.blueprint_ids.append(BLUEPRINT)
        assert service.evaluate_step(packet).command_type == pb.COMMAND_SEED

        quarantine_elsewhere(data_dir)
        deadline = time.monotonic() + 15
        while cache.stats.invalidations == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # the background thread polls every 100 ms
        assert cache.stats.invalidations == 1  # the seeding was announced before the cache subscribed
        assert_refused(service.evaluate_step(packet))
    finally:
        service.close()
        cache.close()
