"""Answers show a result byte for byte the same whether its row holds the compact stored
form (shared/results.py) or the full form rows written before it hold."""

import json

from sqlalchemy import select, text, update

from api.services import services
from shared import jobs
from shared.models import Job

URL = "http://images.example.com/dog.jpg"
RESULT = {
    "predictions": [
        {"label": "macaw", "class_id": 88, "score": 0.931204},
        {"label": "toucan", "class_id": 96, "score": 0.031102},
        {"label": "lorikeet", "class_id": 90, "score": 0.010215},
        {"label": "bee_eater", "class_id": 92, "score": 4e-05},
        {"label": "jacamar", "class_id": 95, "score": 1e-06},
    ]
}


def _finish(app, new_id: str, old_id: str) -> None:
    """``new_id`` as the worker writes a result now, ``old_id`` as it did before (the full
    JSON text), with the same times and request id so that their answers can differ only in ids."""
    with app.app_context(), services().sessions() as session:
        assert jobs.mark_all_succeeded(session, {new_id: RESULT}) == {new_id}
        session.execute(
            text("UPDATE jobs SET status = 'succeeded', result = :r WHERE id = :id"),
            {"r": json.dumps(RESULT), "id": old_id},
        )
        times = session.execute(
            select(Job.created_at, Job.completed_at, Job.request_id).where(Job.id == new_id)
        ).one()
        session.execute(update(Job).where(Job.id == old_id).values(**times._asdict()))
        session.commit()
        stored = session.execute(
            text("SELECT id, CAST(result AS TEXT) FROM jobs WHERE id IN (:a, :b)"),
            {"a": new_id, "b": old_id},
        ).all()
    forms = {job_id: json.loads(value) for job_id, value in stored}
    assert isinstance(forms[new_id], list) and forms[old_id] == RESULT


def test_a_job_answers_the_same_from_either_stored_form(client, user, api_stack):
    h = user["headers"]
    new, old = (client.post("/v1/jobs", json={"url": URL}, headers=h).get_json() for _ in "ab")
    _finish(api_stack.app, new["id"], old["id"])
    answers = {j["id"]: client.get(f"/v1/jobs/{j['id']}", headers=h) for j in (new, old)}
    bodies = {i: r.get_data(as_text=True).replace(i, "ID") for i, r in answers.items()}
    assert bodies[new["id"]] == bodies[old["id"]]
    assert answers[new["id"]].get_json()["result"] == RESULT
    listed = client.get("/v1/jobs?status=succeeded", headers=h).get_json()["items"]
    assert [j["result"] for j in listed] == [RESULT, RESULT]


def test_a_batch_s_results_read_the_same_from_either_stored_form(client, user, api_stack):
    h = user["headers"]
    batch = client.post("/v1/batches", json={"urls": [URL, URL]}, headers=h).get_json()
    with api_stack.app.app_context(), services().sessions() as session:
        ids = session.scalars(
            select(Job.id).where(Job.batch_id == batch["id"]).order_by(Job.batch_index)
        ).all()
    _finish(api_stack.app, ids[0], ids[1])
    url = f"/v1/batches/{batch['id']}/results"
    first, second = client.get(url, headers=h).get_data(as_text=True).splitlines()
    assert first.replace('"index": 0', '"index": 1') == second
    assert json.loads(first)["predictions"] == RESULT["predictions"]
    csv_rows = client.get(url + "?format=csv", headers=h).get_data(as_text=True).splitlines()
    assert csv_rows[1].removeprefix("0,") == csv_rows[2].removeprefix("1,")
    assert csv_rows[1].split(",")[3:6] == ["macaw", "88", "0.931204"]
