"""Cluster-wide metrics kept in Redis, so one scrape of the API's /metrics sees every worker.

Workers run on other machines and in short-lived pool processes, where a
per-process Prometheus endpoint is awkward to scrape. Instead each worker process
adds its observations to Redis hashes, one pipelined round trip every
``FLUSH_INTERVAL_S`` (worker.runtime), and the API's collector (api/metrics.py)
turns those hashes into Prometheus counters and histograms. Counters live as long
as Redis keeps them; Prometheus treats a drop to zero as a counter reset.

``jobs_finished`` is not the same number as the database's ``imgclf_jobs`` gauge
(api/metrics.py, counters kept by triggers): that one says how many jobs exist in each
status now, and falls when retention purges them; this one counts what the workers
finished, so its rate is the throughput, whatever was purged or canceled since.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Iterable

import redis

from shared.config import Config

#: How often a worker process sends what its batches recorded. Per batch, the flush
#: (about 16 HINCRBYFLOATs in a pipeline) cost the worker 0.49 CPU ms, a lot where
#: batches are small (waiting clients); a scrape comes every 15 s or so, so a second's
#: lag is unseen (docs/benchmarks.md, session 12).
FLUSH_INTERVAL_S = 1.0

# name -> (kind, help, buckets); buckets only for histograms.
METRICS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "batch_size": ("histogram", "Images per forward pass", (1, 2, 4, 8, 16, 32, 64, 128)),
    "model_forward_seconds": (
        "histogram",
        "Model forward pass time per batch",
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    ),
    "image_fetch_seconds": (
        "histogram",
        "Time to fetch or read one image",
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    ),
    "image_fetch_failures": ("counter", "Images that could not be used, by error code", ()),
    "jobs_finished": ("counter", "Jobs the workers finished, by final status", ()),
    "webhook_deliveries": ("counter", "Webhook delivery attempts, by outcome", ()),
    "bookkeeping_cpu_seconds": (
        "counter",
        "Worker thread CPU seconds spent claiming, writing and announcing jobs, by step",
        (),
    ),
}


def _key(config: Config, name: str) -> str:
    return f"{config.queue_prefix}:metrics:{name}"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class MetricsBuffer:
    """Observations gathered during one unit of work, sent to Redis in one pipeline."""

    def __init__(self) -> None:
        self._incr: dict[tuple[str, str], float] = defaultdict(float)
        self._lock = threading.Lock()  # image loads record from several threads

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._incr[(name, _labels(labels) + "|count")] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = METRICS[name][2]
        bucket = next((b for b in buckets if value <= b), math.inf)
        base = _labels(labels)
        with self._lock:
            self._incr[(name, f"{base}|le={bucket}")] += 1
            self._incr[(name, f"{base}|sum")] += value
            self._incr[(name, f"{base}|count")] += 1

    def merge(self, other: MetricsBuffer) -> None:
        """Add ``other``'s observations to this buffer's (a message's load joins its batch's)."""
        with other._lock:
            taken = dict(other._incr)
        with self._lock:
            for key, amount in taken.items():
                self._incr[key] += amount

    def flush(self, client: redis.Redis, config: Config) -> None:
        with self._lock:
            pending, self._incr = self._incr, defaultdict(float)
        if not pending:
            return
        pipe = client.pipeline(transaction=False)
        for (name, field), amount in pending.items():
            pipe.hincrbyfloat(_key(config, name), field, amount)
        pipe.execute()


def read(client: redis.Redis, config: Config) -> dict[str, dict[str, float]]:
    """Every metric's hash, decoded: {name: {field: value}}."""
    pipe = client.pipeline(transaction=False)
    for name in METRICS:
        pipe.hgetall(_key(config, name))
    out = {}
    for name, raw in zip(METRICS, pipe.execute(), strict=True):
        out[name] = {k.decode(): float(v) for k, v in raw.items()}
    return out


def parse_field(field: str) -> tuple[dict[str, str], str]:
    """'model=mobilenet|le=0.1' -> ({'model': 'mobilenet'}, 'le=0.1')."""
    labels_part, _, suffix = field.rpartition("|")
    labels = dict(p.split("=", 1) for p in labels_part.split(",") if p)
    return labels, suffix


def histogram_series(
    fields: dict[str, float], buckets: Iterable[float]
) -> dict[tuple[tuple[str, str], ...], tuple[list[tuple[str, float]], float]]:
    """Per label set: cumulative buckets [(le, count)] including +Inf, and the sum."""
    per: dict[tuple[tuple[str, str], ...], dict[str, float]] = defaultdict(dict)
    for field, value in fields.items():
        labels, suffix = parse_field(field)
        per[tuple(sorted(labels.items()))][suffix] = value
    result = {}
    for label_set, values in per.items():
        running, cumulative = 0.0, []
        for bound in (*buckets, math.inf):
            running += values.get(f"le={bound}", 0.0)
            cumulative.append(("+Inf" if bound == math.inf else str(bound), running))
        result[label_set] = (cumulative, values.get("sum", 0.0))
    return result
