"""`esper run` as its own process, optionally killed with SIGKILL mid-run (for the store's timeline tests).

python -m tests.integration.killed_run [--kill-at-step N] ESPER-RUN-ARGUMENTS...

With `--kill-at-step`, the process kills itself right after Tamiyo recorded its first decision at or past
step N, once its outbox has published everything it may: whatever is not on the bus then was held, not
merely late.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from esper.cli import app
from esper.leyline import pb
from esper.tamiyo.records.field_reports import FieldReports


def _kill_at(step: int) -> None:
    record = FieldReports.after_decision

    def after_decision(
        self: FieldReports, packet: pb.SystemStatePacket, command: pb.AdaptationCommand, **kwargs: Any
    ) -> list[pb.FieldReport]:
        reports = record(self, packet, command, **kwargs)
        if packet.global_step >= step:
            while self.outbox is not None and self.outbox.pump().attempted:
                pass
            os.kill(os.getpid(), signal.SIGKILL)
        return reports

    FieldReports.after_decision = after_decision  # type: ignore[method-assign]


def main() -> None:
    """Run `esper` with the arguments given, after arming the kill."""
    args = sys.argv[1:]
    if args[:1] == ["--kill-at-step"]:
        _kill_at(int(args[1]))
        args = args[2:]
    app(args, prog_name="esper")


if __name__ == "__main__":
    main()
