"""CleanupStack: every step runs; a failing step never takes the place of the error that ended the work."""

from __future__ import annotations

import pytest

from esper.leyline import CleanupFailed, CleanupStack, EsperError


class RunFailed(EsperError):
    pass


def test_a_failing_clean_up_after_a_failing_run_leaves_the_original_error_and_reports_itself() -> None:
    reported: list[tuple[str, str]] = []
    ran: list[str] = []

    def failing_delete() -> None:
        ran.append("delete group")
        raise OSError("delete group tamiyo-run failed after 7 attempts")

    with (
        pytest.raises(RunFailed, match="the controller failed") as info,
        CleanupStack(lambda name, exc: reported.append((name, str(exc)))) as cleanup,
    ):
        cleanup.push("close the store", lambda: ran.append("close the store"))
        cleanup.push("delete the consumer group", failing_delete)
        cleanup.push("close the channel", lambda: ran.append("close the channel"))
        raise RunFailed("the controller failed")
    assert ran == ["close the channel", "delete group", "close the store"]  # newest first, all of them
    assert reported == [("delete the consumer group", "delete group tamiyo-run failed after 7 attempts")]
    assert any("delete the consumer group" in note for note in info.value.__notes__)


def test_a_failing_clean_up_after_a_successful_run_is_raised_after_every_step() -> None:
    reported: list[str] = []
    ran: list[str] = []

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    with (
        pytest.raises(CleanupFailed, match=r"write metrics\.prom: OSError") as info,
        CleanupStack(lambda name, exc: reported.append(name)) as cleanup,
    ):
        cleanup.push("close the store", lambda: ran.append("store"))
        cleanup.push("write metrics.prom", full_disk)
    assert ran == ["store"]
    assert reported == ["write metrics.prom"]
    assert [name for name, _ in info.value.failures] == ["write metrics.prom"]


def test_clean_up_runs_once() -> None:
    ran: list[str] = []
    with CleanupStack(lambda name, exc: None) as cleanup:
        cleanup.push("step", lambda: ran.append("step"))
    assert cleanup.close() == []
    assert ran == ["step"]
