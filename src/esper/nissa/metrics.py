"""A process's Prometheus metrics: one registry, served over HTTP while the process runs and written as a
text snapshot when it ends.

Every subsystem registers its metrics in the registry its composition root hands it (never the global
one), so one process exposes exactly its own figures. `RunMetrics` adds the training run's own gauges;
the composition root feeds it, so Nissa needs nothing from the trainer.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server, write_to_textfile

from esper.leyline import EsperError


class MetricsServerError(EsperError):
    """The metrics server could not start (port taken, address not local, ...)."""


class MetricsServer:
    """`GET /metrics` for `registry` on `address:port`, on a daemon thread, until `close()`."""

    def __init__(self, registry: CollectorRegistry, port: int, address: str = "127.0.0.1") -> None:
        try:
            server, thread = start_http_server(port, addr=address, registry=registry)
        except OSError as exc:
            raise MetricsServerError(f"cannot serve metrics on {address}:{port}: {exc}") from exc
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.address = address
        self.port = int(server.server_port)  # the bound port (port 0 asks for any free one)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and wait for the server thread; the port is free afterwards."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def write_snapshot(registry: CollectorRegistry, path: Path) -> Path:
    """Write `registry` in Prometheus' text format to `path`, atomically (a node exporter's textfile
    collector can pick it up; a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    return path


class RunMetrics:
    """The gauges of one training run: set at the end of every epoch, and once more from the final
    evaluation (after the last epoch, once the lifecycles were ended)."""

    _GAUGES: ClassVar[dict[str, tuple[str, str]]] = {
        "epoch": ("esper_run_epoch", "Epochs completed"),
        "step": ("esper_run_step", "Training steps completed"),
        "validation_accuracy": (
            "esper_run_validation_accuracy",
            "Validation accuracy at the last evaluation",
        ),
        "validation_loss": ("esper_run_validation_loss", "Validation loss at the last evaluation"),
        "parameters": ("esper_run_parameters", "Parameters of the host with its seeds"),
        "active_seeds": ("esper_run_active_seeds", "Seeds between germination and fossilisation"),
        "fossilized_seeds": ("esper_run_fossilized_seeds", "Seeds fossilised into the host"),
    }

    def __init__(self, registry: CollectorRegistry, training_run_id: str) -> None:
        self._run = training_run_id
        self._gauges = {
            field: Gauge(name, help_text, ["run"], registry=registry)
            for field, (name, help_text) in self._GAUGES.items()
        }

    def _set(self, values: dict[str, float]) -> None:
        for field, value in values.items():
            self._gauges[field].labels(self._run).set(value)

    def observe(
        self,
        *,
        epoch: int,
        step: int,
        validation_accuracy: float,
        validation_loss: float,
        parameters: int,
        active_seeds: int,
        fossilized_seeds: int,
    ) -> None:
        """Set every gauge from one epoch's figures."""
        self._set(
            {
                "epoch": epoch,
                "step": step,
                "validation_accuracy": validation_accuracy,
                "validation_loss": validation_loss,
                "parameters": parameters,
                "active_seeds": active_seeds,
                "fossilized_seeds": fossilized_seeds,
            }
        )

    def finish(
        self,
        *,
        step: int,
        validation_accuracy: float,
        validation_loss: float,
        parameters: int,
        fossilized_seeds: int,
    ) -> None:
        """The final evaluation's figures (epoch and active seeds keep the last epoch's)."""
        self._set(
            {
                "step": step,
                "validation_accuracy": validation_accuracy,
                "validation_loss": validation_loss,
                "parameters": parameters,
                "fossilized_seeds": fossilized_seeds,
            }
        )
