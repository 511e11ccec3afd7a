"""The app factory: `create_app(settings, engines)` wires dialects, router and engines."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from hearth.api.common import JSONResponse
from hearth.api.openai import convert as openai_convert
from hearth.api.openai import routes as openai_routes
from hearth.api.routing import LeanStarlette, PathRouter, direct
from hearth.core import record
from hearth.core.engine import Engine
from hearth.core.errors import BadRequest, HearthError, NotFound, internal_error
from hearth.core.router import AliasError, Router
from hearth.core.types import GenerateRequest
from hearth.settings import BUNDLED_MODEL, Settings, SettingsError

log = logging.getLogger("hearth")


@dataclass
class AppState:
    """Everything a request handler may use; lives on `app.state.hearth`."""

    settings: Settings
    router: Router
    engines: list[Engine]
    extras: dict[str, Any] = field(default_factory=dict)

    def limit_max_tokens(self, req: GenerateRequest, field: str = "max_tokens") -> None:
        """Apply the configured per-request token cap (a 400 naming `field`, the one the client sent, if
        asked for more)."""
        cap = self.settings.max_tokens_limit
        if not cap:
            return
        if req.max_tokens is None:
            # not max_tokens: a long prompt must not be refused for room it never asked (the request's
            # own bound, Ollama's num_predict, stays when it is lower)
            req.max_tokens_cap = min(req.max_tokens_cap or cap, cap)
        elif req.max_tokens > cap:
            raise BadRequest(
                f"{field} {req.max_tokens} is over this server's limit of {cap} (setting max_tokens_limit)",
                param=field,
            )


def is_ollama_path(path: str) -> bool:
    """Ollama-dialect paths get Ollama's error envelope."""
    return path.startswith("/api/")


def error_response(request: Request, err: HearthError, extra: dict[str, str] | None = None) -> Response:
    """Render an error in the dialect of the path it happened on (with `extra` headers)."""
    headers = {**(extra or {}), **({"Retry-After": str(err.retry_after)} if err.retry_after is not None else {})}
    if is_ollama_path(request.url.path):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)
    return JSONResponse(openai_convert.error_body(err), status_code=err.status, headers=headers)


async def on_hearth_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HearthError)
    if exc.status >= 500:
        rec = record.current()
        log.warning("%s %s -> %d [%s]: %s", request.method, request.url.path, exc.status,
                    rec.request_id if rec else "-", exc.message)
    return error_response(request, exc)


# Ollama endpoints hearth does not serve, and what to do instead.
UNSERVED = {
    "/api/create": "hearth builds no models from Modelfiles; register a GGUF with `hearth models import PATH --name NAME`",
    "/api/push": "hearth does not push models to a registry",
    "/api/blobs": "hearth takes no blob uploads; register a GGUF with `hearth models import PATH --name NAME`",
    "/v1/responses": "hearth serves the Chat Completions API: use POST /v1/chat/completions "
                     "(openai SDK: client.chat.completions.create)",
    "/v1/audio": "hearth serves text models only (no speech or transcription)",
    "/v1/images": "hearth serves text models only (no image generation; vision models read images in chat)",
    "/v1/moderations": "hearth has no moderation endpoint",
    "/v1/files": "hearth stores no files; send the content in the request",
    "/v1/batches": "hearth has no batch API; send the requests concurrently (the in-box engine batches them)",
    "/v1/assistants": "hearth has no Assistants API; use POST /v1/chat/completions",
    "/v1/threads": "hearth has no Assistants API; use POST /v1/chat/completions",
    "/v1/fine_tuning": "hearth does not fine-tune models",
}


def closest_route(request: Request) -> str:
    """'; did you mean POST /v1/chat/completions?' for a misspelt path, else where the APIs live."""
    served = {getattr(r, "path", ""): sorted(getattr(r, "methods", None) or ()) for r in request.app.routes}
    near = difflib.get_close_matches(request.url.path, [p for p in served if "{" not in p], n=1, cutoff=0.8)
    if not near:
        return "; see /v1/* and /api/*"
    methods = [m for m in served[near[0]] if m != "HEAD"]
    verb = request.method if request.method in methods else "/".join(methods)
    return f"; did you mean {verb} {near[0]}?"


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    unserved = next((hint for prefix, hint in UNSERVED.items() if path.startswith(prefix)), None)
    if exc.status_code == 404 and unserved:
        err: HearthError = NotFound(f"{request.method} {path} is not supported: {unserved}", code="not_supported")
    elif exc.status_code == 404:
        err = NotFound(f"no route {request.method} {path}{closest_route(request)}", code="not_found")
    else:
        err = HearthError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                          code="method_not_allowed" if exc.status_code == 405 else None)
        err.type = "invalid_request_error"
    return error_response(request, err, dict(exc.headers or {}))  # a 405's Allow (RFC 9110 15.5.6)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):  # left mid-upload: nobody to answer, nothing went wrong here
        log.debug("client left during the request body of %s %s", request.method, request.url.path)
        return Response(status_code=499)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    err = internal_error(exc)
    return error_response(request, err)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state: AppState = request.app.state.hearth
    for engine in state.engines:
        if not await engine.ready():
            return JSONResponse({"status": "starting", "engine": engine.name}, status_code=503)
    return JSONResponse({"status": "ready"})


def create_app(settings: Settings, engines: list[Engine] | None = None, extra_routes: list[Route] | None = None) -> Starlette:
    """Build the ASGI app. `engines` defaults to what the settings ask for."""
    if engines is None:
        from hearth.engines.registry import build_engines

        engines = build_engines(settings)
    default, aliases = settings.default_model, settings.alias_targets
    if settings.fake:  # the fake engine stands in for the bundled model
        swap = {BUNDLED_MODEL: "fake:latest"}
        default = swap.get(default, default)
        aliases = {k: swap.get(v, v) for k, v in aliases.items()}
    router = Router(engines, default, aliases, settings.alias_dimensions)
    state = AppState(settings=settings, router=router, engines=engines)
    from hearth.api import auth as auth_api

    security_routes, security_middleware = auth_api.install(settings, state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for engine in engines:
            await engine.start()
        try:
            await router.check_aliases(default_set="default_model" in settings.model_fields_set)
        except AliasError as exc:
            for engine in engines:
                await engine.close()
            raise SettingsError(exc.message) from None
        try:
            yield
        finally:
            for engine in engines:
                await engine.close()
            state.extras["security"].close()

    from hearth.api.ollama import routes as ollama_routes
    from hearth.api import store_routes

    all_routes = [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        *openai_routes.routes(),
        *ollama_routes.routes(),
        *store_routes.routes(),
        *(extra_routes or []),
        *security_routes,
    ]
    app = LeanStarlette(
        lifespan=lifespan,
        middleware=security_middleware,
        exception_handlers={
            HearthError: on_hearth_error,
            HTTPException: on_http_error,
            Exception: on_unexpected,
        },
    )
    app.router = PathRouter(direct(all_routes), lifespan=lifespan)  # fewer steps per request, same routes
    app.state.hearth = state
    return app
