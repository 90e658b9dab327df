"""A process's Prometheus metrics: one registry, served over HTTP while the process runs and written as a
text snapshot when it ends.

Every subsystem registers its metrics in the registry its composition root hands it (never the global
one), so one process exposes exactly its own figures. `RunMetrics` adds the training run's own gauges;
the composition root feeds it, so Nissa needs nothing from the trainer.
"""

from __future__ import annotations

import threading
from pathlib import Path
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
    """The gauges of one training run, set at the end of every epoch."""

    def __init__(self, registry: CollectorRegistry, training_run_id: str) -> None:
        labels = ["run"]
        self._run = training_run_id
        self.epoch = Gauge("esper_run_epoch", "Epochs completed", labels, registry=registry)
        self.step = Gauge("esper_run_step", "Training steps completed", labels, registry=registry)
        self.accuracy = Gauge(
            "esper_run_validation_accuracy",
            "Validation accuracy at the last epoch",
            labels,
            registry=registry,
        )
        self.loss = Gauge(
            "esper_run_validation_loss", "Validation loss at the last epoch", labels, registry=registry
        )
        self.parameters = Gauge(
            "esper_run_parameters", "Parameters of the host with its seeds", labels, registry=registry
        )
        self.active_seeds = Gauge(
            "esper_run_active_seeds", "Seeds between germination and fossilisation", labels, registry=registry
        )
        self.fossilized_seeds = Gauge(
            "esper_run_fossilized_seeds", "Seeds fossilised into the host", labels, registry=registry
        )

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
        run = self._run
        self.epoch.labels(run).set(epoch)
        self.step.labels(run).set(step)
        self.accuracy.labels(run).set(validation_accuracy)
        self.loss.labels(run).set(validation_loss)
        self.parameters.labels(run).set(parameters)
        self.active_seeds.labels(run).set(active_seeds)
        self.fossilized_seeds.labels(run).set(fossilized_seeds)

    def finish(
        self,
        *,
        step: int,
        validation_accuracy: float,
        validation_loss: float,
        parameters: int,
        fossilized_seeds: int,
    ) -> None:
        """The run's final evaluation (after the last epoch, once the lifecycles were ended)."""
        run = self._run
        self.step.labels(run).set(step)
        self.accuracy.labels(run).set(validation_accuracy)
        self.loss.labels(run).set(validation_loss)
        self.parameters.labels(run).set(parameters)
        self.fossilized_seeds.labels(run).set(fossilized_seeds)
