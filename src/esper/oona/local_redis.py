"""A private `redis-server` on a loopback port, without persistence, for tests, benchmarks and local runs.

The server is started with `--save "" --appendonly no`: it keeps nothing on disk, so a restart starts
empty. It is stopped by its own PID, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from esper.oona.bus import BusError


class RedisServerMissing(BusError):
    """No `redis-server` binary on PATH."""


class RedisServerFailed(BusError):
    """`redis-server` did not start or did not answer in time."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalRedisServer:
    """One `redis-server` child process on 127.0.0.1:`port`; `start`, `kill` and `start` again."""

    def __init__(self, workdir: Path, port: int | None = None, *, start_timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.workdir = Path(workdir)
        self.port = port if port is not None else free_loopback_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The `redis://` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's PID while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self._process is not None:
            raise RedisServerFailed(f"redis-server on port {self.port} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"redis-{self.port}.log"
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(log),
            "--daemonize", "no",
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    code = self._process.returncode
                    self._process = None
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RedisServerFailed(f"redis-server on port {self.port} exited with {code}: {tail}")
                if self._answers(client):
                    return
                if time.monotonic() > deadline:
                    self.kill()
                    raise RedisServerFailed(
                        f"redis-server on port {self.port} did not answer within {self.start_timeout_s}s"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    @staticmethod
    def _answers(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False  # not listening yet: `start` bounds the wait with its deadline

    def kill(self) -> None:
        """SIGKILL the server (as a crash would) and reap it; its data is gone."""
        self._stop(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the server and reap it."""
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            os.kill(self._process.pid, sig)
            self._process.wait(timeout=10)
        self._process = None

    def __enter__(self) -> LocalRedisServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
