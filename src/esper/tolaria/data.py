# Over 500 lines: every bundled task and the user's .npz loader, which share one Dataset and its checks.
"""Tolaria's datasets: sklearn's digits, a user's `.npz` arrays, and generated tasks of tunable difficulty.

Every loader returns a `Dataset` of torch tensors (float32 features, int64 labels), split and standardised
deterministically from a seed. Features are standardised with statistics of the training split only.
Token sequences (for the Transformer host) are the exception: int64 token ids, never standardised, with
the dataset's `vocab_size`. Anything wrong with a user's file is a `DatasetError` that names the problem.

A sample's layout says how its features are shaped for a host: `flat` `(F,)` (MLP), `image` `(C, H, W)`
(2-D CNN), `sequence` `(C, L)` (1-D CNN) and `tokens` `(L,)` of integer ids (Transformer).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from esper.leyline import EsperError

VAL_FRACTION = 0.2
MAX_CLASSES = 4096
MAX_VOCAB = 65_536
"""Largest vocabulary of a token task (token ids below it)."""
MAX_ARRAY_BYTES = 2**31
"""Largest array of a user's file, as the float64 values it becomes: its header is checked before reading,
so a file that claims a huge shape is refused instead of exhausting memory."""


Layout = Literal["flat", "image", "sequence", "tokens"]
LAYOUTS: tuple[Layout, ...] = ("flat", "image", "sequence", "tokens")


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
    vocab_size: int = 0
    """Token ids lie in [0, vocab_size) for a token task; 0 for real-valued features."""

    def to(self, device: torch.device) -> Dataset:
        """The same dataset with its four tensors on `device` (itself when they are there already)."""
        if self.x_train.device == device:
            return self
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_val=self.x_val.to(device),
            y_val=self.y_val.to(device),
        )

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


def _sample_shape(shape: tuple[int, ...], layout: Layout, source: str) -> tuple[int, ...]:
    """The per-sample input shape: flat `(F,)`, `(C, H, W)` for an image host, `(C, L)` for a sequence."""
    if layout == "sequence":
        if len(shape) == 1:
            return (1, *shape)
        if len(shape) == 2:
            return shape
        raise DatasetError(source, f"a 1-D host needs samples [L] or [C, L], got samples of shape {shape}")
    if layout != "image":
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
    layout: Layout,
) -> Dataset:
    sample_shape = _sample_shape(tuple(int(d) for d in x_train.shape[1:]), layout, name)
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
    return _to_dataset("digits", x[train], y[train], x[val], y[val], layout="image" if image else "flat")


def _token_dataset(
    name: str,
    *,
    x_train: NDArray[np.int64],
    y_train: NDArray[np.int64],
    x_val: NDArray[np.int64],
    y_val: NDArray[np.int64],
    vocab_size: int,
) -> Dataset:
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.int64)),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_val=torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.int64)),
        y_val=torch.from_numpy(y_val.astype(np.int64)),
        num_classes=int(max(y_train.max(), y_val.max())) + 1,
        input_shape=(int(x_train.shape[1]),),
        vocab_size=vocab_size,
    )


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


def _tokens(array: NDArray[Any], key: str, source: str, vocab_size: int | None) -> NDArray[np.int64]:
    """Token ids `[N, L]`: integers in [0, vocab_size) (vocab_size defaults to MAX_VOCAB as a bound)."""
    if array.dtype.kind not in "iu":
        raise DatasetError(
            source, f"{key} has dtype {array.dtype}; tokens must be an integer array of token ids"
        )
    if array.ndim != 2:
        raise DatasetError(source, f"{key} must be token ids [N, L], got shape {array.shape}")
    if array.size == 0:
        raise DatasetError(source, f"{key} is empty (shape {array.shape})")
    low, high = int(array.min()), int(array.max())
    limit = MAX_VOCAB if vocab_size is None else vocab_size
    if low < 0:
        raise DatasetError(source, f"{key} has negative token id {low}")
    if high >= limit:
        raise DatasetError(
            source,
            f"{key} has token id {high}, outside the vocabulary [0, {limit})"
            + ("" if vocab_size is not None else f" (token ids are limited to {MAX_VOCAB})"),
        )
    return array.astype(np.int64)


def _vocab_size(array: NDArray[Any], source: str) -> int:
    if array.ndim != 0 or array.dtype.kind not in "iu":
        raise DatasetError(
            source, f"vocab_size must be one integer, got dtype {array.dtype} and shape {array.shape}"
        )
    value = int(array)
    if not 1 <= value <= MAX_VOCAB:
        raise DatasetError(source, f"vocab_size must be in [1, {MAX_VOCAB}], got {value}")
    return value


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


def _declared_header(archive: np.lib.npyio.NpzFile, key: str, source: str) -> tuple[tuple[int, ...], Any]:
    """The shape and dtype `key`'s .npy header declares, read without reading the data."""
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
    return tuple(int(d) for d in shape), dtype


def _check_declared_size(archive: np.lib.npyio.NpzFile, key: str, source: str) -> None:
    """Refuse `key` if the shape its .npy header declares exceeds MAX_ARRAY_BYTES (read before the data)."""
    shape, dtype = _declared_header(archive, key, source)
    values = math.prod(shape)
    size = values * max(dtype.itemsize, np.dtype(np.float64).itemsize)
    if size > MAX_ARRAY_BYTES:
        raise DatasetError(
            source,
            f"{key} declares shape {shape} ({values:,} values, {size / 2**30:.1f} GiB as float64); "
            f"arrays are limited to {MAX_ARRAY_BYTES / 2**30:.0f} GiB",
        )


def _open_npz(path: Path | str, source: str) -> np.lib.npyio.NpzFile:
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DatasetError(source, "file not found") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(source, f"not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(source, "holds a single array (.npy), not an .npz archive of named arrays")
    return archive


@dataclass(frozen=True)
class NpzShape:
    """What an .npz declares about its features, read from the headers only: shape of one sample,
    whether the features are integers, and whether it declares a `vocab_size` (a token task)."""

    sample_shape: tuple[int, ...]
    integer: bool
    declares_vocab: bool


def inspect_npz(path: Path | str) -> NpzShape:
    """The `NpzShape` of a user's file, without reading its arrays (to choose a host for it)."""
    source = str(path)
    with _open_npz(path, source) as archive:
        if "x_train" not in archive.files:
            raise DatasetError(source, f"missing key(s) ['x_train']; found {sorted(archive.files)}")
        shape, dtype = _declared_header(archive, "x_train", source)
        declares_vocab = "vocab_size" in archive.files
    if len(shape) < 2:
        raise DatasetError(source, f"x_train must have at least 2 dimensions [N, features...], got {shape}")
    return NpzShape(shape[1:], np.dtype(dtype).kind in "iu", declares_vocab)


def load_npz(path: Path | str, seed: int, image: bool = False, *, layout: Layout | None = None) -> Dataset:  # noqa: C901, PLR0912 (each way a user's .npz can be malformed, refused with its own message)
    """A user's `.npz`: `x_train`, `y_train`, and optionally both `x_val` and `y_val`.

    Without a validation split, a stratified 20% of the training arrays is held out from `seed`.
    Features may be `[N, F]`, `[N, H, W]` or `[N, C, H, W]`; `image=True` (or `layout="image"`) keeps (or
    makes) them images. `layout="sequence"` takes `[N, L]` or `[N, C, L]` for a 1-D host. `layout="tokens"`
    takes integer token ids `[N, L]`, kept as they are, with an optional integer `vocab_size` entry (else
    the largest id + 1).
    """
    source = str(path)
    chosen: Layout = layout if layout is not None else ("image" if image else "flat")
    if chosen not in LAYOUTS:
        raise DatasetError(source, f"unknown layout {chosen!r}; choose one of {list(LAYOUTS)}")
    if image and chosen != "image":
        raise DatasetError(source, f"image=True contradicts layout={chosen!r}")
    with _open_npz(path, source) as archive:
        keys = set(archive.files)
        missing = sorted({"x_train", "y_train"} - keys)
        if missing:
            raise DatasetError(source, f"missing key(s) {missing}; found {sorted(keys)}")
        if ("x_val" in keys) != ("y_val" in keys):
            raise DatasetError(source, "x_val and y_val must be given together or not at all")
        names = ["x_train", "y_train"] + (["x_val", "y_val"] if "x_val" in keys else [])
        if chosen == "tokens" and "vocab_size" in keys:
            names.append("vocab_size")
        raw: dict[str, NDArray[Any]] = {}
        for key in names:
            _check_declared_size(archive, key, source)
            try:
                raw[key] = np.asarray(archive[key])
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DatasetError(source, f"{key} cannot be read ({type(exc).__name__}: {exc})") from exc
    vocab = _vocab_size(raw["vocab_size"], source) if "vocab_size" in raw else None

    def features(key: str) -> NDArray[Any]:
        if chosen == "tokens":
            return _tokens(raw[key], key, source, vocab)
        return _features(raw[key], key, source)

    x_train = features("x_train")
    y_train = _labels(raw["y_train"], "y_train", source)
    if len(x_train) != len(y_train):
        raise DatasetError(
            source, f"x_train has {len(x_train)} samples but y_train has {len(y_train)} labels"
        )
    if "x_val" in raw:
        x_val = features("x_val")
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
    if chosen == "tokens":
        if vocab is None:
            vocab = int(max(x_train.max(), x_val.max())) + 1
        return _token_dataset(
            Path(path).name, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, vocab_size=vocab
        )
    return _to_dataset(Path(path).name, x_train, y_train, x_val, y_val, layout=chosen)


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
        f"task-d{difficulty:g}", features[train], labels[train], features[val], labels[val], layout="flat"
    )


def _check_generated(source: str, difficulty: float, n_classes: int, n_samples: int, length: int) -> None:
    if not 0.0 <= difficulty <= 1.0:
        raise DatasetError(source, f"difficulty must be in [0, 1], got {difficulty}")
    if n_classes < 2 or length < 4 or n_samples < 5 * n_classes:
        raise DatasetError(
            source,
            f"needs n_classes >= 2, length >= 4 and n_samples >= 5 * n_classes "
            f"(got {n_classes}, {length}, {n_samples})",
        )


def make_signals(
    difficulty: float,
    seed: int,
    *,
    length: int = 64,
    n_classes: int = 6,
    n_samples: int = 2400,
) -> Dataset:
    """A generated family of 1-D signals `[N, 1, length]` (for the 1-D CNN host; flattened for an MLP).

    Each class has a template: a few bumps of random position, width and sign on a smooth background
    shared by every class. A sample is its class's template circularly shifted by a random offset,
    scaled by a random gain, plus white noise. `difficulty` in [0, 1] widens the shifts, the gains and
    the noise, and draws the templates closer to the shared background: a position-invariant detector
    (a convolution) copes with the shifts, a flat model must learn every offset.
    """
    source = f"signals(difficulty={difficulty}, seed={seed})"
    _check_generated(source, difficulty, n_classes, n_samples, length)
    rng = np.random.default_rng(seed)
    positions = np.arange(length)
    background = np.sin(2 * np.pi * positions / length * rng.uniform(1.0, 3.0) + rng.uniform(0, 2 * np.pi))
    templates = np.empty((n_classes, length))
    for label in range(n_classes):
        bumps = np.zeros(length)
        for _ in range(3):
            centre = rng.uniform(0, length)
            width = rng.uniform(1.0, 3.0)
            distance = np.minimum(np.abs(positions - centre), length - np.abs(positions - centre))
            bumps += rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.0) * np.exp(-0.5 * (distance / width) ** 2)
        templates[label] = 0.5 * background + (1.0 - 0.5 * difficulty) * bumps
    labels = (np.arange(n_samples) % n_classes).astype(np.int64)
    rng.shuffle(labels)
    max_shift = round((0.05 + 0.25 * difficulty) * length)
    shifts = rng.integers(-max_shift, max_shift + 1, size=n_samples)
    gains = rng.uniform(1.0 - 0.4 * difficulty, 1.0 + 0.4 * difficulty, size=n_samples)
    noise = 0.1 + 0.7 * difficulty
    signals = np.stack(
        [np.roll(templates[label], int(shift)) for label, shift in zip(labels, shifts, strict=True)]
    )
    signals = signals * gains[:, None] + rng.normal(0.0, noise, size=signals.shape)
    signals = signals[:, None, :]
    train, val = _stratified_split(labels, seed, VAL_FRACTION, source)
    return _to_dataset(
        f"signals-d{difficulty:g}",
        signals[train],
        labels[train],
        signals[val],
        labels[val],
        layout="sequence",
    )


def _token_label(sequence: NDArray[np.int64], n_classes: int) -> int:
    """The class of a token sequence: the marker (ids below n_classes) that occurs most often, ties going
    to the tied marker that occurs first."""
    counts = np.bincount(sequence[sequence < n_classes], minlength=n_classes)
    tied = np.flatnonzero(counts == counts.max())
    if len(tied) == 1:
        return int(tied[0])
    first = {int(marker): int(np.flatnonzero(sequence == marker)[0]) for marker in tied}
    return min(first, key=lambda marker: first[marker])


def make_tokens(
    difficulty: float,
    seed: int,
    *,
    length: int = 16,
    n_classes: int = 4,
    vocab_size: int = 12,
    n_samples: int = 2400,
) -> Dataset:
    """A generated token-sequence task `[N, length]` of ids in [0, vocab_size) (for the Transformer host).

    Ids below `n_classes` are markers, the others filler. The class is the marker that occurs most often;
    when markers tie, the one that occurs first wins. Every sample is drawn for a target class: its marker
    gets one or two occurrences more than the others, or (with probability 0.8 x `difficulty`) exactly as
    many as the most frequent other marker, and then the class hangs on which comes first. Counting tokens
    solves the easy task; the hard one needs positions, which a bag of tokens does not see.
    """
    source = f"tokens(difficulty={difficulty}, seed={seed})"
    _check_generated(source, difficulty, n_classes, n_samples, length)
    if vocab_size <= n_classes or vocab_size > MAX_VOCAB or length < 4 * n_classes:
        raise DatasetError(
            source,
            f"needs n_classes < vocab_size <= {MAX_VOCAB} and length >= 4 * n_classes "
            f"(got vocab_size {vocab_size}, n_classes {n_classes}, length {length})",
        )
    rng = np.random.default_rng(seed)
    sequences = np.empty((n_samples, length), dtype=np.int64)
    labels = np.empty(n_samples, dtype=np.int64)
    for index in range(n_samples):
        target = int(rng.integers(n_classes))
        counts = rng.integers(0, 3, size=n_classes)
        others = max(int(counts[m]) for m in range(n_classes) if m != target)
        tie = rng.random() < 0.8 * difficulty and others > 0
        counts[target] = others if tie else others + int(rng.integers(1, 3))
        markers = np.repeat(np.arange(n_classes), counts)
        sequence = rng.integers(n_classes, vocab_size, size=length)
        places = rng.choice(length, size=len(markers), replace=False)
        sequence[places] = rng.permutation(markers)
        sequences[index] = sequence
        labels[index] = _token_label(sequence, n_classes)
    train, val = _stratified_split(labels, seed, VAL_FRACTION, source)
    return _token_dataset(
        f"tokens-d{difficulty:g}",
        x_train=sequences[train],
        y_train=labels[train],
        x_val=sequences[val],
        y_val=labels[val],
        vocab_size=vocab_size,
    )
