"""`hearth upstreams`: each upstream's replicas, their health and load, from GET /admin/upstreams."""

from __future__ import annotations

import argparse
from typing import Any

from hearth.settings import Settings


def state(upstream: dict[str, Any], replica: dict[str, Any]) -> str:
    """healthy / ejected for a replica; running / stopped for a managed child (started on first use)."""
    if upstream.get("managed"):
        return "running" if replica.get("healthy") else "stopped"
    return "healthy" if replica.get("healthy") else "ejected"


def rows(data: dict[str, Any]) -> list[list[str]]:
    """Table rows of a /admin/upstreams answer: one per replica."""
    out = []
    for up in data.get("upstreams") or []:
        kind = up.get("kind", "") + (" (cloud)" if up.get("cloud") else "")
        for r in up.get("replicas") or []:
            shown = state(up, r)
            url = r.get("url", "") if shown != "stopped" else "-"  # a stopped child has no port yet
            problem = r.get("last_error") or up.get("discovery_error") or "-"
            out.append([up.get("name", ""), kind, url, shown, str(r.get("outstanding", 0)),
                        str(r.get("served", 0)), str(len(up.get("models") or [])), problem])
    return out


def cmd_upstreams(args: argparse.Namespace, settings: Settings) -> int:
    """Print every upstream replica with its state, requests in flight, requests served and last error."""
    from hearth.cli.ps import query
    from hearth.cli.table import print_table

    data = query(args, settings, "/admin/upstreams",
                 "start it with `hearth serve`, or pass --url (and an admin --api-key)")
    if isinstance(data, int):
        return data
    table = rows(data)
    if not table:
        print("no upstreams configured (add [upstreams.NAME] tables to hearth.toml)")
        return 0
    print_table(["UPSTREAM", "KIND", "REPLICA", "STATE", "IN FLIGHT", "SERVED", "MODELS", "LAST ERROR"], table)
    return 0


def register(sub: Any, add_common: Any) -> None:
    """Add `hearth upstreams` to the command parser."""
    from hearth.cli.main import settings_from
    from hearth.cli.ps import client_parser

    p = client_parser(sub, add_common, "upstreams",
                      "upstream replicas: health, load and last error (GET /admin/upstreams)",
                      "/admin/upstreams", "an admin API key")
    p.set_defaults(func=lambda args: cmd_upstreams(args, settings_from(args).settings))
