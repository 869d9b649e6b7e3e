"""What the service's bookkeeping costs per image, outside loading and the forward pass
(issue #22).

Two parts:

* ``steps``: the worker's claim, write and announce called in this process, on a
  fresh PostgreSQL database and Redis, at batch sizes 1 and 32: CPU ms of this
  process (thread CPU) and of the PostgreSQL backend per batch, wall ms per batch.
  No Celery, no model, no images: the SQL and Redis work alone.
* ``service``: the whole service on the null model (``RUNTIME=null``), bulk and
  singles with ``Prefer: wait`` (bench.null_model's scenarios) plus one user with 16
  waiting clients (past MAX_WAITS_PER_USER), CPU ms per image per process from /proc,
  and the API's and the worker's by thread (``bench.common.ThreadCpuMeter``). Beside
  them, two floors on the same stack: the HTTP floor (bench/floor_app.py: gunicorn and
  Flask alone) and the glue floor (bench/glue.py: the leanest Flask + Celery glue that
  charges, queues, claims, writes and answers a waiting client, with none of the
  service's other work; bare, then with the service's rate limit and caps on waits,
  then with those and batching, then that on the service's own tables and statements):
  what the same packages, and the service's data model, cost for the same steps on the
  same machine.

``python -m bench.bookkeeping [--quick] [--json PATH]``. The machine may be shared:
numbers are as measured.
"""

from __future__ import annotations

import time

from bench.common import after_next_flush, cpu_seconds, fmt, main_json, median, pids_matching
from bench.latency import lone, lone_stages
from harness import databases, stack_config

STEP_SIZES = (1, 32)
STEP_BATCHES = 200  # per size (quick: 20)


def _user_and_jobs(session, n: int) -> tuple[int, list[str]]:
    """A user and ``n`` queued jobs, charged, built and inserted as the service does."""
    from harness.accounts import add_account
    from shared import jobs, ledger
    from shared.models import new_id, utcnow

    user = add_account(session, n, prefix="b")
    ids, now = [new_id() for _ in range(n)], utcnow()
    rows = [
        jobs.new_row(
            user_id=user.id,
            model="mobilenet",
            top_k=5,
            id=j,
            input_url=f"http://photos.invalid/{j}.jpg",
            created_at=now,
        )
        for j in ids
    ]
    ledger.charge_jobs(session, user.id, ids)
    jobs.insert_new(session, rows)
    session.commit()
    return user.id, ids


def _backend_cpu(db_name: str) -> float:
    return sum(cpu_seconds(p) for p in pids_matching(f" {db_name} "))


def steps(quick: bool = False) -> dict:
    """claim / write / announce per batch, in this process (see the module docstring)."""
    import redis
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from shared.db import make_engine, make_session_factory
    from shared.events import publish_done
    from worker import pipeline

    batches = 20 if quick else STEP_BATCHES
    url = databases.create_postgres_database()
    config = databases.migrated(stack_config.test_config(url))
    engine = make_engine(config)
    sessions = make_session_factory(engine)
    client = redis.Redis.from_url(config.redis_url)
    db_name = make_url(url).database
    out = {}
    try:
        for size in STEP_SIZES:
            with sessions() as s:
                _, ids = _user_and_jobs(s, size * (batches + 5))
                # What autovacuum does in a deployment (this machine's PostgreSQL may run
                # without it): without statistics, the plans cached while the table was
                # small seq-scan it for each claim, and batch 32's PostgreSQL CPU read
                # 2.9 ms where it is 1.2 (issue #22, session 16).
                s.execute(text("ANALYZE jobs"))
                s.commit()
            groups = [ids[i : i + size] for i in range(0, len(ids), size)]
            for g in groups[:5]:  # warm-up: statement caches, connections
                _one_batch(pipeline, sessions, client, config, g, publish_done)
            cpu = {"claim": 0.0, "write": 0.0, "announce": 0.0}
            wall = {"claim": [], "write": [], "announce": []}
            pg_before = _backend_cpu(db_name)
            for g in groups[5:]:
                for step, (c, w) in _one_batch(
                    pipeline, sessions, client, config, g, publish_done
                ).items():
                    cpu[step] += c
                    wall[step].append(w)
            pg = _backend_cpu(db_name) - pg_before
            n = len(groups) - 5
            out[str(size)] = {
                "batches": n,
                "cpu_ms_per_batch": {k: 1000 * v / n for k, v in cpu.items()},
                "wall_ms_per_batch_p50": {k: 1000 * median(v) for k, v in wall.items()},
                "postgres_cpu_ms_per_batch": 1000 * pg / n,
            }
    finally:
        engine.dispose()
        databases.delete_redis_prefix(config.queue_prefix)
        databases.drop_postgres_database(url)
    return out


def _timed(fn):
    c, w = time.thread_time(), time.perf_counter()
    result = fn()
    return result, (time.thread_time() - c, time.perf_counter() - w)


def _one_batch(pipeline, sessions, client, config, ids, publish_done) -> dict:
    def claim():
        with sessions() as s:
            return pipeline.claim(s, ids, "bench")

    (rows, _events), t_claim = _timed(claim)
    outcomes = [
        pipeline.JobOutcome(r, predictions=[{"label": "macaw", "score": 0.9}]) for r in rows
    ]

    def write():
        with sessions() as s:
            return pipeline.write(s, outcomes)

    written, t_write = _timed(write)
    _, t_announce = _timed(lambda: publish_done(client, config, ids, written.bodies))
    return {"claim": t_claim, "write": t_write, "announce": t_announce}


# --- the whole service on the null model ---------------------------------------------

SERVICE_JOBS = 1000
CLIENTS = 16
#: Rounds of the service with wait, then the glue on its own data, one after the other:
#: this host's speed drifts by up to 30 % within minutes, so each pair is compared.
PAIRED_ROUNDS = 3
LONE_REQUESTS = 100
# The stages whose CPU is bookkeeping: loading (loader processes), the photo server and
# the benchmark's own clients are not.
BOOKKEEPING_GROUPS = ("api", "worker", "postgres", "redis")


def _steps_cpu(stack) -> dict[str, float]:
    """The worker's bookkeeping counter (worker.pipeline.BOOKKEEPING), seconds by step."""
    import redis

    after_next_flush()
    client = redis.Redis.from_url(stack.config.redis_url)
    raw = client.hgetall(f"{stack.config.queue_prefix}:metrics:bookkeeping_cpu_seconds")
    out = {}
    for field, value in raw.items():
        labels = dict(p.split("=", 1) for p in field.decode().split("|")[0].split(",") if p)
        out[labels.get("step", "?")] = float(value)
    return out


def _measured(stack, n: int, body) -> dict:
    """Run ``body() -> dict`` (with 'succeeded'), CPU per image by group and worker step."""
    from bench.common import CpuMeter, ThreadCpuMeter

    steps_before = _steps_cpu(stack)
    threads = ThreadCpuMeter({"api": stack.api.worker_pids, "worker": stack.model_pids})
    threads.start()
    meter = CpuMeter(stack.cpu_groups()).start()
    out = body()
    cpu = meter.stop()
    by_thread = threads.stop()
    images = max(1, out["succeeded"])
    # By thread role (py-spy names them): where the API's and the worker's CPU goes,
    # every CPU second counted (a sampling profiler's leaves were noise at this grain).
    out["threads_ms_per_image"] = {
        k: 1000 * v / images for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1])
    }
    out["cpu_ms_per_image"] = {
        k: 1000 * v * cpu["wall_s"] / images for k, v in cpu["cores"].items()
    }
    after = _steps_cpu(stack)
    out["worker_steps_ms_per_image"] = {
        k: 1000 * (after[k] - steps_before.get(k, 0.0)) / images for k in after
    }
    out["bookkeeping_ms_per_image"] = sum(
        out["cpu_ms_per_image"].get(g, 0.0) for g in BOOKKEEPING_GROUPS
    )
    return out


def one_user_waiting(stack, n: int, honour_retry_after: bool) -> dict:
    """16 clients of ONE user (past MAX_WAITS_PER_USER), each submitting with
    ``Prefer: wait=60`` and polling ``?wait=60`` until its job ends, with client/api.py's
    Client: honouring Retry-After, or (the client before issue #22) polling at once."""
    import queue
    import threading

    from client.api import TERMINAL_JOB_STATUSES, Client

    user = stack.user(n + 2)
    todo: queue.Queue = queue.Queue()
    for url in stack.urls(n):
        todo.put(url)
    counts = {"ok": 0, "requests": 0}
    lock = threading.Lock()

    def client_loop() -> None:
        sleep = time.sleep if honour_retry_after else (lambda _s: None)
        api = Client(stack.api.url, user["key"], sleep=sleep)
        while True:
            try:
                url = todo.get_nowait()
            except queue.Empty:
                return
            job, sent = api.create_job_url(url, wait_s=60), 1
            while job["status"] not in TERMINAL_JOB_STATUSES:
                job, sent = api.get_job(job["id"], wait_s=60), sent + 1
            with lock:
                counts["requests"] += sent
                counts["ok"] += job["status"] == "succeeded"

    def body() -> dict:
        start = time.monotonic()
        threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        return {
            "scenario": "one user, 16 waiting clients",
            "honour_retry_after": honour_retry_after,
            "jobs": n,
            "succeeded": counts["ok"],
            "failed": n - counts["ok"],
            "requests_per_image": counts["requests"] / max(1, counts["ok"]),
            "wall_s": wall,
            "images_per_s": counts["ok"] / wall,
        }

    return _measured(stack, n, body)


def lone_requests(stack, n: int) -> dict:
    """One client, one job at a time with ``Prefer: wait=60``: latency of a lone request."""
    return {"scenario": "lone requests", **lone(stack, n)}


def http_floor(stack, n: int) -> dict:
    """bench/floor_app.py (views that do nothing) under the API's gunicorn settings, posted
    the same body by the same 16 clients: what gunicorn and Flask cost per request."""
    from bench.common import ApiProcess, CpuMeter, closed_loop

    floor = ApiProcess(stack.config, app="bench.floor_app:app").start()
    try:

        def call(session, url: str) -> bool:
            return session.post(f"{floor.url}/v1/jobs", json={"url": url}).status_code == 202

        urls = stack.urls(n)
        closed_loop(CLIENTS, urls[:64], call)  # warm-up
        meter = CpuMeter({"api": floor.pid}).start()
        driven = closed_loop(CLIENTS, urls, call)
        cpu = meter.stop()
    finally:
        floor.stop()
    ok = max(1, driven["ok"])
    return {
        "requests": driven["ok"],
        "failed": driven["failed"],
        "requests_per_s": driven["ok"] / driven["wall_s"],
        "cpu_ms_per_request": 1000 * cpu["cores"]["api"] * cpu["wall_s"] / ok,
    }


def glue_floor(stack, n: int, variant: str = "bare", lone_count: int = 0) -> dict:
    """bench/glue.py (the leanest Flask + Celery glue, as ``variant``: bare, guarded by the
    service's rate limit and caps on waits, or guarded and batching) on the same stack's
    database, Redis and photo URLs, driven as the service's singles with wait: 16 users
    with one waiting client each. CPU ms per image of its API, its worker, PostgreSQL and
    Redis; then ``lone_count`` requests one after another, as the service's lone requests."""
    import redis

    from bench import glue
    from bench.common import ApiProcess, CpuMeter, closed_loop
    from harness import waiting

    headers = glue.create_users(stack.db_url, CLIENTS, n, service=variant == "schema")
    app = "api" if variant == "bare" else variant
    api = ApiProcess(stack.config, app=f"bench.glue:{app}").start()
    worker = glue.GlueWorker(stack.config, name="glue").start()
    try:
        waiting.wait_for(lambda: " ready." in worker.log(), 90, "the glue worker")

        def call(session, item) -> bool:
            head, url = item
            resp = session.post(f"{api.url}/v1/jobs", json={"url": url}, headers=head)
            return resp.status_code == 200 and resp.json()["status"] == "succeeded"

        urls = stack.urls(n + 2 * CLIENTS)
        items = [(headers[i % CLIENTS], url) for i, url in enumerate(urls)]
        closed_loop(CLIENTS, items[: 2 * CLIENTS], call, lanes=True)  # warm-up
        groups = {"api": api.pid, "worker": worker.proc.pid}
        groups |= {"postgres": stack.pg_backends, "redis": lambda: pids_matching("redis-server")}
        stats = redis.Redis.from_url(stack.config.redis_url)
        stats.delete(glue.batch_stats_key(stack.config))  # the warm-up's batches
        meter = CpuMeter(groups).start()
        driven = closed_loop(CLIENTS, items[2 * CLIENTS :], call, lanes=True)
        cpu = meter.stop()
        batches = stats.hgetall(glue.batch_stats_key(stack.config))
        alone = _glue_lone(items[:lone_count], call)
    finally:
        worker.stop()
        api.stop()
    ok = max(1, driven["ok"])
    per_image = {k: 1000 * cpu["cores"][k] * cpu["wall_s"] / ok for k in groups}
    return {
        # Counted by the batching task only (the others run one job a task).
        "batches": {k.decode(): int(v) for k, v in batches.items()},
        "images": driven["ok"],
        "failed": driven["failed"],
        "images_per_s": driven["ok"] / driven["wall_s"],
        "cpu_ms_per_image": per_image,
        "bookkeeping_ms_per_image": sum(per_image.values()),
        "lone": alone,
    }


def _glue_lone(items: list, call) -> dict:
    """Requests one after another on one connection: submit to answer, with nothing
    else running (the URLs were answered before: only the latency matters here)."""
    import requests

    from bench.common import latency_summary

    if not items:
        return {}
    latencies = []
    with requests.Session() as session:
        for item in items:
            start = time.perf_counter()
            if not call(session, item):
                raise RuntimeError("a lone request to the glue failed")
            latencies.append(time.perf_counter() - start)
    return {"requests": len(items), **latency_summary(latencies)}


def _scenario(stack, n: int, run) -> dict:
    # bench.end_to_end's scenarios, re-measured here for the worker's step counter.
    return _measured(stack, n, lambda: {k: v for k, v in run().items() if k != "cpu_cores"})


def service(quick: bool = False) -> dict:
    from bench import end_to_end
    from bench.null_model import NullStack

    n = 48 if quick else SERVICE_JOBS
    lone_count = 20 if quick else LONE_REQUESTS
    with NullStack() as stack, stack.running(1, "1"):  # loading in a loader process
        end_to_end.singles(stack, 16, CLIENTS, wait=True)  # warm-up
        scenarios = {
            "bulk": _scenario(stack, n, lambda: end_to_end.bulk(stack, n)),
            "singles": _scenario(stack, n, lambda: end_to_end.singles(stack, n, CLIENTS, False)),
            "singles_wait": _scenario(
                stack, n, lambda: end_to_end.singles(stack, n, CLIENTS, wait=True)
            ),
            "one_user_spin": one_user_waiting(stack, n // 2, honour_retry_after=False),
            "one_user_retry_after": one_user_waiting(stack, n // 2, honour_retry_after=True),
            "lone": lone_requests(stack, lone_count),
            "http_floor": http_floor(stack, n),
            **{
                key: glue_floor(stack, n, variant, lone_count)
                for key, variant in (
                    ("glue_floor", "bare"),
                    ("guarded_glue", "guarded"),
                    ("batching_glue", "batching"),
                    ("schema_glue", "schema"),
                )
            },
            "paired": paired(stack, n, 1 if quick else PAIRED_ROUNDS),
        }
    return scenarios


def paired(stack, n: int, rounds: int) -> list[dict]:
    """The service's singles with wait, then the ``schema`` glue (the same steps on the
    service's own tables and statements), ``rounds`` times: CPU ms per image with wait
    of each, by process, measured minutes apart at most."""
    from bench import end_to_end

    out = []
    for _ in range(rounds):
        service = _scenario(stack, n, lambda: end_to_end.singles(stack, n, CLIENTS, wait=True))
        glue = glue_floor(stack, n, "schema")
        out.append(
            {
                name: {
                    "total": run["bookkeeping_ms_per_image"],
                    **{g: run["cpu_ms_per_image"].get(g, 0.0) for g in BOOKKEEPING_GROUPS},
                }
                for name, run in (("service", service), ("glue", glue))
            }
        )
    return out


def run(quick: bool = False) -> dict:
    return {"steps": steps(quick), "service": service(quick)}


def _breakdown(result: dict) -> list[str]:
    sc = result["service"]
    plain_api = sc["singles"]["cpu_ms_per_image"]["api"]
    lines = [
        "",
        "Null model (`RUNTIME=null`), one worker, one loader process; CPU ms per image by "
        "step (bookkeeping = API + worker + PostgreSQL + Redis; loading, photo server and "
        "clients left out):",
        "",
        "| step | bulk | singles, fire and forget | singles with wait |",
        "|---|---|---|---|",
    ]
    keys = ("bulk", "singles", "singles_wait")

    def row(label: str, value) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(value(sc[k])) for k in keys) + " |")

    row("API (all of it)", lambda s: s["cpu_ms_per_image"].get("api"))
    row(
        "  of which the wait and its wake-up (API with wait - fire and forget)",
        lambda s: s["cpu_ms_per_image"].get("api") - plain_api if s is sc["singles_wait"] else None,
    )
    row("worker process (all of it)", lambda s: s["cpu_ms_per_image"].get("worker"))
    for step in ("claim", "write", "announce"):
        row(f"  of which {step}", lambda s, step=step: s["worker_steps_ms_per_image"].get(step))
    row(
        "  of which Celery/kombu and the rest (per message)",
        lambda s: (
            s["cpu_ms_per_image"].get("worker")
            - sum(
                s["worker_steps_ms_per_image"].get(k, 0.0) for k in ("claim", "write", "announce")
            )
        ),
    )
    row("PostgreSQL", lambda s: s["cpu_ms_per_image"].get("postgres"))
    row("Redis", lambda s: s["cpu_ms_per_image"].get("redis"))
    row("**bookkeeping total**", lambda s: s["bookkeeping_ms_per_image"])
    row("(loader processes, not bookkeeping)", lambda s: s["cpu_ms_per_image"].get("loaders"))
    row("images/s", lambda s: s["images_per_s"])
    lines += [
        "",
        "One user, 16 clients waiting (`Prefer: wait=60`, then `?wait=60` until the end; "
        "MAX_WAITS_PER_USER 10):",
        "",
        "| client | images/s | requests per image | API CPU ms/image | bookkeeping CPU ms/image |",
        "|---|---|---|---|---|",
    ]
    for key, label in (
        ("one_user_spin", "polls again at once (before)"),
        ("one_user_retry_after", "honours Retry-After"),
    ):
        s = sc[key]
        lines.append(
            f"| {label} | {fmt(s['images_per_s'])} | {fmt(s['requests_per_image'])} "
            f"| {fmt(s['cpu_ms_per_image'].get('api'))} | {fmt(s['bookkeeping_ms_per_image'])} |"
        )
    lines += _by_thread(sc, keys)
    alone = sc["lone"]
    lines += [
        "",
        f"Lone requests (one client, `Prefer: wait=60`, {alone['jobs']} in a row): p50 "
        f"{fmt(alone['p50_ms'])} ms, p95 {fmt(alone['p95_ms'])} ms (no forward pass); "
        + lone_stages(alone),
    ]
    floor = sc["http_floor"]
    lines += [
        "",
        f"The HTTP floor (bench/floor_app.py: views that do nothing, under the API's "
        f"gunicorn.conf.py, the same body from {CLIENTS} clients): "
        f"{fmt(floor['cpu_ms_per_request'])} CPU ms per request in gunicorn and Flask, "
        f"against the API's {fmt(plain_api)} per submission fire and forget "
        f"({fmt(floor['requests_per_s'])} requests/s, {floor['failed']} failed).",
    ]
    return lines + _glue_floor(sc) + _paired(sc.get("paired", []))


def _paired(rounds: list[dict]) -> list[str]:
    if not rounds:
        return []
    lines = [
        "",
        "Side by side: the service with wait, then the glue on the service's tables and "
        f"statements, {len(rounds)} time(s) one after the other (CPU ms per image with wait; "
        "API / worker / PostgreSQL / Redis):",
        "",
        "| round | the service | the glue on the service's data | service ÷ glue |",
        "|---|---|---|---|",
    ]

    def cell(r: dict) -> str:
        parts = " / ".join(fmt(r[g]) for g in BOOKKEEPING_GROUPS)
        return f"**{fmt(r['total'])}** ({parts})"

    ratios = []
    for i, r in enumerate(rounds, 1):
        ratios.append(r["service"]["total"] / r["glue"]["total"])
        lines.append(f"| {i} | {cell(r['service'])} | {cell(r['glue'])} | {fmt(ratios[-1], 2)} |")
    lines.append(f"| median | | | **{fmt(median(ratios), 2)}** |")
    return lines


def _glue_floor(sc: dict) -> list[str]:
    lines = [
        "",
        f"Beside the glue floor (bench/glue.py: the leanest Flask + Celery glue for a waiting "
        f"client, one statement each to charge and insert, claim and write, a Celery message, "
        f"a Redis publish; {CLIENTS} users with one waiting client each), CPU ms per image "
        "with wait:",
        "",
        "| | API | worker | PostgreSQL | Redis | total | images/s | mean batch | over the floor "
        "| lone request p50 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    floor = sc["glue_floor"]["bookkeeping_ms_per_image"]
    for key, label in (
        ("singles_wait", "the service"),
        ("schema_glue", "the same on the service's tables and statements"),
        ("batching_glue", "the glue with the guards, batching (celery-batches)"),
        ("guarded_glue", "the glue with the service's rate limit and caps on waits"),
        ("glue_floor", "the glue floor"),
    ):
        s, cpu = sc[key], sc[key]["cpu_ms_per_image"]
        total = s["bookkeeping_ms_per_image"]
        alone = sc["lone"] if key == "singles_wait" else s.get("lone", {})
        lines.append(
            f"| {label} | {fmt(cpu.get('api'))} | {fmt(cpu.get('worker'))} "
            f"| {fmt(cpu.get('postgres'))} | {fmt(cpu.get('redis'))} | **{fmt(total)}** "
            f"| {fmt(s['images_per_s'])} | {fmt(_mean_batch(s))} "
            f"| {fmt(total / floor if floor else None, 2)}x "
            f"| {fmt(alone.get('p50_ms'))} ms |"
        )
    lines += [
        "",
        "Lone requests: one client, one request at a time. The service's also fetch and "
        "decode a photo (its claim-to-result stage, fetch, decode, batch and forward, took "
        f"{fmt(sc['lone']['stages_p50_ms'].get('to_result'))} ms at p50); a glue has "
        "nothing to load.",
    ]
    return lines


def _mean_batch(scenario: dict) -> float | None:
    # The service's from its worker's batch_size metric; a glue's from its own count.
    if "worker" in scenario:
        return scenario["worker"].get("mean_batch_size")
    counts = scenario.get("batches") or {"jobs": 1, "batches": 1}
    return counts["jobs"] / counts["batches"]


def _by_thread(sc: dict, keys: tuple[str, ...]) -> list[str]:
    """The API's and the worker's CPU by thread role, the roles above 0.02 ms an image."""
    roles = sorted(
        {r for k in keys for r, ms in sc[k].get("threads_ms_per_image", {}).items() if ms >= 0.02}
    )
    if not roles:
        return []
    lines = [
        "",
        "The same runs by thread (CPU ms per image from /proc per thread, named by "
        "`py-spy dump`; the worker's process without its loader process). API: "
        "ThreadPoolExecutor is gunicorn's request threads, MainThread its poller, job-done "
        "the waits' listener. Worker: MainThread is Celery's consumer (kombu, the batching "
        "state machine, acks), ThreadPoolExecutor the batch slots (forward, write, announce), "
        "claim-first and claim the claims, loader-results what the loader process sends back:",
        "",
        "| thread | bulk | singles, fire and forget | singles with wait |",
        "|---|---|---|---|",
    ]
    for role in roles:
        cells = [fmt(sc[k].get("threads_ms_per_image", {}).get(role), 2) for k in keys]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    return lines


def report(result: dict) -> str:
    lines = [
        "Worker steps in process (PostgreSQL; CPU ms per batch: this process / PG backend):",
        "",
        "| batch | claim CPU | write CPU | announce CPU | PG backend CPU (all three) "
        "| claim wall p50 | write wall p50 | announce wall p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, s in result["steps"].items():
        c, w = s["cpu_ms_per_batch"], s["wall_ms_per_batch_p50"]
        lines.append(
            f"| {size} | {fmt(c['claim'])} | {fmt(c['write'])} | {fmt(c['announce'])} "
            f"| {fmt(s['postgres_cpu_ms_per_batch'])} | {fmt(w['claim'])} | {fmt(w['write'])} "
            f"| {fmt(w['announce'])} |"
        )
    if "service" in result:
        lines += _breakdown(result)
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
