"""Nissa's run logs: each opened once per run and flushed per line; size, sync and truncate serve the
trainer's checkpoints; the event log is an `EventSink`."""

from __future__ import annotations

import builtins
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from esper.leyline import EventSink
from esper.nissa.log import EventLog, JsonlLog
from tests.integration.run_worker import assembled_run, config, controller


def test_a_run_opens_each_of_its_logs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: Counter[str] = Counter()
    real_open = builtins.open

    def counting_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened[Path(str(file)).name] += 1
        return real_open(file, *args, **kwargs)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(builtins, "open", counting_open)
        assembled_run(config(run_dir, epochs=2), controller())
    lines = {
        name: len((run_dir / name).read_text().splitlines()) for name in ("metrics.jsonl", "events.jsonl")
    }
    assert lines["metrics.jsonl"] > 2 and lines["events.jsonl"] > 2
    assert opened["metrics.jsonl"] == opened["decisions.jsonl"] == opened["events.jsonl"] == 1


def test_every_appended_line_is_readable_before_the_log_is_closed(tmp_path: Path) -> None:
    log = JsonlLog(tmp_path / "metrics.jsonl")
    try:
        log.append({"step": 1})
        log.append({"step": 2})
        assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
            {"step": 1},
            {"step": 2},
        ]
        size = log.size()
        log.append({"step": 3})
        log.sync()
        log.truncate(size)  # what a resume does with the size a checkpoint recorded
        log.append({"step": 4})
        assert log.read() == [{"step": 1}, {"step": 2}, {"step": 4}]
    finally:
        log.close()


def test_the_event_log_is_an_event_sink(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    sink: EventSink = log
    sink("cleanup_failed", "OSError: disk full", cleanup="write metrics.prom")
    log.close()
    assert log.read() == [
        {"kind": "cleanup_failed", "reason": "OSError: disk full", "cleanup": "write metrics.prom"}
    ]
