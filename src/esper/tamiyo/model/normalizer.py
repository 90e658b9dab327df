"""The feature normaliser: per-feature running statistics, kept through a `NormalizerStore`."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from esper.leyline import EsperError
from esper.tamiyo.model.normalizer_state import NormalizerState, NormalizerStore
from esper.tamiyo.model.schema import FloatArray, GraphSchema, GraphSchemaError

if TYPE_CHECKING:
    pass


class NormalizerWriteError(EsperError):
    """The normaliser statistics could not be persisted; the stored copy is stale."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"normaliser statistics were not saved: {reason}")


class FeatureNormalizer:
    """Per-feature running mean/variance (Welford, batched), kept through a `NormalizerStore`.

    The statistics are a few dozen float64 numbers: they are kept and updated as NumPy arrays, where one
    operation costs a microsecond instead of a tensor operation's several (commit runs once per decision).
    """

    def __init__(self, schema: GraphSchema, store: NormalizerStore | None, flush_every: int) -> None:
        self._schema = schema
        self._store = store
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self._updates_since_flush = 0
        self._pending: list[tuple[str, FloatArray, FloatArray]] = []
        self._scaled: dict[str, tuple[FloatArray, FloatArray]] = {}
        self._count: dict[str, FloatArray] = {}
        self._mean: dict[str, FloatArray] = {}
        self._m2: dict[str, FloatArray] = {}
        for spec in schema.node_types:
            width = len(spec.continuous)
            self._count[spec.name] = np.zeros(width, dtype=np.float64)
            self._mean[spec.name] = np.zeros(width, dtype=np.float64)
            self._m2[spec.name] = np.zeros(width, dtype=np.float64)
        saved = store.load() if store is not None else None
        if saved is not None:
            self._restore(saved)

    def _restore(self, saved: dict[str, NormalizerState]) -> None:
        for name, state in saved.items():
            spec = self._schema.node(name)
            width = len(spec.continuous)
            if not len(state.count) == len(state.mean) == len(state.m2) == width:
                raise GraphSchemaError(
                    f"normaliser[{name}]", f"saved statistics have the wrong width (expected {width})"
                )
            self._count[name] = np.array(state.count, dtype=np.float64)
            self._mean[name] = np.array(state.mean, dtype=np.float64)
            self._m2[name] = np.array(state.m2, dtype=np.float64)

    @property
    def flush_due(self) -> bool:
        """True when enough updates accumulated since the last write."""
        with self._lock:
            pending = len(self._pending)
        return self._store is not None and self._updates_since_flush + pending >= self._flush_every

    def normalize(self, name: str, values: Tensor, present: Tensor, *, update: bool) -> Tensor:
        """Normalise the continuous columns of `values` (float32 [N, F]); missing entries stay 0.

        A graph is normalised with the statistics of every *earlier* graph; with `update` its own values
        are queued and folded in by `commit()` (the service calls it after the decision, off the deadline;
        the next `normalize` or `states` does it otherwise).
        """
        if values.shape[1] == 0 or values.shape[0] == 0:
            return values
        array = values.detach().cpu().numpy().astype(np.float32)
        mask = present.detach().cpu().numpy().astype(np.float32)
        return torch.from_numpy(self.normalize_array(name, array, mask, update=update))

    def normalize_array(
        self,
        name: str,
        values: FloatArray,
        present: FloatArray,
        *,
        update: bool,
        used: dict[str, NormalizerState] | None = None,
    ) -> FloatArray:
        """`normalize` on float32 NumPy arrays (the builder's path: no tensor operations). With `used`, the
        statistics this call normalised with are put there under `name` (taken with the scale, atomically).
        """
        with self._lock:
            if used is not None:
                # The arrays are replaced, never changed in place, so these are the statistics in use.
                used[name] = NormalizerState(
                    self._count[name].tolist(), self._mean[name].tolist(), self._m2[name].tolist()
                )
            if values.shape[1] == 0 or values.shape[0] == 0:
                return values
            mean, scale = self._scaled.get(name) or self._scale(name)
            if update:
                self._pending.append((name, values, present))
        out: FloatArray = np.clip((values - mean) / scale, -10.0, 10.0) * present
        return out

    def _scale(self, name: str) -> tuple[FloatArray, FloatArray]:
        count = self._count[name]
        std = np.where(count > 1, np.sqrt(self._m2[name] / np.maximum(count - 1, 1)), 1.0)
        self._scaled[name] = (
            self._mean[name].astype(np.float32),
            np.maximum(std.astype(np.float32), np.float32(1e-3)),
        )
        return self._scaled[name]

    def commit(self) -> None:
        """Fold the queued values into the running statistics."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            for name, values, present in pending:
                self._update(name, values.astype(np.float64), present.astype(np.float64))
            for name in {name for name, _, _ in pending}:
                self._scale(name)  # ready for the next graph, so normalising costs no statistics work

    def _update(self, name: str, values: FloatArray, present: FloatArray) -> None:
        batch_count = present.sum(0)
        if not (batch_count > 0).any():
            return
        batch_mean = (values * present).sum(0) / np.maximum(batch_count, 1)
        batch_m2 = (((values - batch_mean) * present) ** 2).sum(0)
        count, mean, m2 = self._count[name], self._mean[name], self._m2[name]
        total = count + batch_count
        delta = batch_mean - mean
        safe_total = np.maximum(total, 1)
        observed = batch_count > 0
        self._mean[name] = np.where(observed, mean + delta * batch_count / safe_total, mean)
        self._m2[name] = np.where(observed, m2 + batch_m2 + delta**2 * count * batch_count / safe_total, m2)
        self._count[name] = total
        self._updates_since_flush += 1

    def states(self) -> dict[str, NormalizerState]:
        """A snapshot of every node type's statistics (queued values included)."""
        self.commit()
        with self._lock:
            return {
                name: NormalizerState(
                    self._count[name].tolist(), self._mean[name].tolist(), self._m2[name].tolist()
                )
                for name in self._count
            }

    def load_states(self, states: dict[str, NormalizerState]) -> None:
        """Continue from `states()` output (a checkpoint's): the statistics become exactly these, and
        values queued since are discarded (they belong to graphs after that snapshot)."""
        with self._lock:
            self._restore(states)
            self._pending = []
            self._scaled = {}
        self._updates_since_flush = 0

    def flush(self) -> None:
        """Write the statistics to the store; a failure is a `NormalizerWriteError` (never ignored)."""
        if self._store is None:
            return
        states = self.states()
        try:
            self._store.save(states)
        except Exception as exc:
            raise NormalizerWriteError(f"{type(exc).__name__}: {exc}") from exc
        self._updates_since_flush = 0
