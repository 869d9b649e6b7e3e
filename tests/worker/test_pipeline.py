"""The batch function called directly (no Celery): real SQL, Redis, HTTP and MobileNet.

A redelivered batch must change nothing: one result, one charge, at most one refund.
"""

import dataclasses
import threading
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from sqlalchemy import event, select, update

from harness.accounts import charged_job
from shared import jobs
from shared.errors import ServiceError
from shared.metrics import MetricsBuffer
from shared.models import Job, LedgerEntry, User, WebhookEvent
from shared.pixel_budget import PixelBudget
from tests import support
from worker import pipeline
from worker.loader import ImageResult, LoadCanceled, ThreadLoader
from worker.runtime import Runtime


@pytest.fixture(scope="session")
def runtime(api_stack):
    rt = Runtime.build(api_stack.config)
    yield rt
    rt.io_pool.shutdown()


@pytest.fixture
def account(runtime):
    return support.new_account(runtime.sessions, tokens=10, prefix="p")


def _submit(runtime, user_id, url, **fields) -> str:
    with runtime.sessions() as s:
        return charged_job(s, user_id, url, **fields).id


def _job(runtime, job_id) -> Job:
    with runtime.sessions() as s:
        return s.get(Job, job_id)


def _ledger(runtime, user_id, job_id):
    with runtime.sessions() as s:
        rows = s.scalars(select(LedgerEntry.reason).where(LedgerEntry.job_id == job_id))
        balance = s.get(User, user_id).tokens
        return sorted(rows), balance, support.ledger_sum(s, user_id)


def test_a_redelivered_batch_changes_nothing(runtime, account, photo_server):
    ok = _submit(runtime, account, photo_server.url("parrot.jpg"))
    bad = _submit(runtime, account, photo_server.url("missing.jpg"))
    assert pipeline.process(runtime, [ok, bad]) is None
    first = _job(runtime, ok)
    assert first.status == "succeeded"
    assert first.result["predictions"][0]["label"] == "macaw"
    assert _job(runtime, bad).error_code == "fetch_failed"

    assert pipeline.process(runtime, [ok, bad]) is None  # the same message again
    again = _job(runtime, ok)
    assert (again.status, again.result, again.completed_at) == (
        "succeeded",
        first.result,
        first.completed_at,
    )
    assert _ledger(runtime, account, ok)[0] == ["charge"]
    reasons, balance, total = _ledger(runtime, account, bad)
    assert reasons == ["charge", "refund"]
    assert balance == total == 9


def test_a_message_loaded_twice_in_one_batch_ends_each_job_once(runtime, account, photo_server):
    # The loader stage may hold a message and its redelivery at once: both load (the
    # second claim takes over), both join a batch, one outcome per job.
    ok = _submit(runtime, account, photo_server.url("parrot.jpg"))
    bad = _submit(runtime, account, photo_server.url("missing.jpg"))
    first, second = pipeline.load(runtime, [ok, bad]), pipeline.load(runtime, [ok, bad])
    assert _job(runtime, ok).status == "processing" and _job(runtime, ok).attempts == 2
    assert pipeline.process(runtime, [ok, bad], [first, second]) is None
    assert _job(runtime, ok).result["predictions"][0]["label"] == "macaw"
    assert _ledger(runtime, account, ok)[0] == ["charge"]
    reasons, balance, total = _ledger(runtime, account, bad)
    assert reasons == ["charge", "refund"]
    assert balance == total == 9


def test_a_url_repeated_in_one_batch_is_fetched_once(runtime, account, photo_server):
    url = photo_server.url("hot_dog.jpg") + "?dup"
    ids = [_submit(runtime, account, url) for _ in range(3)]
    before = photo_server.hits.count("/hot_dog.jpg?dup")
    pipeline.process(runtime, ids)
    assert photo_server.hits.count("/hot_dog.jpg?dup") - before == 1
    labels = {_job(runtime, j).result["predictions"][0]["label"] for j in ids}
    assert labels == {"hotdog"}


def test_each_job_keeps_its_own_top_k(runtime, account, photo_server):
    few = _submit(runtime, account, photo_server.url("bird.bmp"), top_k=1)
    many = _submit(runtime, account, photo_server.url("bird.bmp"), top_k=10)
    pipeline.process(runtime, [few, many])
    assert len(_job(runtime, few).result["predictions"]) == 1
    assert len(_job(runtime, many).result["predictions"]) == 10


def test_a_job_that_keeps_failing_its_worker_ends_failed_and_refunded(
    runtime, account, photo_server
):
    job_id = _submit(runtime, account, photo_server.url("dog.jpg"))
    with runtime.sessions() as s:  # as if three workers had died holding it
        s.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status="processing", attempts=runtime.config.job_max_attempts)
        )
        s.commit()
    pipeline.process(runtime, [job_id])
    job = _job(runtime, job_id)
    assert (job.status, job.error_code) == ("failed", "internal_error")
    assert _ledger(runtime, account, job_id)[0] == ["charge", "refund"]


def test_a_claim_records_the_worker_instance(runtime, account, photo_server):
    # The reconciler re-sends a job at once when this worker's heartbeat stops.
    job_id = _submit(runtime, account, photo_server.url("slow/dog.jpg"))
    named = dataclasses.replace(runtime, worker_id="host/abcd1234")
    with named.sessions() as s:
        [job], _ = pipeline.claim(s, [job_id], named.worker_id)
    assert (job.status, job.claimed_by, job.attempts) == ("processing", "host/abcd1234", 1)
    assert _job(runtime, job_id).claimed_by == "host/abcd1234"
    with runtime.sessions() as s:  # no other test's reconciler must find it lost
        s.execute(update(Job).where(Job.id == job_id).values(status="canceled"))
        s.commit()


def test_a_finished_job_forgets_its_worker(runtime, account, photo_server):
    # Only a processing job's claim is read (by the reconciler): a finished row drops it,
    # on the lone job's statement and on the batch's CASE statement alike.
    named = dataclasses.replace(runtime, worker_id="host/abcd1234")
    lone = _submit(runtime, account, photo_server.url("dog.jpg?forget=1"))
    pipeline.process(named, [lone])
    pair = [_submit(runtime, account, photo_server.url(f"dog.jpg?forget={n}")) for n in (2, 3)]
    pipeline.process(named, pair)
    for job_id in (lone, *pair):
        job = _job(runtime, job_id)
        assert (job.status, job.claimed_by) == ("succeeded", None)


def test_final_and_unknown_jobs_are_skipped(runtime, account, photo_server):
    job_id = _submit(runtime, account, photo_server.url("dog.jpg"))
    with runtime.sessions() as s:
        s.execute(update(Job).where(Job.id == job_id).values(status="canceled"))
        s.commit()
    assert pipeline.process(runtime, [job_id, "no-such-job"]) is None
    assert _job(runtime, job_id).status == "canceled"
    assert _job(runtime, job_id).result is None


def test_private_addresses_are_refused_and_refunded(runtime, account, photo_server):
    config = runtime.config.replace(allow_private_urls=False)
    budget = PixelBudget(config.decode_budget_pixels, config.decode_wait_s)
    strict = dataclasses.replace(runtime, loader=ThreadLoader(config, runtime.uploads, budget))
    job_id = _submit(runtime, account, photo_server.url("dog.jpg"))
    pipeline.process(strict, [job_id])
    job = _job(runtime, job_id)
    assert (job.status, job.error_code) == ("failed", "blocked_address")
    assert _ledger(runtime, account, job_id)[0] == ["charge", "refund"]


def test_pathological_files_fail_as_not_images_and_are_refunded(runtime, account, photo_server):
    ids = [_submit(runtime, account, photo_server.url(n)) for n in ("segments.jpg", "chunks.png")]
    assert pipeline.process(runtime, ids) is None
    for job_id in ids:
        job = _job(runtime, job_id)
        assert (job.status, job.error_code) == ("failed", "not_an_image"), job.error_message
        assert _ledger(runtime, account, job_id)[0] == ["charge", "refund"]


def test_decodes_take_pixels_from_the_process_budget(runtime, account, photo_server):
    # parrot.jpg has about 230,000 pixels: a budget of 1,000 can never hold it.
    tiny_budget = PixelBudget(1000, wait_s=5)
    tiny = dataclasses.replace(
        runtime, loader=ThreadLoader(runtime.config, runtime.uploads, tiny_budget)
    )
    refused = _submit(runtime, account, photo_server.url("parrot.jpg"))
    assert pipeline.process(tiny, [refused]) is None
    job = _job(runtime, refused)
    assert (job.status, job.error_code) == ("failed", "image_too_large")
    assert "at most 1,000 at once (DECODE_BUDGET_PIXELS)" in job.error_message
    ok = _submit(runtime, account, photo_server.url("parrot.jpg"))
    assert pipeline.process(runtime, [ok]) is None
    assert _job(runtime, ok).status == "succeeded"
    assert tiny_budget.free == 1000  # all given back
    assert runtime.loader.work.budget.free == runtime.config.decode_budget_pixels


class _Statements:
    """The statements an engine sends, and whether each ran outside a transaction: on
    PostgreSQL as psycopg sends them (``support.DriverLog``: those run on the driver
    too), on SQLite as SQLAlchemy does (its BEGIN IMMEDIATE included)."""

    def __init__(self, engine) -> None:
        self.engine, self.seen, self.sql = engine, [], []
        self._driver = support.DriverLog(engine, self._add)

    def _add(self, statement: str, autocommit: bool) -> None:
        self.seen.append((statement.split()[0], autocommit))
        self.sql.append(statement)

    def _record(self, _conn, _cursor, statement, *_args) -> None:
        self._add(statement, False)

    @property
    def async_commit(self) -> bool:
        """Whether a statement carried ``SET LOCAL synchronous_commit = off``."""
        return any("set_config('synchronous_commit', 'off', true)" in s for s in self.sql)

    def __enter__(self):
        if self.engine.dialect.name == "postgresql":
            self._driver.__enter__()
        else:
            event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self.engine.dialect.name == "postgresql":
            self._driver.__exit__(*exc)
        else:
            event.remove(self.engine, "before_cursor_execute", self._record)


def test_a_lone_job_is_claimed_and_written_in_one_statement_each(runtime, account, photo_server):
    # Issue #22: at batch 1 the bookkeeping around the forward pass is one round trip
    # for the claim and one for the result (autocommit on PostgreSQL: no BEGIN, COMMIT).
    job_id = _submit(runtime, account, photo_server.url("dog.jpg"))
    engine = runtime.sessions.kw["bind"]
    # SQLite keeps its BEGIN IMMEDIATE (the write lock; in-process, no round trip).
    one = (
        [("UPDATE", True)]
        if engine.dialect.name == "postgresql"
        else [
            ("BEGIN", False),
            ("UPDATE", False),
        ]
    )
    with _Statements(engine) as claim_sql, runtime.sessions() as s:
        [job], events = pipeline.claim(s, [job_id], "w")
    assert (job.status, job.attempts, events) == ("processing", 1, [])
    assert claim_sql.seen == one
    outcome = pipeline.JobOutcome(job, predictions=[{"label": "x", "score": 1.0}])
    with _Statements(engine) as write_sql, runtime.sessions() as s:
        assert pipeline.write(s, [outcome]).events == []
    assert write_sql.seen == one
    # Both commit without waiting for the WAL flush, on PostgreSQL only: each is
    # recoverable if a crash loses it (docs/reliability.md).
    postgres = engine.dialect.name == "postgresql"
    assert (claim_sql.async_commit, write_sql.async_commit) == (postgres, postgres)
    done = _job(runtime, job_id)
    assert (done.status, done.result) == (
        "succeeded",
        {"predictions": [{"label": "x", "score": 1.0}]},
    )
    with runtime.sessions() as s:  # a redelivery after the write changes nothing
        assert pipeline.claim(s, [job_id], "w") == ([], [])


def test_the_write_hands_each_single_job_as_answers_show_it(runtime, account, photo_server):
    # Issue #22: a request waiting on a single job answers from the notification's body,
    # so the body must be the job exactly as a read of the committed row would show it,
    # for a lone job (one statement) and a batch (CASE), and nothing for a failure.
    ids = [_submit(runtime, account, photo_server.url("dog.jpg")) for _ in range(3)]
    with runtime.sessions() as s:
        rows, _ = pipeline.claim(s, ids, "w")
    by_id = {r.id: r for r in rows}
    ok = [{"label": "x", "score": 0.5}]
    lone = [pipeline.JobOutcome(by_id[ids[0]], predictions=ok)]
    pair = [
        pipeline.JobOutcome(by_id[ids[1]], predictions=ok),
        pipeline.JobOutcome(by_id[ids[2]], error=ServiceError("no", code="fetch_failed")),
    ]
    with runtime.sessions() as s:
        written = [pipeline.write(s, lone), pipeline.write(s, pair)]
    assert [sorted(w.bodies) for w in written] == [[ids[0]], [ids[1]]]
    for job_id, w in ((ids[0], written[0]), (ids[1], written[1])):
        assert w.bodies[job_id] == jobs.job_to_dict(_job(runtime, job_id))
        assert w.bodies[job_id]["status"] == "succeeded"


def test_results_with_anything_else_to_undo_commit_synchronously(runtime, account, photo_server):
    # An upload (its bytes are deleted once announced), a failure (a refund) and a job
    # with a webhook (an event) would not come back as they were if a crash lost their
    # write: those writes wait for the disk.
    upload = _submit(runtime, account, None)
    failed = _submit(runtime, account, photo_server.url("dog.jpg"))
    hooked = _submit(runtime, account, photo_server.url("dog.jpg"), webhook_url="http://h.invalid/")
    engine = runtime.sessions.kw["bind"]
    with runtime.sessions() as s:
        rows, _ = pipeline.claim(s, [upload, failed, hooked], "w")
    by_id = {r.id: r for r in rows}
    ok = [{"label": "x", "score": 1.0}]
    for outcome in (
        pipeline.JobOutcome(by_id[upload], predictions=ok),
        pipeline.JobOutcome(by_id[failed], error=ServiceError("no", code="fetch_failed")),
        pipeline.JobOutcome(by_id[hooked], predictions=ok),
    ):
        with _Statements(engine) as write_sql, runtime.sessions() as s:
            pipeline.write(s, [outcome])
        assert not write_sql.async_commit, outcome.job.id
    assert [_job(runtime, j).status for j in (upload, failed, hooked)] == [
        "succeeded",
        "failed",
        "succeeded",
    ]


def test_a_claim_records_job_started_once_beside_plain_jobs(runtime, account, photo_server):
    # A job with a webhook is claimed with its job.started event in one transaction;
    # the plain jobs of the same message go in the one-statement claim.
    plain = _submit(runtime, account, photo_server.url("dog.jpg"))
    hooked = _submit(
        runtime,
        account,
        photo_server.url("dog.jpg"),
        webhook_url="http://hooks.invalid/x",
        webhook_events=["started", "completed"],
    )
    with runtime.sessions() as s:
        rows, events = pipeline.claim(s, [plain, hooked, plain], "w")
    assert sorted(r.id for r in rows) == sorted([plain, hooked]) and len(events) == 1
    with runtime.sessions() as s:  # the redelivery: taken over, no second job.started
        rows, again = pipeline.claim(s, [plain, hooked], "w")
        assert {r.attempts for r in rows} == {2} and again == []
        recorded = s.scalars(select(WebhookEvent).where(WebhookEvent.job_id == hooked)).all()
    assert [(e.event_type, e.payload["data"]["status"]) for e in recorded] == [
        ("job.started", "processing")
    ]
    with runtime.sessions() as s:
        s.execute(update(Job).where(Job.id.in_([plain, hooked])).values(status="canceled"))
        s.commit()


# --- pipeline.Loading, the loader stage, with stand-ins for the claim and the loader ---


class _Handed:
    """A ``done`` callback that records what it was handed."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.loaded = self.error = None

    def __call__(self, loaded, error) -> None:
        self.loaded, self.error = loaded, error
        self.called.set()


class _DoneLoader:
    def submit(self, task) -> Future:
        future: Future = Future()
        future.set_result(ImageResult(arrays={}))
        return future


@pytest.fixture
def stage(monkeypatch):
    """A Loading whose claims wait for ``release[ids[0]]`` when one is set."""
    release: dict[str, threading.Event] = {}
    claims: list[list[list[str]]] = []  # each claim statement's messages

    def claim_messages(rt, messages):
        claims.append(messages)
        for job_ids in messages:
            if job_ids[0] in release:
                release[job_ids[0]].wait(30)
        return [(pipeline.Loaded([], MetricsBuffer()), [["group"]]) for _ in messages]

    monkeypatch.setattr(pipeline, "claim_messages", claim_messages)
    monkeypatch.setattr(pipeline, "image_task", lambda rt, group: group)
    monkeypatch.setattr(pipeline, "take_images", lambda rt, loaded, groups, results: None)
    loading = pipeline.Loading(
        SimpleNamespace(loader=_DoneLoader()), claim_threads=1, first_claim_threads=1
    )
    loading.release, loading.claims = release, claims
    yield loading
    for gate in release.values():
        gate.set()
    loading.stop()


def test_close_keeps_the_claim_threads_and_cancels_what_was_waiting(stage):
    # close runs in celery's signal handler on the consumer's thread, which may be
    # inside submit holding the executor's lock: it must not shut the executor down.
    stage.close()
    handed = _Handed()
    stage.submit(["a"], handed)
    assert handed.called.wait(30)
    assert isinstance(handed.error, LoadCanceled)
    stage.stop()
    with pytest.raises(RuntimeError):
        stage.submit(["b"], _Handed())


def test_an_error_after_the_claim_still_hands_the_message_back(stage, monkeypatch):
    def broken(rt, loaded, groups, results):
        raise KeyError("a model")

    monkeypatch.setattr(pipeline, "take_images", broken)
    handed = _Handed()
    stage.submit(["a"], handed)
    assert handed.called.wait(30)  # on a future's callback: its error would be swallowed
    assert handed.loaded is None and isinstance(handed.error, KeyError)


def test_a_single_job_is_claimed_while_bulk_claims_hold_their_threads(stage):
    stage.release["bulk"] = threading.Event()
    bulk, single = _Handed(), _Handed()
    stage.submit(["bulk"], bulk)  # holds the only bulk claim thread (a database outage)
    stage.submit(["single"], single, first=True)
    assert single.called.wait(30) and single.error is None
    assert not bulk.called.is_set()
    stage.release["bulk"].set()
    assert bulk.called.wait(30)


def test_messages_that_wait_for_a_claim_are_claimed_together(stage):
    # Issue #22: a claim statement per single job cost ~0.6 CPU ms each; those that
    # arrive while one runs share the next.
    stage.release["a"] = threading.Event()
    handed = {j: _Handed() for j in "abcd"}
    stage.submit(["a"], handed["a"], first=True)  # holds the only interactive thread
    support.wait_for(lambda: stage.claims == [[["a"]]], 30, "the first claim")
    for j in "bcd":
        stage.submit([j], handed[j], first=True)
    stage.release["a"].set()
    assert all(h.called.wait(30) and h.error is None for h in handed.values())
    assert stage.claims == [[["a"]], [["b"], ["c"], ["d"]]]


def test_one_claim_statement_for_several_messages(runtime, account, photo_server):
    url = photo_server.url("dog.jpg")
    a, b, c = (_submit(runtime, account, url) for _ in range(3))
    engine = runtime.sessions.kw["bind"]
    with _Statements(engine) as sql:
        claimed = pipeline.claim_messages(runtime, [[a], [b, a], [c]])
    assert [st for st, _ in sql.seen].count("UPDATE") == 1
    ids = [[o.job.id for o in loaded.outcomes] for loaded, _ in claimed]
    assert ids == [[a], [b, a], [c]]
    # A job in two messages is claimed once, and each message loads its own images.
    assert _job(runtime, a).attempts == 1
    assert [len(groups) for _, groups in claimed] == [1, 1, 1]
    assert all(not loaded.requeue for loaded, _ in claimed)
