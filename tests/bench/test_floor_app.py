"""bench/floor_app.py, the HTTP floor bench.bookkeeping measures: it must answer as the
API's submission does (202 and a job-shaped body) while doing nothing else."""

from bench.floor_app import app


def test_the_floor_answers_a_submission_like_the_api():
    client = app.test_client()
    resp = client.post("/v1/jobs", json={"url": "http://photos.example/a.jpg"})
    assert resp.status_code == 202
    job = resp.get_json()
    assert job["status"] == "queued" and job["input"] == {"url": "http://photos.example/a.jpg"}
    assert len(job["id"]) == 36
    assert client.get("/healthz").status_code == 200
