"""A user's data as the trainer takes it: DataLoaders (any collate) or tensors, read once and checked.

The trainer draws its batches from tensors (deterministic order from the run's seed, the same batches
after a resume), so a loader is read once, here, into one tensor of inputs and one of targets. A batch
is `(inputs, targets)` (a tuple or list of two) or a mapping with one input key and one target key.
Everything that would fail later fails here, before training: batches of different sample shapes, an
empty split, a model that cannot run on a batch, a loss that cannot be computed on its output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from esper.leyline import EsperError
from esper.tolaria.data import Dataset
from esper.tolaria.evaluation import Loss, classifies

INPUT_KEYS = ("x", "input", "inputs", "features")
TARGET_KEYS = ("y", "label", "labels", "target", "targets")


class GrowInputError(EsperError):
    """The data, model or loss given to `esper.grow` cannot train (which, and why); nothing was run."""

    def __init__(self, what: str, problem: str) -> None:
        self.what = what
        self.problem = problem
        super().__init__(f"{what}: {problem}")


@dataclass(frozen=True)
class Split:
    """One split's inputs and targets, and the batch size the loader used."""

    x: Tensor
    y: Tensor
    batch_size: int | None


def _unpack(batch: Any, what: str) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        inputs = [k for k in INPUT_KEYS if k in batch]
        targets = [k for k in TARGET_KEYS if k in batch]
        if len(inputs) != 1 or len(targets) != 1:
            raise GrowInputError(
                what,
                f"a batch mapping needs one input key of {INPUT_KEYS} and one target key of "
                f"{TARGET_KEYS}; it has {sorted(map(str, batch))}",
            )
        x, y = batch[inputs[0]], batch[targets[0]]
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        x, y = batch
    else:
        raise GrowInputError(
            what, f"a batch must be (inputs, targets) or a mapping of them, not {type(batch).__name__}"
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise GrowInputError(
            what, f"a batch holds {type(x).__name__} and {type(y).__name__}; both must be tensors"
        )
    if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
        raise GrowInputError(
            what, f"inputs {tuple(x.shape)} and targets {tuple(y.shape)} are not batches of the same size"
        )
    return x, y


def read_split(data: Any, what: str) -> Split:
    """`data` (a DataLoader or any iterable of batches, or an `(inputs, targets)` pair of tensors) as
    one pair of tensors on the CPU."""
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = _unpack(tuple(data), what)
        return Split(x.detach().cpu(), y.detach().cpu(), None)
    if not isinstance(data, Iterable):
        raise GrowInputError(
            what, f"expected a DataLoader or an (inputs, targets) pair of tensors, not {type(data).__name__}"
        )
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    for index, batch in enumerate(data):
        x, y = _unpack(batch, f"{what}, batch {index}")
        if xs and (x.shape[1:] != xs[0].shape[1:] or y.shape[1:] != ys[0].shape[1:]):
            raise GrowInputError(
                f"{what}, batch {index}",
                f"samples of shape {tuple(x.shape[1:])} with targets {tuple(y.shape[1:])}, but batch 0 "
                f"had {tuple(xs[0].shape[1:])} with {tuple(ys[0].shape[1:])}",
            )
        xs.append(x.detach().cpu())
        ys.append(y.detach().cpu())
    if not xs:
        raise GrowInputError(what, "it yields no batch")
    batch_size = getattr(data, "batch_size", None)
    return Split(torch.cat(xs), torch.cat(ys), batch_size if isinstance(batch_size, int) else None)


def check_split(model: nn.Module, loss_fn: Loss, split: Split, what: str, batch: int) -> bool:
    """Run one batch of `split` through `model` and `loss_fn` as training will; True for a classification.

    Raises `GrowInputError` saying what failed (the model on the inputs, or the loss on the output)."""
    x, y = split.x[:batch], split.y[:batch]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = model(x)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise GrowInputError(
                    what, f"the model cannot run on its inputs of shape {tuple(x.shape)}: {exc}"
                ) from exc
            if not isinstance(output, Tensor):
                raise GrowInputError(what, f"the model returns {type(output).__name__}, not a tensor")
            try:
                loss = loss_fn(output, y)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise GrowInputError(
                    what,
                    f"the loss cannot be computed on the model's output {tuple(output.shape)} and the "
                    f"targets {tuple(y.shape)}: {exc}",
                ) from exc
    finally:
        model.train(was_training)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise GrowInputError(what, "the loss must return one scalar tensor (the batch's mean loss)")
    if not math.isfinite(float(loss)):
        raise GrowInputError(what, f"the loss of the first batch is {float(loss)}")
    return classifies(output, y)


def to_dataset(name: str, train: Split, val: Split, *, classification: bool) -> Dataset:
    """The trainer's dataset of the two splits (their sample and target shapes must agree)."""
    if train.x.shape[1:] != val.x.shape[1:] or train.y.shape[1:] != val.y.shape[1:]:
        raise GrowInputError(
            "val_data",
            f"samples {tuple(val.x.shape[1:])} with targets {tuple(val.y.shape[1:])} do not match "
            f"train_data's {tuple(train.x.shape[1:])} with {tuple(train.y.shape[1:])}",
        )
    num_classes = int(max(train.y.max(), val.y.max())) + 1 if classification else 0
    return Dataset(
        name=name,
        x_train=train.x,
        y_train=train.y,
        x_val=val.x,
        y_val=val.y,
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in train.x.shape[1:]),
    )


def default_loss() -> Callable[[Tensor, Tensor], Tensor]:
    """Cross-entropy, the loss when none is given."""
    return nn.CrossEntropyLoss()
