"""Fixtures of Tolaria's trainer tests: a small classification task and a blueprint catalogue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.tolaria.data import Dataset, make_task
from esper.urza import BlueprintCatalogue


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return make_task(0.3, 0, n_features=8, n_classes=3, n_samples=320)


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[BlueprintCatalogue]:
    catalogue = BlueprintCatalogue.open_default(tmp_path / "urza.sqlite3")
    yield catalogue
    catalogue.close()
