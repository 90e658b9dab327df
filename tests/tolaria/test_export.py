"""Export: a grown model as safetensors, a JSON spec and a model card, rebuilt by `esper.portable`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from typer.testing import CliRunner

from esper import portable
from esper.assembly import run as run_module
from esper.cli import app
from esper.kasmina import GrowthMode, IdentityBlock, KasminaSettings, SeedManager, SlotMode, UnitGroup
from esper.leyline import ManualClock, SignatureVerifier, load_settings, pb, sign
from esper.tolaria.adapt import GrowthPoint, adapt_model
from esper.tolaria.export import ExportError, export_model, export_run, restore_final
from esper.tolaria.hosts import Host, build_host
from esper.tolaria.run import RunConfig
from esper.tolaria.settings import TolariaSettings
from esper.urza import BlueprintCatalogue
from tests.integration.run_worker import assembled_run
from tests.integration.scripted import ScriptedController
from tests.kasmina.support import RUN_ID, SECRET, fast_settings, germinate, open_catalogue
from tests.kasmina.test_growth_commands import deepen, widen
from tests.tolaria.test_adapt import CustomForward, cnn, mlp

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]

# The loader, in a fresh interpreter: every case dir holds the export plus inputs.safetensors (x, expected).
_CHECK = """
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from esper import portable
for case in sys.argv[1:]:
    model = portable.load(case)
    data = load_file(str(Path(case) / "inputs.safetensors"))
    with torch.no_grad():
        got = model(data["x"])
    err = float((got - data["expected"]).abs().max())
    assert err <= 1e-6, (case, err)
loaded = sorted(m for m in sys.modules if m.startswith("esper"))
assert loaded == ["esper", "esper.common", "esper.common.lazy", "esper.portable"], loaded
print("ok", len(sys.argv) - 1)
"""


def check_in_fresh_process(cases: list[Path]) -> None:
    """Rebuild each exported case with esper.portable in a new interpreter (no Kasmina, Tolaria, Tamiyo)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, *map(str, cases)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", str(len(cases))]


def save_case(directory: Path, model: nn.Module, x: Tensor) -> Path:
    model.eval()
    with torch.no_grad():
        expected = model(x)
    save_file({"x": x.contiguous(), "expected": expected.contiguous()}, str(directory / "inputs.safetensors"))
    return directory


def _manager(host: Host, catalogue: BlueprintCatalogue, clock: ManualClock) -> SeedManager:
    verifier = SignatureVerifier(SECRET, freshness_s=60.0, future_skew_s=5.0, clock=clock)
    return SeedManager(host.slots(), catalogue, verifier, fast_settings(), training_run_id=RUN_ID, host=host)


def grow_final(
    host: Host,
    *,
    catalogue: BlueprintCatalogue,
    seeds: dict[str, str],
    widened: str,
    deepened: str,
    blend: int,
) -> None:
    """Seeds fossilised, a widen merged and a block kept, as a finished run leaves them, with weights
    moved off their neutral start so every part changes the output."""
    clock = ManualClock()
    manager = _manager(host, catalogue, clock)
    generator = torch.Generator().manual_seed(7)

    def perturb(module: nn.Module) -> None:
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))

    assert manager.apply(widen(clock, widened, init=pb.GROWTH_INIT_RANDOM), step=0).accepted
    container = host.get_submodule("growth")
    for key, group in list(container.named_children()):
        assert isinstance(group, UnitGroup)
        perturb(group)
        group.mode = GrowthMode.LIVE
        group.merge()  # the slot on the widened layer is dormant, as merging needs
        del container[key]
    for slot_id, blueprint in seeds.items():
        assert manager.apply(germinate(clock, slot_id, blueprint, blend_mode=blend), step=0).accepted
    if deepened:
        assert manager.apply(deepen(clock, deepened), step=0).accepted
    for slot in host.slots():
        if slot.seed is not None:
            perturb(slot.seed)
            slot.mode = SlotMode.FOSSIL
    for module in list(host.modules()):
        if isinstance(module, IdentityBlock):
            perturb(module)
            module.mode, module.alpha = GrowthMode.LIVE, 1.0


def normed_cnn() -> nn.Module:
    """A batch norm first and a max pool before the head: layers the spec carries but does not grow."""
    return nn.Sequential(
        nn.BatchNorm2d(1),
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 3),
    )


HOSTS: dict[str, tuple[tuple[int, ...], Any, dict[str, str], str, str]] = {
    "mlp": ((10,), lambda: torch.randn(6, 10), {"h1": "lowrank", "h2": "attention_lite"}, "fc2", "fc1"),
    "cnn": (
        (1, 8, 8),
        lambda: torch.randn(6, 1, 8, 8),
        {"c1": "conv_se", "c2": "conv_depthwise"},
        "conv2",
        "conv1",
    ),
    "conv1d": (
        (2, 16),
        lambda: torch.randn(6, 2, 16),
        {"s1": "conv1d_bottleneck", "s2": "conv1d_residual"},
        "conv2",
        "conv1",
    ),
    "transformer": (
        (7,),
        lambda: torch.randint(0, 10, (6, 7)),
        {"f1": "conv1d_lowrank", "t1": "conv1d_se"},
        "ff1",
        "",
    ),
}
BLENDS = {
    "mlp": pb.BLEND_MODE_CHANNEL,
    "cnn": pb.BLEND_MODE_CONFIDENCE,
    "conv1d": pb.BLEND_MODE_RESIDUAL,
    "transformer": pb.BLEND_MODE_CONVEX,
}


def test_grown_hosts_and_adapted_models_reload_without_esper_and_compute_the_same(tmp_path: Path) -> None:
    catalogue = open_catalogue(tmp_path)
    cases: list[Path] = []
    for kind, (shape, example, seeds, widened, deepened) in HOSTS.items():
        torch.manual_seed(0)
        host = build_host(kind, shape, 3, vocab_size=10)
        grow_final(
            host, catalogue=catalogue, seeds=seeds, widened=widened, deepened=deepened, blend=BLENDS[kind]
        )
        out = export_model(host, tmp_path / kind, {"task": "test"})
        cases.append(save_case(out, host, example()))
    adapted = {
        "adapted-mlp": (mlp, lambda: torch.randn(6, 10), {"p1": "mlp_small"}, "3", "1"),
        "adapted-cnn": (cnn, lambda: torch.randn(6, 1, 8, 8), {"p1": "conv_bottleneck"}, "2", "0"),
        "adapted-custom": (CustomForward, lambda: torch.randn(6, 10), {"hidden": "mlp_expand"}, "fc2", "fc1"),
        "adapted-normed": (normed_cnn, lambda: torch.randn(6, 1, 8, 8), {"p1": "conv_se"}, "1", ""),
    }
    for name, (build, example, seeds, widened, deepened) in adapted.items():
        torch.manual_seed(0)
        x = example()
        model = build()
        model(x)  # a training-mode pass: batch norms hold running statistics of their own
        host = adapt_model(model, x)
        grow_final(
            host,
            catalogue=catalogue,
            seeds=seeds,
            widened=widened,
            deepened=deepened,
            blend=pb.BLEND_MODE_RESIDUAL,
        )
        cases.append(save_case(export_model(host, tmp_path / name), host, x))
    spec = json.loads((tmp_path / "mlp" / "model.json").read_text())
    kinds = json.dumps(spec)
    assert '"seed"' in kinds and '"residual"' in kinds and "SeedSlot" not in kinds
    linears = [(n["in"], n["out"]) for n in spec["model"]["layers"] if n["kind"] == "linear"]
    assert linears == [(10, 4), (4, 8), (8, 3)]  # the narrow start; fc2 widened by 4 and merged
    custom = json.loads((tmp_path / "adapted-custom" / "model.json").read_text())["model"]
    assert custom["kind"] == "graph"
    assert [step["op"] for step in custom["nodes"]].count("module") == 5  # fc1, point, fc2, point, head
    check_in_fresh_process(cases)


class Gated(nn.Module):
    """A forward that reads a parameter directly and takes its shape: nothing the spec describes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.point = GrowthPoint("p")
        self.fc2 = nn.Linear(6, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc2(self.point(torch.relu(self.fc1(x)))) * self.scale
        return out


def test_a_custom_forward_the_spec_cannot_describe_is_refused_by_name(tmp_path: Path) -> None:
    host = adapt_model(Gated(), torch.randn(3, 4))
    with pytest.raises(ExportError, match="get_attr 'scale' is not something the spec can describe"):
        export_model(host, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_growth_still_in_its_lifecycle_is_not_exported(tmp_path: Path) -> None:
    host = build_host("mlp", (10,), 3)
    clock = ManualClock()
    manager = _manager(host, open_catalogue(tmp_path), clock)
    assert manager.apply(germinate(clock, "h1", "lowrank"), step=0).accepted
    with pytest.raises(ExportError, match="still in its lifecycle"):
        export_model(host, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_loader_refuses_unknown_versions_and_kinds() -> None:
    spec = {"format": "esper-model", "version": 1, "model": {"kind": "sequential", "layers": []}}
    assert isinstance(portable.build(spec), nn.Module)
    with pytest.raises(portable.PortableError, match="spec version 2"):
        portable.build({**spec, "version": 2})
    with pytest.raises(portable.PortableError, match="unknown layer kind 'warp'"):
        portable.build({**spec, "model": {"kind": "sequential", "layers": [{"kind": "warp"}]}})
    graph = {"kind": "graph", "inputs": ["x"], "output": "y", "nodes": []}
    step = {"name": "y", "op": "method", "target": "__class__", "args": [{"ref": "x"}], "kwargs": {}}
    with pytest.raises(portable.PortableError, match="unknown method '__class__'"):
        portable.build({**spec, "model": {**graph, "nodes": [step]}})
    with pytest.raises(portable.PortableError, match="not an Esper model spec"):
        portable.build({**spec, "format": "other"})


def test_a_run_directory_without_a_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="no checkpoint"):
        export_run(tmp_path / "run", tmp_path / "out")
    with pytest.raises(ExportError, match="no such directory"):
        export_run(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()


def test_esper_export_refuses_a_run_without_a_checkpoint_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    done = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert done.exit_code == 1
    assert "esper export failed" in done.output and "no checkpoint" in done.output


# -- from real runs ----------------------------------------------------------------------------------------


class GrowingScript(ScriptedController):
    """The scripted controller, plus: widen `layer` at the first decision, fossilise ready growths."""

    def __init__(self, layer: str, **kw: Any) -> None:
        super().__init__(SECRET, **kw)
        self.layer = layer
        self.widened = False

    def evaluate_step(self, packet: pb.SystemStatePacket) -> pb.AdaptationCommand:
        for state in packet.growth_states:
            if state.metrics.get("fossilize_ready") == 1.0:
                return self._growth(packet, pb.SEED_OP_FOSSILIZE, state.seed_id)
        if self.layer and not self.widened:
            self.widened = True
            return self._growth(packet, pb.SEED_OP_WIDEN, self.layer)
        return super().evaluate_step(packet)

    def _growth(self, packet: pb.SystemStatePacket, operation: int, target: str) -> pb.AdaptationCommand:
        self.decisions += 1
        command = pb.AdaptationCommand(
            version=1,
            command_id=f"grow-{packet.training_run_id}-{self.decisions}",
            issued_by="scripted",
            training_run_id=packet.training_run_id,
            command_type=pb.COMMAND_SEED,
            target_seed_id=target,
        )
        op = command.seed_operation
        op.operation = operation
        op.slot_id = target
        op.alpha_ramp_steps = self.alpha_ramp_steps
        if operation == pb.SEED_OP_WIDEN:
            op.growth.layer_id, op.growth.units, op.growth.init = target, 4, pb.GROWTH_INIT_RANDOM
        return sign(command, self.secret)


def run_config(run_dir: Path, task: str, host: str, epochs: int) -> RunConfig:
    return RunConfig(
        task=task,
        host=host,
        policy="scripted",
        difficulty=0.5,
        run_dir=run_dir,
        catalogue_path=run_dir.parent / "urza.sqlite3",
        training_run_id=f"run-export-{host}",
        tolaria=load_settings(TolariaSettings, environ={}, epochs=epochs, decision_interval=5, seed=3),
        kasmina=load_settings(
            KasminaSettings,
            environ={},
            min_training_steps=10,
            improvement_window=2,
            min_shadowing_steps=5,
            probation_steps=10,
            embargo_steps=15,
        ),
    )


RUNS = {
    # host: (task, epochs, slots to germinate and their blueprints, layer to widen)
    "mlp": ("digits", 8, {"h2": "lowrank"}, "fc1"),
    "cnn": ("digits", 1, {"c1": "conv_residual"}, ""),
    "conv1d": ("signals", 1, {"s1": "conv1d_lowrank"}, ""),
    "transformer": ("tokens", 1, {"f1": "conv1d_lowrank"}, ""),
}


@pytest.mark.slow
def test_esper_export_of_real_runs_equals_their_final_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Host] = []

    def recording_build_host(*args: Any, **kwargs: Any) -> Host:
        host = build_host(*args, **kwargs)
        built.append(host)
        return host

    monkeypatch.setattr(run_module, "build_host", recording_build_host)
    cases = []
    for kind, (task, epochs, seeds, layer) in RUNS.items():
        run_dir = tmp_path / f"run-{kind}"
        controller = GrowingScript(layer, germinate=tuple(seeds), blueprints=seeds)
        summary = assembled_run(run_config(run_dir, task, kind, epochs), controller, secret=SECRET).to_json()
        final = built[-1]
        out = tmp_path / f"export-{kind}"
        if kind == "mlp":
            done = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])
            assert done.exit_code == 0, done.output
        else:
            export_run(run_dir, out)
        card = json.loads((out / "model_card.json").read_text())
        assert card["task"] == summary["task"] and card["final_val_accuracy"] == summary["final_val_accuracy"]
        assert card["parameters"] == summary["params_final"] == final.parameter_count()
        if kind == "mlp":
            stages = {(e.get("slot_id"), e["to_stage"]) for e in card["growth_history"]}
            assert ("h2", "FOSSILIZED") in stages and ("fc1:w1", "FOSSILIZED") in stages, sorted(stages)
            assert final.host_layers()[0][2] == 8  # fc1 (4 units at the start) widened by 4, merged
        dataset = run_module.load_task(task, kind, seed=3, difficulty=0.5)
        cases.append(save_case(out, final, dataset.x_val[:64]))
    check_in_fresh_process(cases)


def test_a_checkpoint_that_does_not_fit_the_runs_host_is_refused(tmp_path: Path) -> None:
    host = build_host("mlp", (10,), 3)
    state = {"slots": {"h1": {}}, "paused": False}
    with pytest.raises(ExportError, match="does not fit the run's host"):
        restore_final(host, fast_settings(), RUN_ID, state, {})
