"""Normaliser statistics as stored: plain numbers, no tensors, so the store and the CLI read them without
loading PyTorch. The graph builder's `FeatureNormalizer` keeps them up to date."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from esper.leyline import pb


@dataclass
class NormalizerState:
    """Running count, mean and sum of squared deviations of one node type's continuous features."""

    count: list[float]
    mean: list[float]
    m2: list[float]


def statistics_to_proto(states: Mapping[str, NormalizerState]) -> list[pb.NormalizerStatistics]:
    """`states` as the decision record carries them (node types in name order)."""
    return [
        pb.NormalizerStatistics(node_type=name, count=state.count, mean=state.mean, m2=state.m2)
        for name, state in sorted(states.items())
    ]


def statistics_from_proto(messages: Iterable[pb.NormalizerStatistics]) -> dict[str, NormalizerState]:
    """The statistics a decision record carries (empty when it carries none)."""
    return {
        message.node_type: NormalizerState(list(message.count), list(message.mean), list(message.m2))
        for message in messages
    }


class NormalizerStore(Protocol):
    """Where normaliser statistics live between runs (the storage manager implements it in SQLite)."""

    def load(self) -> dict[str, NormalizerState] | None:
        """The saved statistics per node type, or None when nothing was saved yet."""
        ...

    def save(self, states: dict[str, NormalizerState]) -> None:
        """Persist the statistics durably; raise on failure."""
        ...


class InMemoryNormalizerStore:
    """A `NormalizerStore` in memory, for tests and throwaway runs."""

    def __init__(self, states: dict[str, NormalizerState] | None = None) -> None:
        self.states = states
        self.saves = 0

    def load(self) -> dict[str, NormalizerState] | None:
        """The last saved statistics."""
        return self.states

    def save(self, states: dict[str, NormalizerState]) -> None:
        """Keep a copy of `states`."""
        self.states = {
            name: NormalizerState(list(s.count), list(s.mean), list(s.m2)) for name, s in states.items()
        }
        self.saves += 1
