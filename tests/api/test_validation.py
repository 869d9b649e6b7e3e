"""api.validation and the schemas' own fields: marshmallow validates the bodies, and its
errors keep the service's error body (codes, messages, details.fields)."""

import marshmallow as ma
import pytest

from api import schemas
from api.validation import validation_failed
from shared.errors import ValidationFailed

URL = "http://images.example.com/a.jpg"


def _error(resp, status: int = 422) -> dict:
    assert resp.status_code == status, resp.get_json()
    return resp.get_json()["error"]


def test_a_url_field_answers_its_own_code_and_one_message(client, user):
    h = user["headers"]
    for body, code in [
        ({"url": 5}, "invalid_url"),
        ({"url": "ftp://x.org/a.jpg"}, "invalid_url"),
        ({"url": URL, "webhook": 5}, "invalid_webhook"),
        ({"url": URL, "webhook": "javascript:alert(1)"}, "invalid_webhook"),
    ]:
        error = _error(client.post("/v1/jobs", json=body, headers=h))
        assert error["code"] == code, body
        assert "absolute http(s) URL" in error["message"] and "details" not in error
    # Blank is "not given": no url is missing_input, no webhook is no webhook.
    assert _error(client.post("/v1/jobs", json={"url": "  "}, headers=h))["code"] == "missing_input"
    resp = client.post("/v1/jobs", json={"url": f" {URL} ", "webhook": ""}, headers=h)
    assert resp.status_code == 202 and resp.get_json()["input"] == {"url": URL}
    assert resp.get_json()["webhook"] is None


def test_a_url_failing_with_another_field_lists_both(client, user):
    resp = client.post("/v1/jobs", json={"url": "not a url", "top_k": 0}, headers=user["headers"])
    error = _error(resp)
    assert error["code"] == "validation_error"
    assert set(error["details"]["fields"]) == {"url", "top_k"}


def test_batch_lines_that_are_not_a_list_are_invalid_body(client, user):
    for body in (
        {"urls": "x"},
        {"urls": None},
        {"items": {"url": URL}},
        {},
        {"urls": [], "items": []},
    ):
        error = _error(client.post("/v1/batches", json=body, headers=user["headers"]))
        assert error["code"] == "invalid_body", body
        assert '{"urls": [...]}' in error["message"]


def test_a_text_batch_takes_its_options_from_the_query(client, user):
    h = {**user["headers"], "Content-Type": "text/plain"}
    error = _error(client.post("/v1/batches?top_k=0", data=f"{URL}\n", headers=h))
    assert error["code"] == "validation_error" and "top_k" in error["details"]["fields"]
    error = _error(client.post("/v1/batches?webhook=nope", data=f"{URL}\n", headers=h))
    assert error["code"] == "invalid_webhook"


def test_the_seed_refill_range_is_the_v1_refill_range(client, admin):
    creds = {"username": admin["username"], "password": admin["password"], "user": "x"}
    for amount in (0, 1_000_001, 2.5, True, "3"):
        resp = client.post("/refill", json={**creds, "refill": amount})
        body = resp.get_json()
        assert resp.status_code == 422 and body["status"] == 422, amount  # seed format
        assert body["error"]["code"] == "validation_error"
        assert list(body["error"]["details"]["fields"]) == ["refill"]
    v1 = client.post(
        "/v1/admin/refill", json={"username": "x", "amount": 0}, headers=admin["headers"]
    )
    assert list(_error(v1)["details"]["fields"]) == ["amount"]


def test_a_seed_body_that_is_not_an_object_is_invalid_body_in_seed_format(client):
    resp = client.post("/token", data="[1]", content_type="application/json")
    assert resp.status_code == 422
    assert resp.get_json()["status"] == 422
    assert resp.get_json()["error"]["code"] == "invalid_body"


class _Probe(ma.Schema):
    webhook = schemas.HttpUrl("webhook")
    url = schemas.HttpUrl()
    top_k = ma.fields.Integer()


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ({"url": ["bad"]}, "invalid_url"),
        ({"url": ["bad"], "webhook": ["bad"]}, "invalid_webhook"),  # declaration order
        ({"url": ["bad"], "top_k": ["bad"]}, "validation_error"),
        ({"_schema": ["bad"]}, "validation_error"),
    ],
)
def test_validation_failed_picks_a_fields_code_only_when_every_failure_has_one(messages, code):
    err = validation_failed(messages, _Probe())
    assert isinstance(err, ValidationFailed) and err.code == code
    assert (err.details is None) == (code != "validation_error")


def test_the_parser_builds_each_schema_class_once(client, user):
    # webargs would build (and deep-copy the fields of) a new schema per request.
    from api.validation import Blueprint

    parser = Blueprint.ARGUMENTS_PARSER
    first = parser._get_schema(schemas.JobCreate, None)
    assert parser._get_schema(schemas.JobCreate, None) is first
    # Reused across requests, it still answers each one on its own.
    bad = client.post("/v1/jobs", json={"url": "nope", "top_k": 0}, headers=user["headers"])
    assert set(_error(bad)["details"]["fields"]) == {"url", "top_k"}
    ok = client.post("/v1/jobs", json={"url": URL, "top_k": 3}, headers=user["headers"])
    assert ok.status_code == 202, ok.get_json()
    assert ok.get_json()["top_k"] == 3
