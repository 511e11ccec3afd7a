"""Privacy policy: which upstream addresses are on this box or its network.

An upstream is *local* when its host is loopback, private or link-local (or a
name that can only mean a machine on the local network). Anything else is a
*cloud* upstream: prompts sent there leave the box, so hearth refuses it unless
the configuration says `cloud = true`, and never uses it as a fallback.

No DNS lookups happen here: a public-looking host name counts as cloud. A LAN
machine with a public-looking DNS name should be configured by its IP address.

Local addresses are an explicit list, not `ipaddress`'s `is_private`: that
also covers ranges whose packets do leave the network (Teredo's 2001::/32,
NAT64's 64:ff9b:1::/48 on newer Pythons), and its list changes between
Python versions.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}")
LOCAL_SUFFIXES = (".localhost", ".local", ".lan", ".internal", ".home.arpa", ".localdomain")
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "0.0.0.0/8",  # 0.0.0.0 reaches this machine on Linux; the rest of 0/8 reaches nothing
    "::1/128", "::/128", "fc00::/7", "fe80::/10",
))


def url_host(url: str) -> str:
    """The host part of an http(s) URL, lower-cased, without brackets."""
    return (urlsplit(url).hostname or "").lower()


def is_local_host(host: str) -> bool:
    """True for loopback, private and link-local addresses and LAN-only names."""
    host = host.strip("[]").lower()
    if not host or not host.isascii():
        # the resolver folds full-width dots and digits ("８。８。８。８" is 8.8.8.8): a host is only
        # known to be local in the form it is connected by
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if NUMERIC_HOST.fullmatch(host):  # 134744072, 0x08080808, 8.8.2056: the resolver reads IPv4 here
            try:
                addr = ipaddress.IPv4Address(socket.inet_aton(host))
            except OSError:
                return False  # numbers the resolver would not take: not known to be local
        else:
            return host == "localhost" or "." not in host or host.endswith(LOCAL_SUFFIXES)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in LOCAL_NETWORKS)


def is_cloud_url(url: str) -> bool:
    """True when requests to `url` would leave this machine's network."""
    return not is_local_host(url_host(url))
