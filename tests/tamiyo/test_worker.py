"""The persistent inference worker: hard deadline, late work discarded, never delays the next decision."""

from __future__ import annotations

import threading

import pytest

from esper.leyline import EsperError
from esper.tamiyo.worker import (
    CancelToken,
    DeadlineExceeded,
    DecisionCancelled,
    InferenceWorker,
    WorkerClosed,
    WorkerLeak,
    WorkerSaturated,
)

GENEROUS_MS = 30_000.0
TINY_MS = 1.0


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
        with pytest.raises(DeadlineExceeded) as caught:
            worker.run(slow, timeout_ms=TINY_MS)
        assert caught.value.budget_ms == TINY_MS
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
        with pytest.raises(DeadlineExceeded):
            worker.run(lambda _t: gate.wait(30), timeout_ms=TINY_MS)
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
        with pytest.raises(DeadlineExceeded):
            worker.run(job, timeout_ms=TINY_MS)
        assert done.wait(30) and observed == [True]
    finally:
        worker.close()


def test_too_many_late_jobs_saturate_instead_of_piling_up_threads() -> None:
    worker = InferenceWorker(max_retired=0)
    gate = threading.Event()
    try:
        with pytest.raises(DeadlineExceeded):
            worker.run(lambda _t: gate.wait(30), timeout_ms=TINY_MS)
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
    with pytest.raises(DeadlineExceeded):
        worker.run(lambda _t: gate.wait(30), timeout_ms=TINY_MS)
    with pytest.raises(WorkerLeak):
        worker.close()
    gate.set()


def test_a_job_cancelled_before_it_starts_never_runs() -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(DecisionCancelled):
        token.check()


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
