"""The loop closed: a model the pipeline trained, served by a real worker through the API.

``POST /v1/jobs`` names the trained model; a Celery worker configured with
``MODELS=<name>`` and ``MODEL_DIR=<the pipeline's model dir>`` loads it by name and answers
with CIFAR-10 class names. Embedded SQLite and the local Redis keep it to one worker start.
"""

from __future__ import annotations

import io

import pytest

from tests import support
from tests.training.conftest import CIFAR_CLASSES, NAME, Trained

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(trained: Trained, sqlite_url: str):
    from api import create_app

    # Only the trained model: the worker then starts without loading MobileNet.
    config = support.migrated(
        support.test_config(
            sqlite_url, models=(NAME,), default_model=NAME, model_dir=str(trained.model_dir)
        )
    )
    worker = support.WorkerProcess(config, name="trained").start()
    try:
        worker.wait_ready()
        yield create_app(config).test_client()
    finally:
        worker.stop()
        support.delete_redis_prefix(config.queue_prefix)


def test_a_job_naming_the_trained_model_gets_cifar10_labels(served, photos_dir) -> None:
    user = support.new_user(served)
    photo = photos_dir / "cat.bmp"
    resp = served.post(
        "/v1/jobs",
        data={"file": (io.BytesIO(photo.read_bytes()), photo.name), "model": NAME, "top_k": "3"},
        headers=user["basic"],
    )
    assert resp.status_code == 202, resp.get_json()
    assert resp.get_json()["model"] == NAME
    job = served.get(f"/v1/jobs/{resp.get_json()['id']}?wait=30", headers=user["headers"])
    job = job.get_json()
    assert job["status"] == "succeeded", job
    predictions = job["result"]["predictions"]
    assert len(predictions) == 3
    assert all(p["label"] in CIFAR_CLASSES for p in predictions)
    assert [p["label"] for p in predictions] == [CIFAR_CLASSES[p["class_id"]] for p in predictions]
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


def test_a_model_that_is_not_served_is_refused(served, photos_dir) -> None:
    user = support.new_user(served)
    resp = served.post("/v1/jobs", json={"url": "http://127.0.0.1/x.jpg", "model": "mobilenet"},
                       headers=user["headers"])  # fmt: skip
    assert resp.status_code == 422
    # A built-in model this deployment does not serve: says so, and names the setting.
    assert resp.get_json()["error"]["code"] == "model_not_enabled"
    assert "MODELS" in resp.get_json()["error"]["message"]
