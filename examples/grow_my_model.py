"""Grow your own model with Esper, export it, and load it back with plain PyTorch.

A 1-D CNN written as an ordinary `nn.Sequential` learns Esper's generated signal task (1-D signals of
six classes, shifted and noisy). `esper.grow` finds its growth points, trains it while the heuristic
controller grows it, and returns the grown model. The export is then loaded by `portable.py` alone (a
single file that imports only torch and safetensors) and gives the same outputs.

    python examples/grow_my_model.py            # a real run (a minute or two on a laptop CPU)
    python examples/grow_my_model.py --smoke    # seconds: a check that everything fits together
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import esper
from esper.tolaria.data import make_signals


def my_model(classes: int) -> nn.Sequential:
    """What a user writes: nothing of Esper in it."""
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 16, 5, padding=2, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(16 * 4, classes),
    )


def load_without_esper(directory: Path) -> nn.Module:
    """Load the export with esper/portable.py taken as a lone file, as a user who copied it would."""
    source = Path(esper.__file__).with_name("portable.py")
    spec = importlib.util.spec_from_file_location("portable", source)
    assert spec is not None and spec.loader is not None
    portable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    model: nn.Module = portable.load(directory)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds: tiny data, few epochs")
    parser.add_argument("--out", type=Path, default=None, help="where to write the export")
    args = parser.parse_args()

    samples, epochs = (400, 3) if args.smoke else (2400, 15)
    data = make_signals(0.5, seed=0, n_samples=samples)
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=256)

    torch.manual_seed(0)
    model = my_model(data.num_classes)
    result = esper.grow(model, train, val, epochs=epochs, decision_interval=10)

    summary = result.summary
    name, value = result.metric
    print(f"{name}: {value:.3f}, parameters {summary.params_initial} -> {summary.params_final}")
    print(f"seeds germinated {summary.seeds_germinated}, fossilised {summary.seeds_fossilized}")
    print(f"run directory: {result.run_dir}  (try: esper report {result.run_dir})")

    out = args.out or Path(tempfile.mkdtemp()) / "my-grown-model"
    result.export(out)
    plain = load_without_esper(out)
    model.eval()
    with torch.no_grad():
        same = torch.allclose(plain(data.x_val), model(data.x_val), atol=1e-6)
    print(f"exported to {out}; reloaded without Esper, same outputs: {same}")
    if not same:
        raise SystemExit("the reloaded model's outputs differ")


if __name__ == "__main__":
    main()
