"""Address ranges refused on top of requests-hardened's filter (image fetches, webhooks).

requests-hardened maps IPv4-mapped IPv6 (``::ffff:a.b.c.d``) back to IPv4 before its
check, but not the deprecated IPv4-compatible form (``::a.b.c.d``, RFC 4291): Python
calls ``::7f00:1`` or ``::a9fe:a9fe`` global, so they passed. The filter reads its
module-level list of extra ranges on every check; we add ours to it.
"""

from __future__ import annotations

import ipaddress

from requests_hardened import ip_filter

EXTRA_BLOCKED = (ipaddress.ip_network("::/96"),)


def install() -> None:
    """Add our ranges to the filter (idempotent); call before building a session."""
    have = ip_filter.EXTRA_BLOCKED_NET_RANGES
    missing = tuple(net for net in EXTRA_BLOCKED if net not in have)
    if missing:
        ip_filter.EXTRA_BLOCKED_NET_RANGES = (*have, *missing)
