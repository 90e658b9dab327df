"""The progress display of a run: one line per epoch, redrawn by the training thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from esper.tolaria.trainer import EpochReport, Trainer, TrainingOutcome

if TYPE_CHECKING:
    from rich.console import Console


def fit(
    trainer: Trainer, console: Console | None, show: bool, observer: Callable[[EpochReport], None]
) -> TrainingOutcome:
    """`trainer.fit`, with `observer` told of every epoch, and a progress bar on `console` if `show`."""
    if not show:
        return trainer.fit(on_epoch=observer)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]epoch"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        # Redrawn by the training thread after each epoch, never by a refresh thread: that thread holds
        # the GIL for ~0.4 ms ten times a second, and landing inside a decision it delays it as much.
        auto_refresh=False,
    )
    with progress:
        epochs = trainer.settings.epochs
        task = progress.add_task(
            "train",
            total=epochs,
            completed=trainer.step // trainer.steps_per_epoch,
            status="",
        )

        def on_epoch(report: EpochReport) -> None:
            progress.update(
                task,
                completed=report.epoch,
                status=f"acc {report.validation_accuracy:.3f}  params {report.parameters:,}  "
                f"active seeds {report.active_seeds}  fossilised {report.fossilized_seeds}",
                refresh=True,
            )
            observer(report)

        return trainer.fit(on_epoch=on_epoch)
