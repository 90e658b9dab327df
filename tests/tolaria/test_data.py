"""Tolaria's datasets: digits, user .npz files (with every kind of bad file), generated tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from esper.leyline import EsperError
from esper.tolaria.data import (
    Dataset,
    DatasetError,
    load_digits,
    load_npz,
    make_signals,
    make_task,
    make_tokens,
)

torch.set_num_threads(1)


def _check_tensors(data: Dataset) -> None:
    assert data.x_train.dtype == torch.float32 and data.x_val.dtype == torch.float32
    assert data.y_train.dtype == torch.int64 and data.y_val.dtype == torch.int64
    assert data.x_train.shape[1:] == data.input_shape == data.x_val.shape[1:]
    assert len(data.x_train) == len(data.y_train) and len(data.x_val) == len(data.y_val)
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_val).all()
    assert int(data.y_train.max()) < data.num_classes and int(data.y_val.max()) < data.num_classes


# --- digits ----------------------------------------------------------------------------------------


def test_digits_flat_is_split_stratified_and_standardised() -> None:
    data = load_digits(seed=0)
    _check_tensors(data)
    assert data.input_shape == (64,) and data.num_classes == 10
    assert len(data.x_train) + len(data.x_val) == 1797
    assert len(data.x_val) == pytest.approx(0.2 * 1797, abs=10)
    train_share = torch.bincount(data.y_train, minlength=10) / len(data.y_train)
    val_share = torch.bincount(data.y_val, minlength=10) / len(data.y_val)
    assert torch.allclose(train_share, val_share, atol=0.01)
    assert data.x_train.mean(dim=0).abs().max() < 1e-4
    varying = data.x_train.std(dim=0) > 0
    assert torch.allclose(
        data.x_train.std(dim=0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-3
    )


def test_digits_image_gives_one_channel_8x8() -> None:
    flat, image = load_digits(seed=3), load_digits(seed=3, image=True)
    _check_tensors(image)
    assert image.input_shape == (1, 8, 8) and image.x_train.shape[1:] == (1, 8, 8)
    assert torch.equal(image.x_train.reshape(len(image.x_train), 64), flat.x_train)


def test_digits_is_deterministic_by_seed() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.y_train, c.y_train)


# --- npz -------------------------------------------------------------------------------------------


def _save(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "task.npz"
    np.savez(path, **arrays)
    return path


def _good(n: int = 60, features: int = 5, classes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.normal(size=(n, features)), "y_train": np.arange(n) % classes}


def test_npz_without_validation_gets_a_deterministic_stratified_split(tmp_path: Path) -> None:
    path = _save(tmp_path, **_good())
    data = load_npz(path, seed=0)
    _check_tensors(data)
    assert data.input_shape == (5,) and data.num_classes == 3 and data.name == "task.npz"
    assert len(data.x_train) == 48 and len(data.x_val) == 12
    assert torch.bincount(data.y_val).tolist() == [4, 4, 4]
    again = load_npz(path, seed=0)
    assert torch.equal(data.x_val, again.x_val)


def test_npz_with_validation_keeps_it(tmp_path: Path) -> None:
    arrays = _good()
    path = _save(tmp_path, **arrays, x_val=arrays["x_train"][:7], y_val=arrays["y_train"][:7])
    data = load_npz(path, seed=0)
    assert len(data.x_train) == 60 and len(data.x_val) == 7
    assert data.y_val.tolist() == arrays["y_train"][:7].tolist()


def test_npz_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    four_d = load_npz(_save(tmp_path, x_train=rng.normal(size=(40, 3, 4, 4)), y_train=labels), 0, image=True)
    assert four_d.input_shape == (3, 4, 4)
    three_d = load_npz(_save(tmp_path, x_train=rng.normal(size=(40, 4, 4)), y_train=labels), 0, image=True)
    assert three_d.input_shape == (1, 4, 4)
    square = load_npz(_save(tmp_path, x_train=rng.normal(size=(40, 16)), y_train=labels), 0, image=True)
    assert square.input_shape == (1, 4, 4)
    flattened = load_npz(_save(tmp_path, x_train=rng.normal(size=(40, 3, 4, 4)), y_train=labels), 0)
    assert flattened.input_shape == (48,)


def test_integral_float_labels_and_int_features_are_accepted(tmp_path: Path) -> None:
    path = _save(
        tmp_path, x_train=np.arange(40).reshape(20, 2), y_train=(np.arange(20) % 2).astype(np.float32)
    )
    data = load_npz(path, seed=0)
    assert data.y_train.dtype == torch.int64 and data.num_classes == 2


def _bad_cases() -> list[tuple[str, dict[str, Any], str]]:
    good = _good()
    x, y = good["x_train"], good["y_train"]
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    inf_x = x.copy()
    inf_x[0, 0] = np.inf
    return [
        ("missing x_train", {"y_train": y}, r"missing key\(s\) \['x_train'\]"),
        ("missing y_train", {"x_train": x}, r"missing key\(s\) \['y_train'\]"),
        ("x_val without y_val", {**good, "x_val": x}, "x_val and y_val must be given together"),
        ("x 1-d", {"x_train": x[:, 0], "y_train": y}, "at least 2 dimensions"),
        ("y 2-d", {"x_train": x, "y_train": y.reshape(-1, 1)}, "1-dimensional"),
        ("NaN", {"x_train": nan_x, "y_train": y}, "1 NaN or infinite"),
        ("inf", {"x_train": inf_x, "y_train": y}, "NaN or infinite"),
        ("length mismatch", {"x_train": x, "y_train": y[:-1]}, "60 samples but y_train has 59"),
        ("non-integer labels", {"x_train": x, "y_train": y + 0.5}, "non-integer labels"),
        ("string labels", {"x_train": x, "y_train": np.array(["a"] * 60)}, "labels must be integers"),
        ("negative labels", {"x_train": x, "y_train": y - 1}, "negative labels"),
        ("huge label", {"x_train": x, "y_train": y * 10_000}, "must be below"),
        ("empty x", {"x_train": np.zeros((0, 5)), "y_train": np.zeros(0, dtype=int)}, "is empty"),
        ("no features", {"x_train": np.zeros((60, 0)), "y_train": y}, "is empty"),
        ("string features", {"x_train": np.array([["a"]] * 60), "y_train": y}, "features must be numeric"),
        ("complex features", {"x_train": x.astype(complex), "y_train": y}, "features must be numeric"),
        ("val label unseen", {**good, "x_val": x[:3], "y_val": np.array([0, 1, 7])}, r"label\(s\) \[7\]"),
        ("val shape", {**good, "x_val": x[:3, :4], "y_val": y[:3]}, "x_val samples have shape"),
        ("val length", {**good, "x_val": x[:3], "y_val": y[:2]}, "x_val has 3 samples but y_val has 2"),
        ("one per class", {"x_train": x[:3], "y_train": y[:3]}, "too few samples per class"),
    ]


@pytest.mark.parametrize(("arrays", "match"), [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_bad_npz_files_are_dataset_errors_naming_the_problem(
    tmp_path: Path, arrays: dict[str, Any], match: str
) -> None:
    path = _save(tmp_path, **arrays)
    with pytest.raises(DatasetError, match=match) as info:
        load_npz(path, seed=0)
    assert info.value.source == str(path)


def test_non_square_features_cannot_be_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="square feature count"):
        load_npz(_save(tmp_path, **_good(features=5)), seed=0, image=True)


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = _save(tmp_path, x_train=np.array([{"a": 1}] * 10, dtype=object), y_train=np.zeros(10, dtype=int))
    with pytest.raises(DatasetError, match="x_train cannot be read"):
        load_npz(path, seed=0)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "file not found"),
        (b"not a zip at all", "not a readable .npz"),
        (b"PK\x03\x04broken", "not a readable"),
    ],
)
def test_unreadable_files_are_dataset_errors(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "data.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        load_npz(path, seed=0)


def huge_npz(path: Path, shape: tuple[int, ...] = (5_000_000_000,)) -> Path:
    """An .npz whose x_train header claims `shape` of float64 (40 GB by default) with no data behind it."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    small = io.BytesIO()
    np.lib.format.write_array(small, np.zeros(3, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", header.getvalue())  # magic and header, no data
        archive.writestr("y_train.npy", small.getvalue())
    return path


def test_an_array_whose_header_claims_too_much_memory_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"x_train declares shape \(5000000000,\).*37\.3 GiB") as info:
        load_npz(huge_npz(tmp_path / "huge.npz"), seed=0)
    assert "limited to 2 GiB" in str(info.value)


def test_a_single_npy_array_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((4, 2)))
    with pytest.raises(DatasetError, match="single array"):
        load_npz(path, seed=0)


numeric_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
)
any_arrays = hnp.arrays(
    dtype=st.one_of(numeric_dtypes, hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3)),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    arrays=st.dictionaries(
        st.sampled_from(["x_train", "y_train", "x_val", "y_val", "extra"]), any_arrays, max_size=5
    ),
    image=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_npz_gives_a_dataset_or_a_dataset_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], image: bool, seed: int
) -> None:
    path = tmp_path / "fuzz.npz"
    np.savez(path, **arrays)
    try:
        data = load_npz(path, seed=seed, image=image)
    except DatasetError as exc:
        assert isinstance(exc, EsperError) and exc.problem
        return
    _check_tensors(data)


# --- generated tasks -------------------------------------------------------------------------------


def test_make_task_is_deterministic_and_shaped() -> None:
    a, b = make_task(0.5, seed=4), make_task(0.5, seed=4)
    _check_tensors(a)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert a.input_shape == (32,) and a.num_classes == 10
    assert len(a.x_train) + len(a.x_val) == 3000
    assert not torch.equal(a.x_train, make_task(0.5, seed=5).x_train)
    small = make_task(0.2, seed=0, n_features=8, n_classes=3, n_samples=300)
    assert small.input_shape == (8,) and small.num_classes == 3


@pytest.mark.parametrize(
    "bad", [{"difficulty": -0.1}, {"difficulty": 1.5}, {"n_classes": 1}, {"n_samples": 10}]
)
def test_make_task_rejects_bad_arguments(bad: dict[str, float]) -> None:
    arguments: dict[str, Any] = {"difficulty": 0.5, "seed": 0} | bad
    with pytest.raises(DatasetError):
        make_task(**arguments)


def _accuracy_of_mlp(data: Dataset, hidden: int) -> float:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(data.input_size, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, data.num_classes)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(data.x_val).argmax(dim=1) == data.y_val).float().mean())


@pytest.mark.slow
def test_a_wider_host_does_measurably_better_than_a_narrow_one() -> None:
    data = make_task(0.5, seed=0)
    narrow, wide = _accuracy_of_mlp(data, 8), _accuracy_of_mlp(data, 64)
    assert wide - narrow > 0.08, (narrow, wide)


@pytest.mark.slow
def test_difficulty_makes_the_task_harder() -> None:
    easy, hard = make_task(0.0, seed=0), make_task(1.0, seed=0)
    assert _accuracy_of_mlp(easy, 16) > _accuracy_of_mlp(hard, 16) + 0.1


# --- 1-D signals and token sequences ---------------------------------------------------------------


def _nearest_template_accuracy(data: Dataset) -> float:
    """Accuracy of the nearest class mean of the training signals (no shift invariance at all)."""
    flat_train, flat_val = data.x_train.flatten(1), data.x_val.flatten(1)
    means = torch.stack([flat_train[data.y_train == c].mean(dim=0) for c in range(data.num_classes)])
    predicted = torch.cdist(flat_val, means).argmin(dim=1)
    return float((predicted == data.y_val).float().mean())


def test_signals_are_deterministic_by_seed_and_shaped_for_a_1d_host() -> None:
    a, b = make_signals(0.5, seed=3, n_samples=300), make_signals(0.5, seed=3, n_samples=300)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, make_signals(0.5, seed=4, n_samples=300).x_train)
    _check_tensors(a)
    assert a.input_shape == (1, 64) and a.num_classes == 6 and a.vocab_size == 0
    assert make_signals(0.0, 0, length=32, n_classes=3, n_samples=60).input_shape == (1, 32)


def test_signal_difficulty_changes_separability() -> None:
    easy, hard = make_signals(0.0, seed=0), make_signals(1.0, seed=0)
    assert _nearest_template_accuracy(easy) > _nearest_template_accuracy(hard) + 0.2


def _bag_of_tokens_accuracy(data: Dataset) -> float:
    """A logistic regression on token counts: it sees how often each token occurs, never where."""
    from sklearn.linear_model import LogisticRegression

    def counts(x: torch.Tensor) -> np.ndarray:
        return np.stack([np.bincount(row, minlength=data.vocab_size) for row in x.numpy()])

    model = LogisticRegression(max_iter=2000).fit(counts(data.x_train), data.y_train.numpy())
    return float(model.score(counts(data.x_val), data.y_val.numpy()))


def test_tokens_are_deterministic_by_seed_and_integer_ids_in_the_vocabulary() -> None:
    a, b = make_tokens(0.5, seed=2, n_samples=300), make_tokens(0.5, seed=2, n_samples=300)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, make_tokens(0.5, seed=3, n_samples=300).x_train)
    assert a.x_train.dtype == torch.int64 and a.input_shape == (16,) and a.x_train.shape[1:] == (16,)
    assert a.vocab_size == 12 and a.num_classes == 4
    assert int(a.x_train.min()) >= 0 and int(a.x_train.max()) < a.vocab_size
    assert set(a.y_train.tolist()) == {0, 1, 2, 3}


def test_token_labels_follow_the_rule() -> None:
    data = make_tokens(1.0, seed=0, n_samples=200)
    for row, label in zip(data.x_train, data.y_train, strict=True):
        counts = torch.bincount(row[row < 4], minlength=4)
        tied = torch.nonzero(counts == counts.max()).flatten().tolist()
        first = {m: int(torch.nonzero(row == m)[0]) for m in tied}
        assert int(label) == min(first, key=first.__getitem__)


def test_token_difficulty_changes_separability() -> None:
    easy, hard = make_tokens(0.0, seed=0), make_tokens(1.0, seed=0)
    assert _bag_of_tokens_accuracy(easy) > _bag_of_tokens_accuracy(hard) + 0.1


@pytest.mark.parametrize(
    "arguments",
    [
        {"difficulty": 1.5, "seed": 0},
        {"difficulty": 0.5, "seed": 0, "n_classes": 1},
        {"difficulty": 0.5, "seed": 0, "n_samples": 3},
    ],
)
def test_generated_sequence_tasks_refuse_bad_arguments(arguments: dict[str, Any]) -> None:
    with pytest.raises(DatasetError):
        make_signals(**arguments)
    with pytest.raises(DatasetError):
        make_tokens(**arguments)


def test_npz_sequences_take_one_or_several_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    one = load_npz(_save(tmp_path, x_train=rng.normal(size=(40, 30)), y_train=labels), 0, layout="sequence")
    _check_tensors(one)
    assert one.input_shape == (1, 30)
    several = load_npz(
        _save(tmp_path, x_train=rng.normal(size=(40, 3, 30)), y_train=labels), 0, layout="sequence"
    )
    assert several.input_shape == (3, 30)
    with pytest.raises(DatasetError, match=r"needs samples \[L\] or \[C, L\]"):
        load_npz(
            _save(tmp_path, x_train=rng.normal(size=(40, 2, 3, 4)), y_train=labels), 0, layout="sequence"
        )


def test_npz_tokens_stay_integer_ids_with_their_vocabulary(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 7, size=(40, 10))
    labels = np.arange(40) % 2
    inferred = load_npz(_save(tmp_path, x_train=x, y_train=labels), 0, layout="tokens")
    assert inferred.x_train.dtype == torch.int64 and inferred.vocab_size == int(x.max()) + 1
    assert inferred.input_shape == (10,)
    declared = load_npz(
        _save(tmp_path, x_train=x, y_train=labels, vocab_size=np.array(20)), 0, layout="tokens"
    )
    assert declared.vocab_size == 20
    assert sorted(torch.cat([declared.x_train, declared.x_val]).flatten().tolist()) == sorted(
        x.flatten().tolist()
    )


@pytest.mark.parametrize(
    ("x", "more", "match"),
    [
        (np.zeros((40, 10)), {}, "tokens must be an integer array"),
        (np.full((40, 10), -1), {}, "negative token id -1"),
        (np.full((40, 10), 9), {"vocab_size": np.array(5)}, r"token id 9, outside the vocabulary \[0, 5\)"),
        (np.full((40, 10), 70_000), {}, "token ids are limited to 65536"),
        (np.zeros((40, 2, 5), dtype=np.int64), {}, r"token ids \[N, L\]"),
        (
            np.zeros((40, 10), dtype=np.int64),
            {"vocab_size": np.array([3, 4])},
            "vocab_size must be one integer",
        ),
        (np.zeros((40, 10), dtype=np.int64), {"vocab_size": np.array(0)}, "vocab_size must be in"),
    ],
)
def test_npz_tokens_refuse_what_is_not_token_ids(
    tmp_path: Path, x: np.ndarray, more: dict[str, Any], match: str
) -> None:
    path = _save(tmp_path, x_train=x, y_train=np.arange(40) % 2, **more)
    with pytest.raises(DatasetError, match=match):
        load_npz(path, 0, layout="tokens")


def test_npz_layout_and_image_flag_must_agree(tmp_path: Path) -> None:
    path = _save(tmp_path, **_good())
    with pytest.raises(DatasetError, match="contradicts"):
        load_npz(path, 0, image=True, layout="sequence")
