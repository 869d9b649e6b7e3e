"""Hostile uploads (issue #14): the API reads only a bounded header, after auth and the rate
limit, and refuses before charging. Real API, database and Redis; no worker."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from api import create_app
from api.services import services
from shared.models import Job, User
from tests import support

URL = "http://images.example.com/dog.jpg"
HOSTILE = {
    "segments.jpg": lambda: support.jpeg_segment_flood(4_800_000),  # 19 MB
    "chunks.png": lambda: support.png_chunk_flood(1_600_000),  # 19 MB
}


def _upload(client, user: dict, name: str, data: bytes):
    return client.post("/v1/jobs", data={"file": (io.BytesIO(data), name)}, headers=user["headers"])


def _account(app, username: str) -> tuple[int, int, int]:
    """(balance, ledger sum, jobs) of a user."""
    with app.app_context(), services().sessions() as session:
        user = session.scalars(select(User).where(User.username == username)).one()
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.user_id == user.id))
        return user.tokens, support.ledger_sum(session, user.id), jobs


@pytest.fixture
def no_pillow(monkeypatch):
    """The API must not hand uploads to Pillow at all: its parsers are what cost seconds."""

    def pillow_open(*args, **kwargs):
        raise AssertionError("the API parsed an upload with Pillow")

    monkeypatch.setattr("PIL.Image.open", pillow_open)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_pathological_files_are_refused_before_any_charge(api_stack, no_pillow, name):
    client = api_stack.client()
    rich, broke = support.new_user(client), support.new_user(client)
    for _ in range(5):  # spend every token: a user with none must still be refused the same
        assert (
            client.post("/v1/jobs", json={"url": URL}, headers=broke["headers"]).status_code == 202
        )
    data = HOSTILE[name]()
    for user, account in ((rich, (5, 5, 0)), (broke, (0, 0, 5))):
        resp = _upload(client, user, name, data)
        assert resp.status_code == 415, resp.get_json()
        error = resp.get_json()["error"]
        assert error["code"] == "unsupported_image_format"
        assert "too many" in error["message"] or "more than" in error["message"]
        assert _account(api_stack.app, user["username"]) == account


def test_the_header_is_read_only_after_authentication_and_the_rate_limit(api_stack, monkeypatch):
    probed = []
    real_probe = __import__("api.submission", fromlist=["probe"]).probe
    monkeypatch.setattr("api.submission.probe", lambda data: probed.append(1) or real_probe(data))
    app = create_app(api_stack.config.replace(rate_limit_submit="1/minute"))
    client = app.test_client()
    data = support.jpeg_segment_flood(100_000)
    anonymous = client.post("/v1/jobs", data={"file": (io.BytesIO(data), "a.jpg")})
    assert anonymous.status_code == 401 and probed == []
    user = support.new_user(client)
    assert _upload(client, user, "a.jpg", data).status_code == 415 and probed == [1]
    limited = _upload(client, user, "a.jpg", data)
    assert limited.get_json()["error"]["code"] == "rate_limited" and probed == [1]
    assert _account(app, user["username"]) == (5, 5, 0)


def test_an_upload_declaring_too_many_pixels_is_refused_before_any_charge(client, user, api_stack):
    resp = _upload(client, user, "bomb.png", support.png_header(30_000, 30_000))
    assert resp.status_code == 413
    error = resp.get_json()["error"]
    assert error["code"] == "image_too_large" and "30000x30000" in error["message"]
    assert _account(api_stack.app, user["username"]) == (5, 5, 0)


def test_real_photos_are_still_accepted_without_pillow(
    client, user, api_stack, photos_dir, no_pillow
):
    for name in ("dog.jpg", "cat.bmp"):
        resp = _upload(client, user, name, (photos_dir / name).read_bytes())
        assert resp.status_code == 202, resp.get_json()
    assert _account(api_stack.app, user["username"]) == (3, 3, 2)
