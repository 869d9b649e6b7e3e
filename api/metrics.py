"""GET /metrics: the API's own request metrics plus cluster-wide ones.

Request counts and latencies are this process's (with gunicorn's several
workers, set PROMETHEUS_MULTIPROC_DIR and prometheus-client aggregates them).
Everything else is read at scrape time: job counts and token totals from the
counters the database keeps as rows change (``read_counters``; no scrape counts
the jobs table), queue depths from the broker, and worker observations (batch
sizes, forward time, fetches, webhook deliveries) from the Redis hashes the
workers write (shared/metrics.py).
"""

from __future__ import annotations

import hmac
import logging
import os
import time

from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from api.services import Services
from shared import metrics
from shared.db import read_only
from shared.errors import Forbidden, Unauthorized
from shared.models import Counter as CounterRow
from shared.queue import bulk_queue, interactive_queue, queue_depth, webhook_queue
from shared.status import JobStatus

log = logging.getLogger(__name__)

# Label values must come from a bounded set: any method name a client sends would
# otherwise become a new series in every process (2,000 made /metrics 1 MB).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
REQUESTS = Counter("imgclf_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "imgclf_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class ClusterCollector:
    """Collects, at scrape time, what no single process holds."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self):
        yield from self._sql()
        yield from self._queues()
        yield from self._worker_metrics()

    def _sql(self):
        jobs = GaugeMetricFamily("imgclf_jobs", "Jobs by status", labels=["status"])
        tokens = CounterMetricFamily(
            "imgclf_tokens", "Tokens moved, by ledger reason", labels=["reason"]
        )
        try:
            with self.svc.sessions() as session:
                counts = read_counters(session)
        except Exception as exc:  # a scrape reports what it can
            log.warning("metrics: database unavailable: %r", exc)
            return
        # Every status, 0 included: a series that vanished would look stale, not empty.
        by_status = dict.fromkeys([s.value for s in JobStatus], 0) | counts.get("jobs", {})
        for status, n in sorted(by_status.items()):
            jobs.add_metric([status], n)
        for reason, total in sorted(counts.get("tokens", {}).items()):
            tokens.add_metric([reason], abs(total))
        yield jobs
        yield tokens

    def _queues(self):
        depth = GaugeMetricFamily(
            "imgclf_queue_depth", "Messages waiting in a queue", labels=["queue"]
        )
        config = self.svc.config
        try:
            for queue in (interactive_queue(config), bulk_queue(config), webhook_queue(config)):
                # Asked of the broker: RabbitMQ, or a Redis other than REDIS_URL.
                depth.add_metric([queue], queue_depth(self.svc.celery, [queue]))
        except Exception as exc:
            log.warning("metrics: broker unavailable: %r", exc)
            return
        yield depth

    def _worker_metrics(self):
        try:
            data = metrics.read(self.svc.redis, self.svc.config)
        except Exception as exc:
            log.warning("metrics: redis unavailable: %r", exc)
            return
        for name, (kind, help_text, buckets) in metrics.METRICS.items():
            fields = data.get(name, {})
            if kind == "histogram":
                yield self._histogram(name, help_text, buckets, fields)
            else:
                yield self._counter(name, help_text, fields)

    @staticmethod
    def _histogram(name, help_text, buckets, fields):
        series = metrics.histogram_series(fields, buckets)
        label_names = sorted({k for labels in series for k, _ in labels})
        family = HistogramMetricFamily(f"imgclf_{name}", help_text, labels=label_names)
        for labels, (cumulative, total) in series.items():
            values = dict(labels)
            family.add_metric([values.get(k, "") for k in label_names], cumulative, total)
        return family

    @staticmethod
    def _counter(name, help_text, fields):
        parsed = [(metrics.parse_field(f)[0], v) for f, v in fields.items()]
        label_names = sorted({k for labels, _ in parsed for k in labels})
        family = CounterMetricFamily(f"imgclf_{name}", help_text, labels=label_names)
        for labels, value in parsed:
            family.add_metric([labels.get(k, "") for k in label_names], value)
        return family


def read_counters(session: Session) -> dict[str, dict[str, int]]:
    """{metric: {label: value}} from the counters table (migration 0009): jobs by status,
    the ledger's sum by reason. Exact as of one snapshot; costs a few dozen rows however
    many jobs there are. On PostgreSQL the deltas written since the last fold are folded
    first, in a transaction of their own (skipped if another fold is running)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT imgclf_counters_fold()"))
        session.commit()
    read_only(session)  # SQLite: a snapshot, never queued behind a 10,000-line submission
    rows = session.execute(
        select(CounterRow.metric, CounterRow.label, func.sum(CounterRow.n)).group_by(
            CounterRow.metric, CounterRow.label
        )
    )
    out: dict[str, dict[str, int]] = {}
    for metric, label, total in rows:
        out.setdefault(metric, {})[label] = int(total)
    return out


def init_metrics(app: Flask, svc: Services) -> None:
    registry = CollectorRegistry()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REQUESTS)
        registry.register(LATENCY)
    registry.register(ClusterCollector(svc))

    @app.before_request
    def _start_timer() -> None:
        g.metrics_start = time.perf_counter()

    @app.after_request
    def _record(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in KNOWN_METHODS else "other"
        start = g.get("metrics_start")
        if start is not None:
            LATENCY.labels(method, route).observe(time.perf_counter() - start)
        REQUESTS.labels(method, route, str(response.status_code)).inc()
        return response

    app.extensions["imgclf_metrics"] = registry


LOOPBACK = ("127.", "::1", "::ffff:127.")


def metrics_response() -> Response:
    """The metrics, for a caller allowed to read them (``check_scraper``)."""
    check_scraper(current_app.extensions["imgclf"].config.metrics_token)
    registry = current_app.extensions["imgclf_metrics"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def check_scraper(token: str) -> None:
    """/metrics shows token totals and queue depths: never to the public.

    With ``METRICS_TOKEN`` set, the caller must send it as a Bearer token (Prometheus'
    ``authorization: credentials_file``). Without it, only a request made on this
    machine straight to the API: from a loopback address and not through a proxy
    (a proxied request carries X-Forwarded-For, and a proxy on this machine would
    otherwise make every client look local).
    """
    if token:
        scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
        # Compared as bytes: compare_digest refuses non-ASCII str.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            sent.strip().encode(), token.encode()
        ):
            raise Unauthorized(
                "Send the metrics token as 'Authorization: Bearer <METRICS_TOKEN>'.",
                code="metrics_token_required",
            )
        return
    direct = request.environ.get("werkzeug.proxy_fix.orig", request.environ)
    address = direct.get("REMOTE_ADDR") or ""
    if not address.startswith(LOOPBACK) or "X-Forwarded-For" in request.headers:
        raise Forbidden(
            "/metrics answers only this machine; set METRICS_TOKEN to scrape it from another.",
            code="metrics_forbidden",
        )
