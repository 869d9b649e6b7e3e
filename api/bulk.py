"""Submitting a bulk batch: validate every line, charge N in one transaction, then dispatch.

Same order as single jobs (api/submission.py): nothing is written unless every
line is valid and the balance covers all of them, and Redis is checked before the
transaction. The jobs are committed numbered in chunks and waiting in SQL; after the
commit, ``shared.dispatch.refill`` sends as many chunks as the bulk window has room
for, round-robin over the users with work waiting. A send that fails leaves the jobs
waiting (charged, as accepted) for the next refill, not undone: the batch is the
durable record, and the broker is only told about a few chunks at a time anyway.
Retrying a batch's failed lines (``retry_batch``) goes the same way.

The batch-level options (model, top_k, webhook) come checked by the schemas
(api/schemas.py); each line is checked here, so that every bad line is reported by
its number.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from sqlalchemy import select
from sqlalchemy.orm import Session

from api import idempotency, json_provider
from api.errors import check_row_id
from api.ratelimit import limits
from api.services import services, unit_of_work
from api.urls import is_valid_url
from shared import batches, dispatch, jobs, ledger, logs
from shared.errors import (
    Conflict,
    DecodeBusy,
    InvalidJSON,
    JobInputError,
    NotFound,
    ServiceError,
    ValidationFailed,
)
from shared.models import Batch, Job, User, new_id, utcnow

MAX_REPORTED_LINES = 100
RESULTS_PAGE = 500
MAX_CUSTOM_ID = 64
TOP_K_RANGE = range(1, 21)  # the batch-level top_k's range (api/schemas.py BatchOptions)
JSONL_KEYS = ("custom_id", "url", "top_k")
JSONL_TYPE = "application/jsonl"


def _job_error_codes() -> tuple[str, ...]:
    """Every ``error.code`` a failed job can have: the input errors, the worker's own."""
    classes, seen = [JobInputError, DecodeBusy], set()
    while classes:
        cls = classes.pop()
        seen.add(cls.code)
        classes += cls.__subclasses__()
    # Raised by code, not by class: the worker's crash and the reconciler's give-up.
    return tuple(sorted(seen | {"internal_error", "worker_lost"}))


JOB_ERROR_CODES = _job_error_codes()


@dataclass(frozen=True)
class BatchRequest:
    urls: tuple[str, ...]
    model: str
    top_k: int
    webhook_url: str | None = None
    # Per line, from JSON Lines or {"items": [...]} input; None for plain URL lists.
    custom_ids: tuple[str | None, ...] | None = None
    top_ks: tuple[int | None, ...] | None = None

    def fingerprint(self) -> str:
        payload: list = [self.model, self.top_k, self.webhook_url, self.urls]
        if self.custom_ids is not None:
            payload += [self.custom_ids, self.top_ks]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


@dataclass(frozen=True)
class Unparsable:
    """A JSON Lines line that is not JSON: reported with the other invalid lines."""

    reason: str


def parse_lines(lines: Iterable[str], limit: int, comments: bool = True) -> list[tuple[int, str]]:
    """(line number, url) for each line that is not blank or (``comments``) a ``#`` comment.

    Stops after ``limit`` + 1 URLs: that is already too many, and reading on would
    hold every line of a huge body at once (10 million lines took 1 GB).
    """
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not (comments and line.startswith("#")):
            out.append((number, line))
            if len(out) > limit:
                break
    return out


def parse_jsonl(lines: Iterable[str], limit: int) -> list[tuple[int, object]]:
    """(line number, decoded object) for each non-blank JSON Lines line; a line that is
    not JSON comes as ``Unparsable``. Stops after ``limit`` + 1 lines, as parse_lines.

    A line nested deeper than any batch line can be is ``400 invalid_json`` at once, as
    for a JSON body (api/json_provider.py): Python's decoder would recurse past its limit.
    """
    out: list[tuple[int, object]] = []
    for number, line in parse_lines(lines, limit, comments=False):
        try:
            out.append((number, json_provider.loads(line)))
        except json_provider.TooDeep:
            raise InvalidJSON(
                f"Line {number} is nested deeper than {json_provider.MAX_DEPTH} levels; "
                'each line is one flat object, {"custom_id": "...", "url": "https://..."}.',
                details={"lines": [number]},
            ) from None
        except ValueError:
            out.append((number, Unparsable("not a JSON object")))
    return out


class Utf8Lines:
    """The lines of a text or JSON Lines body, decoded as UTF-8 while they are read.

    A line that is not UTF-8 is noted in ``bad`` and read with U+FFFD for its bad bytes,
    so that parsing goes on; ``check`` then refuses the body, naming those lines.
    (Replacing alone accepted them, and two different bad byte sequences became the same
    custom_id.) Bad bytes are first kept as surrogates (surrogateescape), which valid
    UTF-8 never decodes to: a line that cannot be encoded back held some.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape")
        self.bad: list[int] = []

    def __iter__(self) -> Iterator[str]:
        for number, line in enumerate(self._text, start=1):
            if not line.isascii():
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:
                    self.bad.append(number)
                    line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield line

    def check(self) -> None:
        """422 ``invalid_encoding`` naming the lines that were not UTF-8, if any."""
        if not self.bad:
            return
        shown = self.bad[:MAX_REPORTED_LINES]
        more = " …" if len(self.bad) > len(shown) else ""
        raise ValidationFailed(
            f"{len(self.bad)} line(s) are not valid UTF-8: {', '.join(map(str, shown))}{more}. "
            "Send the body encoded as UTF-8.",
            code="invalid_encoding",
            details={"lines": shown, "count": len(self.bad)},
        )


def line_problem(item: object, seen: dict[str, int]) -> str | None:
    """Why a JSON Lines item cannot be a batch line, or None; records its custom_id in
    ``seen`` (custom_id -> first line number) to find repeats."""
    if isinstance(item, Unparsable):
        return item.reason
    if not isinstance(item, dict):
        return "not a JSON object"
    if unknown := sorted(set(item) - set(JSONL_KEYS)):
        return "; ".join(map(_unknown_key, unknown))
    url = item.get("url")
    if not (isinstance(url, str) and is_valid_url(url.strip())):
        return "'url' must be an absolute http(s) URL"
    top_k = item.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k not in TOP_K_RANGE):
        return f"'top_k' must be an integer from {TOP_K_RANGE[0]} to {TOP_K_RANGE[-1]}"
    return _custom_id_problem(item.get("custom_id"), seen)


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, JSONL_KEYS, n=1)
    meant = f"did you mean {close[0]!r}?" if close else f"use {', '.join(JSONL_KEYS)}"
    return f"unknown field {key!r}: {meant}"


def _custom_id_problem(custom_id: object, seen: dict[str, int]) -> str | None:
    if custom_id is None:
        return None
    if not (isinstance(custom_id, str) and 0 < len(custom_id) <= MAX_CUSTOM_ID):
        return f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters"
    if not custom_id.isprintable():
        return "'custom_id' must be printable characters (no control or line breaks)"
    if custom_id in seen:
        return f"'custom_id' {custom_id!r} repeats line {seen[custom_id]}'s"
    return None


def _check_size(numbered: Sequence[tuple[int, object]]) -> None:
    limit = services().config.max_batch_urls
    if not numbered:
        raise ValidationFailed("The batch has no URLs.", code="empty_batch")
    if len(numbered) > limit:
        raise ValidationFailed(
            f"A batch takes at most {limit} URLs; this one has more.",
            code="too_many_urls",
        )


def build_item_batch_request(
    numbered: list[tuple[int, object]], model: str, top_k: int, webhook: str | None
) -> BatchRequest:
    """A batch from items ``{"custom_id", "url", "top_k"}`` (JSON Lines, or JSON "items"):
    every invalid line is refused at once, with its number and why."""
    _check_size(numbered)
    seen: dict[str, int] = {}
    problems: list[dict] = []
    for number, item in numbered:
        if problem := line_problem(item, seen):
            problems.append({"line": number, "problem": problem})
        elif isinstance(item, dict) and item.get("custom_id") is not None:
            seen[item["custom_id"]] = number
    if problems:
        shown = problems[:MAX_REPORTED_LINES]
        first = "; ".join(f"line {p['line']}: {p['problem']}" for p in shown[:3])
        raise ValidationFailed(
            f"{len(problems)} line(s) are invalid ({first}{' …' if len(problems) > 3 else ''}). "
            'Each line is {"custom_id": "...", "url": "https://...", "top_k": N}; '
            "custom_id and top_k are optional.",
            code="invalid_lines",
            details={
                "lines": [p["line"] for p in shown],
                "problems": shown,
                "count": len(problems),
            },
        )
    items = [item for _, item in numbered if isinstance(item, dict)]
    return BatchRequest(
        urls=tuple(item["url"].strip() for item in items),
        model=model,
        top_k=top_k,
        webhook_url=webhook,
        custom_ids=tuple(item.get("custom_id") for item in items),
        top_ks=tuple(item.get("top_k") for item in items),
    )


def build_batch_request(
    numbered: list[tuple[int, object]], model: str, top_k: int, webhook: str | None
) -> BatchRequest:
    _check_size(numbered)
    bad = [n for n, url in numbered if not (isinstance(url, str) and is_valid_url(url.strip()))]
    if bad:
        shown = bad[:MAX_REPORTED_LINES]
        raise ValidationFailed(
            f"{len(bad)} line(s) are not absolute http(s) URLs: "
            f"{', '.join(map(str, shown))}{' …' if len(bad) > len(shown) else ''}."
            f"{_jsonl_hint(numbered, bad)}",
            code="invalid_urls",
            details={"lines": shown, "count": len(bad)},
        )
    return BatchRequest(
        urls=tuple(str(url).strip() for _, url in numbered),
        model=model,
        top_k=top_k,
        webhook_url=webhook,
    )


def _jsonl_hint(numbered: list[tuple[int, object]], bad: list[int]) -> str:
    """A hint when the refused lines are JSON objects: JSON Lines sent as text/plain."""
    first = dict(numbered)[bad[0]]
    if isinstance(first, str) and first.startswith("{") and first.rstrip().endswith("}"):
        return f" The lines look like JSON Lines: send them with Content-Type: {JSONL_TYPE}."
    return ""


def check_error_codes(codes: Sequence[str]) -> None:
    """422 ``unknown_error_code`` for a code no failed line can have, listing those there
    are: otherwise a typo would only find nothing to retry."""
    unknown = sorted(set(codes) - set(JOB_ERROR_CODES))
    if not unknown:
        return
    close = [m for code in unknown for m in difflib.get_close_matches(code, JOB_ERROR_CODES, 1)]
    meant = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValidationFailed(
        f"Unknown error code(s) {', '.join(map(repr, unknown))}.{meant} A failed line's "
        f"error.code is one of: {', '.join(JOB_ERROR_CODES)}.",
        code="unknown_error_code",
        details={"unknown": unknown, "known": list(JOB_ERROR_CODES)},
    )


def submit_batch(user: User, req: BatchRequest, idempotency_key: str | None) -> tuple[int, dict]:
    fingerprint = req.fingerprint()
    svc = services()
    try:
        with unit_of_work() as session:
            if idempotency_key and (
                found := idempotency.replay(user.id, idempotency_key, fingerprint)
            ):
                return found
            limits().check_submission(user.id)  # a batch is one submission; tokens bound its size
            limits().check_bulk_lines(user.id, len(req.urls))  # ... but a cancel gives them back
            svc.redis.ping()  # a dead broker is a 503 before anything is written
            body = _insert_batch(session, user.id, req, svc.config.batch_max)
            if idempotency_key:
                idempotency.save(user.id, idempotency_key, fingerprint, body)
    except Exception:
        # The same key sent twice at once: the first commit wins, the others replay it.
        if found := idempotency.replay_if_raced(user.id, idempotency_key, fingerprint):
            return found
        raise
    dispatch.refill(svc.sessions, svc.redis, svc.celery, svc.config)
    return 202, body


def _insert_batch(session: Session, user_id: int, req: BatchRequest, batch_max: int) -> dict:
    """Charge the batch's lines and insert it and them, numbered in chunks and waiting for
    shared.dispatch; returns the batch's body."""
    batch_id, job_ids = new_id(), [new_id() for _ in req.urls]
    chunk_of = {
        job_id: n for n, ids in enumerate(chunk(job_ids, req.urls, batch_max)) for job_id in ids
    }
    ledger.charge_batch(session, user_id, batch_id, len(job_ids))  # one ledger row
    session.add(
        Batch(
            id=batch_id,
            user_id=user_id,
            total=len(job_ids),
            model=req.model,
            top_k=req.top_k,
            webhook_url=req.webhook_url,
        )
    )
    session.flush()
    # One row built by shared.jobs, then a copy per line with the line's own columns: a
    # dict merge per line, as cheap as the rows built by hand before (10,000 of them).
    batch_row = jobs.new_row(
        user_id=user_id,
        model=req.model,
        top_k=req.top_k,
        batch_id=batch_id,
        created_at=utcnow(),
        request_id=logs.request_id.get(),
    )
    custom_ids = req.custom_ids or (None,) * len(job_ids)
    top_ks = req.top_ks or (None,) * len(job_ids)
    lines = zip(job_ids, req.urls, custom_ids, top_ks, strict=True)
    jobs.insert_new(
        session,
        [
            {
                **batch_row,
                "id": job_id,
                "batch_index": i,
                "custom_id": custom_id,
                "top_k": line_top_k or req.top_k,
                "input_url": url,
                "chunk": chunk_of[job_id],
            }
            for i, (job_id, url, custom_id, line_top_k) in enumerate(lines)
        ],
    )
    return batches.batch_to_dict(session, session.get_one(Batch, batch_id))


def chunk(job_ids: list[str], urls: tuple[str, ...], size: int) -> list[list[str]]:
    """Messages of up to ``size`` job ids, never splitting one URL's duplicates, so the
    worker fetches and classifies each URL once for all of its lines.

    A batch larger than one message starts with a short one, ``dispatch.FIRST_CHUNK``
    at most, so that a round of users never served costs little (shared/dispatch.py);
    a batch that fits one message stays one, so it needs one turn, not two."""
    by_url: dict[str, list[str]] = defaultdict(list)
    for job_id, url in zip(job_ids, urls, strict=True):
        by_url[url].append(job_id)
    first = min(size, dispatch.FIRST_CHUNK) if len(job_ids) > size else size
    chunks: list[list[str]] = [[]]
    for group in by_url.values():
        limit = first if len(chunks) == 1 else size
        if chunks[-1] and len(chunks[-1]) + len(group) > limit:
            chunks.append([])
        chunks[-1].extend(group)
    return chunks


def retry_batch(
    user: User, batch_id: str, codes: Sequence[str], idempotency_key: str | None
) -> tuple[int, dict]:
    """Re-queue a batch's failed lines (only ``codes``, if any), charging one token each.

    One transaction under the batch's row lock (cancel and completion take it too):
    failed -> queued is a conditional transition, so of two concurrent retries each line
    goes to one, and the charge covers exactly the lines this call moved, all or none.
    The lines then wait in SQL like a new batch's jobs, and ``dispatch.refill`` sends
    them (in their original chunks) when the bulk window has room.
    """
    check_error_codes(codes)
    payload = json.dumps(["retry", batch_id, sorted(set(codes))])
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()
    svc = services()
    try:
        with unit_of_work() as session:
            if idempotency_key and (
                found := idempotency.replay(user.id, idempotency_key, fingerprint)
            ):
                return found
            limits().check_submission(user.id)  # a retry is a submission of its lines
            svc.redis.ping()  # a dead broker is a 503 before anything is written
            batch, retried = _requeue(session, user, batch_id, codes)
            body = {**batches.batch_to_dict(session, batch), "retried": retried}
            if idempotency_key:
                idempotency.save(user.id, idempotency_key, fingerprint, body)
    except Exception:
        # The same key sent twice at once: the second waited on the batch lock and found
        # the lines taken by the first (409), whose answer is the one to give.
        if found := idempotency.replay_if_raced(user.id, idempotency_key, fingerprint):
            return found
        raise
    dispatch.refill(svc.sessions, svc.redis, svc.celery, svc.config)
    return 202, body


def _requeue(
    session: Session, user: User, batch_id: str, codes: Sequence[str]
) -> tuple[Batch, int]:
    """Lock the batch, move its failed lines back to waiting and charge them; returns the
    batch and how many lines were moved."""
    batch = locked_batch(session, user, batch_id)
    if batch.canceled_at is not None:
        raise Conflict(
            "The batch was canceled; submit its lines as a new batch instead.",
            code="batch_canceled",
        )
    batches.check_whole(session, batch)  # 410 once retention has begun to purge it
    runs = jobs.requeue_failed(session, batch_id, codes)
    if not runs:
        which = f" with error code {', '.join(codes)}" if codes else ""
        raise Conflict(
            f"The batch has no failed lines{which} to retry.",
            code="nothing_to_retry",
            details={"failed": batches.counts(session, batch_id)["failed"]},
        )
    # One ledger row for the lines retried, keyed by the batch's new run (reopen makes it
    # so); each line's refund keeps its own run. A 402 rolls all of it back.
    ledger.charge_batch(session, user.id, batch_id, len(runs), batch.retries + 1)
    batches.reopen(session, batch)
    return batch, len(runs)


def locked_batch(session: Session, user: User, batch_id: str) -> Batch:
    """The user's batch, locked until the commit: cancel, retry, delete and completion
    serialise on it. Someone else's batch is as missing as one that does not exist."""
    check_row_id(batch_id, "batch")
    batch = batches.lock(session, batch_id)
    if batch is None or batch.user_id != user.id:
        raise NotFound("No such batch.", code="batch_not_found")
    return batch


class BatchDeleted(ServiceError):
    """The batch was deleted while its results were being streamed."""

    status, code = 410, "batch_deleted"

    def __init__(self, sent: int, total: int) -> None:
        super().__init__(
            f"The batch was deleted while its results were being sent: {sent} of its "
            f"{total} lines were sent. The results are incomplete.",
            details={"sent": sent, "total": total},
        )


def result_lines(batch_id: str, total: int) -> Iterator[dict]:
    """The batch's result lines (shared.jobs.result_line) in input order, read page by
    page in short transactions, so 10,000 lines never sit in memory at once.

    A batch's lines are only ever deleted all at once, with the batch (DELETE, the
    retention purge), but for those a cancel withdrew (never sent: shared.batches.cancel),
    and a page is one statement: fewer than ``total`` lines, and the batch gone, means it
    was deleted between two pages, and ``BatchDeleted`` is raised after the last line
    sent. (One transaction for the whole stream would hold a snapshot open as long as
    the slowest client reads.)
    """
    sent = 0
    for line in _result_pages(batch_id):
        sent += 1
        yield line
    if sent < total and _gone(batch_id):
        raise BatchDeleted(sent, total)


def _gone(batch_id: str) -> bool:
    with unit_of_work(read_only=True) as session:
        return session.scalar(select(Batch.id).where(Batch.id == batch_id)) is None


def _result_pages(batch_id: str) -> Iterator[dict]:
    after: int | None = -1
    while True:
        # Each page in its own short transaction, ended before its lines are sent.
        with unit_of_work(read_only=True) as session:
            page = list(
                session.scalars(
                    select(Job)
                    .where(Job.batch_id == batch_id, Job.batch_index > after)
                    .order_by(Job.batch_index)
                    .limit(RESULTS_PAGE)
                )
            )
            lines = [jobs.result_line(job) for job in page]
            session.expunge_all()  # 500 jobs a page: none kept once read
        yield from lines
        if len(page) < RESULTS_PAGE:
            return
        after = page[-1].batch_index
