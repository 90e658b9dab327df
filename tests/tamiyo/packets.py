"""Packets and small policies shared by Tamiyo's tests."""

from __future__ import annotations

import threading
from typing import Any

import torch

from esper.leyline import pb
from esper.tamiyo.model.gnn import TamiyoGNNConfig
from esper.tamiyo.model.policy import GNNPolicy
from esper.tamiyo.model.proposal import Proposal
from esper.tamiyo.model.schema import TAMIYO_SCHEMA
from esper.tamiyo.settings import TamiyoSettings

# What other subsystems may import of Tamiyo (besides `esper.tamiyo.settings`): `esper.tamiyo.__all__`.
PUBLIC_FACE = (
    "BlueprintMetadataCache",
    "CheckpointIncompatible",
    "DeadlineExceeded",
    "GNNPolicy",
    "GraphBuilder",  # the Gymnasium environment shows agents the graph the GNN sees
    "HeuristicPolicy",
    "OUTBOX_STATUSES",
    "Policy",
    "PolicyUpdateFeed",
    "PolicyUpdateIntake",
    "PolicyUpdateRejected",
    "Proposal",  # the Gymnasium environment turns an agent's action into one
    "StoreError",
    "TamiyoService",
    "TamiyoGraph",
    "TamiyoStore",
    "read_payload_header",
)


class Stateless:
    """What a test policy adds to `propose` to be a complete `Policy`: nothing to warm up, no state."""

    def warm_up(self) -> None:
        return None

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        assert not state, f"a stateless test policy was given state {state}"


torch.set_num_threads(1)

SECRET = b"tamiyo-test-secret-0123456789"
# Narrow, with the full size's depth (two SAGE and two GAT layers): every layer-to-layer path is exercised.
SMALL = TamiyoGNNConfig(
    schema=TAMIYO_SCHEMA, hidden_dim=32, gat_dim=16, gat_heads=4, sage_layers=2, gat_layers=2
)


def settings(**overrides: object) -> TamiyoSettings:
    """Settings for tests: a generous deadline unless a test asks for a tight one."""
    values: dict[str, object] = {"step_timeout_ms": 10_000.0}
    values.update(overrides)
    return TamiyoSettings(**values)  # type: ignore[arg-type]


def small_policy(config: TamiyoSettings | None = None, **kwargs: object) -> GNNPolicy:
    """A GNN policy with narrow layers (same architecture, fast to run)."""
    return GNNPolicy(config or settings(), config=SMALL, **kwargs)  # type: ignore[arg-type]


def make_packet(
    n_layers: int = 4,
    n_slots: int = 3,
    n_blueprints: int = 2,
    *,
    stages: dict[int, int] | None = None,
    metrics: bool = True,
) -> pb.SystemStatePacket:
    """A valid packet: slots spread over layers, one seed state per slot (dormant unless `stages`)."""
    packet = pb.SystemStatePacket(
        packet_id="pkt-1",
        training_run_id="run-1",
        source_subsystem="test",
        validation_loss=1.0,
        training_loss=0.9,
        validation_accuracy=0.5,
        current_epoch=3,
        global_step=300,
    )
    packet.training_metrics["learning_rate"] = 0.01
    packet.training_metrics["grad_norm"] = 1.0
    packet.hardware_context.total_memory_gb = 16.0
    packet.hardware_context.available_memory_gb = 8.0
    for index in range(n_layers):
        packet.topology.layers.add(
            layer_id=f"layer-{index}", kind="linear", width=32, depth=index, parameter_count=1024
        )
    stages = stages or {}
    for index in range(n_slots):
        slot_id = f"slot-{index}"
        packet.topology.slots.add(slot_id=slot_id, layer_id=f"layer-{index % max(n_layers, 1)}", width=32)
        stage = stages.get(index, pb.SEED_STAGE_DORMANT)
        state = packet.seed_states.add(seed_id=f"seed-{index}", slot_id=slot_id, stage=stage)
        if stage != pb.SEED_STAGE_DORMANT:
            state.blueprint_id = "bp-0" if n_blueprints else "bp-elsewhere"
            if metrics:
                for key in (
                    "alpha",
                    "alpha_steps",
                    "alpha_total_steps",
                    "blend_allowed",
                    "isolation_violations",
                ):
                    state.metrics[key] = 0.0
    packet.blueprint_ids.extend(f"bp-{index}" for index in range(n_blueprints))
    return packet


class ScriptedPolicy(Stateless):
    """A `Policy` that returns fixed proposals; optionally blocks on its first call until released."""

    version = "scripted-1"

    def __init__(self, proposal: Proposal, *, block_first: bool = False) -> None:
        self.proposal = proposal
        self.release = threading.Event()
        self.calls = 0
        self.threads: list[int] = []
        self._block_first = block_first

    def propose(self, packet: pb.SystemStatePacket) -> Proposal:
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self._block_first and self.calls == 1:
            self.release.wait(30)
        return self.proposal
