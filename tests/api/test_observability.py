"""Metrics after real traffic, request ids from the API into the worker, worker heartbeat."""

import time

from prometheus_client.parser import text_string_to_metric_families

from api import create_app
from shared import metrics
from shared.queue import interactive_queue
from tests import support
from worker.runtime import METRICS_SENT_WITHIN_S


def _samples(client) -> dict:
    text = client.get("/metrics").get_data(as_text=True)
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _settled_samples(client) -> dict:
    """The samples once the workers' metrics have not moved for two flush intervals: a
    job an earlier test finished reaches Redis up to one interval after its answer
    (shared.metrics.FLUSH_INTERVAL_S), and must not count as this test's."""
    names = tuple(f"imgclf_{name}" for name in metrics.METRICS)
    quiet_s = 2 * METRICS_SENT_WITHIN_S
    last = {"workers": None, "since": 0.0}

    def settled():
        samples = _samples(client)
        workers = {k: v for k, v in samples.items() if k[0].startswith(names)}
        if workers != last["workers"]:
            last.update(workers=workers, since=time.monotonic())
            return None
        return samples if time.monotonic() - last["since"] >= quiet_s else None

    return support.wait_for(settled, 60, "the workers' metrics to settle", interval=0.2)


def _delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_metrics_move_by_the_right_amounts(stack, photo_server):
    client = stack.client()
    user = support.new_user(client)
    before = _settled_samples(client)
    urls = [
        photo_server.url("parrot.jpg?m1"),
        photo_server.url("bird.bmp?m2"),
        photo_server.url("missing-m3.jpg"),
    ]
    ids = [
        client.post("/v1/jobs", json={"url": u}, headers=user["headers"]).get_json()["id"]
        for u in urls
    ]
    for job_id in ids:
        client.get(f"/v1/jobs/{job_id}?wait=30", headers=user["headers"])

    # The worker sends what its batches recorded once a second (shared.metrics).
    def recorded():
        s = _samples(client)
        finished = _delta(before, s, "imgclf_jobs_finished_total", status="succeeded")
        failed = _delta(before, s, "imgclf_jobs_finished_total", status="failed")
        return s if finished >= 2 and failed >= 1 else None

    after = support.wait_for(
        recorded,
        30,
        "the worker's metrics of these jobs",
        interval=0.2,
    )
    d = lambda name, **labels: _delta(before, after, name, **labels)  # noqa: E731
    assert d("imgclf_http_requests_total", method="POST", route="/v1/jobs", status="202") == 3
    assert d("imgclf_jobs_finished_total", status="succeeded") == 2
    assert d("imgclf_jobs_finished_total", status="failed") == 1
    assert d("imgclf_image_fetch_failures_total", code="fetch_failed") == 1
    assert d("imgclf_tokens_total", reason="charge") == 3
    assert d("imgclf_tokens_total", reason="refund") == 1
    assert d("imgclf_batch_size_count") >= 1
    assert d("imgclf_model_forward_seconds_count", model="mobilenet") >= 1
    assert after[("imgclf_jobs", (("status", "succeeded"),))] >= 2


def test_a_request_id_follows_the_job_into_the_worker(stack, photo_server):
    client = stack.client()
    user = support.new_user(client)
    resp = client.post(
        "/v1/jobs",
        json={"url": photo_server.url("eagle.jpg?rid")},
        headers={**user["headers"], "X-Request-ID": "trace-4f2a9c", "Prefer": "wait=30"},
    )
    assert resp.headers["X-Request-ID"] == "trace-4f2a9c"
    job = resp.get_json()
    assert job["request_id"] == "trace-4f2a9c" and job["status"] == "succeeded"
    support.wait_for(
        lambda: "[trace-4f2a9c] job " + job["id"] in stack.worker.log(),
        10,
        "the worker's log line with the request id",
    )
    generated = client.get("/v1/me", headers=user["headers"]).headers["X-Request-ID"]
    assert len(generated) == 32


def test_readiness_reports_the_worker_heartbeat(stack):
    checks = stack.client().get("/readyz").get_json()["checks"]
    assert checks["database"] == checks["redis"] == "ok"
    assert checks["worker_heartbeat_age_s"] is not None
    assert 0 <= checks["worker_heartbeat_age_s"] < 30


def test_queue_depth_is_read_from_the_broker(tmp_path):
    # On RabbitMQ the messages are not in Redis: /metrics must ask the broker.
    config = support.migrated(
        support.test_config(f"sqlite:///{tmp_path / 'q.db'}", broker_url=support.RABBITMQ_URL)
    )
    client = create_app(config).test_client()
    user = support.new_user(client)
    try:
        for i in range(2):
            resp = client.post(
                "/v1/jobs", json={"url": f"http://x/{i}.jpg"}, headers=user["headers"]
            )
            assert resp.status_code == 202
        queue = interactive_queue(config)
        assert _samples(client)[("imgclf_queue_depth", (("queue", queue),))] == 2
    finally:
        support.delete_rabbitmq_queues(config)
        support.delete_redis_prefix(config.queue_prefix)


def _local_app(tmp_path, **overrides):
    config = support.migrated(support.test_config(f"sqlite:///{tmp_path / 'm.db'}", **overrides))
    return create_app(config), config


def test_metrics_are_not_public_without_a_token(tmp_path):
    # Issue #23: /metrics (token totals, queue depths) answered anyone.
    app, config = _local_app(tmp_path)
    client = app.test_client()
    try:
        assert client.get("/metrics").status_code == 200  # on this machine, straight in
        for environ, headers in (
            ({"REMOTE_ADDR": "203.0.113.9"}, {}),  # another machine
            ({}, {"X-Forwarded-For": "203.0.113.9"}),  # through a proxy on this machine
        ):
            resp = client.get("/metrics", environ_base=environ, headers=headers)
            assert resp.status_code == 403
            assert resp.get_json()["error"]["code"] == "metrics_forbidden"
            assert "imgclf_tokens_total" not in resp.get_data(as_text=True)
    finally:
        support.delete_redis_prefix(config.queue_prefix)


def test_metrics_take_the_bearer_token_from_anywhere_and_nothing_else(tmp_path):
    app, config = _local_app(tmp_path, metrics_token="s3cret-metrics")
    client = app.test_client()
    user = support.new_user(client)
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, user["headers"]):
            resp = client.get("/metrics", environ_base=remote, headers=headers)
            assert resp.status_code == 401
            assert resp.get_json()["error"]["code"] == "metrics_token_required"
            assert "Bearer" in resp.headers["WWW-Authenticate"]
        # With a token set, even a local request needs it.
        assert client.get("/metrics").status_code == 401
        ok = client.get(
            "/metrics", environ_base=remote, headers={"Authorization": "Bearer s3cret-metrics"}
        )
        assert ok.status_code == 200 and "imgclf_http_requests_total" in ok.get_data(as_text=True)
    finally:
        support.delete_redis_prefix(config.queue_prefix)


def test_a_null_runtime_deployment_says_so_on_readyz_and_every_answer(tmp_path):
    app, config = _local_app(tmp_path, runtime="null", ready_heartbeat_max_age_s=0)
    client = app.test_client()
    try:
        ready = client.get("/readyz")
        assert ready.get_json()["checks"]["runtime"].startswith("null: ")
        user = support.new_user(client)
        for resp in (ready, client.get("/v1/me", headers=user["headers"]), client.get("/nope")):
            assert resp.headers["X-Imgclf-Runtime"].startswith("null: ")
        real, real_config = _local_app(tmp_path / "real")
        assert "runtime" not in real.test_client().get("/readyz").get_json()["checks"]
        assert "X-Imgclf-Runtime" not in real.test_client().get("/healthz").headers
        support.delete_redis_prefix(real_config.queue_prefix)
    finally:
        support.delete_redis_prefix(config.queue_prefix)
