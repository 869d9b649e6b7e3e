"""Loader processes under the worker command exactly as the docs write it (issue #22 item 0).

The README, the Makefile, scripts/run_local.sh, the Dockerfile and docker-compose start
the worker with the ``celery`` program, whose sys.path lacks the project (Celery adds
the working directory only while it imports the app). Loader processes are spawned
with the parent's sys.path: under that command each one died at once on
``import worker`` and every image failed, while the other tests (``python -m
celery``) passed.
"""

from __future__ import annotations

import io

import pytest

from api import create_app
from tests import support

URL_JOBS, UPLOADS = 16, 4


@pytest.fixture(scope="module")
def documented_worker():
    database_url = support.create_postgres_database()
    config = support.migrated(
        support.test_config(
            database_url,
            runtime="null",
            loader_processes="2",
            fetch_threads=4,
            signup_tokens=URL_JOBS + UPLOADS,
        )
    )
    worker = support.WorkerProcess(config, name="documented", as_documented=True).start()
    try:
        worker.wait_ready()
        yield create_app(config).test_client(), worker
    finally:
        worker.stop()
        support.delete_redis_prefix(config.queue_prefix)
        support.drop_postgres_database(database_url)


def test_url_jobs_and_uploads_succeed_under_the_celery_program(
    documented_worker, photo_server, photos_dir
):
    client, worker = documented_worker
    user = support.new_user(client)
    names = ["parrot.jpg", "dog.jpg", "hot_dog.jpg", "bird.bmp"]
    ids = []
    for i in range(URL_JOBS):
        url = photo_server.url(f"{names[i % len(names)]}?documented{i}")
        resp = client.post("/v1/jobs", json={"url": url}, headers=user["headers"])
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    data = (photos_dir / "cat.bmp").read_bytes()
    for _ in range(UPLOADS):
        upload = {"file": (io.BytesIO(data), "cat.bmp")}
        resp = client.post("/v1/jobs", data=upload, headers=user["basic"])
        assert resp.status_code == 202, resp.get_json()
        ids.append(resp.get_json()["id"])
    jobs = [client.get(f"/v1/jobs/{i}?wait=60", headers=user["headers"]).get_json() for i in ids]
    failed = [(j["status"], j["error"]) for j in jobs if j["status"] != "succeeded"]
    assert not failed, (failed, worker.log_tail())
    assert "ModuleNotFoundError" not in worker.log()
