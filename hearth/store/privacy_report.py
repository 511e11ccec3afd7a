"""What `hearth privacy` and `GET /admin/privacy` show: every outbound host and who may use it."""

from __future__ import annotations

from typing import Any

from hearth.core.privacy import is_cloud_url, url_host
from hearth.settings import Settings
from hearth.store.keys import KeyStore
from hearth.store.usage import UsageStore

NO_TELEMETRY = "hearth sends no telemetry, makes no update checks and downloads nothing in the background"
ANYONE = "(no keys: anyone on this machine)"
ANYONE_KEYLESS = "(without a key: anyone on this machine, loopback_needs_key = false)"


def local_open(settings: Settings, keys: KeyStore) -> bool:
    """True when clients on this machine need no key: none exists, or `loopback_needs_key = false`."""
    return not keys.any_keys() or not bool(getattr(settings, "loopback_needs_key", True))


def outbound_hosts(settings: Settings, keys: KeyStore) -> list[dict[str, Any]]:
    """Each host hearth is configured to contact, whether it is cloud, and which keys may reach it."""
    live = keys.list()
    # a client on this machine without a key is not checked at all, so it reaches cloud upstreams too
    owner = [ANYONE_KEYLESS if keys.any_keys() else ANYONE] if local_open(settings, keys) else []
    everyone = [k.name for k in live] + owner
    cloud_keys = [k.name for k in live if k.allow_cloud] + owner
    hosts: list[dict[str, Any]] = []
    for name, up in (getattr(settings, "upstreams", None) or {}).items():
        urls = list(getattr(up, "urls", None) or [])
        if not urls and getattr(up, "managed", None) is not None:
            hosts.append({"purpose": f"upstream {name} (managed, started by hearth)", "host": "127.0.0.1",
                          "url": None, "cloud": False, "keys": everyone})
        for url in urls:
            cloud = is_cloud_url(url) or bool(getattr(up, "cloud", False))  # declared cloud: treated as one
            hosts.append({"purpose": f"upstream {name} ({getattr(up, 'kind', '?')})", "host": url_host(url),
                          "url": url, "cloud": cloud, "keys": cloud_keys if cloud else everyone})
    for purpose, url in pull_sources(settings):
        allowed = bool(getattr(settings, "allow_network", False))
        hosts.append({"purpose": purpose + ("" if allowed else " (off: allow_network is false)"),
                      "host": url_host(url), "url": url, "cloud": is_cloud_url(url),
                      "keys": ["admin keys, on `hearth models pull` with consent"] if allowed else []})
    return hosts


def pull_sources(settings: Settings) -> list[tuple[str, str]]:
    """Where `hearth pull` would download from (only on an explicit pull with network consent)."""
    sources = []
    for attr, purpose in (("hf_endpoint", "model pulls from Hugging Face"),
                          ("ollama_registry", "model pulls from the Ollama registry")):
        url = getattr(settings, attr, None)
        if url:
            sources.append((purpose, str(url)))
    return sources


def build_report(settings: Settings, keys: KeyStore, usage: UsageStore, since: float | None = None) -> dict[str, Any]:
    """The whole privacy report as JSON-ready data."""
    live = keys.list()
    return {
        "telemetry": NO_TELEMETRY,
        "allow_network": bool(getattr(settings, "allow_network", False)),
        "outbound": outbound_hosts(settings, keys),
        "cloud_keys": [k.name for k in live if k.allow_cloud],
        "local_open": local_open(settings, keys),  # keyless requests from this machine pass, cloud ones too
        "cloud_calls": usage.cloud_calls(since),
    }
