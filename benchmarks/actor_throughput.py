"""Simic's actors: episodes per minute on this machine, for each number of actors run side by side.

For each count N in `--actors`, N `esper simic actor` processes (actor-0 ...) start together on a fresh
data directory and embedded bus, each running `--episodes` episodes of the default task draw (every
family) with `--epochs` epochs, and the wall-clock time from their start to the last exit is measured
(process start-up included: it is part of what a supervised actor costs). No learner runs: the figure is
the actors' own. The last line of stdout is one JSON object with every figure.

    .venv/bin/python benchmarks/actor_throughput.py [--actors 1,2] [--episodes 6] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def measure(actors: int, episodes: int, epochs: int) -> dict[str, Any]:
    """Run `actors` actors of `episodes` episodes each; their throughput and per-episode figures."""
    with tempfile.TemporaryDirectory(prefix="esper-actors-") as root:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "ESPER_DATA_DIR": root,
            "ESPER_BUS_URL": "",
            "ESPER_SIGNING_SECRET": "actor-throughput-benchmark-0123456789",
        }
        command = [sys.executable, "-c", "from esper.cli import main; main()", "simic", "actor", "--json"]
        started = time.perf_counter()
        processes = [
            subprocess.Popen(
                [
                    *command,
                    "--actor-id",
                    f"actor-{i}",
                    "--max-episodes",
                    str(episodes),
                    "--epochs",
                    str(epochs),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(actors)
        ]
        outputs = [process.communicate() for process in processes]
        wall = time.perf_counter() - started
        for process, (_out, err) in zip(processes, outputs, strict=True):
            if process.returncode != 0:
                raise SystemExit(f"an actor failed ({process.returncode}):\n{err[-2000:]}")
    results = [json.loads(line) for out, _err in outputs for line in out.splitlines() if line.startswith("{")]
    if len(results) != actors * episodes:
        raise SystemExit(f"expected {actors * episodes} episodes, got {len(results)}")
    seconds = [float(r["wall_seconds"]) for r in results]
    return {
        "actors": actors,
        "episodes": len(results),
        "wall_seconds": round(wall, 2),
        "episodes_per_minute": round(60 * len(results) / wall, 2),
        "episode_seconds_median": round(statistics.median(seconds), 3),
        "decisions_per_episode_median": statistics.median(int(r["decisions"]) for r in results),
        "families": sorted({r["plan"]["family"] for r in results}),
    }


def main() -> None:
    """Measure each count of actors in turn; print a line per count, then the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", default="1,2", help="Counts of actors to measure, comma-separated.")
    parser.add_argument("--episodes", type=int, default=6, help="Episodes per actor.")
    parser.add_argument("--epochs", type=int, default=6, help="Epochs per episode.")
    args = parser.parse_args()
    figures = []
    for count in (int(n) for n in args.actors.split(",")):
        figure = measure(count, args.episodes, args.epochs)
        figures.append(figure)
        print(
            f"{count} actor(s): {figure['episodes']} episodes in {figure['wall_seconds']} s = "
            f"{figure['episodes_per_minute']} episodes/min "
            f"(median episode {figure['episode_seconds_median']} s)",
            flush=True,
        )
    # Ratios against the first count, measured in this same process (the machine is shared and noisy).
    base = figures[0]["episodes_per_minute"]
    for figure in figures:
        figure["speedup_vs_first"] = round(figure["episodes_per_minute"] / base, 3)
    print(json.dumps({"benchmark": "actor_throughput", "cpus": os.cpu_count(), "results": figures}))


if __name__ == "__main__":
    main()
