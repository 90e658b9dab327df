"""Warm-up input: synthetic graphs of typical sizes, run before the first decision (never commands)."""

from __future__ import annotations

from collections.abc import Sequence

from esper.leyline import pb
from esper.tamiyo.model.builder import GraphBuilder
from esper.tamiyo.model.graph import TamiyoGraph
from esper.tamiyo.model.schema import GraphSchema
from esper.tamiyo.settings import TamiyoSettings


def warmup_packet(n_layers: int, n_slots: int, n_blueprints: int) -> pb.SystemStatePacket:
    """A synthetic packet of the given size, used only to warm the network up (never for commands)."""
    packet = pb.SystemStatePacket(
        packet_id="warmup",
        training_run_id="warmup",
        source_subsystem="tamiyo.warmup",
        validation_loss=1.0,
        training_loss=1.0,
    )
    for index in range(n_layers):
        packet.topology.layers.add(layer_id=f"warmup-layer-{index}", kind="linear", width=64, depth=index)
    for index in range(n_slots):
        slot_id = f"warmup-slot-{index}"
        packet.topology.slots.add(
            slot_id=slot_id, layer_id=f"warmup-layer-{index % max(n_layers, 1)}", width=64
        )
        packet.seed_states.add(seed_id=f"warmup-seed-{index}", slot_id=slot_id, stage=pb.SEED_STAGE_DORMANT)
    packet.blueprint_ids.extend(f"warmup-blueprint-{index}" for index in range(n_blueprints))
    return packet


def warmup_graphs(
    settings: TamiyoSettings, schema: GraphSchema, sizes: Sequence[tuple[int, int, int]]
) -> list[TamiyoGraph]:
    """Graphs of the given (layers, slots, blueprints) sizes, built by a builder of their own: warm-up ids
    never reach the catalogue or the normaliser statistics. Their features are placeholders (no catalogue
    entry, no metrics), so they are built leniently whatever `strict_graph` says: only their shapes count."""
    builder = GraphBuilder(settings.model_copy(update={"strict_graph": False}), schema=schema)
    return [builder.build(warmup_packet(*size), update_stats=False) for size in sizes]
