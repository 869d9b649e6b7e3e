"""SSRF-safe image download for the worker.

requests-hardened does the address filtering: its adapter resolves the host,
rejects private, loopback, link-local and other reserved addresses, and then
connects to the vetted IP itself, so a second DNS answer cannot slip in. The
check runs for every connection, so every redirect hop is filtered too.

Known gap: the deadline bounds connecting and every socket read, but not DNS
resolution (``getaddrinfo`` has no timeout) and not a server that dribbles its
response *headers* a byte at a time; the body is checked against the deadline
between reads.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urljoin, urlsplit

import requests
import requests_hardened
import urllib3
from requests_hardened.ip_filter import InvalidIPAddress

from shared import ssrf
from shared.config import Config
from shared.errors import BlockedAddress, FetchFailed, ImageTooLarge

USER_AGENT = "imgclf-fetcher/0.1"
_SCHEMES = frozenset({"http", "https"})
_CHUNK = 64 * 1024
# AVIF, TIFF and friends are not decodable, so do not invite a CDN to send them.
_ACCEPT = "image/jpeg, image/png, image/webp, image/gif, image/bmp;q=0.9, */*;q=0.1"


class Fetcher:
    """Downloads image URLs; ``fetch`` may be called from several threads at once.

    Each call uses its own session: ``requests.Session`` is not documented as
    thread-safe, and a shared cookie jar would carry cookies set by one job's
    server into another job's requests. Image URLs rarely share hosts, so
    keep-alive pooling would buy little.
    """

    def __init__(self, config: Config) -> None:
        self._max_bytes = config.max_image_bytes
        self._timeout_s = config.fetch_timeout_s
        self._max_redirects = config.fetch_max_redirects
        ssrf.install()  # also refuse IPv4-compatible IPv6 (::/96)
        self._manager = requests_hardened.Manager(
            requests_hardened.Config(
                ip_filter_enable=not config.allow_private_urls,
                ip_filter_allow_loopback_ips=False,
                never_redirect=True,  # redirects are followed by hand, see _get
                default_timeout=(self._timeout_s, self._timeout_s),
                user_agent_override=USER_AGENT,
            )
        )

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self._timeout_s
        try:
            with self._manager.get_session() as session:
                # Proxies from the environment would make the filter vet the proxy, not
                # the target; .netrc would hand credentials to arbitrary hosts.
                session.trust_env = False
                with self._get(session, url, deadline) as response:
                    return self._read_body(response, deadline)
        except InvalidIPAddress as exc:
            raise BlockedAddress() from exc
        except (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError) as exc:
            raise self._timed_out() from exc
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
            raise FetchFailed("The image URL is not valid.") from exc
        except requests.ConnectionError as exc:
            raise FetchFailed("Could not connect to the image host.") from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise FetchFailed(f"Downloading the image failed: {type(exc).__name__}.") from exc

    def _get(self, session: requests.Session, url: str, deadline: float) -> requests.Response:
        """Follow redirects by hand so each hop's scheme is checked and the hops are counted."""
        for _hop in range(self._max_redirects + 1):
            if urlsplit(url).scheme.lower() not in _SCHEMES:
                raise FetchFailed("Only http and https URLs are supported")
            remaining = self._remaining(deadline)
            try:
                response = session.get(
                    url,
                    headers={"Accept": _ACCEPT},
                    stream=True,
                    allow_redirects=False,
                    timeout=(remaining, remaining),
                )
            except InvalidIPAddress as exc:
                raise _blocked(url, exc) from exc
            if not response.is_redirect:
                if not 200 <= response.status_code < 300:
                    response.close()
                    raise FetchFailed(f"The image URL returned HTTP {response.status_code}.")
                return response
            url = urljoin(response.url, session.get_redirect_target(response))
            response.close()
        raise FetchFailed(f"The image URL redirected more than {self._max_redirects} times.")

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large(f"{int(declared):,} bytes")
        sock = _socket_of(response.raw)
        body = bytearray()
        while True:
            # read1 returns what one socket read gave, so the deadline is checked often
            # even when a server drips data; urllib3 bounds decompressed output to _CHUNK.
            remaining = self._remaining(deadline)
            if sock is not None and sock.fileno() != -1:  # -1: closed, the body is all in
                # The read timeout was fixed when the hop began; shrink it so one stalled
                # read cannot outlive the deadline.
                sock.settimeout(remaining)
            chunk = response.raw.read1(_CHUNK, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self._max_bytes:
                raise self._too_large(f"more than {self._max_bytes:,} bytes")

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        return remaining

    def _timed_out(self) -> FetchFailed:
        return FetchFailed(f"Fetching the image timed out after {self._timeout_s:g} s.")

    def _too_large(self, size: str) -> ImageTooLarge:
        return ImageTooLarge(
            f"The image is {size}; the limit is {self._max_bytes:,} bytes (MAX_IMAGE_BYTES)."
        )


def _blocked(url: str, exc: InvalidIPAddress) -> BlockedAddress:
    # Say which host and address, and the setting a developer trying it locally needs.
    address = exc.args[0] if exc.args else "a non-public address"
    return BlockedAddress(
        f"{urlsplit(url).hostname} resolves to {address}, a loopback, private or reserved "
        "address, which the service does not fetch. For local development and tests, "
        "start the worker with ALLOW_PRIVATE_URLS=1."
    )


def _socket_of(raw: urllib3.HTTPResponse) -> socket.socket | None:
    connection = raw.connection
    if connection is not None and connection.sock is not None:
        return connection.sock
    try:
        # With "Connection: close", http.client hands the socket to the response's file.
        return raw._fp.fp.raw._sock
    except AttributeError:
        return None  # then a stalled read may overrun the deadline by one read timeout
