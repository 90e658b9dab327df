"""Builds the `SystemStatePacket` a controller decides from: metrics, topology, seeds, blueprints offered."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from esper.leyline import pb, validate_packet


def build_packet(
    *,
    training_run_id: str,
    experiment_name: str,
    epoch: int,
    global_step: int,
    validation_loss: float,
    validation_accuracy: float,
    training_loss: float,
    timestamp_ns: int,
    topology: pb.HostTopology,
    seed_states: Sequence[pb.SeedState],
    blueprint_ids: Sequence[str],
    training_metrics: Mapping[str, float],
    growth_states: Sequence[pb.SeedState] = (),
    max_parameters: int = 0,
    device: str = "cpu:0",
) -> pb.SystemStatePacket:
    """A validated packet; `packet_id` is fresh for every packet. `max_parameters` is the run's growth
    budget (0: unbounded); the model's size now is `training_metrics["param_count"]`; `device` is where
    the run computes ("cpu:0", "cuda:1"), its type before the colon."""
    packet = pb.SystemStatePacket(
        version=1,
        packet_id=f"pkt-{uuid.uuid4().hex}",
        source_subsystem="tolaria",
        training_run_id=training_run_id,
        experiment_name=experiment_name,
        current_epoch=epoch,
        global_step=global_step,
        validation_loss=validation_loss,
        validation_accuracy=validation_accuracy,
        training_loss=training_loss,
        timestamp_ns=timestamp_ns,
        hardware_context=pb.HardwareContext(device_type=device.partition(":")[0], device_id=device),
        max_parameters=max_parameters,
    )
    packet.topology.CopyFrom(topology)
    packet.seed_states.extend(seed_states)
    packet.growth_states.extend(growth_states)
    packet.blueprint_ids.extend(blueprint_ids)
    packet.training_metrics.update(training_metrics)
    return validate_packet(packet)
