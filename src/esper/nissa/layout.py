"""The run directory: every file name of a run, spelled here and nowhere else.

Nissa owns the layout; the run assembly hands the paths to the subsystems that write there (Tolaria's
logs and checkpoints, Tamiyo's store), so none of them spells a file name of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from esper.oona.factory import EMBEDDED_FILE

REPORT_PAGE = "report.md"
"""The report's page inside `RunLayout.report` (its plots are named by the report)."""


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created by naming them)."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved configuration a run started with (its presence means the run began)."""
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        """The figures of a run that ended (completed or halted)."""
        return self.root / "summary.json"

    @property
    def status(self) -> Path:
        """Whether the run is running, completed, failed or halted, and why."""
        return self.root / "status.json"

    @property
    def metrics(self) -> Path:
        """One JSON line per evaluation."""
        return self.root / "metrics.jsonl"

    @property
    def decisions(self) -> Path:
        """One JSON line per controller decision."""
        return self.root / "decisions.jsonl"

    @property
    def events(self) -> Path:
        """One JSON line per lifecycle, growth or trainer event."""
        return self.root / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        """Where the trainer's checkpoints live."""
        return self.root / "checkpoints"

    @property
    def tamiyo_store(self) -> Path:
        """Tamiyo's durable decisions, field reports and outbox."""
        return self.root / "tamiyo.sqlite3"

    @property
    def policies(self) -> Path:
        """Policy weights accepted during the run (restored on resume)."""
        return self.root / "policies"

    @property
    def bus(self) -> Path:
        """A run's own embedded bus file, where one was kept beside the run."""
        return self.root / EMBEDDED_FILE

    @property
    def metrics_snapshot(self) -> Path:
        """The Prometheus metrics of the run at its end."""
        return self.root / "metrics.prom"

    @property
    def log(self) -> Path:
        """The `esper` loggers' records during the run."""
        return self.root / "esper.log"

    @property
    def metrics_csv(self) -> Path:
        """The metrics as CSV, for spreadsheets."""
        return self.root / "metrics.csv"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files of the run."""
        return self.root / "tensorboard"

    @property
    def report(self) -> Path:
        """The rendered report (markdown and plots)."""
        return self.root / "report"


@dataclass(frozen=True)
class DataLayout:
    """The paths of a deployment's data directory (`ESPER_DATA_DIR`)."""

    root: Path

    @property
    def catalogue(self) -> Path:
        """Urza's blueprint catalogue."""
        return self.root / "urza.sqlite3"

    @property
    def bus(self) -> Path:
        """The embedded bus, when `ESPER_BUS_URL` is empty."""
        return self.root / EMBEDDED_FILE

    @property
    def runs(self) -> Path:
        """Where `esper run` puts a run directory unless told otherwise."""
        return self.root / "runs"

    @property
    def actors(self) -> Path:
        """Simic's actors: each one's progress and episode runs (`actors/<actor id>/`)."""
        return self.root / "actors"

    @property
    def simic(self) -> Path:
        """Simic's state (its policy and lineage) unless told otherwise."""
        return self.root / "simic"
