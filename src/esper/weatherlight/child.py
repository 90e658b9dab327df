"""How a supervised service starts: bound to its supervisor's life, then the `esper` command it runs.

A supervisor killed with SIGKILL cannot stop its children, so each child asks the kernel to send it
SIGTERM when its parent dies (Linux's `PR_SET_PDEATHSIG`), and stops on it as on any SIGTERM. The child
sets this on itself as its first act: the alternative, a `preexec_fn` in the supervisor, is unsafe in a
process with threads. Where the call is not available the service runs unbound, and says so.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


class ParentGone(Exception):
    """The supervisor died before the child could bind itself to it."""


def bind_to_parent() -> bool:
    """Have this process receive SIGTERM when its parent dies; False where the platform cannot.

    Raises `ParentGone` when the parent died before the binding took (the child was orphaned already)."""
    parent = os.getppid()
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
    if os.getppid() != parent:
        raise ParentGone(f"parent {parent} exited before this service bound itself to it")
    return True


def main() -> None:
    """`python -c "from esper.weatherlight.child import main; main()" ARGS...`: `esper ARGS...`, bound to
    the supervisor that started it."""
    try:
        bound = bind_to_parent()
    except ParentGone as exc:
        print(f"weatherlight child: {exc}; not starting", file=sys.stderr)
        raise SystemExit(1) from exc
    if not bound:
        print(
            f"weatherlight child: {sys.platform} cannot tie a process to its parent's life; this service "
            "keeps running if its supervisor is killed with SIGKILL",
            file=sys.stderr,
        )
    from esper.cli import main as esper_main

    esper_main()
