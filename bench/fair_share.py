"""Fair share between users' bulk work (issue #16): the bulk window against FIFO.

    python -m bench.fair_share            # about 12,000 images: 10-15 minutes on 2 cores
    python -m bench.fair_share --quick    # tiny counts, window mode only, one stack: a smoke run

Each mode gets a fresh stack (PostgreSQL, the API under gunicorn, one worker, the photo
server) and fresh users, and runs three scenarios one after another:

* idle: B submits 30 URLs to an idle service;
* behind: A submits 3,000 URLs, then (as soon as A's batch is accepted) B submits 30;
* together: three users submit 1,000 URLs each at the same moment.

Then, on one more stack, one user's throughput alone (640 URLs at a time) with the
window and without it, alternated on the same worker (the machine is shared: its
load moves more between two stacks than the window does): through the API under
gunicorn (the window), and through an in-process API whose window is unbounded.

Modes: ``window`` is the service's default (the bulk window, ``shared/dispatch.py``);
``fifo`` sets BULK_WINDOW_BATCHES so large that every chunk goes to the broker at
submission, which is the first-come-first-served service from before the window.

A batch's time runs from just before its POST to the newest ``completed_at`` of its
jobs in SQL. Targets (issue #16): B behind A ends within 3x its idle time plus one
batch in flight (WORKER_CONCURRENCY x BATCH_MAX / the measured images per second: the
duration of one batch while the worker's slots overlap); A loses no more throughput
than B's share (A's time grows by at most B's jobs at the measured rate); the three
users' times differ by less than 20 % (of the longest).
"""

from __future__ import annotations

import threading
import time

from bench.common import ServiceStack, fmt, loadavg, machine_info, main_json, wait_done
from shared.config import Config

MODES = {"window": {}, "fifo": {"bulk_window_batches": 1_000_000}}
FULL = {"small": 30, "big": 3000, "each": 1000, "users": 3}
QUICK = {"small": 5, "big": 60, "each": 20, "users": 3}


def _batch(stack: ServiceStack, user: dict, n: int) -> tuple[str, float]:
    """POST a batch of n fresh URLs; returns its id and the time just before the POST."""
    text = "\n".join(stack.urls(n))
    start = time.time()
    resp = stack.post_batch(user, text)
    resp.raise_for_status()
    return resp.json()["id"], start


def _done(stack: ServiceStack, batch_id: str, n: int, start: float) -> dict:
    counts, end = wait_done(stack.dsn, "batch_id = %s", (batch_id,), n, timeout=120 + n)
    return {"jobs": n, "succeeded": counts.get("succeeded", 0), "wall_s": end - start}


def idle(stack: ServiceStack, n: int) -> dict:
    batch_id, start = _batch(stack, stack.user(n), n)
    return _done(stack, batch_id, n, start)


def behind(stack: ServiceStack, big: int, small: int) -> dict:
    a, b = stack.user(big), stack.user(small)
    a_id, a_start = _batch(stack, a, big)
    b_id, b_start = _batch(stack, b, small)
    b_done = _done(stack, b_id, small, b_start)
    a_done = _done(stack, a_id, big, a_start)
    return {"a": a_done, "b": b_done, "images_per_s": (big + small) / a_done["wall_s"]}


def together(stack: ServiceStack, users: int, each: int) -> dict:
    accounts = [stack.user(each) for _ in range(users)]
    gate, submitted = threading.Barrier(users), [None] * users

    def submit(i: int) -> None:
        gate.wait()
        submitted[i] = _batch(stack, accounts[i], each)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(start for _, start in submitted)
    # Every user's time from the common start: who was accepted first is part of it.
    times = [_done(stack, batch_id, each, first)["wall_s"] for batch_id, _ in submitted]
    return {"walls_s": times, "spread": (max(times) - min(times)) / max(times)}


def run_mode(mode: str, sizes: dict) -> dict:
    with ServiceStack(**MODES[mode]) as stack:
        return _scenarios(stack, sizes)


def _scenarios(stack: ServiceStack, sizes: dict) -> dict:
    idle(stack, 8)  # first-time set-up (model warm-up, connections) is not measured
    # The load average says how much of a difference is the shared machine's.
    out = {"load_before": loadavg(), "idle": idle(stack, sizes["small"])}
    out["behind"] = behind(stack, sizes["big"], sizes["small"])
    out["together"] = together(stack, sizes["users"], sizes["each"])
    out["load_after"] = loadavg()
    return out


def alternating(n: int, rounds: int) -> dict:
    """One user's images/s, window and fifo taking turns on one worker."""
    with ServiceStack() as stack:
        return _alternate(stack, n, rounds)


def _alternate(stack: ServiceStack, n: int, rounds: int) -> dict:
    from api import create_app

    rates: dict[str, list[float]] = {"window": [], "fifo": []}
    fifo = create_app(stack.config.replace(**MODES["fifo"])).test_client()
    idle(stack, 8)
    for _ in range(rounds):
        for mode in rates:
            user, text = stack.user(n), "\n".join(stack.urls(n))
            start = time.time()
            if mode == "window":
                batch_id = _batch(stack, user, n)[0]
            else:
                resp = fifo.post(
                    "/v1/batches", data=text, content_type="text/plain", headers=user["headers"]
                )
                batch_id = resp.get_json()["id"]
            rates[mode].append(n / _done(stack, batch_id, n, start)["wall_s"])
    return {"jobs": n, "images_per_s": rates}


def run(quick: bool = False) -> dict:
    sizes = QUICK if quick else FULL
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = {"sizes": sizes, "machine": machine_info(), "date": started}
    if quick:
        # The smoke run: both parts on one stack (the window mode is the default, so
        # the alternation's stack would be the same one again), one worker start.
        with ServiceStack(**MODES["window"]) as stack:
            out["modes"] = {"window": _scenarios(stack, sizes)}
            out["alternating"] = _alternate(stack, 40, 1)
        return out
    out["modes"] = {mode: run_mode(mode, sizes) for mode in MODES}
    out["alternating"] = alternating(640, 2)
    return out


def judged(mode: dict, sizes: dict) -> dict:
    """The three targets' numbers for one mode."""
    c = Config()
    rate = mode["behind"]["images_per_s"]
    batch_s = c.worker_concurrency * c.batch_max / rate
    b_limit = 3 * mode["idle"]["wall_s"] + batch_s
    return {
        "b_s": mode["behind"]["b"]["wall_s"],
        "b_limit_s": b_limit,
        "b_ok": mode["behind"]["b"]["wall_s"] <= b_limit,
        "b_ratio": mode["behind"]["b"]["wall_s"] / mode["idle"]["wall_s"],
        "a_s": mode["behind"]["a"]["wall_s"],
        "b_share_s": sizes["small"] / rate,  # B's jobs at the measured rate
        "spread": mode["together"]["spread"],
        "spread_ok": mode["together"]["spread"] < 0.2,
    }


def report(result: dict) -> str:
    sizes, modes = result["sizes"], result["modes"]
    j = {name: judged(mode, sizes) for name, mode in modes.items()}
    names = list(modes)
    head = "| | " + " | ".join(f"`{n}`" for n in names) + " | target |"
    lines = [head, "|---|" + "---|" * (len(names) + 1)]

    def row(label: str, cells: list[str], target: str = "") -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")

    small, big, each = sizes["small"], sizes["big"], sizes["each"]
    idle_s = [fmt(modes[n]["idle"]["wall_s"], 2) for n in names]
    row(f"B alone: {small} URLs, idle service (s)", idle_s)
    row(
        f"B's {small} behind A's {big} (s)",
        [f"**{fmt(j[n]['b_s'], 2)}** ({fmt(j[n]['b_ratio'])}x idle)" for n in names],
        "≤ 3x idle + one batch in flight",
    )
    row("the limit: 3x idle + one batch (s)", [fmt(j[n]["b_limit_s"], 2) for n in names])
    row(
        "B's target",
        ["met" if j[n]["b_ok"] else "**MISSED**" for n in names],
    )
    row(f"A's {big} (s)", [fmt(j[n]["a_s"], 1) for n in names])
    row(
        "images/s, A and B together",
        [fmt(modes[n]["behind"]["images_per_s"]) for n in names],
    )
    row(f"B's {small} jobs at that rate (s)", [fmt(j[n]["b_share_s"], 2) for n in names])
    alt = result.get("alternating")
    if alt:
        rates = alt["images_per_s"]
        row(
            f"one user's {alt['jobs']} alone, taking turns on one worker (images/s)",
            [", ".join(fmt(r) for r in rates.get(n, [])) or "–" for n in names],
            "window ≥ fifo less B's share",
        )
    for i in range(sizes["users"]):
        row(
            f"user {i + 1} of {sizes['users']}, {each} URLs each at once (s)",
            [fmt(modes[n]["together"]["walls_s"][i], 1) for n in names],
        )
    row(
        "spread: (slowest - fastest) / slowest",
        [f"**{100 * j[n]['spread']:.0f} %**" for n in names],
        "< 20 %",
    )
    row("spread's target", ["met" if j[n]["spread_ok"] else "**MISSED**" for n in names])
    loads = [
        f"{modes[n].get('load_before', '?')} → {modes[n].get('load_after', '?')}" for n in names
    ]
    row("load average before → after", loads)
    m = result["machine"]
    lines += [
        "",
        f"{result['date']}, {m['cpu_model']} ({m['nproc']} cores, {m['ram_gb']} GB), one "
        "worker on the defaults, the API under gunicorn, PostgreSQL, Redis; `window` is the "
        "default bulk window, `fifo` every chunk sent at submission (the service before it).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
