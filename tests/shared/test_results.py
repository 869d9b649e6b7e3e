"""The stored form of a job's result (shared/results.py): compact in the column, the same
result read back, and rows written before it read unchanged."""

import json
import math

import numpy as np
import pytest
from sqlalchemy import select, text, update

from harness.accounts import charged_job
from shared import jobs, results
from shared.models import Job
from tests import support
from worker.models.base import top_k

LABELS = [f"class {i}" for i in range(1000)]


def _top5(seed: int) -> dict:
    probs = np.random.default_rng(seed).dirichlet(np.full(1000, 0.05)).astype(np.float32)
    return {"predictions": top_k(probs, 5, LABELS)}


# --- the conversion, both ways ---------------------------------------------------------


def test_a_top_k_result_packs_flat_and_expands_to_the_same_json():
    for seed in range(200):
        result = _top5(seed)
        stored = results.pack(result)
        assert isinstance(stored, list) and len(stored) == 15
        assert all(type(v) is int for v in stored[2::3])  # scores in millionths
        assert json.dumps(results.expand(stored)) == json.dumps(result)


def test_every_six_decimal_score_reads_back_exactly():
    scores = [k / results.SCALE for k in range(results.SCALE + 1)]
    packed = [round(s * results.SCALE) for s in scores]
    assert [m / results.SCALE for m in packed] == scores
    assert [repr(m / results.SCALE) for m in packed] == [repr(s) for s in scores]


def test_the_packed_form_reads():
    stored = ["macaw", 88, 931204, "toucan", 96, 1, "x", 0, 1000000]
    assert results.expand(stored) == {
        "predictions": [
            {"label": "macaw", "class_id": 88, "score": 0.931204},
            {"label": "toucan", "class_id": 96, "score": 1e-06},
            {"label": "x", "class_id": 0, "score": 1.0},
        ]
    }


@pytest.mark.parametrize(
    "odd",
    [
        {"predictions": [{"label": "a", "class_id": 1, "score": 0.1234567}]},  # 7 decimals
        {"predictions": [{"label": "a", "class_id": 1, "score": -0.0}]},
        {"predictions": [{"label": "a", "class_id": 1, "score": math.nan}]},
        {"predictions": [{"label": "a", "class_id": 1, "score": 1}]},  # an int score
        {"predictions": [{"label": "a", "class_id": True, "score": 0.5}]},
        {"predictions": [{"class_id": 1, "label": "a", "score": 0.5}]},  # key order
        {"predictions": [{"label": "a", "class_id": 1, "score": 0.5, "extra": 1}]},
        {"predictions": [{"label": "a", "score": 0.5}]},
        {"predictions": [{"label": "a", "class_id": 1, "score": 0.5}], "model": "m"},
        {"predictions": "none"},
    ],
)
def test_what_would_not_read_back_the_same_is_stored_as_it_is(odd):
    assert results.pack(odd) is odd
    assert results.expand(results.pack(odd)) is odd


def test_a_stored_full_result_and_none_read_unchanged():
    old = _top5(1)
    assert results.expand(old) is old
    assert results.pack(None) is None and results.expand(None) is None


def test_a_truncated_packed_form_is_an_error_not_a_shorter_result():
    with pytest.raises(ValueError):
        results.expand(["macaw", 88, 931204, "toucan", 96])


# --- in the jobs table (PostgreSQL and SQLite) -----------------------------------------


@pytest.fixture
def account(session):
    user = support.add_account(session, tokens=3, prefix="r")
    session.commit()
    return user


def _stored_text(session, job_id: str) -> str:
    sql = text("SELECT CAST(result AS TEXT) FROM jobs WHERE id = :id")
    return session.scalar(sql, {"id": job_id})


def test_the_worker_s_write_stores_the_compact_form(session, account):
    one, two, three = (charged_job(session, account.id) for _ in range(3))
    written = {one.id: _top5(1)}  # a lone job: its own statement
    assert jobs.mark_all_succeeded(session, written) == {one.id}
    batch = {two.id: _top5(2), three.id: _top5(3)}  # a batch: one UPDATE with CASE
    assert jobs.mark_all_succeeded(session, batch) == set(batch)
    session.commit()
    for job_id, result in {**written, **batch}.items():
        assert json.loads(_stored_text(session, job_id)) == results.pack(result)
        assert len(_stored_text(session, job_id)) < 150  # the full form: ~320
    session.expire_all()
    rows = session.execute(select(Job.id, Job.result)).all()  # Core-style rows too
    assert {i: r for i, r in rows if i in batch} == batch
    assert session.get(Job, one.id).result == written[one.id]


def test_a_row_in_the_old_form_reads_the_same_as_a_new_one(session, account):
    old, new = charged_job(session, account.id), charged_job(session, account.id)
    result = _top5(7)
    jobs.mark_all_succeeded(session, {new.id: result})
    # As the worker wrote rows before the compact form: the full result's JSON text.
    session.execute(
        text("UPDATE jobs SET status = 'succeeded', result = :r WHERE id = :id"),
        {"r": json.dumps(result), "id": old.id},
    )
    # The same times too, so that the answers may differ in their ids alone.
    times = session.execute(select(Job.created_at, Job.completed_at).where(Job.id == new.id)).one()
    session.execute(update(Job).where(Job.id == old.id).values(**times._asdict()))
    session.commit()
    assert json.loads(_stored_text(session, old.id)) == result  # stored in full
    session.expire_all()
    rows = {j.id: j for j in session.scalars(select(Job).where(Job.id.in_([old.id, new.id])))}
    assert rows[old.id].result == rows[new.id].result == result

    def shown(job_id: str, dump) -> str:
        return dump(rows[job_id]).replace(job_id, "ID")

    def as_answer(job):
        return json.dumps(jobs.job_to_dict(job))

    def as_line(job):
        return json.dumps(jobs.result_line(job))

    assert shown(old.id, as_answer) == shown(new.id, as_answer)
    assert shown(old.id, as_line) == shown(new.id, as_line)
