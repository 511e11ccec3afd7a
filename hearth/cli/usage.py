"""`hearth usage [--by key|model|day] [--since ...] [--json]`: totals from GET /admin/usage of the
running server, or from this machine's database when no server runs."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from hearth.cli.ps import add_client_flags, from_server
from hearth.store.db import open_database
from hearth.store.keys import KeyError_, parse_when
from hearth.store.usage import GROUPS, UsageStore


def cmd_usage(args: argparse.Namespace) -> int:
    from hearth.cli.keys import when
    from hearth.cli.main import fail, settings_from

    settings = settings_from(args).settings
    try:
        since = parse_when(args.since, future=False) if args.since else None
    except KeyError_ as exc:
        return fail(str(exc))
    query = urllib.parse.urlencode({"by": args.by, **({"since": args.since} if args.since else {})})
    answer = from_server(args, settings, f"/admin/usage?{query}")  # the server's own, settled records
    if isinstance(answer, int):
        return answer
    rows = answer["rows"] if answer is not None else UsageStore(open_database(settings.db_path)).summary(
        args.by, since)
    if args.json:
        print(json.dumps({"by": args.by, "since": since, "rows": rows}, indent=2))
        return 0
    if not rows:
        print("no usage recorded" + (f" since {args.since}" if args.since else "") + ".")
        return 0
    from hearth.cli.table import print_table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    print_table(
        [args.by.upper(), "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "CACHED", "AVG TTFT MS", "AVG MS", "LAST"],
        [[str(r[args.by]), str(r["requests"]), str(r["errors"]), str(r["prompt_tokens"]),
          str(r["completion_tokens"]), str(r["cached_tokens"]), ms(r["avg_ttft_ms"]), ms(r["avg_duration_ms"]),
          when(r["last"])] for r in rows],
    )
    return 0


def register(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `hearth usage` to the CLI."""
    p = sub.add_parser("usage", help="requests and tokens per key, model or day")
    add_common(p)
    p.add_argument("--by", choices=list(GROUPS), default="key", help="group by (default key)")
    p.add_argument("--since", help="a date (2025-06-01) or a duration back from now (24h, 7d)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_client_flags(p, "an admin key")
    p.set_defaults(func=cmd_usage)
