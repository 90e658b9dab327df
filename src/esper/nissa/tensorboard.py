"""Standard exports of a run: TensorBoard event files and a CSV of its metrics.

`TensorBoardSink` takes a run's records one at a time (an evaluation from `metrics.jsonl`, an event from
`events.jsonl`) and writes them with `torch.utils.tensorboard.SummaryWriter`:

- scalars `validation/accuracy`, `validation/loss`, `train/loss`, `train/lr`, `model/parameters`, and
  `slots/<slot>/alpha`, at the training step of the evaluation (the final evaluation as `final/...`);
- every lifecycle transition, refused command and trainer event as text under `growth` or `trainer`, at
  its step, e.g. "h2:g1 DORMANT -> GERMINATED (blueprint mlp_expand, 1212 parameters)".

`export_run(run_dir)` feeds the sink from the run's files after the fact (today's wiring: `esper run`
calls it at the end, `esper tensorboard` on any run) and writes `metrics.csv` beside them, so
`tensorboard --logdir <ESPER_DATA_DIR>/runs` shows every run with no glue.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.leyline.files import write_atomically
from esper.nissa.layout import RunLayout
from esper.nissa.runs import TRAINER_EVENTS, RunReadError, is_run_dir, read_jsonl

_SCALARS = {
    "validation_accuracy": "validation/accuracy",
    "validation_loss": "validation/loss",
    "training_loss": "train/loss",
    "lr": "train/lr",
    "parameters": "model/parameters",
}
_TRAINER_KINDS = (*TRAINER_EVENTS, "decision_deadline_missed")


class TensorBoardSink:
    """Writes a run's evaluations and events into TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def metric(self, record: dict[str, Any]) -> None:
        """One evaluation of `metrics.jsonl`."""
        if "validation_accuracy" not in record:
            return
        step = int(record["step"])
        prefix = "final/" if record.get("final") else ""
        for key, tag in _SCALARS.items():
            value = record.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(prefix + tag, float(value), step)
        if not record.get("final"):
            for slot_id, alpha in (record.get("alphas") or {}).items():
                self._writer.add_scalar(f"slots/{slot_id}/alpha", float(alpha), step)

    def event(self, event: dict[str, Any]) -> None:
        """One record of `events.jsonl`."""
        kind = str(event.get("kind", ""))
        step = int(event.get("step", 0))
        if kind == "transition":
            text = (
                f"{event.get('seed_id')} {event.get('from_stage') or '-'} -> {event.get('to_stage')}"
                f" ({event.get('reason', '')})"
            )
            self._writer.add_text("growth", text, step)
        elif kind == "command_rejected":
            self._writer.add_text(
                "growth", f"refused for {event.get('seed_id')}: {event.get('reason')}", step
            )
        elif kind in _TRAINER_KINDS:
            self._writer.add_text("trainer", f"{kind}: {event.get('reason', '')}", step)

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def metrics_csv(records: list[dict[str, Any]]) -> str:
    """The evaluations as CSV: step, epoch, final, the scalar figures, then each slot's stage and alpha."""
    rows = [r for r in records if "validation_accuracy" in r]
    slots = sorted({str(s) for r in rows for s in (r.get("stages") or {})})
    columns = ["step", "epoch", "final", *_SCALARS]
    columns += [f"{slot}_stage" for slot in slots] + [f"{slot}_alpha" for slot in slots]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in rows:
        stages, alphas = record.get("stages") or {}, record.get("alphas") or {}
        values = [record.get(c) for c in ["step", "epoch", "final", *_SCALARS]]
        values += [stages.get(slot) for slot in slots] + [alphas.get(slot) for slot in slots]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


@dataclass(frozen=True)
class ExportFiles:
    """Where a run's exports were written."""

    tensorboard_dir: Path
    csv: Path


def export_run(run_dir: Path) -> ExportFiles:
    """Write `run_dir/tensorboard/` (event files, replacing earlier exports) and `run_dir/metrics.csv`."""
    if not is_run_dir(run_dir):
        raise RunReadError(run_dir, "not a run directory (no metrics.jsonl or config.json)")
    metrics = read_jsonl(RunLayout(run_dir).metrics)
    events = read_jsonl(RunLayout(run_dir).events)
    log_dir = RunLayout(run_dir).tensorboard
    log_dir.mkdir(exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()  # an export is regenerated whole: a second export must not double every point
    sink = TensorBoardSink(log_dir)
    try:
        for record in metrics:
            sink.metric(record)
        for event in events:
            sink.event(event)
    finally:
        sink.close()
    csv_path = RunLayout(run_dir).metrics_csv
    write_atomically(csv_path, metrics_csv(metrics).encode("utf-8"))
    return ExportFiles(tensorboard_dir=log_dir, csv=csv_path)
