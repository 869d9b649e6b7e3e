"""The pages without a browser: redirects, CSRF on every form, who may see what."""

from __future__ import annotations

import re
import uuid

import pytest

from tests import support
from tests.web.conftest import web_app_for

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')
PAGES = ["/app/classify", "/app/bulk", "/app/history", "/app/account"]


@pytest.fixture(scope="session")
def app(api_stack):
    return web_app_for(api_stack.config)


@pytest.fixture
def web(app):
    return app.test_client()


def csrf_of(resp) -> str:
    match = CSRF_META.search(resp.get_data(as_text=True))
    assert match, "no CSRF meta tag on the page"
    return match.group(1)


def log_in(web, username: str, password: str = "correct-horse", next_: str = ""):
    token = csrf_of(web.get("/app/login"))
    return web.post(
        "/app/login",
        data={"username": username, "password": password, "csrf_token": token, "next": next_},
    )


@pytest.fixture
def member(web):
    user = support.new_user(web)
    assert log_in(web, user["username"]).status_code == 302
    return user


def test_pages_need_a_session_and_come_back_after_login(web):
    assert web.get("/").headers["Location"] == "/app/"
    assert web.get("/app/").headers["Location"] == "/app/login"
    for path in [*PAGES, "/app/admin", "/app/jobs/x", "/app/batches/x"]:
        resp = web.get(path)
        assert resp.status_code == 302 and "/app/login?next=" in resp.headers["Location"], path
    user = support.new_user(web)
    resp = log_in(web, user["username"], next_="/app/history")
    assert resp.status_code == 302 and resp.headers["Location"] == "/app/history"
    for path in PAGES:
        resp = web.get(path)
        assert resp.status_code == 200, path
        assert user["username"] in resp.get_data(as_text=True)
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/app/", "/v1/me", "/\\evil.example"]
)
def test_login_never_redirects_off_the_pages(web, target):
    user = support.new_user(web)
    resp = log_in(web, user["username"], next_=target)
    assert resp.status_code == 302 and resp.headers["Location"] == "/app/classify"


def test_wrong_password_is_a_message_not_an_error(web):
    user = support.new_user(web)
    resp = log_in(web, user["username"], password="wrong-horse")
    assert resp.status_code == 401
    assert "Wrong username or password." in resp.get_data(as_text=True)
    assert web.get("/app/classify").status_code == 302


def test_signup_logs_in_and_shows_the_first_key_once(web, app):
    token = csrf_of(web.get("/app/signup"))
    username = f"w{uuid.uuid4().hex[:10]}"
    resp = web.post(
        "/app/signup", data={"username": username, "password": "secret1", "csrf_token": token}
    )
    assert resp.status_code == 302 and resp.headers["Location"] == "/app/account?welcome=1"
    first = web.get("/app/account").get_data(as_text=True)
    key = re.search(r'<code id="new-key-value"[^>]*>(ick_[^<]+)</code>', first).group(1)
    assert f"Welcome, {username}" in first and "5 tokens" in first
    assert web.get("/v1/me", headers=support.bearer(key)).get_json()["username"] == username
    again = web.get("/app/account").get_data(as_text=True)
    assert key not in again and "Your account" in again


def test_signup_problems_are_shown_beside_the_fields(web):
    taken = support.new_user(web)["username"]
    cases = [
        ("a", "secret1", "That username is too short or too long."),
        ("no spaces", "secret1", "That username has characters that are not allowed."),
        ("", "secret1", "Choose a username."),
        (f"w{uuid.uuid4().hex[:8]}", "abc", "Use a password of 6 to 72 characters."),
        (taken, "secret1", "is taken. Please choose another."),
    ]
    for username, password, message in cases:
        token = csrf_of(web.get("/app/signup"))
        resp = web.post(
            "/app/signup", data={"username": username, "password": password, "csrf_token": token}
        )
        text = resp.get_data(as_text=True)
        assert resp.status_code == 422 and message in text, (username, text)
        assert 'aria-invalid="true"' in text


def test_every_form_post_needs_the_csrf_token(web, member):
    username = f"w{uuid.uuid4().hex[:10]}"
    resp = web.post("/app/signup", data={"username": username, "password": "secret1"})
    assert resp.status_code == 400 and "This form has expired" in resp.get_data(as_text=True)
    resp = web.post(
        "/app/login", data={"username": member["username"], "password": "correct-horse"}
    )
    assert resp.status_code == 400
    assert web.post("/app/logout", data={"csrf_token": "forged"}).status_code == 400
    assert web.get("/app/classify").status_code == 200  # still logged in
    assert web.get("/app/logout").status_code == 405
    token = csrf_of(web.get("/app/classify"))
    assert web.post("/app/logout", data={"csrf_token": token}).status_code == 302
    assert web.get("/app/classify").status_code == 302


def test_the_pages_call_v1_with_the_session_and_csrf_header(web, member):
    token = csrf_of(web.get("/app/account"))
    assert web.get("/v1/me").get_json()["username"] == member["username"]
    resp = web.post("/v1/keys", json={"name": "no header"})
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "csrf_failed"
    resp = web.post("/v1/keys", json={"name": "laptop"}, headers={"X-CSRF-Token": token})
    assert resp.status_code == 201


def test_a_single_job_and_a_batch_offer_delete_with_the_csrf_header(web, member):
    token = {"X-CSRF-Token": csrf_of(web.get("/app/account"))}
    url = "http://images.example.com/a.jpg"
    job = web.post("/v1/jobs", json={"url": url}, headers=token).get_json()
    batch = web.post("/v1/batches", json={"urls": [url]}, headers=token).get_json()
    batch_job = next(j for j in web.get("/v1/jobs").get_json()["items"] if j["batch_id"])
    assert 'id="delete-job"' in web.get(f"/app/jobs/{job['id']}").get_data(as_text=True)
    # A batch's job goes with its batch: its page offers no delete of its own.
    assert 'id="delete-job"' not in web.get(f"/app/jobs/{batch_job['id']}").get_data(as_text=True)
    assert 'id="delete-batch"' in web.get(f"/app/batches/{batch['id']}").get_data(as_text=True)
    assert web.post(f"/v1/jobs/{job['id']}/cancel", headers=token).status_code == 200
    resp = web.delete(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "csrf_failed"
    assert web.delete(f"/v1/jobs/{job['id']}", headers=token).status_code == 204


def test_admin_page_is_for_admins_only(web, app, member):
    resp = web.get("/app/admin")
    assert resp.status_code == 403 and "Administrators only" in resp.get_data(as_text=True)
    admin = f"admin{uuid.uuid4().hex[:8]}"
    result = app.test_cli_runner().invoke(args=["create-admin", admin, "--password", "secret1"])
    assert result.exit_code == 0, result.output
    other = app.test_client()
    assert log_in(other, admin, password="secret1").status_code == 302
    text = other.get(f"/app/admin?q={member['username'].upper()}").get_data(as_text=True)
    assert f'data-username="{member["username"]}"' in text
    text = other.get("/app/admin?q=%25_").get_data(as_text=True)  # LIKE wildcards are literal
    assert "No user matches" in text


def test_someone_elses_job_or_batch_is_not_found(web, app, member):
    stranger = support.new_user(web)
    job = web.post(
        "/v1/jobs", json={"url": "http://images.example.com/a.jpg"}, headers=stranger["headers"]
    )
    batch = web.post(
        "/v1/batches",
        json={"urls": ["http://images.example.com/a.jpg"]},
        headers=stranger["headers"],
    )
    for path in (f"/app/jobs/{job.get_json()['id']}", f"/app/batches/{batch.get_json()['id']}"):
        resp = web.get(path)
        assert resp.status_code == 404 and "not found" in resp.get_data(as_text=True)


def test_no_page_loads_anything_from_another_host(web, member):
    for path in [*PAGES, "/app/login"]:
        html = web.get(path).get_data(as_text=True)
        assert not re.search(r'(src|href)="(https?:)?//', html), path
    css = web.get("/app/static/app.css").get_data(as_text=True)
    assert "url(" not in css and "@import" not in css


def test_login_with_the_database_down_is_the_503_page_not_wrong_password(api_stack):
    down = web_app_for(
        api_stack.config.replace(database_url="postgresql+psycopg://postgres@127.0.0.1:1/imgclf")
    ).test_client()
    resp = log_in(down, "someone")
    assert resp.status_code == 503
    page = resp.get_data(as_text=True)
    assert "Temporarily unavailable" in page and "Wrong username or password" not in page
