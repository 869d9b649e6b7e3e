"""Shared set-up for benchmarks: real databases, Redis, processes, drivers and /proc meters.

Everything here runs the real thing: PostgreSQL (a fresh database per stack),
the shared Redis under a unique QUEUE_PREFIX, the API under gunicorn with its
own gunicorn.conf.py, and real Celery worker processes. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import psycopg
import requests
from sqlalchemy import select
from sqlalchemy.engine import make_url

from harness import accounts, databases, processes, stack_config, waiting
from harness.services import OUTPUT, ROOT
from harness.serving import LoopbackHTTPServer
from shared import ledger
from shared.models import User

ASSETS = Path(os.environ.get("IMGCLF_ASSETS", ROOT.parent / "shared" / "assets"))
PHOTOS = ASSETS / "photos"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- environment ----------------------------------------------------------------


def ensure_keras_home() -> str:
    """Point KERAS_HOME at a writable copy of the shared Keras cache (real weights)."""
    if os.environ.get("KERAS_HOME"):
        return os.environ["KERAS_HOME"]
    target = ROOT / ".cache" / "keras_home"
    source = ASSETS / "keras_home" / "models"
    if not (target / "models").is_dir() and source.is_dir():
        shutil.copytree(source, target / "models", dirs_exist_ok=True)
    os.environ["KERAS_HOME"] = str(target)
    return str(target)


def has_weights(filename: str) -> bool:
    return (Path(ensure_keras_home()) / "models" / filename).is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_info() -> dict:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "host": platform.node(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def machine() -> str:
    m = machine_info()
    return f"{m['host']} ({m['nproc']} cores, {m['machine']}, Python {m['python']})"


# --- statistics -------------------------------------------------------------------


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


# --- databases and users -----------------------------------------------------------


@contextmanager
def backend(name: str, tmp_dir: str, **overrides):
    """A migrated database of kind ``name`` ("postgres" or "sqlite") and its Config."""
    if name == "postgres":
        url = databases.create_postgres_database()
    else:
        url = f"sqlite:///{tmp_dir}/bench.db"
    config = databases.migrated(stack_config.test_config(url, **overrides))
    try:
        yield config
    finally:
        databases.delete_redis_prefix(config.queue_prefix)
        if name == "postgres":
            databases.drop_postgres_database(url)


def funded_user(app, tokens: int) -> dict:
    """A user made through the API, then given ``tokens`` more by a direct ledger grant."""
    from api.services import services

    user = accounts.new_user(app.test_client())
    with app.app_context(), services().sessions() as session:
        user_id = session.scalars(select(User.id).where(User.username == user["username"])).one()
        ledger.grant(session, user_id, tokens, ledger.REFILL)
        session.commit()
    user["id"] = user_id
    return user


def libpq_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


def job_counts(dsn: str, where: str, params: tuple) -> tuple[dict[str, int], float | None]:
    """Jobs by status matching ``where``, and the latest completed_at (epoch seconds)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT status, count(*), max(completed_at) FROM jobs WHERE {where} GROUP BY status",
            params,
        ).fetchall()
    counts = {status: n for status, n, _ in rows}
    ends = [last for _, _, last in rows if last is not None]
    return counts, (max(ends).timestamp() if ends else None)


FINAL = ("succeeded", "failed", "canceled")


def wait_done(
    dsn: str, where: str, params: tuple, expected: int, timeout: float, interval: float = 0.1
) -> tuple[dict[str, int], float]:
    """Poll SQL until ``expected`` matching jobs are final; returns counts and the last
    completed_at. The end time comes from the row the worker wrote, not from the poll."""
    deadline = time.monotonic() + timeout
    while True:
        counts, last = job_counts(dsn, where, params)
        if sum(counts.get(s, 0) for s in FINAL) >= expected:
            return counts, last or time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {counts} of {expected} jobs final after {timeout}s")
        time.sleep(interval)


# --- /proc: process trees, memory and CPU -------------------------------------------


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{current}/task/{tid}/children").read_text().split():
                    out.append(int(child))
                    todo.append(int(child))
    return out


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB; empty if it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _stat_cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc stat file (a process's or a thread's); raises OSError
    when it is gone."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    try:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pids_matching(text: str) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and text in cmdline(int(p))]


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (user+nice+system+irq+softirq+steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of ``pid``, by thread id (a thread that ended is
    gone from /proc, and its CPU with it)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError):
            out[int(tid)] = _stat_cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat"))
    return out


def py_spy() -> str | None:
    """The py-spy program: on PATH, or installed into this Python's virtual environment."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def python_thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name of ``pid``'s live threads, from ``py-spy dump``
    (Python does not name the OS threads); empty when py-spy is missing or not allowed
    to attach."""
    spy = py_spy()
    if spy is None:
        return {}
    try:
        out = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names = {}
    for line in out.splitlines():
        # 'Thread 12345 (idle): "MainThread"' (older py-spy: a hex pthread id, not usable)
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[0] == "Thread" and parts[1].isdigit():
            names[int(parts[1])] = parts[3].split('"')[1] if '"' in parts[3] else "?"
    return names


class ThreadCpuMeter:
    """CPU seconds by thread role of some processes between ``start()`` and ``stop()``:
    a role is a Python thread name without its trailing number (``fetch-3`` ->
    ``fetch``), named at ``stop`` (threads started during the run are named too);
    ``unnamed`` where py-spy could not name a thread. Finer than ``CpuMeter``, and
    unlike a sampling profiler it counts every CPU second, the GIL's hand-offs included."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[tuple[str, int, int], float] = {}

    def _snapshot(self) -> dict[tuple[str, int, int], float]:
        """CPU seconds by (group, pid, thread id)."""
        return {
            (group, pid, tid): s
            for group, spec in self.groups.items()
            for pid in spec()
            for tid, s in thread_cpu_seconds(pid).items()
        }

    def start(self) -> ThreadCpuMeter:
        self._start = self._snapshot()
        return self

    def stop(self) -> dict[str, float]:
        """CPU seconds by 'group: role'."""
        names: dict[int, dict[int, str]] = {}  # by pid: one py-spy dump each
        out: dict[str, float] = {}
        for (group, pid, tid), s in self._snapshot().items():
            if pid not in names:
                names[pid] = python_thread_names(pid)
            role = names[pid].get(tid, "unnamed").rstrip("0123456789").rstrip("-_") or "?"
            key = f"{group}: {role}"
            out[key] = out.get(key, 0.0) + max(0.0, s - self._start.get((group, pid, tid), 0.0))
        return out


class CpuMeter:
    """CPU seconds used by named process groups between ``start()`` and ``stop()``.

    A group is a root pid (its whole tree counts) or a callable returning pids.
    ``other`` is the machine's busy time not in any group: other people's work on a
    shared machine shows up there.
    """

    def __init__(self, groups: dict[str, int | Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, float] = {}
        self._t0 = 0.0

    def _pids(self, spec) -> list[int]:
        return spec() if callable(spec) else tree(spec)

    def _snapshot(self) -> dict[str, dict[int, float]]:
        """CPU seconds per pid of each group (pids come and go: pooled connections)."""
        snap = {name: {p: cpu_seconds(p) for p in self._pids(s)} for name, s in self.groups.items()}
        snap["_machine"] = {0: machine_busy_seconds()}
        return snap

    def start(self) -> CpuMeter:
        self._start = self._snapshot()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict:
        end = self._snapshot()
        wall = time.monotonic() - self._t0
        # Per pid: a process born meanwhile counts in full; one that exited meanwhile is
        # lost (an undercount) rather than subtracted from the survivors.
        used = {}
        for k, pids in end.items():
            before = self._start.get(k, {})
            used[k] = sum(max(0.0, cpu - before.get(pid, 0.0)) for pid, cpu in pids.items())
        machine_s = used.pop("_machine")
        cores = {k: v / wall for k, v in used.items()}
        cores["other"] = max(0.0, (machine_s - sum(used.values())) / wall)
        cores["machine"] = machine_s / wall
        return {"wall_s": wall, "cores": cores}


class MemorySampler:
    """Peak RSS of process trees, sampled every ``interval`` seconds, plus VmHWM at the end."""

    def __init__(self, groups: dict[str, int], interval: float = 0.2) -> None:
        self.groups = groups
        self.interval = interval
        self.peak_total_kb = dict.fromkeys(groups, 0)
        self.peak_kb: dict[str, dict[int, int]] = {g: {} for g in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-sampler")

    def _sample(self) -> None:
        for name, root in self.groups.items():
            total = 0
            for pid in tree(root):
                kb = status_kb(pid)
                rss = max(kb.get("VmRSS", 0), kb.get("VmHWM", 0))
                total += kb.get("VmRSS", 0)
                self.peak_kb[name][pid] = max(self.peak_kb[name].get(pid, 0), rss)
            self.peak_total_kb[name] = max(self.peak_total_kb[name], total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {
            name: {
                "peak_total_mb": self.peak_total_kb[name] / 1024,
                "peak_per_process_mb": {
                    str(pid): kb / 1024 for pid, kb in sorted(self.peak_kb[name].items())
                },
            }
            for name in self.groups
        }


# --- processes: photo server, API under gunicorn, worker -----------------------------


class PhotoServerProcess:
    """harness.photos.PhotoServer over the real photos, in its own process (its own GIL)."""

    def __init__(self, directory: Path = PHOTOS) -> None:
        self.directory = directory
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self) -> PhotoServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.photo_server", str(self.directory)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
            text=True,
        )
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            raise RuntimeError(f"photo server did not start: {self.base_url!r}")
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def photo_names() -> list[str]:
    return sorted(p.name for p in PHOTOS.iterdir() if p.is_file())


def photo_urls(base_url: str, n: int, tag: str) -> list[str]:
    """``n`` URLs over the real photos, each unique (query string) so nothing is deduplicated."""
    names = photo_names()
    return [f"{base_url}/{names[i % len(names)]}?n={tag}-{i}" for i in range(n)]


class ApiProcess:
    """The API as deployed: ``gunicorn -c gunicorn.conf.py api.wsgi:app`` (``app``: another
    WSGI app under the same settings, such as bench/floor_app.py)."""

    def __init__(
        self,
        config,
        workers: int | None = None,
        threads: int | None = None,
        app: str = "api.wsgi:app",
    ) -> None:
        self.config = config
        self.app = app
        self.port = free_port()
        self.workers = workers
        self.threads = threads
        self.proc: subprocess.Popen | None = None
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUTPUT / f"bench-api-{config.queue_prefix}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> ApiProcess:
        env = {**os.environ, **stack_config.config_env(self.config), "PORT": str(self.port)}
        if self.workers:
            env["WEB_CONCURRENCY"] = str(self.workers)
        if self.threads:
            env["API_THREADS"] = str(self.threads)
        cmd = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", self.app]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_http(f"{self.url}/healthz", self.proc, self.log_path)
        # gunicorn answers from the first worker; wait until every worker has booted.
        expected = self.workers or int(env.get("WEB_CONCURRENCY") or 0)
        if expected:
            waiting.wait_for(lambda: len(descendants(self.pid)) >= expected, 60, "API workers")
        return self

    def worker_pids(self) -> list[int]:
        return descendants(self.pid)

    def stop(self) -> None:
        stop_process(self.proc)


def wait_http(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited: {log_path.read_text()[-3000:]}")
        try:
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    waiting.wait_for(up, timeout, url, interval=0.2)


def stop_process(proc: subprocess.Popen | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class BenchWorker(processes.WorkerProcess):
    """The real classification worker; bench.worker_app only swaps in random weights for
    a model whose weights are not in the offline Keras cache (InceptionV3)."""

    app_module = "bench.worker_app"


class ServiceStack:
    """A fresh PostgreSQL database, the API under gunicorn, one worker and a photo server."""

    def __init__(
        self,
        models: tuple[str, ...] = ("mobilenet",),
        *,
        worker: bool = True,
        api_workers: int | None = None,
        api_threads: int | None = None,
        **overrides,
    ) -> None:
        self.models = models
        self.with_worker = worker
        self.api_workers = api_workers
        self.api_threads = api_threads
        self.overrides = overrides
        self.db_url = ""
        self.config = None
        self.app = None
        self.photos: PhotoServerProcess | None = None
        self.api: ApiProcess | None = None
        self.worker: BenchWorker | None = None

    def __enter__(self) -> ServiceStack:
        from api import create_app

        ensure_keras_home()
        self.db_url = databases.create_postgres_database()
        try:
            values = {
                "models": self.models,
                "default_model": self.models[0],
                # One benchmark user submits hundreds per second; the limiter would
                # answer 429 long before the service itself is the limit.
                "rate_limit_submit": "100000/second",
                **self.overrides,
            }
            self.config = databases.migrated(stack_config.test_config(self.db_url, **values))
            self.app = create_app(self.config)  # in-process: only to make funded users
            self.photos = PhotoServerProcess().start()
            self.api = ApiProcess(
                self.config, workers=self.api_workers, threads=self.api_threads
            ).start()
            if self.with_worker:
                self.start_worker()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start_worker(self) -> None:
        self.worker = BenchWorker(self.config, name="bench").start()
        self.worker.wait_ready()

    def stop_worker(self) -> None:
        if self.worker:
            self.worker.stop()
            self.worker = None

    def __exit__(self, *exc) -> None:
        for stop in (
            self.stop_worker,
            self.api.stop if self.api else None,
            self.photos.stop if self.photos else None,
        ):
            if stop:
                with contextlib.suppress(Exception):
                    stop()
        if self.config:
            with contextlib.suppress(Exception):
                databases.delete_redis_prefix(self.config.queue_prefix)
        if self.db_url:
            with contextlib.suppress(Exception):
                databases.drop_postgres_database(self.db_url)

    @property
    def dsn(self) -> str:
        return libpq_dsn(self.db_url)

    def user(self, tokens: int) -> dict:
        return funded_user(self.app, tokens)

    def urls(self, n: int, tag: str | None = None) -> list[str]:
        return photo_urls(self.photos.base_url, n, tag or uuid.uuid4().hex[:8])

    def post_batch(self, user: dict, text: str) -> requests.Response:
        """``POST /v1/batches`` with ``text`` (one URL per line) over HTTP."""
        return requests.post(
            f"{self.api.url}/v1/batches",
            data=text,
            headers={**user["headers"], "Content-Type": "text/plain"},
            timeout=120,
        )

    def worker_pid(self) -> int:
        return self.worker.proc.pid

    def pg_backends(self) -> list[int]:
        name = make_url(self.db_url).database
        return pids_matching(f" {name} ")

    def cpu_groups(self, driver: bool = True) -> dict:
        groups: dict = {"api": self.api.pid, "photo server": self.photos.pid}
        if self.worker:
            groups["worker"] = self.worker_pid()
        groups["postgres"] = self.pg_backends
        groups["redis"] = lambda: pids_matching("redis-server")
        if driver:
            groups["driver (clients)"] = lambda: [os.getpid()]
        return groups

    def worker_metrics(self) -> dict[str, float]:
        """Sums and counts of the worker's batch metrics (Redis hashes, see shared.metrics),
        once the workers have sent what their last batches recorded."""
        import redis

        after_next_flush()
        client = redis.Redis.from_url(self.config.redis_url)
        out = {}
        for name in ("batch_size", "model_forward_seconds", "image_fetch_seconds"):
            fields = client.hgetall(f"{self.config.queue_prefix}:metrics:{name}")
            out[f"{name}_sum"] = sum(float(v) for k, v in fields.items() if k.endswith(b"|sum"))
            out[f"{name}_count"] = sum(float(v) for k, v in fields.items() if k.endswith(b"|count"))
        return out


def after_next_flush() -> None:
    """Wait out one flush interval of the workers' metrics (shared.metrics): a bench reads
    them after its measured part, and each worker sends them once a second."""
    from worker.runtime import METRICS_SENT_WITHIN_S

    time.sleep(METRICS_SENT_WITHIN_S + 0.1)


# --- hostile image hosts -------------------------------------------------------------


class DripServer:
    """An image host on 127.0.0.1 that answers one byte a second, for ever: ``head``
    then ``body``. ``hits`` lists the paths asked for, in order. A context manager."""

    def __init__(self, head: bytes, body: bytes = b"") -> None:
        hits: list[str] = []
        data = head + body

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                hits.append(self.path)
                with contextlib.suppress(OSError):  # the worker hung up (its deadline)
                    for byte in data:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(1)

        self.hits = hits
        self._server = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> DripServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def single_job_seconds(stack: ServiceStack, user: dict, url: str) -> float:
    """Submit one URL job for ``user`` and wait until it is final; the seconds it took."""
    start = time.monotonic()
    requests.post(
        f"{stack.api.url}/v1/jobs", json={"url": url}, headers=user["headers"], timeout=60
    ).raise_for_status()
    wait_done(stack.dsn, "user_id = %s", (user["id"],), 1, timeout=600, interval=0.02)
    return time.monotonic() - start


# --- HTTP drivers ------------------------------------------------------------------


def closed_loop(
    n_clients: int,
    items: Iterable,
    call: Callable[[requests.Session, object], bool],
    *,
    lanes: bool = False,
) -> dict:
    """``n_clients`` threads, each sending its next item when its previous answer came back.

    ``lanes``: client ``c`` sends only items ``c``, ``c + n_clients``, ... (one client per
    user when item ``i`` belongs to user ``i % n_clients``); else any client takes the
    next item. Returns wall time from the first send to the last answer, per-request
    latencies, and how many calls returned True (ok) or False/raised (failed).
    """
    queues = [queue.SimpleQueue() for _ in range(n_clients if lanes else 1)]
    for i, item in enumerate(items):
        queues[i % len(queues)].put(item)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(n_clients + 1)

    def client(work: queue.SimpleQueue) -> None:
        session = requests.Session()
        start_gate.wait()
        while True:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            try:
                ok = call(session, item)
                err = None if ok else "not ok"
            except Exception as exc:  # counted, not raised: a driver must keep going
                ok, err = False, repr(exc)
            elapsed = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures.append(err)

    threads = [
        threading.Thread(target=client, args=(queues[c % len(queues)],), daemon=True)
        for c in range(n_clients)
    ]
    for t in threads:
        t.start()
    start_gate.wait()
    t0_epoch = time.time()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "start_epoch": t0_epoch,
        "wall_s": wall,
        "ok": len(latencies),
        "failed": len(failures),
        "failures_sample": failures[:3],
        "latencies": latencies,
    }


def latency_summary(latencies: list[float]) -> dict:
    return {
        "p50_ms": percentile(latencies, 50) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


# --- running one benchmark module in its own process ---------------------------------


def main_json(run: Callable[..., dict], argv: list[str] | None = None) -> None:
    """``python -m bench.X [--quick] [--json PATH]``: run, print the report or write JSON."""
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the raw result here instead of printing a table")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    else:
        module = importlib.import_module(run.__module__)
        print(module.report(result))
