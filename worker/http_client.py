"""The worker's one outbound HTTP client: image fetches and webhook deliveries.

Both send requests to URLs that users chose, so both follow one SSRF policy, kept here:

- requests-hardened resolves the host, refuses loopback, private, link-local and
  other reserved addresses (and ``shared.ssrf``'s extra ranges), then connects to
  the address it checked, so a second DNS answer cannot slip in. The check runs for
  every connection. ``ALLOW_PRIVATE_URLS=1`` turns it off (local development, tests).
  Image fetches run the same check (its ``filter_host``) on a urllib3 pool of their
  own, as each connection opens (``worker.fetch``: connections kept alive per host).
- http and https only (``check_scheme``).
- The library follows no redirect. A caller that follows them (image fetches) sends
  each hop as a request of its own, through ``check_scheme`` and the filter again;
  webhooks follow none.
- Environment proxies are ignored (the filter would vet the proxy, not the target),
  and so is ``.netrc`` (it would hand credentials to arbitrary hosts).

Errors have one mapping too: inside ``mapped_errors(url)`` whatever requests, urllib3
or the socket raise for a request that got no HTTP response becomes a
``RequestFailed`` saying which ``Failure`` it was (for a blocked address, with the
host and the address it resolved to). Each caller words it for its own users.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests
import requests_hardened
import urllib3
from requests_hardened.ip_filter import InvalidIPAddress

from shared import ssrf
from shared.config import Config

SCHEMES = frozenset({"http", "https"})


class Failure(enum.StrEnum):
    """Why a request got no HTTP response."""

    SCHEME = "scheme"  # neither http nor https
    BLOCKED = "blocked"  # the host resolves to an address the policy refuses
    INVALID_URL = "invalid_url"
    TIMEOUT = "timeout"
    CONNECT = "connect"  # refused, reset, unresolvable host...
    OTHER = "other"


class RequestFailed(Exception):
    """A request to ``url`` that got no HTTP response, and why (``kind``)."""

    def __init__(self, kind: Failure, url: str, cause: BaseException | None = None) -> None:
        super().__init__(f"{kind}: {url}")
        self.kind = kind
        self.url = url
        self.cause = cause

    @property
    def host(self) -> str | None:
        return urlsplit(self.url).hostname

    @property
    def address(self) -> str | None:
        """For BLOCKED: the address the host resolved to (requests-hardened names it)."""
        if self.kind is Failure.BLOCKED and self.cause is not None and self.cause.args:
            return str(self.cause.args[0])
        return None

    @property
    def cause_name(self) -> str:
        return type(self.cause).__name__ if self.cause is not None else self.kind.value

    def detail(self) -> str:
        """The underlying error, as ``Type: message``."""
        return f"{self.cause_name}: {self.cause}" if self.cause is not None else str(self)


class HttpClient:
    """Makes sessions that apply the policy; one client per purpose and timeout.

    A session per request (or per redirect chain): ``requests.Session`` is not
    documented as thread-safe, and a shared cookie jar would carry one URL's cookies
    to another user's requests.
    """

    def __init__(self, config: Config, *, timeout_s: float, user_agent: str) -> None:
        ssrf.install()  # also refuse IPv4-compatible IPv6 (::/96)
        self.timeout_s = timeout_s
        self._manager = requests_hardened.Manager(
            requests_hardened.Config(
                ip_filter_enable=not config.allow_private_urls,
                ip_filter_allow_loopback_ips=False,
                never_redirect=True,
                default_timeout=(timeout_s, timeout_s),
                user_agent_override=user_agent,
            )
        )

    def session(self) -> requests.Session:
        session = self._manager.get_session()
        session.trust_env = False  # no environment proxies, no .netrc
        return session


def check_scheme(url: str) -> None:
    """Raise RequestFailed(SCHEME) unless ``url`` is http or https."""
    if urlsplit(url).scheme.lower() not in SCHEMES:
        raise RequestFailed(Failure.SCHEME, url)


@contextlib.contextmanager
def mapped_errors(url: str) -> Iterator[None]:
    """Turn the errors of a request to ``url`` (and of reading its body) into RequestFailed."""
    try:
        yield
    except RequestFailed:
        raise  # already mapped, by an inner block that knew the hop's URL
    except InvalidIPAddress as exc:
        raise RequestFailed(Failure.BLOCKED, url, exc) from exc
    except urllib3.exceptions.NewConnectionError as exc:  # before TimeoutError, its base
        raise RequestFailed(Failure.CONNECT, url, exc) from exc
    except urllib3.exceptions.LocationValueError as exc:  # LocationParseError too
        raise RequestFailed(Failure.INVALID_URL, url, exc) from exc
    except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError) as exc:
        raise RequestFailed(Failure.TIMEOUT, url, exc) from exc
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
        raise RequestFailed(Failure.INVALID_URL, url, exc) from exc
    except requests.ConnectionError as exc:
        raise RequestFailed(Failure.CONNECT, url, exc) from exc
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise RequestFailed(Failure.OTHER, url, exc) from exc
