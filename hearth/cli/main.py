"""`hearth` command: serve, config (more commands are clients of the HTTP API)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

from hearth.settings import LoadedSettings, SettingsError, load_settings


def fail(message: str, hint: str | None = None) -> int:
    """Print an error in one line (plus a hint) and return exit code 2."""
    print(f"hearth: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return 2


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="path to hearth.toml (env HEARTH_CONFIG)")


def settings_from(args: argparse.Namespace, **flags: Any) -> LoadedSettings:
    return load_settings(flags=flags, config=getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    from hearth.cli.serve import serve

    loaded = settings_from(
        args, host=args.host, port=args.port, fake=True if args.fake else None,
        default_model=args.model, log_level=args.log_level,
    )
    return serve(loaded.settings, create_admin_key=args.create_admin_key)


def cmd_config(args: argparse.Namespace) -> int:
    loaded = settings_from(args)
    from hearth.settings import Settings

    rows: list[dict[str, Any]] = []
    for name, field in Settings.model_fields.items():
        value = getattr(loaded.settings, name)
        shown = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in value.items()} \
            if isinstance(value, dict) else value
        rows.append({"setting": name, "value": shown if isinstance(shown, (dict, list, int, float, bool)) else str(shown),
                     "source": loaded.sources[name], "description": field.description or ""})
    if args.json:
        print(json.dumps({"config_file": str(loaded.config_path) if loaded.config_path else None, "settings": rows},
                         indent=2))
        return 0
    from hearth.cli.table import print_table

    print(f"config file: {loaded.config_path or '(none; using env and defaults)'}")
    print_table(["SETTING", "VALUE", "SOURCE", "DESCRIPTION"],
                [[r["setting"], json.dumps(r["value"]) if isinstance(r["value"], (dict, list)) else str(r["value"]),
                  r["source"], r["description"]] for r in rows])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth", description="A private AI server on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the server (OpenAI and Ollama APIs)")
    add_common(serve)
    serve.add_argument("--host", help="address to listen on (env HEARTH_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env HEARTH_PORT, default 11435)")
    serve.add_argument("--model", help="default model (env HEARTH_DEFAULT_MODEL)")
    serve.add_argument("--fake", action="store_true", help="serve the scripted fake engine (testing)")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    serve.add_argument("--create-admin-key", action="store_true",
                       help="off loopback with no admin key: create one and print it once")
    serve.set_defaults(func=cmd_serve)

    config = sub.add_parser("config", help="print every effective setting and where it came from")
    add_common(config)
    config.add_argument("--json", action="store_true", help="machine-readable output")
    config.set_defaults(func=cmd_config)

    from hearth.cli import ps as ps_cli
    from hearth.cli import upstreams as upstreams_cli

    ps_cli.register(sub, add_common)
    upstreams_cli.register(sub, add_common)

    from hearth.cli import hw as hw_cli
    from hearth.cli import models as models_cli

    models_cli.add_parser(sub)
    hw_cli.add_parser(sub)
    from hearth.cli import keys as keys_cli
    from hearth.cli import privacy as privacy_cli
    from hearth.cli import usage as usage_cli

    for cli in (keys_cli, usage_cli, privacy_cli):
        cli.register(sub, add_common)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `hearth` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = func(args)
    except SettingsError as exc:
        code = fail(str(exc), "run `hearth config` to see every setting and where it comes from")
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # the reader left early (`hearth config | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        code = 0
    except sqlite3.Error as exc:  # a damaged or foreign hearth.db
        code = fail(f"the database cannot be used: {exc}", "`hearth config` shows `home`; move a damaged "
                    "hearth.db away (hearth makes a new one) or point HEARTH_HOME elsewhere")
    except OSError as exc:  # the home cannot be made or written: a file in the way, no permission, full disk
        where = f": {exc.filename}" if exc.filename else ""
        code = fail(f"{exc.strerror or exc}{where}", "check that `home` (HEARTH_HOME) is a writable folder "
                    "with free space")
    sys.exit(code)
