"""Issue 16.1 end to end: `esper run --policy gnn` on Redis rides out an outage of the bus.

The run is a real `esper` process on a private redis-server. Once it has written its first checkpoint,
Redis is killed; once the run has trained on through more decisions without it, Redis comes back (empty:
it kept nothing). The run completes, and its log says the policy-update feed was lost and recovered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from esper.oona.local_redis import LocalRedisServer

REPO = Path(__file__).resolve().parents[2]


def _wait_for(condition: object, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"the run never reached {what}"
        time.sleep(0.05)


def _decisions(run_dir: Path) -> int:
    path = run_dir / "decisions.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_gnn_run_on_redis_completes_through_an_outage_of_the_bus(
    private_redis: LocalRedisServer, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
        "ESPER_DATA_DIR": str(tmp_path / "data"),
        "ESPER_SIGNING_SECRET": "bus-outage-test-secret-0123456789",
        "ESPER_BUS_URL": private_redis.url,
        # An outage is noticed in milliseconds, not after the default retries.
        "OONA_RETRY_BASE_MS": "5",
        "OONA_RETRY_MAX_MS": "50",
        "OONA_RETRY_LIMIT": "2",
        "OONA_SOCKET_TIMEOUT_S": "1",
        # The test is about the bus, not the latency budget of a loaded machine.
        "TAMIYO_STEP_TIMEOUT_MS": "2000",
    }
    args = ["run", "--policy", "gnn", "--epochs", "8", "--decision-interval", "5", "--no-progress"]
    command = [sys.executable, "-c", "from esper.cli import main; main()", *args, "--run-dir", str(run_dir)]
    process = subprocess.Popen(command, cwd=tmp_path, env=env)
    try:
        _wait_for(lambda: list(run_dir.glob("checkpoints/ckpt-*.json")), process, "its first checkpoint")
        before = _decisions(run_dir)
        private_redis.kill()
        _wait_for(lambda: _decisions(run_dir) >= before + 6, process, "six decisions without Redis")
        private_redis.start()
        returncode = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    log = (run_dir / "esper.log").read_text()
    assert "policy_feed_unavailable" in log
