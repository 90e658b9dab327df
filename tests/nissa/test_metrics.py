"""Nissa's metrics: served over HTTP while a process runs, written as a snapshot when it ends."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from esper.leyline import EsperError
from esper.leyline.settings import load_settings
from esper.nissa import MetricsServer, MetricsServerError, NissaSettings, RunMetrics, write_snapshot


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _run_metrics(registry: CollectorRegistry) -> RunMetrics:
    metrics = RunMetrics(registry, "run-1")
    metrics.observe(
        epoch=3,
        step=60,
        validation_accuracy=0.91,
        validation_loss=0.3,
        parameters=1234,
        active_seeds=1,
        fossilized_seeds=2,
    )
    return metrics


def test_the_server_exposes_the_registry_and_frees_its_port_when_closed() -> None:
    registry = CollectorRegistry()
    _run_metrics(registry)
    decisions = Counter("tamiyo_decisions", "Commands issued", ["action"], registry=registry)
    decisions.labels("WAIT").inc(4)
    with MetricsServer(registry, 0) as server:
        assert server.port > 0
        body = urllib.request.urlopen(server.url, timeout=5).read().decode()
    samples = _samples(body)
    assert samples[("esper_run_validation_accuracy", (("run", "run-1"),))] == pytest.approx(0.91)
    assert samples[("esper_run_parameters", (("run", "run-1"),))] == 1234
    assert samples[("tamiyo_decisions_total", (("action", "WAIT"),))] == 4
    with socket.socket() as probe:  # nothing listens any more (the scrape's own socket may be in TIME_WAIT)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.port))
        probe.listen()


def test_a_taken_port_is_a_typed_error_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsServerError, match=f"127.0.0.1:{port}") as caught:
            MetricsServer(CollectorRegistry(), port)
    assert isinstance(caught.value, EsperError)


def test_the_snapshot_is_the_registry_in_text_format(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    _run_metrics(registry)
    path = write_snapshot(registry, tmp_path / "run" / "metrics.prom")
    samples = _samples(path.read_text())
    assert samples[("esper_run_epoch", (("run", "run-1"),))] == 3
    assert samples[("esper_run_fossilized_seeds", (("run", "run-1"),))] == 2
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind


@pytest.mark.parametrize("value", ["-1", "70000", "port"])
def test_a_bad_port_fails_at_start_naming_the_variable(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NISSA_METRICS_PORT", value)
    with pytest.raises(EsperError, match="NISSA_METRICS_PORT"):
        load_settings(NissaSettings)
