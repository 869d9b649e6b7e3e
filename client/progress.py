"""Waiting for a batch with a progress bar.

Polling (not ``?wait=``) keeps the bar moving while images finish one by one: a
long-poll would only answer when the whole batch is done. The interval starts at
1 s and backs off to 2 s while nothing changes, so an idle wait costs the server
little and a busy one still looks live.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from client.api import TERMINAL_BATCH_STATUSES, Client

FIRST_INTERVAL_S = 1.0
MAX_INTERVAL_S = 2.0
BACKOFF = 1.25


def finished_count(batch: dict) -> int:
    """Items that will not change any more: succeeded, failed or canceled."""
    counts = batch.get("counts") or {}
    return sum(int(counts.get(k, 0)) for k in ("succeeded", "failed", "canceled"))


def is_final(batch: dict) -> bool:
    """A canceled batch says "canceled" at once, but jobs that had started still finish:
    wait for those too, so the downloaded results are the final ones."""
    counts = batch.get("counts") or {}
    active = int(counts.get("queued", 0)) + int(counts.get("processing", 0))
    return batch.get("status") in TERMINAL_BATCH_STATUSES and active == 0


def summary(batch: dict) -> str:
    """The succeeded/failed part of the bar, also used for the final line."""
    counts = batch.get("counts") or {}
    text = f"[green]{counts.get('succeeded', 0)} ok[/] [red]{counts.get('failed', 0)} failed[/]"
    if counts.get("canceled"):
        text += f" [yellow]{counts['canceled']} canceled[/]"
    return text


def wait_for_batch(
    client: Client,
    batch: dict,
    console: Console,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll ``GET /v1/batches/{id}`` until the batch is final; return its last state.

    ``batch`` is the state already in hand (from the submit or a first GET), so a
    batch that is finished already costs no extra request.
    """
    batch_id = batch["id"]
    interval = FIRST_INTERVAL_S
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(
            f"batch {batch_id[:8]}",
            total=batch.get("total") or 0,
            completed=finished_count(batch),
            counts=summary(batch),
        )
        while not is_final(batch):
            sleep(interval)
            previous = finished_count(batch)
            batch = client.get_batch(batch_id)
            done = finished_count(batch)
            progress.update(
                task, total=batch.get("total") or 0, completed=done, counts=summary(batch)
            )
            if done != previous:
                interval = FIRST_INTERVAL_S
            else:
                interval = min(interval * BACKOFF, MAX_INTERVAL_S)
    return batch
