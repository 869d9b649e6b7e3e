"""Job submission rules, checked on the real API, database and Redis with no worker running
(jobs stay queued, so every state the API creates can be inspected)."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import requests
from sqlalchemy import func, select
from werkzeug.serving import make_server

from api import create_app
from api.services import services
from shared.models import Job, LedgerEntry, User, WebhookEvent
from tests import support

URL = "http://images.example.com/dog.jpg"


def _count_jobs(app, username: str) -> int:
    with app.app_context(), services().sessions() as session:
        return session.scalar(
            select(func.count()).select_from(Job).join(User).where(User.username == username)
        )


def _balance_and_ledger(app, username: str) -> tuple[int, int]:
    with app.app_context(), services().sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        return user.tokens, support.ledger_sum(session, user.id)


def test_submission_charges_one_token_and_queues(client, user, api_stack):
    resp = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    assert resp.status_code == 202
    job = resp.get_json()
    assert job["status"] == "queued" and job["input"] == {"url": URL}
    assert job["model"] == "mobilenet" and job["top_k"] == 5 and job["result"] is None
    assert _balance_and_ledger(api_stack.app, user["username"]) == (4, 4)
    got = client.get(f"/v1/jobs/{job['id']}", headers=user["headers"]).get_json()
    assert got["id"] == job["id"] and got["status"] == "queued"


def test_bad_input_is_rejected_and_changes_nothing(client, user, api_stack):
    h = user["headers"]
    cases = [
        (
            client.post("/v1/jobs", data="{nope", content_type="application/json", headers=h),
            400,
            "invalid_json",
        ),
        (client.post("/v1/jobs", json={}, headers=h), 422, "missing_input"),
        (client.post("/v1/jobs", json={"url": "ftp://x.org/a.jpg"}, headers=h), 422, "invalid_url"),
        (client.post("/v1/jobs", json={"url": "not a url"}, headers=h), 422, "invalid_url"),
        (
            client.post("/v1/jobs", json={"url": URL, "model": "resnet9000"}, headers=h),
            422,
            "unknown_model",
        ),
        (
            client.post("/v1/jobs", json={"url": URL, "top_k": 0}, headers=h),
            422,
            "validation_error",
        ),
        (
            client.post("/v1/jobs", json={"url": URL, "colour": "red"}, headers=h),
            422,
            "validation_error",
        ),
        (
            client.post("/v1/jobs", data={"file": (io.BytesIO(b"hello"), "a.jpg")}, headers=h),
            415,
            "unsupported_image_format",
        ),
        (
            client.post("/v1/jobs", data={"file": (io.BytesIO(b""), "a.jpg")}, headers=h),
            422,
            "empty_file",
        ),
        (
            client.post("/v1/jobs", data="url=x", content_type="text/plain", headers=h),
            422,
            "invalid_body",
        ),
    ]
    for resp, status, code in cases:
        assert (resp.status_code, resp.get_json()["error"]["code"]) == (status, code)
    assert _count_jobs(api_stack.app, user["username"]) == 0
    assert _balance_and_ledger(api_stack.app, user["username"]) == (5, 5)


def test_upload_over_the_byte_limit_is_413(api_stack, photos_dir):
    small = create_app(api_stack.config.replace(max_image_bytes=50_000))
    client = small.test_client()
    user = support.new_user(client)
    data = (photos_dir / "dog.jpg").read_bytes()
    resp = client.post(
        "/v1/jobs", data={"file": (io.BytesIO(data), "dog.jpg")}, headers=user["headers"]
    )
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "payload_too_large"
    assert f"The file is {len(data):,} bytes" in resp.get_json()["error"]["message"]
    assert _balance_and_ledger(small, user["username"]) == (5, 5)


def test_out_of_tokens_is_402_and_creates_nothing(client, user, api_stack):
    for _ in range(5):
        assert (
            client.post("/v1/jobs", json={"url": URL}, headers=user["headers"]).status_code == 202
        )
    resp = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    assert resp.status_code == 402
    assert resp.get_json()["error"]["code"] == "insufficient_tokens"
    assert _count_jobs(api_stack.app, user["username"]) == 5
    assert _balance_and_ledger(api_stack.app, user["username"]) == (0, 0)


def test_idempotency_key_replays_and_refuses_another_body(client, user, api_stack):
    h = {**user["headers"], "Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json={"url": URL}, headers=h)
    again = client.post("/v1/jobs", json={"url": URL}, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.get_json()["id"] == first.get_json()["id"]
    other = client.post("/v1/jobs", json={"url": URL + "?2"}, headers=h)
    assert other.status_code == 409
    assert other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert _count_jobs(api_stack.app, user["username"]) == 1
    assert _balance_and_ledger(api_stack.app, user["username"]) == (4, 4)


def test_jobs_of_other_users_are_not_found(client, user):
    job = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"]).get_json()
    other = support.new_user(client)
    for resp in (
        client.get(f"/v1/jobs/{job['id']}", headers=other["headers"]),
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=other["headers"]),
        client.get("/v1/jobs/no-such-job", headers=user["headers"]),
    ):
        assert resp.status_code == 404
        assert resp.get_json()["error"]["code"] == "job_not_found"


def test_cancel_refunds_once(client, user, api_stack):
    job = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"]).get_json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user["headers"])
    assert resp.status_code == 200 and resp.get_json()["status"] == "canceled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=user["headers"])
    assert again.status_code == 409
    assert again.get_json()["error"]["code"] == "job_not_cancelable"
    assert _balance_and_ledger(api_stack.app, user["username"]) == (5, 5)


def test_list_paginates_newest_first_and_filters_by_status(client, user):
    ids = [
        client.post("/v1/jobs", json={"url": f"{URL}?{i}"}, headers=user["headers"]).get_json()[
            "id"
        ]
        for i in range(5)
    ]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=user["headers"])
    seen, cursor = [], None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/v1/jobs{query}", headers=user["headers"]).get_json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    canceled = client.get("/v1/jobs?status=canceled", headers=user["headers"]).get_json()
    assert [j["id"] for j in canceled["items"]] == [ids[0]]
    bad = client.get("/v1/jobs?status=weird", headers=user["headers"])
    assert bad.status_code == 422
    assert client.get("/v1/jobs?cursor=%%%", headers=user["headers"]).status_code == 422


def test_concurrent_submissions_never_overdraw(api_stack):
    """20 parallel clients, 5 tokens: exactly 5 jobs, and 15 clean 402s."""
    server = make_server("127.0.0.1", 0, api_stack.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        user = support.new_user(api_stack.client())
        barrier = threading.Barrier(20)

        def submit(i: int) -> int:
            barrier.wait()
            return requests.post(
                f"{base}/v1/jobs", json={"url": f"{URL}?{i}"}, headers=user["headers"], timeout=60
            ).status_code

        with ThreadPoolExecutor(20) as pool:
            codes = sorted(pool.map(submit, range(20)))
    finally:
        server.shutdown()
    assert codes == [202] * 5 + [402] * 15
    assert _count_jobs(api_stack.app, user["username"]) == 5
    assert _balance_and_ledger(api_stack.app, user["username"]) == (0, 0)


def test_redis_down_at_submission_is_503_and_charges_nothing(api_stack, photos_dir):
    # A real connection to a port where no Redis listens.
    down = create_app(api_stack.config.replace(redis_url="redis://127.0.0.1:1/0"))
    client = down.test_client()
    user = support.new_user(client)
    resp = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "service_unavailable"
    upload = (photos_dir / "cat.bmp").read_bytes()
    resp = client.post(
        "/v1/jobs", data={"file": (io.BytesIO(upload), "cat.bmp")}, headers=user["headers"]
    )
    assert resp.status_code == 503
    assert _count_jobs(down, user["username"]) == 0
    assert _balance_and_ledger(down, user["username"]) == (5, 5)
    assert client.get("/readyz").status_code == 503


def test_database_down_is_503(api_stack):
    config = api_stack.config.replace(
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/imgclf"
    )
    client = create_app(config).test_client()
    resp = client.post("/v1/jobs", json={"url": URL}, headers=support.bearer("ick_whatever"))
    assert resp.status_code == 503
    assert resp.get_json()["error"]["code"] == "service_unavailable"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["database"] != "ok"


def test_an_idempotency_key_is_free_again_after_its_ttl(api_stack):
    forgetful = create_app(api_stack.config.replace(idempotency_ttl_s=0))
    client = forgetful.test_client()
    user = support.new_user(client)
    h = {**user["headers"], "Idempotency-Key": "expires"}
    first = client.post("/v1/jobs", json={"url": URL}, headers=h).get_json()
    second = client.post("/v1/jobs", json={"url": URL}, headers=h).get_json()
    assert first["id"] != second["id"]
    assert _balance_and_ledger(forgetful, user["username"]) == (3, 3)


def _ledger_job_ids(app, username: str) -> list[str]:
    with app.app_context(), services().sessions() as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).one()
        rows = session.scalars(select(LedgerEntry.job_id).where(LedgerEntry.user_id == user_id))
        return sorted(j for j in rows if j)


def _events_of(app, job_id: str) -> int:
    with app.app_context(), services().sessions() as session:
        return session.scalar(
            select(func.count()).select_from(WebhookEvent).where(WebhookEvent.job_id == job_id)
        )


def test_delete_refuses_an_unfinished_job_then_removes_it_and_keeps_the_ledger(
    client, user, api_stack
):
    h = user["headers"]
    job = client.post(
        "/v1/jobs", json={"url": URL, "webhook": "http://hooks.example.com/x"}, headers=h
    ).get_json()
    refused = client.delete(f"/v1/jobs/{job['id']}", headers=h)
    assert refused.status_code == 409
    error = refused.get_json()["error"]
    assert error["code"] == "job_not_finished" and "/cancel" in error["message"]
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).status_code == 200  # unchanged

    other = support.new_user(client)
    assert client.delete(f"/v1/jobs/{job['id']}", headers=other["headers"]).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=h).status_code == 200
    assert _events_of(api_stack.app, job["id"]) == 1  # job.completed, owed to the webhook
    ledger_before = _ledger_job_ids(api_stack.app, user["username"])

    resp = client.delete(f"/v1/jobs/{job['id']}", headers=h)
    assert resp.status_code == 204 and resp.get_data() == b""
    assert client.get(f"/v1/jobs/{job['id']}", headers=h).status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}", headers=h).status_code == 404
    assert _events_of(api_stack.app, job["id"]) == 0
    # The charge and the refund stay, with the id of the job that is gone.
    assert _ledger_job_ids(api_stack.app, user["username"]) == ledger_before == [job["id"]] * 2
    assert _balance_and_ledger(api_stack.app, user["username"]) == (5, 5)


def test_delete_of_a_batch_job_points_at_the_batch(client, user):
    batch = client.post("/v1/batches", json={"urls": [URL]}, headers=user["headers"]).get_json()
    client.post(f"/v1/batches/{batch['id']}/cancel", headers=user["headers"])
    job_id = client.get("/v1/jobs", headers=user["headers"]).get_json()["items"][0]["id"]
    resp = client.delete(f"/v1/jobs/{job_id}", headers=user["headers"])
    assert resp.status_code == 409
    error = resp.get_json()["error"]
    assert error["code"] == "job_in_batch" and f"/v1/batches/{batch['id']}" in error["message"]
