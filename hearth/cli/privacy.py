"""`hearth privacy [--json]`: every outbound host, which are cloud, who may use them, cloud calls made.

From GET /admin/privacy of the running server (its config is the one that counts), or built from
this machine's config and database when no server runs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from hearth.cli.ps import add_client_flags, from_server
from hearth.store.db import open_database
from hearth.store.keys import KeyStore
from hearth.store.privacy_report import build_report
from hearth.store.usage import UsageStore


def cmd_privacy(args: argparse.Namespace) -> int:
    from hearth.cli.keys import when
    from hearth.cli.main import settings_from
    from hearth.cli.table import print_table

    settings = settings_from(args).settings
    answer = from_server(args, settings, "/admin/privacy")  # what the server runs with, not this shell's config
    if isinstance(answer, int):
        return answer
    if answer is not None:
        report = answer
    else:
        db = open_database(settings.db_path)
        report = build_report(settings, KeyStore(db), UsageStore(db))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["telemetry"] + ".")
    print(f"network downloads (model pulls): {'allowed' if report['allow_network'] else 'off'}\n")
    if report["outbound"]:
        print_table(["HOST", "CLOUD", "PURPOSE", "KEYS THAT MAY USE IT"],
                    [[h["host"], "yes" if h["cloud"] else "no", h["purpose"], ", ".join(h["keys"]) or "none"]
                     for h in report["outbound"]])
    else:
        print("outbound hosts: none")
    if report["local_open"] and any(h["cloud"] and h["url"] for h in report["outbound"]):
        print("\nkeys allowed to use cloud upstreams: any client on this machine may, without a key (hint: "
              "once a key exists and loopback_needs_key is true, only --allow-cloud keys reach a cloud)")
    else:
        print(f"\nkeys allowed to use cloud upstreams: {', '.join(report['cloud_keys']) or 'none'}")
    calls = report["cloud_calls"]
    if not calls:
        print("recorded cloud calls: none")
        return 0
    print("recorded cloud calls:")
    print_table(["KEY", "UPSTREAM", "REQUESTS", "PROMPT", "COMPLETION", "FIRST", "LAST"],
                [[c["key"], str(c["engine"]), str(c["requests"]), str(c["prompt_tokens"]),
                  str(c["completion_tokens"]), when(c["first"]), when(c["last"])] for c in calls])
    return 0


def register(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `hearth privacy` to the CLI."""
    p = sub.add_parser("privacy", help="where hearth may connect, and the cloud calls it made")
    add_common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_client_flags(p, "an admin key")
    p.set_defaults(func=cmd_privacy)
