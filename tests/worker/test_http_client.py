"""The one outbound HTTP client: its error mapping and its policy, for fetches and webhooks."""

from __future__ import annotations

import socket

import pytest
import requests
import urllib3
from requests_hardened.ip_filter import InvalidIPAddress

from shared.config import Config
from worker.http_client import Failure, HttpClient, RequestFailed, check_scheme, mapped_errors

URL = "http://images.example/a.jpg"


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (InvalidIPAddress("10.0.0.1"), Failure.BLOCKED),
        (requests.ConnectTimeout("slow"), Failure.TIMEOUT),  # also a ConnectionError
        (requests.ReadTimeout("slow"), Failure.TIMEOUT),
        (urllib3.exceptions.ReadTimeoutError(None, URL, "slow"), Failure.TIMEOUT),
        (TimeoutError(), Failure.TIMEOUT),
        (requests.exceptions.InvalidURL("bad"), Failure.INVALID_URL),
        (requests.exceptions.MissingSchema("bad"), Failure.INVALID_URL),
        (requests.ConnectionError("refused"), Failure.CONNECT),
        (requests.exceptions.ChunkedEncodingError("cut"), Failure.OTHER),
        (urllib3.exceptions.ProtocolError("cut"), Failure.OTHER),
        (ConnectionResetError(), Failure.OTHER),
    ],
)
def test_errors_map_to_one_kind_each(raised: Exception, kind: Failure) -> None:
    with pytest.raises(RequestFailed) as failed, mapped_errors(URL):
        raise raised
    assert failed.value.kind is kind
    assert failed.value.cause is raised and failed.value.__cause__ is raised


def test_a_blocked_address_names_the_host_and_the_address() -> None:
    with pytest.raises(RequestFailed) as failed, mapped_errors(URL):
        raise InvalidIPAddress("10.0.0.1")
    assert (failed.value.host, failed.value.address) == ("images.example", "10.0.0.1")


def test_an_inner_mapping_keeps_its_own_url() -> None:
    # A redirect hop is mapped inside the whole fetch's block: the hop's URL is kept.
    hop = "http://169.254.169.254/latest/"
    with pytest.raises(RequestFailed) as failed, mapped_errors(URL), mapped_errors(hop):
        raise InvalidIPAddress("169.254.169.254")
    assert failed.value.host == "169.254.169.254"


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), mapped_errors(URL):
        raise KeyError("not a request's error")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/a.jpg", "gopher://x/", "x"])
def test_only_http_and_https(url: str) -> None:
    with pytest.raises(RequestFailed) as failed:
        check_scheme(url)
    assert failed.value.kind is Failure.SCHEME
    check_scheme("HTTPS://images.example/a.jpg")


def test_sessions_ignore_the_environment_and_filter_unless_allowed() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    strict = HttpClient(Config(), timeout_s=1.0, user_agent="t/1")
    with strict.session() as session:
        assert session.trust_env is False
        with pytest.raises(InvalidIPAddress):
            session.get(url)
    lax = HttpClient(Config(allow_private_urls=True), timeout_s=1.0, user_agent="t/1")
    with lax.session() as session, pytest.raises(requests.ConnectionError):
        session.get(url)  # refused by the closed port, not blocked by the filter
