"""`hearth ps`: models held in memory, from GET /api/ps of the running server."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import http.client
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from hearth.settings import Settings


def server_url(settings: Settings, flag: str | None) -> str:
    """The running server: --url, HEARTH_URL, else the configured host and port."""
    if flag or os.environ.get("HEARTH_URL"):
        return (flag or os.environ["HEARTH_URL"]).rstrip("/")
    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"http://{url_host_part(host)}:{settings.port}"


def url_host_part(host: str) -> str:
    """A host as it goes in a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ServerError(RuntimeError):
    """The server answered with an error status (`status`), or not like hearth at all (0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(RuntimeError):
    """Nothing answers at the URL."""


def fetch_json(url: str, path: str, api_key: str | None) -> dict[str, Any]:
    """GET path of the running server; raises ServerError or Unreachable with a readable message."""
    try:
        req = urllib.request.Request(url + path)
    except ValueError:
        raise ServerError(f"{url!r} is not a URL; give one like http://127.0.0.1:11435") from None
    try:
        if api_key:
            req.add_header("Authorization", f"Bearer {api_key}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ServerError(f"{url}{path} answered HTTP {exc.code}: {_message(exc.read())}", exc.code) from None
    except UnicodeEncodeError:
        raise ServerError("the API key has characters a key never has (copied with an ellipsis?); "
                          "paste the whole key") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach hearth at {url} ({reason}); is `hearth serve` running?") from None
    except (ValueError, OSError, http.client.HTTPException) as exc:  # a bad URL, HTML, another protocol
        raise ServerError(f"{url} did not answer like a hearth server ({type(exc).__name__}: {exc}); "
                          "check --url or the port") from None
    if not isinstance(data, dict):
        raise ServerError(f"{url}{path} did not answer like a hearth server; check --url or the port")
    return data


def _message(body: bytes) -> str:
    """The message of an error envelope (OpenAI's or Ollama's), else the start of the body."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


# (unit, its seconds, the time from which the next unit is used)
UNITS = (("minute", 60, 2 * 3600), ("hour", 3600, 2 * 86400), ("day", 86400, 14 * 86400),
         ("week", 7 * 86400, 60 * 86400), ("month", 30 * 86400, 730 * 86400), ("year", 365 * 86400, 3e8))


def until(expires_at: str | None) -> str:
    """'4 minutes from now' style text for an RFC 3339 time."""
    if not expires_at:
        return "Forever"
    try:
        when = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    seconds = (when - dt.datetime.now(dt.timezone.utc)).total_seconds()
    if seconds > 3e8:
        return "Forever"
    if seconds < 60:
        return "less than a minute from now" if seconds >= 0 else "expired"
    for unit, size, below in UNITS:  # the largest unit that still reads as a count, as Ollama prints it
        if seconds < below:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "Forever"


def megabytes(size: int) -> str:
    """A model's size as `ollama ps` shows it (291 MB, 5.4 GB); "<1 MB" for a tiny one, "-" if unknown."""
    if not size:
        return "-"
    if size < 1e6:
        return "<1 MB"
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def rows(data: dict[str, Any]) -> list[list[str]]:
    """Table rows of an /api/ps answer."""
    out = []
    for m in data.get("models") or []:
        size = int(m.get("size") or 0)
        out.append([m.get("name") or m.get("model", ""), megabytes(size),
                    str(m.get("context_length") or "-"), until(m.get("expires_at"))])
    return out


def query(args: argparse.Namespace, settings: Settings, path: str, hint: str) -> dict[str, Any] | int:
    """GET `path` of the running server for a command; on failure the error is printed and its exit
    code returned. With --json the answer is printed too (and 0 returned)."""
    from hearth.cli.main import fail

    url = server_url(settings, args.url)
    try:
        data = fetch_json(url, path, args.api_key or os.environ.get("HEARTH_API_KEY"))
    except ServerError as exc:
        return fail(str(exc), key_hint(exc.status, path) or "check --url")
    except Unreachable as exc:
        return fail(str(exc), hint)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    return data


def from_server(args: argparse.Namespace, settings: Settings, path: str) -> dict[str, Any] | int | None:
    """GET `path` of the running server: its answer, None when no server runs (the caller reads the
    local database instead, and says so), or the exit code of a printed error."""
    from hearth.cli.main import fail

    url = server_url(settings, args.url)
    chosen = bool(args.url or os.environ.get("HEARTH_URL"))
    try:
        return fetch_json(url, path, args.api_key or os.environ.get("HEARTH_API_KEY"))
    except ServerError as exc:
        if exc.status in (401, 403) and not chosen:  # this machine's owner can read the database itself
            print(f"hearth: the server at {url} wants {'an admin' if exc.status == 403 else 'a'} key "
                  "(--api-key); read this machine's database instead", file=sys.stderr)
            return None
        return fail(str(exc), key_hint(exc.status, path) or "check --url")
    except Unreachable:
        if chosen:
            return fail(f"cannot reach hearth at {url}", "check --url (HEARTH_URL), or leave it out to read "
                        "this machine's database")
        print(f"hearth: no server at {url}; read this machine's database instead", file=sys.stderr)
        return None


def key_hint(status: int, path: str) -> str | None:
    """What to do about a 401, 403 or 429 from the server."""
    admin = path.startswith(("/admin/", "/metrics"))
    if status == 429:  # every request counts toward a key's --rpm, this one too
        return "the key is over its request or token limit; wait a minute, or use a key with a higher --rpm"
    if status == 401:
        return f"pass {'an admin' if admin else 'a'} key with --api-key or set HEARTH_API_KEY"
    if status == 403:
        return "this needs an admin key: pass one with --api-key (`hearth keys create NAME --role admin`)"
    return None


def client_parser(sub: Any, add_common: Any, name: str, help_text: str, path: str, key: str) -> Any:
    """A subcommand that asks the running server: --url, --api-key and --json."""
    p = sub.add_parser(name, help=help_text)
    add_common(p)
    add_client_flags(p, key)
    p.add_argument("--json", action="store_true", help=f"print the raw {path} answer")
    return p


def add_client_flags(p: argparse.ArgumentParser, key: str) -> None:
    """--url and --api-key, for a command that asks the running server."""
    p.add_argument("--url", help="server URL (env HEARTH_URL; default from host and port settings)")
    p.add_argument("--api-key", help=f"{key}, if the server has keys (env HEARTH_API_KEY)")


def cmd_ps(args: argparse.Namespace, settings: Settings) -> int:
    """Print the loaded models (in-box engine and managed upstreams)."""
    from hearth.cli.table import print_table

    data = query(args, settings, "/api/ps", "start it with `hearth serve`, or pass --url")
    if isinstance(data, int):
        return data
    print_table(["NAME", "SIZE", "CONTEXT", "UNTIL"], rows(data))
    return 0


def register(sub: Any, add_common: Any) -> None:
    """Add `hearth ps` to the command parser."""
    from hearth.cli.main import settings_from

    p = client_parser(sub, add_common, "ps", "list models in memory, managed upstreams included (GET /api/ps)",
                      "/api/ps", "an API key")
    p.set_defaults(func=lambda args: cmd_ps(args, settings_from(args).settings))
