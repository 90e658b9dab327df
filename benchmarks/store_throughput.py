"""TamiyoStore throughput against raw sqlite3, and restore time for 100 000 field reports.

Write throughput: acknowledged `TamiyoStore.add_field_report` calls per second (validate, serialise,
checksum, insert the report with its outbox state as one row, in its own fsynced transaction, then note
the WAL's committed frames in the acknowledged-write mark) against raw sqlite3
single-row inserts of the same reports, pre-serialised, one autocommit transaction each (the strictest
baseline: no protobuf, no validation, one row). Both run in this process, on the same disk (one temporary
directory), in WAL mode with `synchronous=FULL`, interleaved in blocks of `--block` writes that alternate
sides, so that disk contention from elsewhere hits both alike; `ratio` is the median over rounds of
store / raw writes per second (the machine is shared and noisy).

Restore: a store holding `--restore-reports` reports is closed and reopened; measured are the open (WAL
recovery, `quick_check`, schema check), the state a restarted service needs (open windows, outbox counts,
policy version) and reading every report back as a message.

    .venv/bin/python benchmarks/store_throughput.py [--writes 300] [--rounds 9] [--block 1]
        [--restore-reports 100000]

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from esper.leyline import pb, serialize
from esper.tamiyo.records.store import TamiyoStore


def sample_report(number: int, prefix: str) -> pb.FieldReport:
    """A synthesised field report of realistic size (about 300 bytes)."""
    report = pb.FieldReport(
        report_id=f"fr-synth-{prefix}-{number:09d}",
        command_id=f"cmd-{prefix}-{number:09d}",
        training_run_id="benchmark-run",
        seed_id="h1:g2",
        blueprint_id="lowrank",
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS,
        observation_window_epochs=1,
        tamiyo_policy_version="heuristic-v1",
        action=pb.POLICY_ACTION_GERMINATE,
    )
    for key, value in (
        ("baseline_accuracy", 0.71),
        ("final_accuracy", 0.73),
        ("accuracy_delta", 0.02),
        ("baseline_loss", 0.9),
        ("final_loss", 0.85),
        ("loss_delta", -0.05),
        ("param_delta", 1200.0),
        ("contribution_accuracy", 0.011),
    ):
        report.metrics[key] = value
    report.issued_at.FromNanoseconds(1_700_000_000_000_000_000 + number)
    return report


class RawTable:
    """The baseline: one table, one single-row INSERT per autocommit transaction."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        assert self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE raw (report_id TEXT PRIMARY KEY, body BLOB NOT NULL)")

    def insert(self, report_id: str, body: bytes) -> None:
        self.db.execute("INSERT INTO raw (report_id, body) VALUES (?, ?)", (report_id, body))

    def close(self) -> None:
        self.db.close()


def timed(run: Callable[[], None], count: int) -> float:
    """Operations per second of `run`, which performs `count` operations."""
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def write_rounds(workdir: Path, writes: int, rounds: int, block: int) -> dict[str, object]:
    """Per round: `writes` acknowledged writes per side, alternating blocks of `block` writes."""
    store = TamiyoStore(workdir / "tamiyo.sqlite3")
    raw = RawTable(workdir / "raw.sqlite3")
    store_rates: list[float] = []
    raw_rates: list[float] = []
    try:
        for number in range(50):  # warm-up, not timed: files grown, statements cached
            store.add_field_report(sample_report(number, "warm"))
            raw.insert(f"warm-{number}", serialize(sample_report(number, "warm")))
        for round_index in range(rounds):
            reports = [sample_report(n, f"s{round_index}") for n in range(writes)]
            rows = [
                (r.report_id, serialize(r))
                for r in (sample_report(n, f"r{round_index}") for n in range(writes))
            ]
            store_s = raw_s = 0.0
            for offset in range(0, writes, block):
                sides = ("store", "raw") if (offset // block + round_index) % 2 == 0 else ("raw", "store")
                for side in sides:
                    start = time.perf_counter()
                    if side == "store":
                        for report in reports[offset : offset + block]:
                            store.add_field_report(report)
                        store_s += time.perf_counter() - start
                    else:
                        for report_id, body in rows[offset : offset + block]:
                            raw.insert(report_id, body)
                        raw_s += time.perf_counter() - start
            store_rates.append(writes / store_s)
            raw_rates.append(writes / raw_s)
            print(
                f"round {round_index}: store {store_rates[-1]:8.1f} writes/s"
                f"   raw {raw_rates[-1]:8.1f} writes/s   ratio {store_rates[-1] / raw_rates[-1]:.3f}"
            )
    finally:
        store.close()
        raw.close()
    store_median, raw_median = statistics.median(store_rates), statistics.median(raw_rates)
    ratios = [s / r for s, r in zip(store_rates, raw_rates, strict=True)]
    return {
        "store_writes_per_s": store_median,
        "raw_writes_per_s": raw_median,
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


def restore(workdir: Path, count: int) -> dict[str, float]:
    path = workdir / "restore.sqlite3"
    with TamiyoStore(path) as store:
        chunk = 10_000
        for offset in range(0, count, chunk):
            store.add_field_reports(
                [sample_report(n, "x") for n in range(offset, min(count, offset + chunk))]
            )
    start = time.perf_counter()
    store = TamiyoStore(path)
    opened = time.perf_counter()
    store.open_windows()
    store.outbox_counts()
    store.current_policy_version()
    ready = time.perf_counter()
    reports = store.field_reports()
    read = time.perf_counter()
    store.close()
    assert len(reports) == count
    return {
        "restore_reports": float(count),
        "restore_open_s": opened - start,
        "restore_ready_s": ready - start,
        "restore_read_all_s": read - start,
        "db_mb": path.stat().st_size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writes", type=int, default=300, help="acknowledged writes per side per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--block", type=int, default=1, help="writes per side before switching sides")
    parser.add_argument("--restore-reports", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="directory for the databases (one disk)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        figures: dict[str, object] = {
            "writes_per_round": args.writes,
            "rounds": args.rounds,
            "dir": str(workdir),
        }
        figures.update(write_rounds(workdir, args.writes, args.rounds, args.block))
        figures.update(restore(workdir, args.restore_reports))
    print(
        f"store {figures['store_writes_per_s']:.1f} writes/s,"
        f" raw sqlite3 {figures['raw_writes_per_s']:.1f} writes/s,"
        f" ratio {figures['ratio']:.3f} (target >= 0.9); restore of {args.restore_reports} reports:"
        f" open {figures['restore_open_s']:.3f} s, ready {figures['restore_ready_s']:.3f} s,"
        f" all read {figures['restore_read_all_s']:.3f} s"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
