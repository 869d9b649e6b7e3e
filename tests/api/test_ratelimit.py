"""Rate limits on submissions, deletions and password guessing (counted in the real Redis)."""

from api import create_app
from tests import support

URL = "http://images.example.com/cat.jpg"


def test_submissions_beyond_the_limit_are_429_and_free(api_stack):
    app = create_app(api_stack.config.replace(rate_limit_submit="3/minute"))
    client = app.test_client()
    user = support.new_user(client)
    codes = [
        client.post("/v1/jobs", json={"url": URL}, headers=user["headers"]).status_code
        for _ in range(4)
    ]
    assert codes == [202, 202, 202, 429]
    refused = client.post("/v1/jobs", json={"url": URL}, headers=user["headers"])
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert client.get("/v1/me", headers=user["headers"]).get_json()["tokens"] == 2
    other = support.new_user(client)  # limits are per user
    assert client.post("/v1/jobs", json={"url": URL}, headers=other["headers"]).status_code == 202


def test_deletions_beyond_the_limit_are_429(api_stack):
    app = create_app(api_stack.config.replace(rate_limit_delete="2/minute"))
    client = app.test_client()
    user = support.new_user(client)
    codes = [
        client.delete("/v1/jobs/no-such-job", headers=user["headers"]).status_code for _ in range(3)
    ]
    assert codes == [404, 404, 429]  # a miss costs a lookup too, so it counts


def test_password_guessing_is_slowed_down(api_stack):
    app = create_app(api_stack.config.replace(login_failure_limit="3/minute"))
    client = app.test_client()
    user = support.new_user(client)
    wrong = support.basic_auth(user["username"], "not-the-password")
    assert [client.get("/v1/me", headers=wrong).status_code for _ in range(3)] == [401] * 3
    # Now even the right password waits for the window to pass.
    locked = client.get("/v1/me", headers=user["basic"])
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) >= 1
    # The API key still works, and other users are not affected.
    assert client.get("/v1/me", headers=user["headers"]).status_code == 200
    other = support.new_user(client)
    assert client.get("/v1/me", headers=other["basic"]).status_code == 200


def test_batch_lines_beyond_the_limit_are_429_even_when_canceled(api_stack):
    """A cancel refunds its lines, so their count, not the tokens, bounds the rows a
    submit-and-cancel loop writes."""
    config = api_stack.config.replace(max_batch_urls=4, rate_limit_bulk_lines="6/minute")
    client = create_app(config).test_client()
    user = support.new_user(client)
    urls = [f"http://images.example.com/{i}.jpg" for i in range(4)]
    batch = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert batch.status_code == 202
    cancel = client.post(f"/v1/batches/{batch.get_json()['id']}/cancel", headers=user["headers"])
    assert cancel.status_code == 200
    refused = client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["error"]["code"] == "rate_limited"
    assert "batch lines" in refused.get_json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.get("/v1/me", headers=user["headers"]).get_json()["tokens"] == 5
    fits = client.post("/v1/batches", json={"urls": urls[:2]}, headers=user["headers"])
    assert fits.status_code == 202  # 4 + 2 lines: within the 6
    # The window is full: refused before the lines are checked (these are no URLs).
    unread = client.post(
        "/v1/batches", data="not a URL\n" * 4, content_type="text/plain", headers=user["headers"]
    )
    assert unread.status_code == 429, unread.get_json()
    other = support.new_user(client)  # per user
    assert (
        client.post("/v1/batches", json={"urls": urls}, headers=other["headers"]).status_code == 202
    )
