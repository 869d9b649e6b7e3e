"""Retention soak: with one minute kept, the database stops growing after a few minutes.

A real stack (the API under gunicorn, a classification worker whose retention thread
purges, the webhook worker, PostgreSQL, Redis) takes work without pause for
``DURATION_S``: single URL jobs, each with an ``Idempotency-Key`` and every fourth
with a webhook to a local receiver, and a 20-URL batch every 10 s. Retention keeps one
minute (``RETENTION_DAYS`` = 60/86400, ``RETENTION_INTERVAL_S=10``, and
``IDEMPOTENCY_TTL_S=60``). Every ``SAMPLE_S`` it records the rows and
``pg_total_relation_size`` (table, indexes and TOAST) of the purged tables, and of the
ledger, which is kept by design and grows with every charge.

The verdict: after ``WARMUP_S``, the purged tables' total size stays within 10 % of its
value at the end of the warm-up. VACUUM makes deleted rows' space reusable (the files
are not shrunk, so what is measured is that they stop growing). Production keeps
PostgreSQL's autovacuum on (its default); where the server has it off, as the test
machine's PostgreSQL does, the soak runs a plain ``VACUUM`` of the purged tables every
``VACUUM_EVERY_S``, as autovacuum would (its naptime is one minute), and says so.

    .venv/bin/python -m bench.retention_soak [--quick] [--json PATH]
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import requests

from bench.common import ServiceStack, machine, main_json
from harness import processes
from harness.webhook_receiver import Receiver

PURGED = ("jobs", "batches", "webhook_events", "webhook_attempts", "idempotency_keys")
KEPT = ("token_ledger",)
SINGLES_PER_S = 8
BATCH_EVERY_S = 10
BATCH_URLS = 20
WEBHOOK_EVERY = 4  # one single job in four asks for a webhook
SAMPLE_S = 15
DURATION_S, WARMUP_S = 480, 180
QUICK_DURATION_S, QUICK_WARMUP_S = 150, 90
FLAT_WITHIN = 0.10
VACUUM_EVERY_S = 60


def _sizes(dsn: str) -> dict[str, dict[str, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        out = {}
        for table in PURGED + KEPT:
            rows = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            size = conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0]
            out[table] = {"rows": rows, "bytes": size}
        return out


def _autovacuum(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SHOW autovacuum").fetchone()[0] == "on"


def _vacuum(dsn: str) -> None:
    """What autovacuum does: mark deleted rows' space reusable (no lock on reads or writes)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in PURGED:
            conn.execute(f"VACUUM {table}")


def _drive(stack: ServiceStack, user: dict, hook: str, stop: threading.Event, sent: dict):
    """Submit at a steady pace until ``stop``; counts what was accepted and what was not."""
    session = requests.Session()
    base, n, next_batch = stack.api.url, 0, time.monotonic()
    start = time.monotonic()
    while not stop.is_set():
        n += 1
        body = {"url": stack.urls(1, f"s{n}")[0]}
        if n % WEBHOOK_EVERY == 0:
            body["webhook"] = hook
        headers = {**user["headers"], "Idempotency-Key": uuid.uuid4().hex}
        resp = session.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=30)
        sent["jobs" if resp.status_code == 202 else "refused"] += 1
        if time.monotonic() >= next_batch:
            next_batch += BATCH_EVERY_S
            text = "\n".join(stack.urls(BATCH_URLS, f"b{n}"))
            ok = stack.post_batch(user, text).status_code == 202
            sent["batches" if ok else "refused"] += 1
        # Paced, not closed-loop: the arrival rate stays what it is whatever the latency.
        stop.wait(max(0.0, start + n / SINGLES_PER_S - time.monotonic()))


def run(quick: bool = False) -> dict:
    duration, warmup = (QUICK_DURATION_S, QUICK_WARMUP_S) if quick else (DURATION_S, WARMUP_S)
    overrides = {
        "retention_days": 60 / 86400,
        "retention_interval_s": 10.0,
        "idempotency_ttl_s": 60,
        "webhook_backoff_s": ("0", "1", "2"),
    }
    tokens = int(duration * (SINGLES_PER_S + BATCH_URLS / BATCH_EVERY_S) * 1.5) + 100
    with Receiver() as receiver, ServiceStack(**overrides) as stack:
        webhooks = processes.WebhookWorkerProcess(stack.config).start()
        try:
            webhooks.wait_ready()
            user = stack.user(tokens)
            sent = {"jobs": 0, "batches": 0, "refused": 0}
            stop = threading.Event()
            driver = threading.Thread(
                target=_drive, args=(stack, user, receiver.url(), stop, sent), daemon=True
            )
            autovacuum = _autovacuum(stack.dsn)
            samples, t0, vacuumed, restarts = [], time.monotonic(), time.monotonic(), 0
            driver.start()
            while (elapsed := time.monotonic() - t0) < duration:
                if webhooks.proc.poll() is not None:  # stopped from outside: noted, restarted
                    restarts += 1
                    webhooks.start().wait_ready()
                if not autovacuum and time.monotonic() - vacuumed >= VACUUM_EVERY_S:
                    _vacuum(stack.dsn)
                    vacuumed = time.monotonic()
                samples.append({"t_s": round(elapsed), **_sizes(stack.dsn)})
                time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - t0 - elapsed)))
            stop.set()
            driver.join(60)
            samples.append({"t_s": round(time.monotonic() - t0), **_sizes(stack.dsn)})
        finally:
            webhooks.stop()
    return {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "duration_s": duration,
        "warmup_s": warmup,
        "sent": sent,
        "webhooks_received": len(receiver.received),
        "webhook_worker_restarts": restarts,
        "autovacuum": autovacuum,
        "samples": samples,
        "verdict": verdict(samples, warmup),
    }


def purged_bytes(sample: dict) -> int:
    return sum(sample[t]["bytes"] for t in PURGED)


def verdict(samples: list[dict], warmup: float) -> dict:
    """The purged tables' size after the warm-up, against its value when the warm-up ended."""
    steady = [s for s in samples if s["t_s"] >= warmup]
    if not steady:
        return {"flat": False, "reason": "no sample after the warm-up"}
    base = purged_bytes(steady[0])
    sizes = [purged_bytes(s) for s in steady]
    spread = (max(sizes) - base) / base if base else 0.0
    return {
        "base_bytes": base,
        "max_bytes": max(sizes),
        "end_bytes": sizes[-1],
        "growth_after_warmup": spread,
        "flat": spread <= FLAT_WITHIN,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def report(result: dict) -> str:
    lines = [
        f"Retention soak, {result['duration_s']} s, {result['date']}, {result['machine']}.",
        f"Accepted {result['sent']['jobs']} single jobs and {result['sent']['batches']} "
        f"batches of {BATCH_URLS} URLs ({result['sent']['refused']} refused); "
        f"{result['webhooks_received']} webhooks delivered"
        f" (webhook worker restarted {result['webhook_worker_restarts']} times). "
        + (
            "Autovacuum on."
            if result["autovacuum"]
            else f"Autovacuum off on this server: VACUUM every {VACUUM_EVERY_S} s by the soak."
        ),
        "",
        "| t (s) | jobs rows | batches | webhook events | attempts | idempotency | "
        "purged tables MB | ledger rows | ledger MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["samples"]:
        lines.append(
            f"| {s['t_s']} | {s['jobs']['rows']} | {s['batches']['rows']} | "
            f"{s['webhook_events']['rows']} | {s['webhook_attempts']['rows']} | "
            f"{s['idempotency_keys']['rows']} | {_mb(purged_bytes(s))} | "
            f"{s['token_ledger']['rows']} | {_mb(s['token_ledger']['bytes'])} |"
        )
    v = result["verdict"]
    if "base_bytes" in v:
        lines += [
            "",
            f"After the {result['warmup_s']} s warm-up the purged tables took "
            f"{_mb(v['base_bytes'])} MB, at most {_mb(v['max_bytes'])} MB after that and "
            f"{_mb(v['end_bytes'])} MB at the end: {100 * v['growth_after_warmup']:+.1f} % "
            f"at the most ({'flat' if v['flat'] else 'NOT flat'}: the target is within "
            f"{100 * FLAT_WITHIN:.0f} %).",
        ]
    else:
        lines += ["", f"No verdict: {v['reason']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
