"""Start-up: how long each command takes to answer, and `esper run` to its first training step.

Each command runs as a new process, as a user types it; the figure is the median wall time of
`--repeats` runs. `esper run` reaches its first step when the first line of its metrics log appears (the
run evaluates after every step here, so that line follows the first step). `import torch` alone is
measured too: the target for the run is "under 3 s plus import torch".

    python benchmarks/startup.py --repeats 3

The last line is one JSON object with every figure.
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

ESPER = [str(Path(sys.executable).with_name("esper"))]


def _wall(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _first_step(env: dict[str, str], run_dir: Path) -> float:
    """Seconds from the process start to the first line of the run's metrics log."""
    command = [*ESPER, "run", "--epochs", "1", "--decision-interval", "1", "--no-progress", "--no-report"]
    metrics = run_dir / "metrics.jsonl"
    start = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--run-dir", str(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not (metrics.exists() and metrics.read_bytes().count(b"\n") >= 1):
            if process.poll() is not None:
                raise RuntimeError(f"esper run exited with {process.returncode} before its first step")
            time.sleep(0.005)
        return time.perf_counter() - start
    finally:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "ESPER_DATA_DIR": work}
        # One finished run, for `esper reports` and `esper runs` to read.
        subprocess.run(
            [*ESPER, "run", "--epochs", "1", "--no-progress", "--no-report", "--run-dir", f"{work}/runs/a"],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        commands = {
            "esper --help": [*ESPER, "--help"],
            "esper settings": [*ESPER, "settings"],
            "esper reports": [*ESPER, "reports", f"{work}/runs/a"],
            "esper runs": [*ESPER, "runs"],
        }
        figures: dict[str, float] = {}
        for name, command in commands.items():
            figures[name] = statistics.median(_wall(command, env) for _ in range(args.repeats))
        figures["import torch"] = statistics.median(
            _wall([sys.executable, "-c", "import torch"], env) for _ in range(args.repeats)
        )
        figures["esper run to its first step"] = statistics.median(
            _first_step(env, Path(work) / "runs" / f"first-{i}") for i in range(args.repeats)
        )
    figures["esper run to its first step, less import torch"] = (
        figures["esper run to its first step"] - figures["import torch"]
    )
    for name, seconds in figures.items():
        print(f"{name:50s} {seconds:6.2f} s")
    print(json.dumps({"seconds": figures, "repeats": args.repeats, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
