"""`hearth keys create|list|revoke|rotate`: works on the local database (server running or not)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from hearth.settings import Settings
from hearth.store.db import open_database
from hearth.store.keys import ROLES, Key, KeyError_, KeyStore, local_time, parse_duration, parse_when


def _settings(args: argparse.Namespace) -> Settings:
    from hearth.cli.main import settings_from

    return settings_from(args).settings


def _fail(message: str, hint: str | None = None) -> int:
    from hearth.cli.main import fail

    return fail(message, hint)


def when(ts: float | None) -> str:
    """Epoch seconds as local `YYYY-MM-DD HH:MM`, or '-'."""
    return local_time(ts) if ts else "-"


def open_store(settings: Settings) -> KeyStore:
    """The key store of this machine's hearth home."""
    return KeyStore(open_database(settings.db_path))


def show_secret(key: Key, secret: str, as_json: bool, verb: str) -> None:
    """Print a new secret once, with how to use it."""
    if as_json:
        print(json.dumps({"key": key.as_dict(), "secret": secret}))
        return
    print(f"{verb} key {key.name!r} (role {key.role}). Its secret, shown only this once:\n\n  {secret}\n")
    print("Use it as `Authorization: Bearer <secret>` or `x-api-key: <secret>`; "
          "OpenAI clients: api_key=<secret>.", file=sys.stderr)


def cmd_create(args: argparse.Namespace) -> int:
    store = open_store(_settings(args))
    try:
        expires = parse_when(args.expires) if args.expires else None
        patterns = [p.strip() for arg in args.models or () for p in arg.split(",") if p.strip()]  # a,b or a b
        key, secret = store.create(args.name, role=args.role, models=patterns or ["*"],
                                   allow_cloud=args.allow_cloud, rpm=args.rpm,
                                   tokens_per_day=args.tokens_per_day, expires_at=expires)
    except KeyError_ as exc:
        return _fail(str(exc), "`hearth keys create --help` shows the options")
    show_secret(key, secret, args.json, "created")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    keys = open_store(_settings(args)).list(include_revoked=args.all)
    if args.json:
        print(json.dumps({"keys": [k.as_dict() for k in keys]}, indent=2))
        return 0
    if not keys:
        store = open_store(_settings(args))
        if store.any_keys():  # revoking every key does not open the server again
            print("no live keys: all were revoked, and the server still asks for one. Create one with "
                  "`hearth keys create NAME` (`--all` lists the revoked).")
        else:
            print("no keys yet: the server needs none on loopback. Create one with `hearth keys create NAME`.")
        return 0
    from hearth.cli.table import print_table

    rows = [[k.name + (" (revoked)" if k.revoked_at else ""), k.role, ",".join(k.prefixes) or "-",
             when(k.created_at), when(k.last_used_at), when(k.expires_at), ",".join(k.models),
             "yes" if k.allow_cloud else "no", str(k.rpm or "-"), str(k.tokens_per_day or "-")] for k in keys]
    print_table(["NAME", "ROLE", "PREFIX", "CREATED", "LAST USED", "EXPIRES", "MODELS", "CLOUD", "RPM",
                 "TOKENS/DAY"], rows)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    try:
        key = open_store(_settings(args)).revoke(args.name)
    except KeyError_ as exc:
        return _fail(str(exc))
    print(json.dumps({"revoked": key.name}) if args.json else f"revoked key {key.name!r}; it stops working now")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    try:
        key, secret = open_store(_settings(args)).rotate(args.name, parse_duration(args.overlap))
    except KeyError_ as exc:
        return _fail(str(exc), "--overlap takes a duration like 0, 90s, 15m or 24h")
    show_secret(key, secret, args.json, "rotated")
    if not args.json:
        print(f"the previous secret keeps working for {args.overlap}, then stops", file=sys.stderr)
    return 0


def register(sub: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `hearth keys ...` to the CLI."""
    keys = sub.add_parser("keys", help="API keys: create, list, revoke, rotate")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("name", help="a name for the app or person using it (e.g. paperless)")
    create.add_argument("--role", choices=ROLES, default="user", help="admin manages keys; user/service use models")
    create.add_argument("--models", nargs="+", metavar="PATTERN", help="allowed models (fnmatch, e.g. 'gemma3*' embed, or comma-separated)")
    create.add_argument("--allow-cloud", action="store_true", help="may use cloud upstreams (prompts leave the box)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tokens-per-day", type=int, help="prompt + completion tokens per day")
    create.add_argument("--expires", help="date (2025-12-31), date and time, or a duration from now (30d)")
    create.set_defaults(func=cmd_create)
    lst = ksub.add_parser("list", help="list keys (never secrets)")
    lst.add_argument("--all", action="store_true", help="include revoked keys")
    lst.set_defaults(func=cmd_list)
    revoke = ksub.add_parser("revoke", help="revoke a key (effective on the next request)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_revoke)
    rotate = ksub.add_parser("rotate", help="give a key a new secret; the old one works for --overlap")
    rotate.add_argument("name")
    rotate.add_argument("--overlap", default="0", help="how long the old secret keeps working (e.g. 24h)")
    rotate.set_defaults(func=cmd_rotate)
    for p in (create, lst, revoke, rotate):
        add_common(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")


def require_admin_key(settings: Settings, create: bool) -> int | None:
    """For `hearth serve` off loopback: an admin key must exist (or be created now). None = go on."""
    from hearth.cli.serve import is_loopback

    if is_loopback(settings.host):
        return None
    store = open_store(settings)
    if store.has_admin():
        return None
    if not create:
        return _fail(f"refusing to listen on {settings.host}: no admin key exists, so anyone on the network "
                     "could use this server",
                     "create one with `hearth keys create admin --role admin`, or start with --create-admin-key")
    name = "admin"
    n = 1
    while store.get(name) is not None:
        n += 1
        name = f"admin-{n}"
    key, secret = store.create(name, role="admin")
    show_secret(key, secret, False, "created admin")
    return None
