"""The morphogenetic loop on digits, step by step through Tolaria's trainer (DESIGN §3, issue 3).

One run under the scripted controller: slot h1 goes DORMANT -> ... -> FOSSILIZED, slot h2 is culled while
blending and comes back DORMANT after its embargo. Every step is watched from outside the trainer: alpha
ramps, the seed's effect on the output and on gradients, isolation while training, the parameter count
and the optimizer after fossilisation. Then forged, replayed, tampered and stale commands reach the
trainer through its controller and change nothing.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from esper.assembly import RunAssembly
from esper.kasmina import SlotMode
from esper.leyline import ManualClock, load_settings, pb, sign
from esper.nissa.layout import RunLayout
from esper.tolaria.trainer import Trainer
from tests.integration.run_worker import SECRET, config, controller, run_settings

torch.set_num_threads(1)
S = pb

LIFE = [
    S.SEED_STAGE_DORMANT,
    S.SEED_STAGE_GERMINATED,
    S.SEED_STAGE_TRAINING,
    S.SEED_STAGE_BLENDING,
    S.SEED_STAGE_SHADOWING,
    S.SEED_STAGE_PROBATIONARY,
    S.SEED_STAGE_FOSSILIZED,
]


class RecordingController:
    """Passes packets to an inner controller, or to `override` when set, and keeps every command."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.commands: list[pb.AdaptationCommand] = []
        self.override: Callable[[pb.SystemStatePacket], pb.AdaptationCommand] | None = None
        self.submitted = pb.AdaptationCommand()

    def prepare(self, packet: pb.SystemStatePacket) -> None:
        self.inner.prepare(packet)

    def anticipate(self) -> None:
        self.inner.anticipate()

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        command = self.override(packet) if self.override else self.inner.evaluate_step(packet)
        self.commands.append(command)
        return command

    def submit(self, packet: pb.SystemStatePacket) -> None:
        self.submitted = self.evaluate_step(packet)

    def collect(self) -> pb.AdaptationCommand:
        return self.submitted

    def export_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.inner.export_state()
        return state

    def restore_state(self, state: Mapping[str, Any]) -> None:
        self.inner.restore_state(state)

    def checkpointed(self, training_run_id: str, step: int) -> None:
        self.inner.checkpointed(training_run_id, step)

    def rewound(self, training_run_id: str, step: int) -> None:
        self.inner.rewound(training_run_id, step)


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[Trainer]:
    cfg = config(tmp_path / "run", epochs=4)
    # One seed's life to FOSSILIZED, its fossil checked in its slot: stacking it into the host is
    # tests/kasmina/test_stacking.py's and tests/tolaria/test_stack_resume.py's.
    cfg = replace(cfg, kasmina=cfg.kasmina.model_copy(update={"stack_fossils": False}))
    recording = RecordingController(controller())
    with RunAssembly(
        run_settings(tmp_path), cfg, secret=SECRET, controller=recording, deployment=False
    ) as run:
        yield run.prepare()


def _seed_params(trainer: Trainer, slot_id: str) -> tuple[nn.Parameter, ...]:
    seed_id = trainer.manager.seed_id(slot_id)
    return dict(trainer.manager.seed_parameter_groups())[seed_id]


def _host_grads_with_and_without_seed(trainer: Trainer, slot_id: str) -> tuple[list[Any], list[Any]]:
    """Host parameter gradients of one batch with the seed incubating, and with the slot dormant."""
    twin = copy.deepcopy(trainer.host)
    slot = next(s for s in twin.slots() if s.slot_id == slot_id)
    seed_ids = {id(p) for p in slot.parameters()}
    host_params = [p for p in twin.parameters() if id(p) not in seed_ids]
    x, y = trainer.dataset.x_train[:64], trainer.dataset.y_train[:64]
    grads = []
    for mode in (slot.mode, SlotMode.IDENTITY):
        slot.mode = mode
        twin.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(twin(x), y).backward()  # type: ignore[no-untyped-call]
        grads.append([p.grad.clone() if p.grad is not None else None for p in host_params])
    return grads[0], grads[1]


def test_seeds_go_through_their_whole_lives_in_the_training_loop(trainer: Trainer) -> None:  # noqa: C901 (one test follows every seed through its whole life)
    manager, settings = trainer.manager, trainer.settings
    params_initial = trainer.host.parameter_count()
    trainer.save_checkpoint()
    stages: dict[str, list[int]] = {"h1": [S.SEED_STAGE_DORMANT], "h2": [S.SEED_STAGE_DORMANT]}
    alphas: list[float] = []
    checked_blending = checked_training = False
    h2_culled_at = h2_reset_at = None
    x_val = trainer.dataset.x_val[:256]
    while trainer.step < trainer.total_steps:
        stage_before, alpha_before = manager.stage("h1"), manager.alpha("h1")
        if stage_before == S.SEED_STAGE_TRAINING and not checked_training:
            with_seed, without_seed = _host_grads_with_and_without_seed(trainer, "h1")
            for a, b in zip(with_seed, without_seed, strict=True):
                assert a is not None and b is not None and torch.equal(a, b), "seed gradient reached the host"
            checked_training = True
        blending = stage_before == S.SEED_STAGE_BLENDING and alpha_before > 0
        if blending and not checked_blending:
            with torch.no_grad():
                blended = trainer.host(x_val)
                with manager.counterfactual("h1"):
                    dormant = trainer.host(x_val)
            assert not torch.allclose(blended, dormant), "a blending seed does not change the output"
        trainer.train_step()
        if blending and not checked_blending:
            grads = [p.grad for p in _seed_params(trainer, "h1")]
            assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
            checked_blending = True
        if trainer.step % settings.decision_interval == 0:
            trainer.decide()
        for slot_id, seen in stages.items():
            if manager.stage(slot_id) != seen[-1]:
                seen.append(manager.stage(slot_id))
        if manager.stage("h1") == S.SEED_STAGE_BLENDING:
            alphas.append(manager.alpha("h1"))
        if manager.stage("h2") == S.SEED_STAGE_CULLED and h2_culled_at is None:
            h2_culled_at = trainer.step
        if manager.stage("h2") == S.SEED_STAGE_RESETTING and h2_reset_at is None:
            h2_reset_at = trainer.step
        h2_back = len(stages["h2"]) > 1 and stages["h2"][-1] == S.SEED_STAGE_DORMANT
        if manager.stage("h1") == S.SEED_STAGE_FOSSILIZED and h2_back:
            break
    assert stages["h1"] == LIFE
    assert checked_training and checked_blending
    assert len(alphas) >= 5 and all(b > a for a, b in itertools.pairwise(alphas)), alphas
    assert stages["h2"] == [
        S.SEED_STAGE_DORMANT,
        S.SEED_STAGE_GERMINATED,
        S.SEED_STAGE_TRAINING,
        S.SEED_STAGE_BLENDING,
        S.SEED_STAGE_CULLED,
        S.SEED_STAGE_EMBARGOED,
        S.SEED_STAGE_RESETTING,
        S.SEED_STAGE_DORMANT,
    ]
    assert h2_culled_at is not None and h2_reset_at is not None
    assert h2_reset_at - h2_culled_at >= manager.settings.embargo_steps
    assert manager.seed_id("h2") == "h2" and "h2:g1" not in trainer.optimizer.group_names
    # Fossilised: the host is bigger and the optimizer trains the new parameters.
    assert trainer.host.parameter_count() > params_initial
    assert trainer.host.parameter_count() == params_initial + manager.seed_parameter_count(
        fossilized_only=True
    )
    assert all(trainer.optimizer.holds(p) for p in _seed_params(trainer, "h1"))
    isolation = [e for e in trainer.run_dir.events.read() if e["kind"] == "isolation_violation"]
    assert isolation == []
    _unauthentic_commands_change_nothing(trainer)


def _snapshot(trainer: Trainer) -> tuple[Any, ...]:
    manager = trainer.manager
    return (
        [(s, manager.stage(s), manager.seed_id(s)) for s in manager.slot_ids],
        {k: v.clone() for k, v in trainer.host.state_dict().items()},
        trainer.optimizer.group_names,
        trainer.host.parameter_count(),
    )


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (
        a[0] == b[0]
        and a[1].keys() == b[1].keys()
        and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        and a[2:] == b[2:]
    )


def _unauthentic_commands_change_nothing(trainer: Trainer) -> None:
    recorder = trainer.controller
    assert isinstance(recorder, RecordingController)
    accepted_germinate = next(
        c
        for c in recorder.commands
        if c.HasField("seed_operation") and c.seed_operation.operation == S.SEED_OP_GERMINATE
    )

    def germinate_h2(
        packet: pb.SystemStatePacket, *, secret: bytes, clock: ManualClock
    ) -> pb.AdaptationCommand:
        message = pb.AdaptationCommand(
            version=1,
            command_id=f"attack-{clock.wall_ns()}-{secret[:3]!r}",
            command_type=S.COMMAND_SEED,
            issued_by="attacker",
            target_seed_id="h2",
            training_run_id=packet.training_run_id,
        )
        op = message.seed_operation
        op.operation, op.slot_id, op.blueprint_id = S.SEED_OP_GERMINATE, "h2", "mlp_small"
        message.issued_at.FromNanoseconds(clock.wall_ns())
        return sign(message, secret, clock=clock)

    now = ManualClock()
    stale_clock = ManualClock(wall_ns=now.wall_ns() - 600 * 10**9)

    def tampered(packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        message = germinate_h2(packet, secret=SECRET, clock=now)
        message.seed_operation.blueprint_id = "lowrank"  # changed after signing
        return message

    attacks: list[tuple[str, Callable[[pb.SystemStatePacket], pb.AdaptationCommand]]] = [
        ("invalid_signature", lambda p: germinate_h2(p, secret=b"forged-secret-0123456789xyz", clock=now)),
        ("invalid_signature", tampered),
        ("replayed_nonce", lambda p: accepted_germinate),
        ("stale", lambda p: germinate_h2(p, secret=SECRET, clock=stale_clock)),
    ]
    for expected_reason, attack in attacks:
        before = _snapshot(trainer)
        recorder.override = attack
        trainer.decide()
        record = trainer.run_dir.decisions.read()[-1]
        assert (record["accepted"], record["rejection"]) == (False, expected_reason), record
        assert _same(_snapshot(trainer), before), expected_reason
    recorder.override = None
    rejected = [e for e in trainer.run_dir.events.read() if e["kind"] == "command_rejected"]
    assert [e["reason"] for e in rejected][-4:] == [reason for reason, _ in attacks]


def test_the_controller_warms_up_once_per_topology_before_deciding(
    trainer: Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = trainer.controller.inner  # type: ignore[attr-defined]
    trainer.decide()
    trainer.decide()
    assert inner.prepared == 1 and inner.decisions == 2
    grown = type(trainer.host.topology())()
    grown.CopyFrom(trainer.host.topology())
    grown.layers[0].width += 1
    monkeypatch.setattr(trainer.host, "topology", lambda: grown)
    trainer.decide()
    trainer.decide()
    assert inner.prepared == 2 and inner.decisions == 4


def test_the_wait_only_control_trains_the_same_host_without_growing_it(tmp_path: Path) -> None:
    from esper.tamiyo import TamiyoService
    from esper.tamiyo.model.heuristic import WaitOnlyPolicy
    from esper.tamiyo.settings import TamiyoSettings
    from esper.tolaria.controller import BoundController

    cfg = config(tmp_path / "run", epochs=1)
    policy = WaitOnlyPolicy()
    service = TamiyoService(load_settings(TamiyoSettings, environ={}, step_timeout_ms=1000.0), policy, SECRET)
    bound = BoundController(decide=service.evaluate_step, save=policy.state, load=policy.restore)
    with RunAssembly(run_settings(tmp_path), cfg, secret=SECRET, controller=bound, deployment=False) as run:
        trainer = run.prepare()
        manager = trainer.manager
        params = trainer.host.parameter_count()
        outcome = trainer.fit()
    decisions = [json.loads(line) for line in RunLayout(cfg.run_dir).decisions.read_text().splitlines()]
    assert decisions and all(d["command_type"] == "WAIT" and d["accepted"] for d in decisions)
    assert outcome.parameters == params
    assert all(manager.stage(s) == S.SEED_STAGE_DORMANT for s in manager.slot_ids)
