"""Jobs end to end: API -> Redis -> a real Celery worker process -> real MobileNet -> SQL."""

import io

import pytest

from tests import support

DOG_BREEDS = range(151, 269)
CATS = {"Egyptian_cat", "tabby", "tiger_cat"}


@pytest.fixture
def worker_client(stack):
    return stack.client()


@pytest.fixture
def worker_user(worker_client):
    return support.new_user(worker_client)


def _wait(client, user, job_id):
    resp = client.get(f"/v1/jobs/{job_id}?wait=30", headers=user["headers"])
    assert resp.status_code == 200
    return resp.get_json()


def test_url_job_finds_a_dog_and_costs_one_token(worker_client, worker_user, photo_server):
    resp = worker_client.post(
        "/v1/jobs", json={"url": photo_server.url("dog.jpg")}, headers=worker_user["headers"]
    )
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued"
    me = worker_client.get("/v1/me", headers=worker_user["headers"]).get_json()
    assert me["tokens"] == 4
    job = _wait(worker_client, worker_user, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    predictions = job["result"]["predictions"]
    assert len(predictions) == 5
    assert predictions[0]["class_id"] in DOG_BREEDS
    assert set(predictions[0]) == {"label", "class_id", "score"}
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert job["started_at"] and job["completed_at"] and job["error"] is None


def test_upload_of_a_bmp_finds_a_cat(worker_client, worker_user, photos_dir):
    data = (photos_dir / "cat.bmp").read_bytes()
    resp = worker_client.post(
        "/v1/jobs", data={"file": (io.BytesIO(data), "cat.bmp")}, headers=worker_user["basic"]
    )
    assert resp.status_code == 202
    assert resp.get_json()["input"] == {"filename": "cat.bmp"}
    job = _wait(worker_client, worker_user, resp.get_json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["predictions"][0]["label"] in CATS


def test_prefer_wait_answers_with_the_finished_job(worker_client, worker_user, photo_server):
    resp = worker_client.post(
        "/v1/jobs",
        json={"url": photo_server.url("parrot.jpg"), "top_k": 3},
        headers={**worker_user["headers"], "Prefer": "wait=30"},
    )
    assert resp.status_code == 200
    assert resp.headers["Preference-Applied"] == "wait=30"
    job = resp.get_json()
    assert job["status"] == "succeeded"
    assert job["result"]["predictions"][0]["label"] == "macaw"
    assert len(job["result"]["predictions"]) == 3


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("missing.jpg", "fetch_failed"),
        ("notes.jpg", "not_an_image"),
        ("bomb.png", "image_too_large"),
    ],
)
def test_bad_urls_fail_with_a_code_and_are_refunded(
    worker_client, worker_user, photo_server, name, code
):
    resp = worker_client.post(
        "/v1/jobs",
        json={"url": photo_server.url(name)},
        headers={**worker_user["headers"], "Prefer": "wait=30"},
    )
    job = resp.get_json()
    assert job["status"] == "failed", job
    assert job["error"]["code"] == code and job["error"]["message"]
    assert job["result"] is None
    me = worker_client.get("/v1/me", headers=worker_user["headers"]).get_json()
    assert me["tokens"] == 5


def test_many_jobs_at_once_all_finish_with_the_right_labels(worker_client, photo_server):
    user = support.new_user(worker_client)
    ids = {}
    for name in ("parrot.jpg", "dog.jpg", "hot_dog.jpg", "bird.bmp", "parrot.jpg"):
        resp = worker_client.post(
            "/v1/jobs", json={"url": photo_server.url(name)}, headers=user["headers"]
        )
        ids[resp.get_json()["id"]] = name
    expected = {"parrot.jpg": "macaw", "hot_dog.jpg": "hotdog", "bird.bmp": "chickadee"}
    for job_id, name in ids.items():
        job = _wait(worker_client, user, job_id)
        assert job["status"] == "succeeded", job
        top = job["result"]["predictions"][0]
        if name == "dog.jpg":
            assert top["class_id"] in DOG_BREEDS
        else:
            assert top["label"] == expected[name]


def test_long_poll_without_wait_answers_at_once(worker_client, worker_user, photo_server):
    job = worker_client.post(
        "/v1/jobs", json={"url": photo_server.url("eagle.jpg")}, headers=worker_user["headers"]
    ).get_json()
    now = worker_client.get(f"/v1/jobs/{job['id']}", headers=worker_user["headers"]).get_json()
    assert now["status"] in {"queued", "processing", "succeeded"}
    assert _wait(worker_client, worker_user, job["id"])["status"] == "succeeded"
