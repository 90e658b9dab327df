"""Arms one deterministic crash in the processes `esper serve` starts (test harness of
test_parallel_actors.py; on the children's PYTHONPATH only).

HARNESS_KILL_ACTOR=actor-0:45 and HARNESS_KILL_MARKER=PATH: the process that runs actor-0 kills
itself with SIGKILL right after Tamiyo recorded its first decision at or past training step 45, unless
PATH exists: it creates PATH first, so the restarted actor is not killed again.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def _arm() -> None:
    target = os.environ.get("HARNESS_KILL_ACTOR", "")
    marker = os.environ.get("HARNESS_KILL_MARKER", "")
    if not target or not marker or os.path.exists(marker):
        return
    actor_id, step = target.rsplit(":", 1)
    argv = sys.argv[1:]
    if "actor" not in argv or "--actor-id" not in argv or argv[argv.index("--actor-id") + 1] != actor_id:
        return
    from esper.tamiyo.records.field_reports import FieldReports

    record = FieldReports.after_decision

    def after_decision(self: FieldReports, packet: Any, command: Any, **kwargs: Any) -> Any:
        reports = record(self, packet, command, **kwargs)
        if packet.global_step >= int(step):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return reports
            os.write(fd, f"{packet.training_run_id} {packet.global_step}\n".encode())
            os.fsync(fd)
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return reports

    FieldReports.after_decision = after_decision  # type: ignore[method-assign]


_arm()
