"""``Prefer: wait`` read as RFC 7240 asks: honoured when valid, ignored (not refused) when not."""

from __future__ import annotations

import pytest

from api.waits import prefer_wait
from tests import support

URL = "http://images.example.com/dog.jpg"  # no worker here: the job stays queued


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["wait=10"], 10),
        (['wait="10"'], 10),
        (["respond-async, wait=5"], 5),
        (["respond-async", "WAIT = 7"], 7),
        (["wait=600"], 60),  # capped at MAX_WAIT_S
        (["wait=abc"], None),
        (["wait=-1"], None),
        (["wait=1.5"], None),
        (["wait="], None),
        (["wait"], None),
        (["handling=lenient; wait=5"], None),  # a parameter of another preference
        (["wait=abc, wait=5"], None),  # only the first instance counts
        (["wait=3, wait=5"], 3),
        (['foo="a,wait=9", wait=4'], 4),  # a comma inside quotes splits nothing
        ([], None),
    ],
)
def test_the_wait_preference_is_parsed_as_rfc_7240_says(values, expected):
    assert prefer_wait(values, 60) == expected


def test_an_invalid_wait_is_ignored_and_a_valid_one_is_applied(client):
    user = support.new_user(client)
    ignored = client.post(
        "/v1/jobs", json={"url": URL}, headers={**user["headers"], "Prefer": "wait=abc"}
    )
    assert ignored.status_code == 202 and "Preference-Applied" not in ignored.headers
    # Honoured but not finished in time: the usual 202, saying the wait was applied.
    waited = client.post(
        "/v1/jobs",
        json={"url": URL},
        headers={**user["headers"], "Prefer": "respond-async, wait=1"},
    )
    assert waited.status_code == 202 and waited.headers["Preference-Applied"] == "wait=1"
    assert waited.get_json()["status"] == "queued" and waited.headers["Location"]


def test_two_prefer_headers_are_read_as_one_list(client):
    # The WSGI server joins them with a comma, in order; the first wait still counts.
    user = support.new_user(client)
    headers = [*user["headers"].items(), ("Prefer", "respond-async"), ("Prefer", "wait=1")]
    waited = client.post("/v1/jobs", json={"url": URL}, headers=headers)
    assert waited.status_code == 202 and waited.headers["Preference-Applied"] == "wait=1"
    headers = [*user["headers"].items(), ("Prefer", "wait=abc"), ("Prefer", "wait=1")]
    ignored = client.post("/v1/jobs", json={"url": URL}, headers=headers)
    assert ignored.status_code == 202 and "Preference-Applied" not in ignored.headers
