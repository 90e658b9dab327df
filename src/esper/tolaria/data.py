"""Tolaria's datasets: sklearn's digits, a user's `.npz` arrays, and generated tasks of tunable difficulty.

Every loader returns a `Dataset` of torch tensors (float32 features, int64 labels), split and standardised
deterministically from a seed. Features are standardised with statistics of the training split only.
Anything wrong with a user's file is a `DatasetError` that names the problem.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from esper.leyline import EsperError

VAL_FRACTION = 0.2
MAX_CLASSES = 4096
MAX_ARRAY_BYTES = 2**31
"""Largest array of a user's file, as the float64 values it becomes: its header is checked before reading,
so a file that claims a huge shape is refused instead of exhausting memory."""


class DatasetError(EsperError):
    """A dataset cannot be used; `source` names the file or task, `problem` what is wrong."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"dataset {source}: {problem}")


@dataclass(frozen=True)
class Dataset:
    """A classification task split into training and validation tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def input_size(self) -> int:
        """Number of scalar features of one sample (the product of `input_shape`)."""
        return math.prod(self.input_shape)


def _stratified_split(
    labels: NDArray[np.int64], seed: int, fraction: float, source: str
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Train and validation indices: `fraction` of every class held out, at least one kept for training."""
    rng = np.random.default_rng(seed)
    train_parts: list[NDArray[np.int64]] = []
    val_parts: list[NDArray[np.int64]] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held_out = min(len(members) - 1, round(len(members) * fraction))
        val_parts.append(members[:held_out])
        train_parts.append(members[held_out:])
    train = np.sort(np.concatenate(train_parts))
    val = np.sort(np.concatenate(val_parts))
    if len(val) == 0:
        raise DatasetError(
            source,
            f"too few samples per class ({len(labels)} in all) to hold out a validation split; "
            "provide x_val and y_val",
        )
    return train.astype(np.int64), val.astype(np.int64)


def _standardise(
    x_train: NDArray[np.float64], x_val: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    # A constant feature (std 0) is centred but not scaled.
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_val - mean) / std


def _image_shape(shape: tuple[int, ...], image: bool, source: str) -> tuple[int, ...]:
    """The per-sample input shape: flat `(F,)`, or `(C, H, W)` for an image host."""
    if not image:
        return (math.prod(shape),)
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return (1, *shape)
    side = math.isqrt(shape[0])
    if side * side != shape[0]:
        raise DatasetError(
            source, f"image=True needs [N,C,H,W], [N,H,W] or a square feature count, got {shape[0]} features"
        )
    return (1, side, side)


def _to_dataset(
    name: str,
    x_train: NDArray[np.float64],
    y_train: NDArray[np.int64],
    x_val: NDArray[np.float64],
    y_val: NDArray[np.int64],
    *,
    image: bool,
) -> Dataset:
    sample_shape = _image_shape(tuple(int(d) for d in x_train.shape[1:]), image, name)
    flat_train = x_train.reshape(len(x_train), -1)
    flat_val = x_val.reshape(len(x_val), -1)
    flat_train, flat_val = _standardise(flat_train, flat_val)
    if not (np.isfinite(flat_train).all() and np.isfinite(flat_val).all()):
        raise DatasetError(name, "features overflow when standardised (values too large for float32)")
    train32 = flat_train.astype(np.float32)
    val32 = flat_val.astype(np.float32)
    if not (np.isfinite(train32).all() and np.isfinite(val32).all()):
        raise DatasetError(name, "standardised features do not fit in float32")
    return Dataset(
        name=name,
        x_train=torch.from_numpy(train32.reshape(len(train32), *sample_shape)),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_val=torch.from_numpy(val32.reshape(len(val32), *sample_shape)),
        y_val=torch.from_numpy(y_val.astype(np.int64)),
        num_classes=int(max(y_train.max(), y_val.max())) + 1,
        input_shape=sample_shape,
    )


def load_digits(seed: int, image: bool = False) -> Dataset:
    """sklearn's bundled 8x8 digits (1797 samples, 10 classes), stratified 80/20 split from `seed`.

    `image=True` gives `[N, 1, 8, 8]` for a CNN host; otherwise `[N, 64]`.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    train, val = _stratified_split(y, seed, VAL_FRACTION, "digits")
    if image:
        x = x.reshape(len(x), 8, 8)
    return _to_dataset("digits", x[train], y[train], x[val], y[val], image=image)


# --- user arrays -----------------------------------------------------------------------------------


def _features(array: NDArray[Any], key: str, source: str) -> NDArray[np.float64]:
    if array.dtype.kind not in "biuf":
        raise DatasetError(
            source, f"{key} has dtype {array.dtype}; features must be numeric (bool, int, float)"
        )
    if array.ndim < 2:
        raise DatasetError(
            source, f"{key} must have at least 2 dimensions [N, features...], got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.size == 0:
        raise DatasetError(source, f"{key} is empty (shape {array.shape})")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise DatasetError(source, f"{key} contains {bad} NaN or infinite value(s)")
    return values


def _labels(array: NDArray[Any], key: str, source: str) -> NDArray[np.int64]:
    if array.ndim != 1:
        raise DatasetError(source, f"{key} must be 1-dimensional [N], got shape {array.shape}")
    if array.size == 0:
        raise DatasetError(source, f"{key} is empty")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise DatasetError(source, f"{key} contains NaN or infinite labels")
        if not (array == np.round(array)).all():
            raise DatasetError(source, f"{key} has non-integer labels (dtype {array.dtype})")
    elif array.dtype.kind not in "biu":
        raise DatasetError(source, f"{key} has dtype {array.dtype}; labels must be integers")
    if (array < 0).any():
        raise DatasetError(source, f"{key} has negative labels (min {array.min()})")
    if array.max() >= MAX_CLASSES:
        raise DatasetError(source, f"{key} has label {array.max()}; labels must be below {MAX_CLASSES}")
    return array.astype(np.int64)


def _check_declared_size(archive: np.lib.npyio.NpzFile, key: str, source: str) -> None:
    """Refuse `key` if the shape its .npy header declares exceeds MAX_ARRAY_BYTES (read before the data)."""
    member = f"{key}.npy"
    if archive.zip is None:
        raise DatasetError(source, "the archive is closed")
    try:
        with archive.zip.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            else:  # 2.0 and 3.0 share the header layout; a numeric dtype's header is ASCII either way
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            source, f"{key} has no readable array header ({type(exc).__name__}: {exc})"
        ) from exc
    values = math.prod(shape)
    size = values * max(dtype.itemsize, np.dtype(np.float64).itemsize)
    if size > MAX_ARRAY_BYTES:
        raise DatasetError(
            source,
            f"{key} declares shape {shape} ({values:,} values, {size / 2**30:.1f} GiB as float64); "
            f"arrays are limited to {MAX_ARRAY_BYTES / 2**30:.0f} GiB",
        )


def load_npz(path: Path | str, seed: int, image: bool = False) -> Dataset:
    """A user's `.npz`: `x_train`, `y_train`, and optionally both `x_val` and `y_val`.

    Without a validation split, a stratified 20% of the training arrays is held out from `seed`.
    Features may be `[N, F]`, `[N, H, W]` or `[N, C, H, W]`; `image=True` keeps (or makes) them images.
    """
    source = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DatasetError(source, "file not found") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(source, f"not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(source, "holds a single array (.npy), not an .npz archive of named arrays")
    with archive:
        keys = set(archive.files)
        missing = sorted({"x_train", "y_train"} - keys)
        if missing:
            raise DatasetError(source, f"missing key(s) {missing}; found {sorted(keys)}")
        if ("x_val" in keys) != ("y_val" in keys):
            raise DatasetError(source, "x_val and y_val must be given together or not at all")
        names = ["x_train", "y_train"] + (["x_val", "y_val"] if "x_val" in keys else [])
        raw: dict[str, NDArray[Any]] = {}
        for key in names:
            _check_declared_size(archive, key, source)
            try:
                raw[key] = np.asarray(archive[key])
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DatasetError(source, f"{key} cannot be read ({type(exc).__name__}: {exc})") from exc
    x_train = _features(raw["x_train"], "x_train", source)
    y_train = _labels(raw["y_train"], "y_train", source)
    if len(x_train) != len(y_train):
        raise DatasetError(
            source, f"x_train has {len(x_train)} samples but y_train has {len(y_train)} labels"
        )
    if "x_val" in raw:
        x_val = _features(raw["x_val"], "x_val", source)
        y_val = _labels(raw["y_val"], "y_val", source)
        if len(x_val) != len(y_val):
            raise DatasetError(source, f"x_val has {len(x_val)} samples but y_val has {len(y_val)} labels")
        if x_val.shape[1:] != x_train.shape[1:]:
            raise DatasetError(
                source, f"x_val samples have shape {x_val.shape[1:]} but x_train samples {x_train.shape[1:]}"
            )
        unseen = sorted(set(np.unique(y_val).tolist()) - set(np.unique(y_train).tolist()))
        if unseen:
            raise DatasetError(source, f"y_val has label(s) {unseen[:10]} that never occur in y_train")
    else:
        train, val = _stratified_split(y_train, seed, VAL_FRACTION, source)
        x_train, x_val, y_train, y_val = x_train[train], x_train[val], y_train[train], y_train[val]
    return _to_dataset(Path(path).name, x_train, y_train, x_val, y_val, image=image)


# --- generated tasks -------------------------------------------------------------------------------


def make_task(
    difficulty: float,
    seed: int,
    n_features: int = 32,
    n_classes: int = 10,
    n_samples: int = 3000,
) -> Dataset:
    """A generated classification task where capacity matters.

    Each class is a union of several Gaussian clusters in a small latent space, so its decision regions
    are many disjoint pieces: a narrow host can carve only a few of them and plateaus, a wider one does
    measurably better. The latent points are embedded in `n_features` dimensions through a random
    nonlinear map. `difficulty` in [0, 1] raises the number of clusters per class and their spread.
    """
    source = f"task(difficulty={difficulty}, seed={seed})"
    if not 0.0 <= difficulty <= 1.0:
        raise DatasetError(source, f"difficulty must be in [0, 1], got {difficulty}")
    if n_classes < 2 or n_features < 2 or n_samples < 5 * n_classes:
        raise DatasetError(
            source,
            f"needs n_classes >= 2, n_features >= 2 and n_samples >= 5 * n_classes "
            f"(got {n_classes}, {n_features}, {n_samples})",
        )
    rng = np.random.default_rng(seed)
    latent_dim = 6
    clusters_per_class = 3 + round(6 * difficulty)
    spread = 0.2 + 0.4 * difficulty
    centres = rng.normal(0.0, 1.5, size=(n_classes * clusters_per_class, latent_dim))
    cluster_of = rng.integers(0, len(centres), size=n_samples)
    latent = centres[cluster_of] + rng.normal(0.0, spread, size=(n_samples, latent_dim))
    labels = (cluster_of % n_classes).astype(np.int64)
    mixing = rng.normal(0.0, 1.0 / math.sqrt(latent_dim), size=(latent_dim, n_features))
    features = np.tanh(latent @ mixing) + latent @ mixing * 0.5
    features += rng.normal(0.0, 0.05, size=features.shape)
    train, val = _stratified_split(labels, seed, VAL_FRACTION, source)
    return _to_dataset(
        f"task-d{difficulty:g}", features[train], labels[train], features[val], labels[val], image=False
    )
