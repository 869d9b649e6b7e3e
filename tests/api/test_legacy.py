"""The seed apps' endpoints, through the same queue and worker as /v1."""

import io
import uuid

from tests import support


def _register(client) -> tuple[str, str]:
    username, password = f"seed{uuid.uuid4().hex[:8]}", "pass123"
    resp = client.post(
        "/register", json={"username": username, "password": password, "is_admin": 1}
    )
    assert resp.status_code == 200
    assert resp.get_json() == {"status": 200, "msg": "You have successfully signed up for the API"}
    return username, password


def test_register_token_and_duplicate(client):
    username, password = _register(client)
    resp = client.post("/token", json={"username": username, "password": password})
    assert resp.get_json()["tokens"] == 5 and resp.get_json()["status"] == 200
    # Asking twice costs nothing (the seed app charged for it).
    assert (
        client.post("/token", json={"username": username, "password": password}).get_json()[
            "tokens"
        ]
        == 5
    )
    dup = client.post("/register", json={"username": username, "password": password})
    assert dup.status_code == 409 and dup.get_json()["status"] == 301
    bad = client.post("/token", json={"username": username, "password": "nope123"})
    assert bad.status_code == 401 and bad.get_json()["status"] == 302


def test_register_cannot_make_an_admin(client):
    username, password = _register(client)
    me = client.get("/v1/me", headers=support.basic_auth(username, password)).get_json()
    assert me["is_admin"] is False


def test_refill_needs_an_admin(client, admin):
    username, password = _register(client)
    resp = client.post(
        "/refill", json={"username": username, "password": password, "user": username, "refill": 3}
    )
    assert resp.status_code == 403 and resp.get_json()["status"] == 304
    resp = client.post(
        "/refill",
        json={
            "username": admin["username"],
            "password": admin["password"],
            "user": username,
            "refill": 3,
        },
    )
    assert resp.status_code == 200 and resp.get_json()["msg"] == "Refilled Successfully!"
    assert (
        client.post("/token", json={"username": username, "password": password}).get_json()[
            "tokens"
        ]
        == 8
    )


def test_classify_answers_top5_percentages(stack, photo_server):
    client = stack.client()
    username, password = _register(client)
    resp = client.post(
        "/classify",
        json={"username": username, "password": password, "url": photo_server.url("parrot.jpg")},
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert len(body) == 5
    assert max(body, key=body.get) == "macaw" and body["macaw"] > 90
    assert all(0 <= v <= 100 for v in body.values())
    assert all(v == round(v, 2) for v in body.values())  # "90.27", as the seed answered
    assert (
        client.post("/token", json={"username": username, "password": password}).get_json()[
            "tokens"
        ]
        == 4
    )


def test_classify_errors_keep_the_seed_status_field(stack, photo_server):
    client = stack.client()
    username, password = _register(client)
    wrong = client.post(
        "/classify",
        json={"username": username, "password": "bad-pass", "url": photo_server.url("dog.jpg")},
    )
    assert wrong.status_code == 401 and wrong.get_json()["status"] == 302
    assert "Basic" in wrong.headers["WWW-Authenticate"]
    missing = client.post("/classify", json={"username": username, "password": password})
    assert missing.status_code == 422
    failed = client.post(
        "/classify",
        json={"username": username, "password": password, "url": photo_server.url("missing.jpg")},
    )
    assert failed.status_code == 422
    assert failed.get_json()["error"]["code"] == "fetch_failed"
    for _ in range(5):
        client.post(
            "/classify",
            json={"username": username, "password": password, "url": photo_server.url("bird.bmp")},
        )
    broke = client.post(
        "/classify",
        json={"username": username, "password": password, "url": photo_server.url("bird.bmp")},
    )
    assert broke.status_code == 402 and broke.get_json()["status"] == 303
    assert broke.get_json()["error"]["details"] == {"balance": 0, "cost": 1}
    assert "administrator" in broke.get_json()["msg"]


def test_predict_takes_an_upload_with_basic_auth(stack, photos_dir):
    client = stack.client()
    username, password = _register(client)
    data = (photos_dir / "hot_dog.jpg").read_bytes()
    resp = client.post(
        "/predict",
        data={"file": (io.BytesIO(data), "hot_dog.jpg")},
        headers=support.basic_auth(username, password),
    )
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["predicted_class"] == "hotdog" and 0.5 < body["confidence_score"] <= 1
    anonymous = client.post("/predict", data={"file": (io.BytesIO(data), "hot_dog.jpg")})
    assert anonymous.status_code == 401


def test_every_seed_error_carries_status_and_msg(client, db_url):
    """Also the errors answered outside the seed blueprint's handler (issue #25): a body
    that is not JSON, and (PostgreSQL) a value the database refuses."""
    bad_json = client.post("/token", data="{oops", content_type="application/json")
    assert bad_json.status_code == 400
    body = bad_json.get_json()
    assert body["status"] == 400 and body["msg"] == body["error"]["message"]
    if db_url.startswith("postgresql"):
        nul = client.post("/token", json={"username": "a\u0000b", "password": "pw-123456"})
        assert nul.status_code == 422, nul.get_json()
        body = nul.get_json()
        assert body["error"]["code"] == "invalid_value"
        assert body["status"] == 422 and body["msg"] == body["error"]["message"]
