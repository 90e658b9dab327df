"""The writer of the crash test: forks children that write to a TamiyoStore until they are killed.

    python -m tests.tamiyo.store_writer DB_PATH

Importing Esper takes seconds (torch), so this process imports it once and forks a fresh writer for
every `fork` line on stdin: it prints `child PID`, and `exit PID STATUS` once the child is reaped.
A child opens the store (a restart after the previous child's crash), then writes for ever, printing
one line per acknowledged write, only after the call returned (committed and fsynced):

    decision COMMAND_ID        record_decision with an open window
    closed COMMAND_ID REPORT_ID  close_window: the report written and the window gone, atomically
    report REPORT_ID           add_field_report
    published N                mark_published of N outbox entries

Lines are single `os.write` calls shorter than PIPE_BUF, so they never interleave.
"""

from __future__ import annotations

import os
import random
import sys
import traceback
import uuid
from pathlib import Path

from esper.leyline import pb
from esper.tamiyo.records.store import TamiyoStore
from tests.tamiyo.test_store import decision, window


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _report(command_id: str) -> pb.FieldReport:
    report = pb.FieldReport(
        report_id=f"fr-synth-{uuid.uuid4().hex}",
        command_id=command_id,
        training_run_id="run-1",
        outcome=pb.FIELD_REPORT_OUTCOME_NEUTRAL,
        observation_window_epochs=1,
        tamiyo_policy_version="crash-v1",
        notes="x" * random.randrange(0, 3000),  # varied sizes: records span pages
    )
    report.metrics["accuracy_delta"] = random.random()
    report.issued_at.GetCurrentTime()
    return report


def write_forever(path: Path) -> None:
    """Open the store and write until killed."""
    random.seed(os.getpid())
    store = TamiyoStore(path)
    _say("open")
    while True:
        choice = random.random()
        if choice < 0.5:
            command_id = f"cmd-{uuid.uuid4().hex}"
            store.record_decision(decision(command_id), window(command_id))
            _say(f"decision {command_id}")
            report = _report(command_id)
            store.close_window(command_id, report)
            _say(f"closed {command_id} {report.report_id}")
        elif choice < 0.9:
            report = _report(f"cmd-{uuid.uuid4().hex}")
            store.add_field_report(report)
            _say(f"report {report.report_id}")
        else:
            due = store.due_outbox(2**62, limit=20)
            store.mark_published(due)
            _say(f"published {len(due)}")


def main() -> None:
    """Fork one writer per `fork` line on stdin and report how each one ended."""
    path = Path(sys.argv[1])
    for line in sys.stdin:
        if line.strip() != "fork":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                write_forever(path)
            finally:
                traceback.print_exc()  # a writer that failed on its own says why (the test expects SIGKILL)
                os._exit(1)
        _say(f"child {pid}")
        _, status = os.waitpid(pid, 0)
        _say(f"exit {pid} {status}")


if __name__ == "__main__":
    main()
