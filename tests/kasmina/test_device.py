"""Growth operations and seeds create their tensors on the device of the tensors they receive.

Checked on the `meta` device (no data, no GPU: any tensor created without the host's device lands on the
CPU and is caught) and on the CPU; and statically, over the growth modules' source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import esper.kasmina
from esper.kasmina import SeedManager
from esper.leyline import ManualClock, SignatureVerifier, pb
from esper.tolaria.hosts import MLPHost
from esper.urza import BlueprintCatalogue
from tests.kasmina.support import RUN_ID, SECRET, fast_settings, germinate, open_catalogue
from tests.kasmina.test_growth_commands import deepen, widen

# Calls that make a new tensor from nothing: each must say where (`device=`), or it lands on the CPU.
_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "randn",
        "rand",
        "randint",
        "randperm",
        "arange",
        "eye",
        "tensor",
        "linspace",
        "as_tensor",
    }
)
_GROWTH_MODULES = ("widen.py", "deepen.py", "stack.py", "growing.py", "growth.py", "slot.py")


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


@pytest.fixture
def catalogue(tmp_path: Path) -> BlueprintCatalogue:
    return open_catalogue(tmp_path)


@pytest.mark.parametrize("operation", ["germinate", "widen", "deepen"])
@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_seeds_and_growths_are_built_on_the_device_of_the_host(
    catalogue: BlueprintCatalogue, device: str, operation: str
) -> None:
    clock = ManualClock()
    torch.manual_seed(0)
    with torch.device(device):
        host = MLPHost(6, 3, width=5)
    verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=clock)
    manager = SeedManager(
        host.slots(), catalogue, verifier, fast_settings(), training_run_id=RUN_ID, host=host
    )
    command = {
        "germinate": lambda: germinate(clock, host.slots()[0].slot_id),
        "widen": lambda: widen(clock, "fc1", init=pb.GROWTH_INIT_RANDOM),
        "deepen": lambda: deepen(clock, "fc1"),
    }[operation]()
    result = manager.apply(command, step=0)
    assert result.accepted, result
    added = manager.drain_parameter_changes().added
    assert len(added) == 1 and added[0][1], added
    for parameter in added[0][1]:
        assert parameter.device.type == device, added[0][0]
    for name, tensor in _tensors(host):
        assert tensor.device.type == device, name
    if device == "meta" and operation == "germinate":
        return  # a germinated seed's first forward is its sanity check, which reads values: not on meta
    with torch.no_grad():
        out = host(torch.zeros(4, 6, device=device))
    assert out.device.type == device and out.shape == (4, 3)


def _unplaced_factories(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if not (isinstance(owner, ast.Name) and owner.id == "torch" and node.func.attr in _FACTORIES):
            continue
        if not any(keyword.arg == "device" for keyword in node.keywords):
            found.append(f"line {node.lineno}: torch.{node.func.attr}(...) without device=")
    return found


def test_growth_modules_never_create_a_tensor_without_a_device() -> None:
    root = Path(esper.kasmina.__file__).parent
    problems = {
        name: found
        for name in _GROWTH_MODULES
        if (found := _unplaced_factories((root / name).read_text(encoding="utf-8")))
    }
    assert not problems, problems


def test_the_static_check_catches_a_tensor_made_without_a_device() -> None:
    source = "import torch\nx = torch.zeros(3)\ny = torch.zeros(3, device=w.device)\nz = w.new_zeros(3)\n"
    assert _unplaced_factories(source) == ["line 2: torch.zeros(...) without device="]
