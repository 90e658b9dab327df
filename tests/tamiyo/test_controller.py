"""The service is Tolaria's controller for every policy; policy updates are an input it consults.

Also the shape that keeps it so: a complete `Policy` protocol (no attribute probes on policies) and a
model that loads without the runtime or the records.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from esper.leyline import ContractViolation, pb
from esper.tamiyo.model.heuristic import HeuristicPolicy
from esper.tamiyo.model.proposal import Policy, Proposal
from esper.tamiyo.runtime.service import TamiyoService
from esper.tolaria.controller import Controller
from tests.tamiyo.packets import SECRET, ScriptedPolicy, make_packet, settings

REPO = Path(__file__).resolve().parents[2]
WAIT = Proposal(pb.POLICY_ACTION_WAIT)


class RecordingUpdates:
    """A policy-update input that records what the service asks of it."""

    def __init__(self, swaps: int = 0) -> None:
        self.polls = 0
        self.swaps = swaps
        self.outcomes: list[str] = []
        self.restored: list[Mapping[str, Any]] = []

    def between_decisions(self) -> bool:
        self.polls += 1
        swapped = self.swaps > 0
        self.swaps -= 1
        return swapped

    def judge(self, failure: str) -> None:
        self.outcomes.append(failure)

    def export_state(self) -> dict[str, Any]:
        return {"serving": "recorded"}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.restored.append(state)


def _members(protocol: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(value)
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    }


def test_the_service_has_every_method_of_tolarias_controller_with_its_parameters() -> None:
    expected = _members(Controller)
    assert expected  # the protocol was read
    for name, signature in expected.items():
        own = inspect.signature(getattr(TamiyoService, name))
        assert list(own.parameters) == list(signature.parameters), name


def test_every_policy_has_the_complete_protocol() -> None:
    for name in _members(Policy):
        assert callable(getattr(HeuristicPolicy, name)), name


def test_updates_are_consulted_before_and_judged_after_every_decision_of_a_heuristic_service() -> None:
    service = TamiyoService(settings(), HeuristicPolicy(settings()), SECRET)
    updates = RecordingUpdates()
    service.consult(updates)
    try:
        service.evaluate_step(make_packet())
        assert (updates.polls, updates.outcomes) == (1, [""])
        service.submit(make_packet())
        assert (updates.polls, updates.outcomes) == (2, [""])  # judged when collected, not before
        service.collect()
        assert updates.outcomes == ["", ""]
        bad = make_packet()
        bad.packet_id = ""
        with pytest.raises(ContractViolation):
            service.evaluate_step(bad)
        assert updates.outcomes == ["", ""]  # the packet's fault, not the policy's
    finally:
        service.close()


def test_a_failed_decision_counts_against_the_policy_and_a_swap_is_warmed_up_first() -> None:
    class Failing(ScriptedPolicy):
        def propose(self, packet: pb.SystemStatePacket) -> Proposal:
            raise RuntimeError("broken weights")

    service = TamiyoService(settings(), Failing(WAIT), SECRET)
    updates = RecordingUpdates(swaps=1)
    service.consult(updates)
    try:
        with pytest.raises(RuntimeError, match="broken weights"):
            service.evaluate_step(make_packet())
        assert updates.polls == 1
        assert updates.outcomes == ["RuntimeError: broken weights"]
    finally:
        service.close()


def test_the_state_is_the_update_inputs_when_consulted_and_the_policys_own_otherwise() -> None:
    heuristic = HeuristicPolicy(settings())
    service = TamiyoService(settings(), heuristic, SECRET)
    try:
        state = service.export_state()
        assert state == heuristic.state()
        service.restore_state(json.loads(json.dumps(state)))
        updates = RecordingUpdates()
        service.consult(updates)
        assert service.export_state() == {"serving": "recorded"}
        service.restore_state({"serving": "recorded"})
        assert updates.restored == [{"serving": "recorded"}]
    finally:
        service.close()


def test_no_policy_is_probed_for_attributes_anywhere_in_the_source() -> None:
    probe = re.compile(r"\b(?:getattr|hasattr)\(\s*[\w.]*polic", re.IGNORECASE)
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted((REPO / "src" / "esper").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if probe.search(line)
    ]
    assert offenders == []


def test_simic_loads_tamiyos_model_without_its_runtime_or_records() -> None:
    code = (
        "import importlib, pkgutil, sys, esper.simic\n"
        "for module in pkgutil.walk_packages(esper.simic.__path__, 'esper.simic.'):\n"
        "    importlib.import_module(module.name)\n"
        "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('esper.tamiyo'))))\n"
    )
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
    ).stdout.split()
    assert "esper.tamiyo.model.policy" in loaded  # the walk did import what Simic trains
    assert [m for m in loaded if m.startswith(("esper.tamiyo.runtime", "esper.tamiyo.records"))] == []


def test_importing_ppo_leaves_the_worker_the_store_and_the_outbox_unloaded() -> None:
    code = "import sys, esper.simic.ppo\nprint('\\n'.join(sorted(sys.modules)))\n"
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env
        ).stdout.split()
    )
    assert "esper.simic.ppo" in loaded
    unwanted = {"esper.tamiyo.runtime.worker", "esper.tamiyo.records.store", "esper.tamiyo.records.outbox"}
    assert loaded & unwanted == set()
