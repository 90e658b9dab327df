"""Where a run computes: the device named by `TOLARIA_DEVICE` (or `esper run --device`), resolved once.

`auto` is the first CUDA device when CUDA is available, else the CPU. A CUDA device asked for on a machine
without one (or an index past the last device) is refused at start with `DeviceUnavailable`. A run given
its own model (the Python API) computes on the device of that model's parameters and moves nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from esper.leyline import ConfigurationError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
_SPEC = re.compile(DEVICE_PATTERN)


class DeviceUnavailable(ConfigurationError):
    """The device asked for does not exist on this machine (or is not a device name)."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(f"device {spec!r} cannot be used: {reason}")


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str, *, cuda_devices: Callable[[], int] | None = None) -> torch.device:
    """The device `spec` names (`auto`, `cpu`, `cuda` or `cuda:N`); `cuda_devices` counts the CUDA devices
    present (torch's count by default; injected by tests)."""
    if not _SPEC.match(spec):
        raise DeviceUnavailable(spec, "use auto, cpu, cuda or cuda:N")
    if spec == "cpu":
        return torch.device("cpu")
    count = (cuda_devices or _cuda_count)()
    if spec == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    index = int(spec.partition(":")[2] or 0)
    if count == 0:
        raise DeviceUnavailable(spec, "CUDA is not available on this machine (use --device cpu or auto)")
    if index >= count:
        raise DeviceUnavailable(spec, f"this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def module_device(module: nn.Module) -> torch.device:
    """The device of `module`'s parameters (or buffers); the CPU for a module that holds none. A module
    spread over several devices is refused: a run computes on one."""
    devices = {tensor.device for tensor in [*module.parameters(), *module.buffers()]}
    if len(devices) > 1:
        names = ", ".join(sorted(str(device) for device in devices))
        raise DeviceUnavailable(names, "the model's parameters lie on several devices; put it on one")
    return devices.pop() if devices else torch.device("cpu")
