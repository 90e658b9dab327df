"""The persistent inference worker: hard deadline, late work discarded, never delays the next decision."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable

import pytest

from esper.leyline import EsperError
from esper.tamiyo.runtime.worker import (
    CancelToken,
    DeadlineExceeded,
    DecisionCancelled,
    InferenceWorker,
    Scheduling,
    WorkerClosed,
    WorkerLeak,
    WorkerSaturated,
    raise_priority,
)

GENEROUS_MS = 30_000.0
# A budget that a job blocking on a gate overruns. Not 1 ms: a job whose deadline passes while it is still
# queued never starts, and on a loaded machine the worker thread can take a millisecond or more to wake,
# so a 1 ms budget sometimes tested "never started" instead of "late" (seen once in CI).
LATE_MS = 250.0


def _miss(worker: InferenceWorker, job: Callable[[CancelToken], object]) -> DeadlineExceeded:
    """Run `job` (which must overrun `LATE_MS`) on `worker`; the deadline miss, after checking that the
    job had started, so that what follows tests a late job and not one that never ran."""
    started = threading.Event()

    def tracked(token: CancelToken) -> object:
        started.set()
        return job(token)

    with pytest.raises(DeadlineExceeded) as caught:
        worker.run(tracked, timeout_ms=LATE_MS)
    assert started.is_set(), f"the job did not start within {LATE_MS} ms: the machine stalled"
    return caught.value


class Boom(EsperError):
    pass


def test_result_is_returned_from_the_same_persistent_thread() -> None:
    worker = InferenceWorker()
    try:
        idents = [worker.run(lambda _t: threading.get_ident(), timeout_ms=GENEROUS_MS) for _ in range(3)]
        assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
    finally:
        worker.close()


def test_missed_deadline_raises_and_the_late_result_is_discarded() -> None:
    worker = InferenceWorker()
    gate = threading.Event()
    finished = threading.Event()

    def slow(_token: CancelToken) -> str:
        gate.wait(30)
        finished.set()
        return "late"

    try:
        assert _miss(worker, slow).budget_ms == LATE_MS
        assert worker.deadline_misses == 1
        gate.set()
        finished.wait(30)
        assert worker.run(lambda _t: "next", timeout_ms=GENEROUS_MS) == "next"
    finally:
        gate.set()
        worker.close()


def test_a_late_job_does_not_delay_the_next_decision() -> None:
    worker = InferenceWorker(max_retired=1)
    gate = threading.Event()
    try:
        _miss(worker, lambda _t: gate.wait(30))
        # The late job is still blocked; the next decision runs on a fresh thread instead of queueing.
        assert worker.run(lambda _t: "fresh", timeout_ms=GENEROUS_MS) == "fresh"
        assert worker.replacements == 1
    finally:
        gate.set()
        worker.close()
    assert worker.threads == []


def test_cancel_token_is_set_for_a_late_job() -> None:
    worker = InferenceWorker()
    started = threading.Event()
    observed: list[bool] = []
    done = threading.Event()

    def job(token: CancelToken) -> None:
        started.set()
        while not token.cancelled:
            threading.Event().wait(0.001)
        observed.append(True)
        done.set()
        token.check()

    try:
        _miss(worker, job)
        assert done.wait(30) and observed == [True]
    finally:
        worker.close()


def test_too_many_late_jobs_saturate_instead_of_piling_up_threads() -> None:
    worker = InferenceWorker(max_retired=0)
    gate = threading.Event()
    try:
        _miss(worker, lambda _t: gate.wait(30))
        with pytest.raises(WorkerSaturated):
            worker.run(lambda _t: "x", timeout_ms=GENEROUS_MS)
    finally:
        gate.set()
        worker.close()


def test_job_error_reaches_the_caller_unchanged() -> None:
    worker = InferenceWorker()

    def fail(_token: CancelToken) -> None:
        raise Boom("policy broke")

    try:
        with pytest.raises(Boom, match="policy broke"):
            worker.run(fail, timeout_ms=GENEROUS_MS)
        assert worker.run(lambda _t: 0, timeout_ms=GENEROUS_MS) == 0
    finally:
        worker.close()


def test_close_leaves_no_thread_running() -> None:
    worker = InferenceWorker()
    worker.run(lambda _t: None, timeout_ms=GENEROUS_MS)
    threads = worker.threads
    assert threads
    worker.close()
    assert all(not thread.is_alive() for thread in threads)
    with pytest.raises(WorkerClosed):
        worker.run(lambda _t: None, timeout_ms=GENEROUS_MS)


def test_close_reports_a_thread_that_will_not_stop() -> None:
    worker = InferenceWorker(join_timeout_s=0.05)
    gate = threading.Event()
    _miss(worker, lambda _t: gate.wait(30))
    with pytest.raises(WorkerLeak):
        worker.close()
    gate.set()


def test_a_cancelled_token_raises_at_its_check() -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(DecisionCancelled):
        token.check()


def test_a_decision_whose_deadline_passes_while_it_is_queued_never_starts() -> None:
    """Queued behind work ahead that ignores its token: the decision misses its deadline in the queue and
    is skipped when the thread reaches it, instead of running late."""
    worker = InferenceWorker()
    gate, ahead_started = threading.Event(), threading.Event()
    ran: list[str] = []

    def deaf(_token: CancelToken) -> None:  # never checks its token
        ahead_started.set()
        gate.wait(30)

    try:
        ahead = worker.start(deaf, what="deaf warm-up")
        assert ahead is not None and ahead_started.wait(30)
        with pytest.raises(DeadlineExceeded):
            worker.run(lambda _t: ran.append("decision"), timeout_ms=20.0)
        gate.set()
        assert ahead.wait(30)
        assert worker.run(lambda _t: "next", timeout_ms=GENEROUS_MS) == "next"
        assert ran == []
    finally:
        gate.set()
        worker.close()


def _until_cancelled(started: threading.Event, stopped: threading.Event) -> Callable[[CancelToken], None]:
    """A background job that checks its token every millisecond until it is cancelled."""

    def job(token: CancelToken) -> None:
        started.set()
        try:
            for _ in range(30_000):
                token.check()
                threading.Event().wait(0.001)
        finally:
            stopped.set()

    return job


def test_a_background_job_runs_on_the_worker_thread_and_reports_how_it_ended() -> None:
    worker = InferenceWorker()
    ran_on: list[int] = []
    try:
        decision_thread = worker.run(lambda _t: threading.get_ident(), timeout_ms=GENEROUS_MS)
        ahead = worker.start(lambda _t: ran_on.append(threading.get_ident()), what="warm-up")
        assert ahead is not None and ahead.what == "warm-up"
        assert ahead.wait(30) and ahead.finished and not ahead.cut_short and ahead.error is None
        assert ran_on == [decision_thread]

        def fail(_token: CancelToken) -> None:
            raise Boom("warm-up broke")

        failed = worker.start(fail, what="failing warm-up")
        assert failed is not None and failed.wait(30)
        assert worker.run(lambda _t: "decided", timeout_ms=GENEROUS_MS) == "decided"  # not its error
        assert failed.finished and isinstance(failed.error, Boom) and not failed.cut_short
    finally:
        worker.close()


def test_a_decision_cuts_a_background_job_short_and_follows_it_on_the_same_thread() -> None:
    worker = InferenceWorker()
    started, stopped = threading.Event(), threading.Event()
    try:
        thread = worker.run(lambda _t: threading.get_ident(), timeout_ms=GENEROUS_MS)
        ahead = worker.start(_until_cancelled(started, stopped), what="warm-up")
        assert ahead is not None and started.wait(30)
        assert worker.run(lambda _t: threading.get_ident(), timeout_ms=GENEROUS_MS) == thread
        assert stopped.is_set() and ahead.finished and ahead.cut_short and ahead.error is None
        assert worker.replacements == 0 and worker.deadline_misses == 0
    finally:
        worker.close()


def test_a_background_job_is_not_started_while_the_worker_is_busy() -> None:
    worker = InferenceWorker()
    gate = threading.Event()
    started, stopped = threading.Event(), threading.Event()
    try:
        first = worker.start(_until_cancelled(started, stopped), what="first")
        assert first is not None and started.wait(30)
        assert worker.start(lambda _t: None, what="second") is None  # one at a time
        worker.run(lambda _t: None, timeout_ms=GENEROUS_MS)
        queued = worker.start(lambda _t: None, what="cut short before it starts")
        assert queued is not None
        worker.run(lambda _t: None, timeout_ms=GENEROUS_MS)
        assert queued.finished  # finished one way or the other before the decision ran
        _miss(worker, lambda _t: gate.wait(30))
        assert worker.start(lambda _t: None, what="behind a late decision") is None
    finally:
        gate.set()
        worker.close()


def test_closing_cuts_a_background_job_short_and_a_closed_worker_starts_none() -> None:
    worker = InferenceWorker()
    started, stopped = threading.Event(), threading.Event()
    ahead = worker.start(_until_cancelled(started, stopped), what="warm-up")
    assert ahead is not None and started.wait(30)
    worker.close()
    assert stopped.is_set() and ahead.cut_short and worker.threads == []
    with pytest.raises(WorkerClosed):
        worker.start(lambda _t: None, what="after close")


def test_a_background_job_runs_at_the_real_time_priority_like_the_decision_that_may_wait_for_it() -> None:
    fake = FakePriority()
    worker = InferenceWorker(realtime_priority=7, set_priority=fake)
    seen: list[int] = []
    try:
        ahead = worker.start(lambda _t: seen.append(fake.current[threading.get_ident()]), what="warm-up")
        assert ahead is not None and ahead.wait(30)
        assert worker.run(lambda _t: fake.current[threading.get_ident()], timeout_ms=GENEROUS_MS) == 7
        assert seen == [7]
    finally:
        worker.close()


def test_worker_has_its_own_thread_budget_and_leaves_the_callers_alone() -> None:
    """DESIGN §10: the inference thread runs with `cpu_threads` torch threads; the trainer keeps its own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    worker = InferenceWorker(cpu_threads=1)
    try:
        assert worker.run(lambda _t: torch.get_num_threads(), timeout_ms=GENEROUS_MS) == 1
        assert torch.get_num_threads() == 2
    finally:
        worker.close()
        torch.set_num_threads(before)


class FakePriority:
    """Records each thread's requested priority; refuses real-time ones when `refuse` is set."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.calls: list[tuple[int, int]] = []  # (thread ident, priority)
        self.current: dict[int, int] = {}

    def __call__(self, priority: int) -> None:
        ident = threading.get_ident()
        self.calls.append((ident, priority))
        if priority and self.refuse:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        self.current[ident] = priority


def test_decisions_run_at_the_real_time_priority_and_warm_ups_at_normal_priority() -> None:
    fake = FakePriority()
    worker = InferenceWorker(realtime_priority=7, set_priority=fake)
    try:
        assert worker.scheduling == Scheduling(7, True)
        seen = worker.run(lambda _t: fake.current[threading.get_ident()], timeout_ms=GENEROUS_MS)
        assert seen == 7
        warm = worker.run(
            lambda _t: fake.current[threading.get_ident()], timeout_ms=GENEROUS_MS, realtime=False
        )
        assert warm == 0  # demoted for the warm-up ...
        after = worker.run(lambda _t: fake.current[threading.get_ident()], timeout_ms=GENEROUS_MS)
        assert after == 7  # ... and promoted again for the next decision
        assert {ident for ident, _ in fake.calls} == {worker.threads[0].ident}  # only the worker thread
    finally:
        worker.close()


def test_a_replacement_thread_gets_the_real_time_priority_too() -> None:
    fake = FakePriority()
    worker = InferenceWorker(realtime_priority=5, set_priority=fake)
    gate = threading.Event()
    try:
        _miss(worker, lambda _t: gate.wait(30))
        assert worker.run(lambda _t: fake.current[threading.get_ident()], timeout_ms=GENEROUS_MS) == 5
        assert worker.replacements == 1
    finally:
        gate.set()
        worker.close()


def test_a_refused_real_time_priority_is_reported_with_its_reason_and_jobs_still_run() -> None:
    fake = FakePriority(refuse=True)
    worker = InferenceWorker(realtime_priority=10, set_priority=fake)
    try:
        scheduling = worker.scheduling
        assert not scheduling.applied and scheduling.realtime_priority == 10
        assert "PermissionError" in scheduling.reason and "not permitted" in scheduling.reason
        assert worker.run(lambda _t: "decided", timeout_ms=GENEROUS_MS) == "decided"
        # Never demoted or re-promoted per job: the thread was never real-time.
        assert worker.run(lambda _t: "warm", timeout_ms=GENEROUS_MS, realtime=False) == "warm"
        assert [priority for _, priority in fake.calls] == [10]
    finally:
        worker.close()


def test_priority_zero_never_touches_the_scheduler() -> None:
    fake = FakePriority()
    worker = InferenceWorker(realtime_priority=0, set_priority=fake)
    try:
        assert worker.scheduling == Scheduling(0, True)
        assert worker.run(lambda _t: 1, timeout_ms=GENEROUS_MS) == 1
        assert fake.calls == []
    finally:
        worker.close()


def test_priority_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="realtime_priority"):
        InferenceWorker(realtime_priority=100)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="per-thread scheduling is Linux only")
def test_the_reported_scheduling_is_the_one_the_os_applied() -> None:
    """With the real call: where the OS grants SCHED_FIFO the worker thread has it during a decision and
    the normal policy during a warm-up; where it refuses, the worker says so and decisions still run."""

    def policy(_token: CancelToken) -> tuple[int, int]:
        return os.sched_getscheduler(0), os.sched_getparam(0).sched_priority

    worker = InferenceWorker(realtime_priority=3)
    try:
        scheduling = worker.scheduling
        decided = worker.run(policy, timeout_ms=GENEROUS_MS)
        warm = worker.run(policy, timeout_ms=GENEROUS_MS, realtime=False)
        if scheduling.applied:
            assert decided == (os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 3)
            assert warm == (os.SCHED_OTHER, 0)
        else:
            assert "OSError" in scheduling.reason or "PermissionError" in scheduling.reason
            assert decided[0] == warm[0] == os.SCHED_OTHER
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's thread is left alone
    finally:
        worker.close()


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="per-thread scheduling is Linux only")
def test_raise_priority_puts_the_previous_policy_back_or_changes_nothing() -> None:
    before = os.sched_getscheduler(0), os.sched_getparam(0).sched_priority
    try:
        restore = raise_priority(4)
    except OSError:  # refused by this OS: nothing may have changed
        assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
        return
    fifo = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == (fifo, 4)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a process forked meanwhile does not inherit the real-time policy
        os.write(write, str(os.sched_getscheduler(0)).encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert int(os.read(read, 32)) == os.SCHED_OTHER
    os.close(read)
    os.close(write)
    inner = raise_priority(9)  # already real-time: left as it is
    assert os.sched_getparam(0).sched_priority == 4
    inner()
    assert os.sched_getparam(0).sched_priority == 4
    restore()
    assert (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority) == before
