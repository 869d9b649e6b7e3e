"""IPv4-compatible IPv6 (::/96) is refused by image fetches and webhook deliveries alike.

requests-hardened maps ``::ffff:a.b.c.d`` back to IPv4 but let ``::a.b.c.d`` through.
Nothing listens on these addresses: the filter must refuse before connecting.
"""

from __future__ import annotations

import pytest
from requests_hardened.ip_filter import InvalidIPAddress

from shared.config import Config
from shared.errors import BlockedAddress
from worker.fetch import Fetcher
from worker.webhook_delivery import webhook_client

V4_COMPATIBLE = [
    "http://[::7f00:1]:9/photo",  # 127.0.0.1
    "http://[::a9fe:a9fe]/latest/meta-data/",  # 169.254.169.254
    "http://[::a00:1]/photo",  # 10.0.0.1
    "http://[::808:808]/photo",  # even a public IPv4 has no business in this form
]


@pytest.mark.parametrize("url", V4_COMPATIBLE)
def test_image_fetch_refuses_ipv4_compatible_ipv6(url: str) -> None:
    with pytest.raises(BlockedAddress):
        Fetcher(Config(allow_private_urls=False, fetch_timeout_s=2.0)).fetch(url)


@pytest.mark.parametrize("url", V4_COMPATIBLE)
def test_webhook_delivery_refuses_ipv4_compatible_ipv6(url: str) -> None:
    client = webhook_client(Config(allow_private_urls=False, webhook_timeout_s=2.0))
    with client.session() as session, pytest.raises(InvalidIPAddress):
        session.post(url, data=b"{}")
