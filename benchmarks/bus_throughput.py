"""Oona throughput: publish -> consume -> ack, our Redis backend against raw redis-py, and the embedded bus.

One run starts a private `redis-server` (loopback, no persistence) and measures, batch by batch:
- `oona_redis`: `RedisBus.publish_many` (pipelined XADD with MAXLEN ~), `consume` (XREADGROUP) and `ack`
  (XACK) of the same batch, envelopes serialised and parsed on the way;
- `raw_redis`: a redis-py loop sending the same commands with the same batch size and client settings,
  on pre-serialised bytes (no protobuf at all: the strictest baseline);
- `embedded`: `EmbeddedBus` with the same batch size (one durable transaction per call).
Each side runs `--rounds` times, alternating, and the median round counts (the machine is shared). Batch
size 1 is measured too, for reference. The last line of stdout is one JSON object with every figure.

    .venv/bin/python benchmarks/bus_throughput.py [--messages 20000] [--batch 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper.leyline import load_settings, pb
from esper.oona import Bus, EmbeddedBus, OonaSettings, RedisBus, envelope_for
from esper.oona.local_redis import LocalRedisServer

GROUP = "bench"


def sample_envelope(number: int) -> pb.BusEnvelope:
    """A field report of realistic size (about 200 bytes) in its envelope."""
    report = pb.FieldReport(
        report_id=f"report-{number:08d}",
        command_id=f"command-{number:08d}",
        training_run_id="benchmark-run",
        seed_id="seed-3",
        blueprint_id="bottleneck",
        outcome=pb.FIELD_REPORT_OUTCOME_SUCCESS,
        observation_window_epochs=3,
        tamiyo_policy_version="v12",
    )
    report.metrics["accuracy_delta"] = 0.0123
    report.metrics["loss_delta"] = -0.042
    report.issued_at.FromNanoseconds(1_700_000_000_000_000_000 + number)
    return envelope_for(report, trace_id=f"trace-{number}")


def run_bus(bus: Bus, stream: str, envelopes: list[pb.BusEnvelope], batch: int) -> float:
    """Messages per second through publish -> consume -> ack on `bus`."""
    bus.ensure_group(stream, GROUP)
    done = 0
    start = time.perf_counter()
    for offset in range(0, len(envelopes), batch):
        bus.publish_many(stream, envelopes[offset : offset + batch])
        deliveries = bus.consume(stream, GROUP, "c", count=batch)
        bus.ack(stream, GROUP, [d.message_id for d in deliveries])
        done += len(deliveries)
    elapsed = time.perf_counter() - start
    if done != len(envelopes):
        raise RuntimeError(f"{stream}: consumed {done} of {len(envelopes)} messages")
    return done / elapsed


def run_raw(client: redis.Redis, stream: str, bodies: list[bytes], batch: int, maxlen: int) -> float:
    """The same commands as `RedisBus`, straight through redis-py."""
    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    done = 0
    start = time.perf_counter()
    for offset in range(0, len(bodies), batch):
        pipe = client.pipeline(transaction=False)
        for body in bodies[offset : offset + batch]:
            pipe.xadd(stream, {b"e": body}, maxlen=maxlen, approximate=True)
        pipe.execute()
        response: Any = client.xreadgroup(GROUP, "c", {stream: ">"}, count=batch)
        message_ids = [message_id for _, entries in response for message_id, _ in entries]
        client.xack(stream, GROUP, *message_ids)
        done += len(message_ids)
    elapsed = time.perf_counter() - start
    if done != len(bodies):
        raise RuntimeError(f"{stream}: consumed {done} of {len(bodies)} messages")
    return done / elapsed


def median_of(rounds: int, measure: Callable[[int], float]) -> tuple[float, list[float]]:
    """Run `measure(round)` `rounds` times; median and every figure."""
    figures = [measure(r) for r in range(rounds)]
    return statistics.median(figures), figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--single-messages", type=int, default=2_000, help="messages for the batch-1 runs")
    args = parser.parse_args()

    settings = load_settings(OonaSettings, environ={})
    envelopes = [sample_envelope(n) for n in range(args.messages)]
    bodies = [envelope.SerializeToString(deterministic=True) for envelope in envelopes]
    singles = envelopes[: args.single_messages]
    results: dict[str, object] = {
        "messages": args.messages,
        "batch": args.batch,
        "rounds": args.rounds,
        "envelope_bytes": len(bodies[0]),
    }
    with tempfile.TemporaryDirectory() as tmp, LocalRedisServer(Path(tmp) / "redis") as server:
        ours = RedisBus(server.url, settings)
        raw = redis.Redis.from_url(
            server.url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        oona_rounds: list[float] = []
        raw_rounds: list[float] = []
        for r in range(args.rounds):
            raw_rounds.append(run_raw(raw, f"raw.{r}", bodies, args.batch, settings.maxlen))
            oona_rounds.append(run_bus(ours, f"oona.{r}", envelopes, args.batch))
        single_oona = run_bus(ours, "oona.single", singles, 1)
        single_raw = run_raw(raw, "raw.single", bodies[: args.single_messages], 1, settings.maxlen)
        ours.close()
        raw.close()

        embedded = EmbeddedBus(Path(tmp) / "bus.sqlite3", settings)
        embedded_rate, embedded_rounds = median_of(
            args.rounds, lambda r: run_bus(embedded, f"embedded.{r}", envelopes, args.batch)
        )
        embedded_single = run_bus(embedded, "embedded.single", singles[:500], 1)
        embedded.close()

    oona_rate, raw_rate = statistics.median(oona_rounds), statistics.median(raw_rounds)
    results.update(
        {
            "oona_redis_msgs_per_s": round(oona_rate),
            "raw_redis_msgs_per_s": round(raw_rate),
            "redis_ratio": round(oona_rate / raw_rate, 3),
            "oona_redis_rounds": [round(x) for x in oona_rounds],
            "raw_redis_rounds": [round(x) for x in raw_rounds],
            "embedded_msgs_per_s": round(embedded_rate),
            "embedded_rounds": [round(x) for x in embedded_rounds],
            "oona_redis_batch1_msgs_per_s": round(single_oona),
            "raw_redis_batch1_msgs_per_s": round(single_raw),
            "redis_batch1_ratio": round(single_oona / single_raw, 3),
            "embedded_batch1_msgs_per_s": round(embedded_single),
            "targets": {"redis_ratio": 0.8, "embedded_msgs_per_s": 5000},
        }
    )
    print(
        f"redis: oona {oona_rate:,.0f} msg/s vs raw {raw_rate:,.0f} msg/s "
        f"(ratio {oona_rate / raw_rate:.3f}); embedded {embedded_rate:,.0f} msg/s (batch {args.batch})"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
