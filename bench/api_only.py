"""(6) The API alone, no worker: job submissions per second and their latency, with wrk.

``POST /v1/jobs`` with a JSON URL and a Bearer API key, against the API as deployed
(``gunicorn -c gunicorn.conf.py``, PostgreSQL, Redis). Each request authenticates
the key, charges a token and inserts the job in one transaction, then enqueues the
id on Redis. Two runs:

* saturation: 16 connections sending back to back (closed loop): the most it
  accepts per second, and the latency at that point;
* at 300/s: 32 connections, each pausing between requests (wrk's ``delay()``,
  exponentially distributed) so that together they offer about 300 requests/s:
  the latency a client sees at the target rate rather than at saturation.

Plus the time to accept a 10,000-URL bulk batch over HTTP.

The benchmark user's submission rate limit (RATE_LIMIT_SUBMIT, 20/s per user by
default) is raised to 100000/second: wrk sends as one user, and the limiter would
otherwise answer 429 after 20 requests, measuring the limiter instead of the API.
When wrk is not installed (a CI machine), a Python thread driver stands in and the
report says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import CpuMeter, ServiceStack, fmt, latency_summary, main_json, median

CONNECTIONS = 16
USERS = 16
SECONDS = 20
TARGET_RATE = 300
PACED_CONNECTIONS = 32
BULK_URLS = 10_000

LUA = """
wrk.method = "POST"
wrk.body = '{{"url": "{url}"}}'
local keys = {{{keys}}}
local i = 0
function init(args)
  i = math.random(#keys)
end
-- Each request authenticates with the next user's API key, round robin.
function request()
  i = i % #keys + 1
  local headers = {{["Content-Type"] = "application/json"}}
  headers["Authorization"] = "Bearer " .. keys[i]
  return wrk.format(nil, nil, headers)
end
"""
# Pacing: wrk waits delay() milliseconds before each request on a connection.
LUA_DELAY = """
function delay()
  return math.floor(-math.log(1 - math.random()) * {mean_delay_ms})
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict:
    pct = {p: _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.M)}
    total = int(re.search(r"(\d+) requests in", output).group(1))
    seconds = _ms(re.search(r"requests in ([\d.]+\w+),", output).group(1)) / 1000
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    bad = int(non2xx.group(1)) if non2xx else 0
    return {
        "requests": total,
        "seconds": seconds,
        "non_2xx": bad,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
        "per_s": total / seconds,
        "ok_per_s": (total - bad) / seconds,
        "p50_ms": pct.get("50"),
        "p90_ms": pct.get("90"),
        "p99_ms": pct.get("99"),
    }


def wrk(
    url: str, keys: list[str], job_url: str, connections: int, seconds: float, mean_delay_ms: float
) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA.format(keys=", ".join(f'"{k}"' for k in keys), url=job_url))
        if mean_delay_ms > 0:
            f.write(LUA_DELAY.format(mean_delay_ms=mean_delay_ms))
        script = f.name
    try:
        cmd = [
            "wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds:g}s", "--latency",
            "--timeout", "10s", "-s", script, f"{url}/v1/jobs",
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        Path(script).unlink()
    result = parse_wrk(out)
    result["command"] = " ".join(cmd[:-3]) + " -s submit.lua URL/v1/jobs"
    result["raw"] = out
    return result


def python_load(
    url: str, keys: list[str], job_url: str, connections: int, seconds: float, mean_delay_ms: float
) -> dict:
    """Stand-in for wrk where it is not installed: threads with keep-alive sessions."""
    import random

    latencies: list[float] = []
    bad = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(n: int) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {keys[n % len(keys)]}"}
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            resp = session.post(f"{url}/v1/jobs", json={"url": job_url}, headers=headers)
            elapsed = time.perf_counter() - t0
            with lock:
                latencies.append(elapsed)
                bad[0] += resp.status_code >= 300
            if mean_delay_ms > 0:
                time.sleep(random.expovariate(1000 / mean_delay_ms))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = latency_summary(latencies)
    return {
        "requests": len(latencies),
        "seconds": wall,
        "non_2xx": bad[0],
        "socket_errors": "",
        "per_s": len(latencies) / wall,
        "ok_per_s": (len(latencies) - bad[0]) / wall,
        "p50_ms": lat["p50_ms"],
        "p90_ms": None,
        "p99_ms": lat["p99_ms"],
        "command": f"python threads, {connections} connections (wrk not installed)",
    }


def bulk_over_http(stack: ServiceStack, n: int, repeat: int) -> dict:
    user = stack.user(n * repeat)
    text = "\n".join(stack.urls(n))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        resp = stack.post_batch(user, text)
        times.append(time.perf_counter() - t0)
        assert resp.status_code == 202, resp.text[:300]
    return {"urls": n, "median_s": median(times), "runs_s": times}


def run_with(stack: ServiceStack, quick: bool = False) -> dict:
    if stack.worker is not None:
        raise RuntimeError("api_only measures the API alone: stop the worker first")
    seconds = 1 if quick else SECONDS
    keys = [stack.user(10_000_000)["key"] for _ in range(USERS)]
    job_url = stack.urls(1)[0]
    tool = wrk if shutil.which("wrk") else python_load
    url = stack.api.url
    tool(url, keys, job_url, CONNECTIONS, 1, 0)  # warm every process's connection pools
    runs = {}
    meter = CpuMeter(stack.cpu_groups(driver=False)).start()
    runs["saturation"] = tool(url, keys, job_url, CONNECTIONS, seconds, 0)
    runs["saturation"]["cpu"] = meter.stop()
    if not quick:
        runs["one_user"] = tool(url, keys[:1], job_url, CONNECTIONS, seconds / 2, 0)
    # Each paced connection offers one request per (delay + response time): guess the
    # response time, try it for a few seconds, then correct the delay by what it did.
    cycle_ms = PACED_CONNECTIONS * 1000 / TARGET_RATE
    mean_delay = cycle_ms - 5
    if not quick:
        trial = tool(url, keys, job_url, PACED_CONNECTIONS, 4, mean_delay)
        response_ms = max(0.0, PACED_CONNECTIONS * 1000 / trial["per_s"] - mean_delay)
        mean_delay = max(0.0, cycle_ms - response_ms)
    runs["paced"] = tool(url, keys, job_url, PACED_CONNECTIONS, seconds, mean_delay)
    bulk = bulk_over_http(stack, 1000 if quick else BULK_URLS, 1 if quick else 3)
    for r in runs.values():
        r.pop("raw", None)
    cpu = runs["saturation"]["cpu"]
    per_request_ms = {
        k: 1000 * cpu["cores"].get(k, 0) * cpu["wall_s"] / max(1, runs["saturation"]["requests"])
        for k in ("api", "postgres", "redis")
    }
    return {
        "tool": "wrk" if tool is wrk else "python",
        "seconds": seconds,
        "users": USERS,
        **runs,
        "cpu_ms_per_request": per_request_ms,
        "paced_mean_delay_ms": mean_delay,
        "bulk": bulk,
        "api_workers": len(stack.api.worker_pids()),
    }


def run(quick: bool = False) -> dict:
    with ServiceStack(worker=False) as stack:
        return run_with(stack, quick)


def report(result: dict) -> str:
    s = result["saturation"]
    lines = [
        "| run | connections | API keys | requests | non-2xx | accepted/s | p50 ms | p90 ms "
        "| p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("saturation (back to back)", "saturation", CONNECTIONS, result["users"]),
        ("saturation, one user", "one_user", CONNECTIONS, 1),
        (f"paced at about {TARGET_RATE}/s", "paced", PACED_CONNECTIONS, result["users"]),
    ]
    for name, key, conns, users in rows:
        r = result.get(key)
        if not r:
            continue
        lines.append(
            f"| {name} | {conns} | {users} | {r['requests']} | {r['non_2xx']} | "
            f"**{fmt(r['ok_per_s'])}** | {fmt(r['p50_ms'], 1)} | {fmt(r['p90_ms'], 1)} | "
            f"{fmt(r['p99_ms'], 1)} |"
        )
    cpu = result["cpu_ms_per_request"]
    p = result.get("paced")
    if p and p["ok_per_s"] < 0.9 * TARGET_RATE:
        lines += [
            "",
            f"The API did not reach {TARGET_RATE}/s here, so the paced run's connections "
            "had no time to pause: it ran at saturation too, with 32 connections.",
        ]
    b = result["bulk"]
    runs = ", ".join(f"{x:.2f}" for x in b["runs_s"])
    lines += [
        "",
        f"Tool: {result['tool']} (`{s['command']}`), {result['seconds']} s per run, against "
        f"{result['api_workers']} gunicorn worker processes; requests rotate over "
        f"{result['users']} users' API keys (the one-user row shows a single account "
        "submitting from 16 connections). Paced connections wait an exponentially "
        f"distributed {fmt(result['paced_mean_delay_ms'], 0)} ms (mean) between requests. "
        "wrk runs on the same two cores as the API, PostgreSQL and Redis. CPU per accepted "
        f"submission at saturation: API {fmt(cpu['api'])} ms, PostgreSQL backends "
        f"{fmt(cpu['postgres'])} ms, Redis {fmt(cpu['redis'])} ms.",
        "",
        f"Bulk acceptance over HTTP (`POST /v1/batches`, text/plain, {b['urls']:,} URLs, "
        f"same API processes): median **{b['median_s']:.2f} s** (runs: {runs}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
