"""Browser sessions live on the server too (issue #14, item 7): log-out revokes them,
and no secret ever travels in the cookie."""

from __future__ import annotations

import uuid

import pytest

from tests import support
from tests.web.conftest import web_app_for
from tests.web.test_views import csrf_of, log_in


@pytest.fixture(scope="session")
def app(api_stack):
    return web_app_for(api_stack.config)


def _cookie(client) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def _decoded(app, value: str) -> dict:
    return dict(app.session_interface.get_signing_serializer(app).loads(value))


def test_a_copied_cookie_stops_working_after_logout(app):
    web = app.test_client()
    user = support.new_user(web)
    assert log_in(web, user["username"]).status_code == 302
    token = csrf_of(web.get("/app/account"))
    stolen = _cookie(web)
    assert web.post("/app/logout", data={"csrf_token": token}).status_code == 302

    thief = app.test_client()
    thief.set_cookie("session", stolen)
    resp = thief.post("/v1/keys", json={"name": "stolen"}, headers={"X-CSRF-Token": token})
    assert resp.status_code == 401, resp.get_json()
    assert thief.get("/v1/me").status_code == 401
    assert thief.get("/app/account").status_code == 302  # to the log-in page


def test_a_session_works_until_logout_and_a_new_login_gets_a_new_one(app):
    web = app.test_client()
    user = support.new_user(web)
    log_in(web, user["username"])
    first = _cookie(web)
    assert web.get("/v1/me").get_json()["username"] == user["username"]
    other = app.test_client()
    log_in(other, user["username"])  # a second device
    assert _decoded(app, _cookie(other))["sid"] != _decoded(app, first)["sid"]
    token = csrf_of(web.get("/app/account"))
    web.post("/app/logout", data={"csrf_token": token})
    assert other.get("/v1/me").status_code == 200  # logging out one device ends only that


def test_a_cookie_without_a_server_session_is_not_logged_in(app):
    web = app.test_client()
    user = support.new_user(web)
    log_in(web, user["username"])
    forged = app.session_interface.get_signing_serializer(app).dumps(
        {**_decoded(app, _cookie(web)), "sid": "made-up"}
    )
    other = app.test_client()
    other.set_cookie("session", forged)
    assert other.get("/v1/me").status_code == 401


def test_signup_keeps_the_new_key_out_of_the_cookie(app):
    web = app.test_client()
    token = csrf_of(web.get("/app/signup"))
    username = f"w{uuid.uuid4().hex[:10]}"
    resp = web.post(
        "/app/signup", data={"username": username, "password": "secret1", "csrf_token": token}
    )
    assert resp.status_code == 302
    cookie = _cookie(web)
    assert "ick_" not in str(_decoded(app, cookie)) and "ick_" not in cookie
    page = web.get("/app/account").get_data(as_text=True)
    assert 'id="new-key-value"' in page and "ick_" in page  # still shown once, from the server
    assert "ick_" not in web.get("/app/account").get_data(as_text=True).split("curl")[0]


def test_logging_in_again_ends_the_browsers_previous_session(app):
    """A copy of the old cookie must not outlive a new log-in on the same browser."""
    web = app.test_client()
    user = support.new_user(web)
    log_in(web, user["username"])
    stolen = _cookie(web)
    token = csrf_of(web.get("/app/account"))  # the log-in page redirects a logged-in user
    again = web.post(
        "/app/login",
        data={"username": user["username"], "password": "correct-horse", "csrf_token": token},
    )
    assert again.status_code == 302
    assert _decoded(app, _cookie(web))["sid"] != _decoded(app, stolen)["sid"]
    assert web.get("/v1/me").status_code == 200
    thief = app.test_client()
    thief.set_cookie("session", stolen)
    assert thief.get("/v1/me").status_code == 401
