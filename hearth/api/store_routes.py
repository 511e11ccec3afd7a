"""Model store over HTTP: Ollama's pull/delete/copy plus hearth's /admin/models/* and /admin/hardware.

Pulls run in a worker thread (blocking HTTP); their progress comes back as
Ollama NDJSON lines. A client that goes away cancels the pull; the partial
download stays for the next pull to resume.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hearth.api.common import JSONResponse, Stream, read_json
from hearth.core.errors import BadRequest, HearthError
from hearth.models import catalog
from hearth.models.fit import check
from hearth.models.hardware import detect
from hearth.models.pull import Puller, options_from
from hearth.models.serving import adopt_bundled, shape_for
from hearth.models.store import ModelStore

DONE = object()


def _store(request: Request) -> ModelStore:
    store = ModelStore(request.app.state.hearth.settings.models_dir)
    adopt_bundled(store)
    return store


async def _body(request: Request) -> dict[str, Any]:
    data = await read_json(request, request.app.state.hearth.settings.max_body_bytes)
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _name(data: dict[str, Any], *keys: str) -> str:
    for key in keys:
        if isinstance(data.get(key), str) and data[key].strip():
            return str(data[key]).strip()
    raise BadRequest(f"field {keys[0]!r} is required: the model name", param=keys[0])


async def _refuse_upstream(request: Request, name: str, does: str, do: str) -> None:
    """A 400 when `name` is an alias or a model an upstream serves (not one of hearth's own store):
    hearth does not manage other servers' models, and "not in the store" would read as "does not exist"."""
    router = request.app.state.hearth.router
    target = router.alias_target(name)
    if target is not None:  # a name from hearth.toml, not the store: "not in the store, pull it" would mislead
        raise BadRequest(f"{name!r} is an alias of {target!r} (set in hearth.toml [aliases]), not a model of the "
                         f"store; {do} {target!r} itself, or change the alias in hearth.toml")
    try:
        _, info = await router.resolve(name)
    except HearthError:
        return  # unknown anywhere: the store's own answer names what it has
    upstream = info.metadata.get("upstream")
    if upstream:
        raise BadRequest(f"model {name!r} is served by upstream {upstream!r}; hearth {does} only models "
                         f"of its own store, so {do} it on that server")


def _refuse_alias_name(request: Request, name: str | None) -> None:
    """A store model named like an alias would be hidden behind it: a 400 for a new name that is one."""
    target = request.app.state.hearth.router.alias_target(name) if name else None
    if target is not None:
        raise BadRequest(f"{name!r} is an alias of {target!r} in hearth.toml [aliases], so a model stored under "
                         "that name would never be served; choose another name")


async def rescan(request: Request) -> None:
    """Let the engines and the router see the store's new contents."""
    state = request.app.state.hearth
    for engine in state.engines:
        refresh = getattr(engine, "refresh_store", None)
        if refresh is not None:
            refresh()
    await state.router.refresh()


async def _loaded(request: Request) -> set[str]:
    names: set[str] = set()
    for engine in request.app.state.hearth.engines:
        names.update(m.id for m in await engine.loaded())
    return names


# -- pull -------------------------------------------------------------------------------
async def _pull_events(request: Request, spec: str, name: str | None, sha256: str | None
                       ) -> AsyncIterator[dict[str, Any]]:
    """Run a pull in a thread and yield its progress events (the last is success or error)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()
    opts = options_from(request.app.state.hearth.settings, cancel=cancel,
                        progress=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
    puller = Puller(_store(request), opts)

    def work() -> None:
        try:
            puller.pull(spec, name, sha256)
        except HearthError as exc:
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, DONE)

    task = loop.run_in_executor(None, work)
    try:
        while (item := await queue.get()) is not DONE:
            if isinstance(item, HearthError):
                yield {"error": item.message, "status_code": item.status}
                continue
            if item.get("status") == "success":
                await rescan(request)
            yield item
    finally:
        cancel.set()
        await asyncio.shield(task)


async def pull(request: Request) -> Response:
    """Ollama `POST /api/pull` (and `/admin/models/pull`, which also takes `name` and `sha256`)."""
    data = await _body(request)
    spec = _name(data, "model", "name")
    await _refuse_upstream(request, spec, "pulls", "pull")
    name = data.get("as") if isinstance(data.get("as"), str) else None
    _refuse_alias_name(request, name)
    sha = data.get("sha256") if isinstance(data.get("sha256"), str) else None
    events = _pull_events(request, spec, name, sha)
    if data.get("stream", True) is False:
        last: dict[str, Any] = {}
        async for event in events:
            last = event
        if "error" in last:
            return JSONResponse({"error": last["error"]}, status_code=last.get("status_code", 500))
        return JSONResponse({"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        async for event in events:
            event.pop("status_code", None)
            event.pop("speed", None)
            yield orjson.dumps(event) + b"\n"

    return Stream(lines(), "application/x-ndjson")


# -- delete / copy ------------------------------------------------------------------------
async def delete(request: Request) -> Response:
    """Ollama `DELETE /api/delete`: refuses loaded models and alias targets (admin route takes force)."""
    data = await _body(request)
    name = _name(data, "model", "name")
    if not _store(request).has(name):  # one stored under an alias's name (made before aliases were checked)
        await _refuse_upstream(request, name, "deletes", "delete")
    force = bool(data.get("force")) and request.url.path.startswith("/admin/")
    state = request.app.state.hearth
    store = _store(request)
    if force:
        for engine in state.engines:
            for m in await engine.loaded():
                if m.id == store.get(name).name:
                    info = (await state.router.resolve(m.id))[1]
                    await engine.unload(info)
    removed = store.remove(name, loaded=await _loaded(request), aliases=state.router.aliases, force=force)
    await rescan(request)
    return JSONResponse({"status": "success", "deleted": removed.name})


async def copy(request: Request) -> Response:
    """Ollama `POST /api/copy`: a new name for the same blob."""
    data = await _body(request)
    await _refuse_upstream(request, _name(data, "source"), "copies", "copy")
    _refuse_alias_name(request, _name(data, "destination"))
    made = _store(request).copy(_name(data, "source"), _name(data, "destination"))
    await rescan(request)
    return JSONResponse({"status": "success", "model": made.name})


# -- hearth's admin endpoints ---------------------------------------------------------------
async def admin_list(request: Request) -> Response:
    """Models in the store with their manifests and whether they are loaded."""
    loaded = await _loaded(request)
    aliases = request.app.state.hearth.router.aliases
    rows = []
    for m in _store(request).list():
        row = {**{k: getattr(m, k) for k in m.__dataclass_fields__}, "loaded": m.name in loaded,
               "aliases": sorted(a for a, t in aliases.items() if t in (m.name, m.name.removesuffix(":latest")))}
        rows.append(row)
    return JSONResponse({"models": rows})


async def admin_catalog(request: Request) -> Response:
    """The shipped catalog, each entry with its fit on this machine (ctx/parallel query parameters)."""
    ctx, parallel = _ints(request.query_params)
    hw = await asyncio.to_thread(detect)
    store = _store(request)
    out = []
    for e in catalog.load():
        v = e.fit(hw, ctx, parallel)
        out.append({"name": e.name, "roles": e.roles, "tier": e.tier, "source": e.source, "size": e.size,
                    "description": e.description, "fits": v.fits, "where": v.where, "need": v.need,
                    "present": store.has(e.name)})
    return JSONResponse({"models": out, "ctx": ctx, "parallel": parallel})


async def admin_hardware(request: Request) -> Response:
    return JSONResponse((await asyncio.to_thread(detect)).to_dict())


def _ints(params: Any, ctx: int = 4096, parallel: int = 1) -> tuple[int, int]:
    try:
        return int(params.get("ctx", ctx)), int(params.get("parallel", parallel))
    except (TypeError, ValueError):
        raise BadRequest("ctx and parallel must be whole numbers", param="ctx") from None


async def admin_fit(request: Request) -> Response:
    """Fit estimate: GET ?model=&ctx=&parallel= or POST {model, ctx, parallel, kv_type}."""
    data = dict(request.query_params) if request.method == "GET" else await _body(request)
    name = _name(data, "model", "name")
    ctx, parallel = _ints(data, request.app.state.hearth.settings.ctx_per_slot, 1)
    opts = options_from(request.app.state.hearth.settings)
    shape, origin = await asyncio.to_thread(shape_for, name, _store(request), opts)
    hw = await asyncio.to_thread(detect)
    verdict = check(shape, hw, ctx, parallel, kv_type=str(data.get("kv_type", "f16")))
    return JSONResponse({"model": name, "from": origin, **verdict.to_dict(), "summary": verdict.summary()})


async def admin_pick(request: Request) -> Response:
    role = request.query_params.get("role", "chat")
    ctx, parallel = _ints(request.query_params)
    entry, verdict = catalog.pick(role, await asyncio.to_thread(detect), ctx, parallel)
    return JSONResponse({"role": role, "model": entry.name, "source": entry.source, "where": verdict.where,
                         "need": verdict.need, "present": _store(request).has(entry.name)})


async def admin_import(request: Request) -> Response:
    data = await _body(request)
    path = Path(_name(data, "path"))
    name = data.get("name") if isinstance(data.get("name"), str) else None
    made = await asyncio.to_thread(_store(request).import_file, path, name)
    await rescan(request)
    return JSONResponse({"status": "success", "model": made.name})


async def admin_rescan(request: Request) -> Response:
    await rescan(request)
    return JSONResponse({"status": "success"})


def routes() -> list[Route]:
    """The store's routes (Ollama-compatible and admin)."""
    return [
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/delete", delete, methods=["DELETE"]),
        Route("/api/copy", copy, methods=["POST"]),
        Route("/admin/models", admin_list, methods=["GET"]),
        Route("/admin/models/catalog", admin_catalog, methods=["GET"]),
        Route("/admin/models/fit", admin_fit, methods=["GET", "POST"]),
        Route("/admin/models/pick", admin_pick, methods=["GET"]),
        Route("/admin/models/pull", pull, methods=["POST"]),
        Route("/admin/models/delete", delete, methods=["POST", "DELETE"]),
        Route("/admin/models/copy", copy, methods=["POST"]),
        Route("/admin/models/import", admin_import, methods=["POST"]),
        Route("/admin/models/rescan", admin_rescan, methods=["POST"]),
        Route("/admin/hardware", admin_hardware, methods=["GET"]),
    ]
