"""The inference worker: a persistent thread that runs decisions under a hard deadline.

Design (P1 and the review): a decision runs on a long-lived worker thread while the caller waits at most
the remaining budget. When the budget runs out the caller gets `DeadlineExceeded` at once; the late job is
told to stop (its `CancelToken` is set, and the GNN checks it between layers) and its result is discarded
whatever it turns out to be.

A thread cannot be killed, so the late job may still be finishing its current layer. It must not delay the
next decision, so the next `run` does not queue behind it: the busy thread is retired (it exits as soon as
its job stops) and a fresh thread takes the decision. Bound, stated honestly: a late job keeps a core busy
for at most one layer of the network after its deadline, or one of the two segments of a traced plan
(the GNN checks its token between them); a policy that never checks its token runs to completion. At
most `max_retired` retired threads may be winding down at once, beyond that `run` fails with
`WorkerSaturated` instead of piling up threads. `close()` cancels and joins every thread and raises
`WorkerLeak` if one does not stop in time: nothing keeps running behind the caller's back.

Thread budget (DESIGN §10): each worker thread sets its own OpenMP intra-op count to `cpu_threads`
(`TAMIYO_CPU_THREADS`, default 1) when it starts; the trainer's thread keeps the count it set for itself
(`TOLARIA_THREADS`). On a shared 2-core machine two inference threads made the same forward pass 3-20x
slower at the median and tail (docs/p7-attention-and-cuda-graphs.md), so one thread per role is the default.

Scheduling: with `realtime_priority` > 0 each worker thread asks the OS for the real-time policy
(`SCHED_FIFO` at that priority, Linux; needs CAP_SYS_NICE or an `RLIMIT_RTPRIO` allowance). Measured in
`esper run --policy gnn`: at normal priority about one decision in 30 waited on its CPU's run queue
behind kernel threads and other processes' tasks, up to 4 ms, and those waits were most of the missed
deadlines; at real-time priority it waits for none of them (docs/p7-attention-and-cuda-graphs.md). The
thread blocks while idle, so the policy costs nothing between decisions; jobs submitted with
`realtime=False` (the warm-ups, which trace and run for hundreds of milliseconds) run at normal priority.
`scheduling` says whether the policy was applied and, if not, why.

Work ahead of a decision: `start` hands the thread a background job (the service's warm-up shortly before a
decision, so that the decision finds the thread's core and caches busy with its own working set) and
returns at once. It runs at the thread's priority (a decision may wait for it to reach a checkpoint:
preempted at normal priority, it would make the decision wait behind other tasks) and yields to the next
`run`: a job that `run` finds still going is cancelled and the new job queues behind it on the same
thread, which stops it at its next checkpoint. A background job is never awaited; its outcome is read
from its `BackgroundJob` handle.
"""

from __future__ import annotations

import _thread
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from esper.leyline import DecisionDeadlineMissed, EsperError

T = TypeVar("T")


class DeadlineExceeded(DecisionDeadlineMissed):
    """A decision missed its deadline; its late result, if any, is discarded."""

    def __init__(self, budget_ms: float, elapsed_ms: float, what: str) -> None:
        self.budget_ms = budget_ms
        self.elapsed_ms = elapsed_ms
        self.what = what
        super().__init__(
            f"{what} missed its deadline: {elapsed_ms:.2f} ms elapsed, budget {budget_ms:.2f} ms"
        )


class DecisionCancelled(EsperError):
    """Raised inside a late job when it reaches a checkpoint after its deadline."""


class WorkerClosed(EsperError):
    """The worker was closed; it takes no more jobs."""


class WorkerSaturated(EsperError):
    """Too many late jobs are still winding down; a new decision is refused rather than queued."""

    def __init__(self, retired_alive: int) -> None:
        self.retired_alive = retired_alive
        super().__init__(f"{retired_alive} late decision(s) are still running; refusing a new one")


class WorkerSchedulingError(EsperError):
    """The real-time priority was required (`TAMIYO_REALTIME_REQUIRED`) and the OS refused it."""

    def __init__(self, priority: int, reason: str) -> None:
        self.priority = priority
        self.reason = reason
        super().__init__(
            f"the inference thread cannot run at SCHED_FIFO priority {priority}: {reason} (grant "
            "CAP_SYS_NICE or an RLIMIT_RTPRIO allowance, or unset TAMIYO_REALTIME_REQUIRED)"
        )


class WorkerLeak(EsperError):
    """`close()` could not stop every worker thread within its timeout."""

    def __init__(self, threads: list[str]) -> None:
        self.threads = threads
        super().__init__(f"worker thread(s) still running after close: {', '.join(threads)}")


@dataclass(frozen=True)
class Scheduling:
    """How the worker's threads are scheduled: `realtime_priority` 0 is the OS's normal policy."""

    realtime_priority: int
    applied: bool
    reason: str = ""  # why the real-time policy was not applied
    pending: bool = False  # the thread has not started yet: nothing is known


def _fifo() -> int:
    # A process forked from a real-time thread starts under the normal policy, not at its priority.
    return os.SCHED_FIFO | getattr(os, "SCHED_RESET_ON_FORK", 0)


def set_thread_priority(priority: int) -> None:
    """The calling thread to `SCHED_FIFO` at `priority` (1-99), or to the normal policy for 0.

    Raises `OSError` when the OS refuses (no CAP_SYS_NICE, no `RLIMIT_RTPRIO` allowance) and
    `AttributeError` where the platform has no such call (only Linux has it per thread)."""
    if priority:
        os.sched_setscheduler(0, _fifo(), os.sched_param(priority))
    else:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


ThreadPriority = Callable[[int], None]


def raise_priority(priority: int) -> Callable[[], None]:
    """The calling thread to `SCHED_FIFO` `priority`; returns what puts its previous policy back (to be
    called on the same thread). A thread already under a real-time policy is left as it is. Raises like
    `set_thread_priority`, with nothing changed."""
    policy = os.sched_getscheduler(0)  # with its reset-on-fork flag, if it has one
    if policy & ~getattr(os, "SCHED_RESET_ON_FORK", 0) in (os.SCHED_FIFO, os.SCHED_RR):
        return _unchanged
    set_thread_priority(priority)
    return lambda: os.sched_setscheduler(0, policy, os.sched_param(0))


def _unchanged() -> None:
    return None


class CancelToken:
    """Set when a job's deadline has passed; the job checks it between layers.

    A plain flag: it only ever goes from unset to set, and an attribute write is atomic under the GIL
    (an `Event` per decision cost its lock and condition for nothing: nobody waits on a token). A token
    with a `deadline` (on `time.monotonic()`) also counts as cancelled once that instant has passed, so a
    job submitted ahead (`InferenceWorker.submit`) stops at its first checkpoint after its deadline even
    while nobody waits for it."""

    def __init__(self, deadline: float | None = None) -> None:
        self._cancelled = False
        self._deadline = deadline

    def cancel(self) -> None:
        """Ask the job to stop at its next checkpoint."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        """True once `cancel()` was called or the deadline passed."""
        if not self._cancelled and self._deadline is not None and time.monotonic() > self._deadline:
            self._cancelled = True
        return self._cancelled

    def check(self) -> None:
        """Raise `DecisionCancelled` if the job was cancelled (or its deadline passed)."""
        if self.cancelled:
            raise DecisionCancelled("decision cancelled after its deadline")


def _held_lock() -> _thread.LockType:
    lock = _thread.allocate_lock()
    lock.acquire()
    return lock


@dataclass
class _Job(Generic[T]):
    fn: Callable[[CancelToken], T]
    realtime: bool = True
    token: CancelToken = field(default_factory=CancelToken)
    # Held until the job has finished: the caller waits by acquiring it (one C-level call, where an
    # `Event.wait` with a timeout runs a condition variable in Python on every decision).
    pending: _thread.LockType = field(default_factory=_held_lock)
    finished: bool = False
    result: T | None = None
    error: BaseException | None = None
    succeeded: bool = False
    background: bool = False  # started by `start`: nobody waits for it, the next `run` cancels it
    finished_at: float = 0.0  # time.monotonic() when it finished (set before `pending` is released)


class BackgroundJob:
    """What became of a job handed to `InferenceWorker.start` (read it once `finished`)."""

    def __init__(self, job: _Job[object], what: str) -> None:
        self._job = job
        self.what = what

    @property
    def finished(self) -> bool:
        """The job ran (or was skipped) and will not run again."""
        return self._job.finished

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the job to finish; whether it has."""
        if not self._job.pending.acquire(timeout=timeout_s):
            return False
        self._job.pending.release()
        return True

    @property
    def cut_short(self) -> bool:
        """Cancelled before it completed: a `run` needed the thread (or the worker closed)."""
        return self._job.finished and isinstance(self._job.error, DecisionCancelled)

    @property
    def error(self) -> BaseException | None:
        """The exception the job raised, other than its cancellation; None while it runs."""
        error = self._job.error if self._job.finished else None
        return None if isinstance(error, DecisionCancelled) else error


class PendingJob(Generic[T]):
    """A job handed to `InferenceWorker.submit`: running (or queued) under its deadline; `collect` it once.

    The deadline counts from the submission. The job's token expires with it, so a job still running
    then stops at its next checkpoint whether or not anybody is waiting for it."""

    def __init__(
        self, worker: InferenceWorker, job: _Job[T], *, submitted: float, timeout_ms: float, what: str
    ) -> None:
        self._worker = worker
        self._job = job
        self.submitted = submitted
        self.deadline = submitted + timeout_ms / 1e3
        self.timeout_ms = timeout_ms
        self.what = what
        self._collected = False

    @property
    def finished(self) -> bool:
        """The job ran (or was skipped) and will not run again."""
        return self._job.finished

    @property
    def elapsed_ms(self) -> float:
        """From the submission to the job's end (to now while it runs)."""
        end = self._job.finished_at if self._job.finished else time.monotonic()
        return (end - self.submitted) * 1e3

    def collect(self) -> T:
        """The job's result or its exception; `DeadlineExceeded` (the job cancelled, its result discarded)
        when it did not finish by its deadline. Waits at most for what is left of the deadline."""
        if self._collected:
            raise EsperError(f"{self.what} was already collected")
        self._collected = True
        job = self._job
        remaining_s = max(self.deadline - time.monotonic(), 0.0)
        if not job.pending.acquire(timeout=remaining_s):
            job.token.cancel()
            self._worker.deadline_misses += 1
            raise DeadlineExceeded(self.timeout_ms, (time.monotonic() - self.submitted) * 1e3, self.what)
        if job.finished_at > self.deadline:  # back, but late: discarded whatever it is
            self._worker.deadline_misses += 1
            raise DeadlineExceeded(self.timeout_ms, self.elapsed_ms, self.what)
        if job.error is not None:
            raise job.error
        if not job.succeeded:
            raise EsperError(f"{self.what} finished without a result or an error")  # unreachable by design
        return job.result  # type: ignore[return-value]

    def cancel(self) -> None:
        """Ask the job to stop at its next checkpoint (its result, if any, is never collected)."""
        self._collected = True
        self._job.token.cancel()


_STOP = object()


class _Lane:
    """One worker thread with its own queue."""

    _ids = itertools.count()

    def __init__(
        self, name: str, cpu_threads: int, realtime_priority: int, set_priority: ThreadPriority
    ) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cpu_threads = cpu_threads
        self._priority = realtime_priority
        self._set_priority = set_priority
        self.realtime = False
        self.scheduling_error = ""
        self.started = threading.Event()
        self.current: _Job[object] | None = None
        self.outstanding: _Job[object] | None = None
        self.thread = threading.Thread(target=self._loop, name=f"{name}-{next(self._ids)}", daemon=True)
        self.thread.start()

    def _start(self) -> None:
        if torch.get_num_threads() != self._cpu_threads:
            torch.set_num_threads(self._cpu_threads)
        if self._priority:
            self._take_priority()
        self.started.set()

    def _loop(self) -> None:
        self._start()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Job)
            self.current = item
            demoted = self.realtime and not item.realtime
            try:
                if demoted:
                    self._set_priority(0)
                item.token.check()  # a job whose deadline passed while queued never starts
                item.result = item.fn(item.token)
                item.succeeded = True
            except BaseException as exc:  # noqa: BLE001 (handed to the waiting caller, which re-raises it)
                item.error = exc
            finally:
                self.current = None
                item.finished_at = time.monotonic()
                item.finished = True
                item.pending.release()
            if demoted:
                self._take_priority()  # allowed a moment ago: only a changed limit refuses it now

    def _take_priority(self) -> None:
        try:
            self._set_priority(self._priority)
            self.realtime = True
        except (OSError, AttributeError) as exc:
            self.realtime = False
            self.scheduling_error = f"{type(exc).__name__}: {exc}"

    @property
    def busy(self) -> bool:
        job = self.outstanding
        return job is not None and not job.finished

    def submit(self, job: _Job[object]) -> None:
        self.outstanding = job
        self._queue.put(job)

    def stop(self) -> None:
        for job in (self.current, self.outstanding):
            if job is not None:
                job.token.cancel()
        self._queue.put(_STOP)


class InferenceWorker:
    """Runs jobs on a persistent thread under a hard deadline. Thread-safe for one caller at a time."""

    def __init__(
        self,
        *,
        cpu_threads: int = 1,
        max_retired: int = 2,
        join_timeout_s: float = 5.0,
        name: str = "tamiyo-inference",
        realtime_priority: int = 0,
        set_priority: ThreadPriority | None = None,
    ) -> None:
        if not 0 <= realtime_priority <= 99:
            raise ValueError(f"realtime_priority must be 0 (normal) to 99, got {realtime_priority}")
        self._cpu_threads = cpu_threads
        self._priority = realtime_priority
        self._set_priority = set_priority or set_thread_priority
        self._max_retired = max_retired
        self._join_timeout_s = join_timeout_s
        self._name = name
        self._lock = threading.Lock()
        self._closed = False
        self._lane = self._new_lane()
        self._retired: list[_Lane] = []
        self.deadline_misses = 0
        self.replacements = 0
        self._lane.started.wait(join_timeout_s)  # so that `scheduling` reports on a running thread

    def _new_lane(self) -> _Lane:
        return _Lane(self._name, self._cpu_threads, self._priority, self._set_priority)

    @property
    def scheduling(self) -> Scheduling:
        """The scheduling of the thread that takes the next decision."""
        lane = self._lane
        if not lane.started.is_set():
            return Scheduling(self._priority, False, "the worker thread has not started yet", pending=True)
        if lane.realtime or not self._priority:
            return Scheduling(self._priority, True)
        return Scheduling(self._priority, False, lane.scheduling_error)

    @property
    def threads(self) -> list[threading.Thread]:
        """Every thread this worker started that is still alive."""
        lanes = [self._lane, *self._retired]
        return [lane.thread for lane in lanes if lane.thread.is_alive()]

    def run(
        self,
        fn: Callable[[CancelToken], T],
        *,
        timeout_ms: float,
        what: str = "decision",
        realtime: bool = True,
    ) -> T:
        """Run `fn(token)` on the worker; its result, or its exception, or `DeadlineExceeded`.

        `realtime=False` runs it at normal priority even on a real-time worker (long warm-ups)."""
        return self.submit(fn, timeout_ms=timeout_ms, what=what, realtime=realtime).collect()

    def submit(
        self,
        fn: Callable[[CancelToken], T],
        *,
        timeout_ms: float,
        what: str = "decision",
        realtime: bool = True,
    ) -> PendingJob[T]:
        """Start `fn(token)` on the worker under a deadline `timeout_ms` from now and return at once;
        `collect()` the handle for its result (`run` is `submit` then `collect`)."""
        start = time.monotonic()
        with self._lock:
            if self._closed:
                raise WorkerClosed(f"{self._name} is closed")
            self._prune()
            outstanding = self._lane.outstanding
            if outstanding is not None and not outstanding.finished:
                if outstanding.background:
                    # Work ahead of this job: it stops at its next checkpoint and this job follows it on
                    # the same thread (a fresh thread would start cold, which the work ahead avoids).
                    outstanding.token.cancel()
                else:
                    # A late job is still finishing a layer: do not wait for it, take a fresh thread.
                    if len(self._retired) >= self._max_retired:
                        raise WorkerSaturated(len(self._retired))
                    self._lane.stop()
                    self._retired.append(self._lane)
                    self._lane = self._new_lane()
                    self.replacements += 1
            job: _Job[T] = _Job(fn, realtime, token=CancelToken(start + timeout_ms / 1e3))
            self._lane.submit(job)  # type: ignore[arg-type]
        return PendingJob(self, job, submitted=start, timeout_ms=timeout_ms, what=what)

    def start(self, fn: Callable[[CancelToken], object], *, what: str) -> BackgroundJob | None:
        """Start `fn(token)` on the worker (at its real-time priority, if it has one) and return at once,
        or return None (and start nothing) while the worker is busy. The next `run` cancels it if it is
        still going and waits for it to stop at its next checkpoint, inside that run's own timeout."""
        with self._lock:
            if self._closed:
                raise WorkerClosed(f"{self._name} is closed")
            if self._lane.busy:
                return None
            job: _Job[object] = _Job(fn, background=True)
            self._lane.submit(job)
        return BackgroundJob(job, what)

    def _prune(self) -> None:
        self._retired = [lane for lane in self._retired if lane.thread.is_alive()]

    def close(self) -> None:
        """Cancel what runs, stop every thread and join them; `WorkerLeak` if one will not stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            lanes = [self._lane, *self._retired]
        for lane in lanes:
            lane.stop()
        deadline = time.monotonic() + self._join_timeout_s
        for lane in lanes:
            lane.thread.join(max(deadline - time.monotonic(), 0.0))
        alive = [lane.thread.name for lane in lanes if lane.thread.is_alive()]
        if alive:
            raise WorkerLeak(alive)
