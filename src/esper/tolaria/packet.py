"""Builds the `SystemStatePacket` a controller decides from: metrics, topology, seeds, blueprints offered."""

from __future__ import annotations

import os
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
    hardware: pb.HardwareContext | None = None,
) -> pb.SystemStatePacket:
    """A validated packet; `packet_id` is fresh for every packet. `max_parameters` is the run's growth
    budget (0: unbounded); the model's size now is `training_metrics["param_count"]`; `device` is where
    the run computes ("cpu:0", "cuda:1"), its type before the colon. `hardware`: that device's memory
    (`device_hardware(device)` when not given)."""
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
        hardware_context=hardware if hardware is not None else device_hardware(device),
        max_parameters=max_parameters,
    )
    packet.topology.CopyFrom(topology)
    packet.seed_states.extend(seed_states)
    packet.growth_states.extend(growth_states)
    packet.blueprint_ids.extend(blueprint_ids)
    packet.training_metrics.update(training_metrics)
    return validate_packet(packet)


_GIB = float(1 << 30)


def unmeasured_hardware(device: str) -> pb.HardwareContext:
    """`device` named, nothing measured (the graph reads its hardware features as missing)."""
    return pb.HardwareContext(device_type=device.partition(":")[0], device_id=device)


def device_hardware(device: str) -> pb.HardwareContext:
    """The memory of `device` as the controller sees it: total and available (GiB); a CUDA device's
    from its driver, a CPU's from the operating system (`host_hardware`)."""
    kind = device.partition(":")[0]
    if kind != "cuda":
        hardware = host_hardware()
        hardware.device_type, hardware.device_id = kind, device
        return hardware
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return pb.HardwareContext(
        device_type=kind,
        device_id=device,
        total_memory_gb=total / _GIB,
        available_memory_gb=free / _GIB,
        utilization_percent=0.0,
        temperature_celsius=0.0,
    )


def host_hardware() -> pb.HardwareContext:
    """This machine's memory as the controller sees it: total and available memory (GiB).

    On a CPU no utilisation nor temperature is measured (both 0): the load average of a shared machine
    says how busy the other processes are, not whether this run has room to grow, and Tamiyo's resource
    gate would refuse every growth on a saturated one."""
    page = os.sysconf("SC_PAGE_SIZE")
    return pb.HardwareContext(
        device_type="cpu",
        device_id="cpu:0",
        total_memory_gb=os.sysconf("SC_PHYS_PAGES") * page / _GIB,
        available_memory_gb=os.sysconf("SC_AVPHYS_PAGES") * page / _GIB,
        utilization_percent=0.0,
        temperature_celsius=0.0,
    )
