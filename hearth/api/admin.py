"""Admin HTTP endpoints (admin keys only; the auth middleware checks the role).

    GET    /admin/keys                   list keys (never secrets)
    POST   /admin/keys                   create {name, role, models, allow_cloud, rpm, tokens_per_day, expires}
    POST   /admin/keys/{name}/rotate     new secret {overlap: "24h" | seconds}
    POST   /admin/keys/{name}/revoke     revoke (also DELETE /admin/keys/{name})
    GET    /admin/usage?by=key&since=7d  usage totals
    GET    /admin/privacy                outbound hosts, cloud keys, recorded cloud calls
    GET    /admin/upstreams              upstreams: models, replicas' health, load, last error
    GET    /metrics                      Prometheus
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hearth.api.common import JSONResponse, read_json
from hearth.api.metrics import metrics_endpoint
from hearth.core.errors import BadRequest, NotFound
from hearth.store.keys import KeyError_, parse_duration, parse_when
from hearth.store.privacy_report import build_report


def _security(request: Request) -> Any:
    return request.app.state.hearth.extras["security"]


def _opt_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise BadRequest(f"field {name!r} must be an integer, got {value!r}", param=name)
    return value


def _key_error(exc: KeyError_) -> BadRequest | NotFound:
    message = str(exc)
    return NotFound(message, code="key_not_found") if message.startswith("no key named") else BadRequest(message)


async def list_keys(request: Request) -> Response:
    sec = _security(request)
    revoked = request.query_params.get("revoked") in ("1", "true")
    return JSONResponse({"keys": [k.as_dict() for k in sec.keys.list(include_revoked=revoked)]})


async def create_key(request: Request) -> Response:
    sec = _security(request)
    body = await read_json(request, sec.settings.max_body_bytes)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise BadRequest("send a JSON object with at least a string 'name'", param="name")
    models = body.get("models", ["*"])
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise BadRequest("field 'models' must be a non-empty list of patterns like [\"gemma3*\"] "
                         "(leave it out for every model)", param="models")
    allow_cloud = body.get("allow_cloud", False)
    if not isinstance(allow_cloud, bool):  # "false" is truthy: a string here must not open the cloud
        raise BadRequest(f"field 'allow_cloud' must be true or false, got {allow_cloud!r}", param="allow_cloud")
    try:
        expires = parse_when(str(body["expires"]), sec.clock) if body.get("expires") else None
        key, secret = sec.keys.create(
            body["name"], role=str(body.get("role", "user")), models=models,
            allow_cloud=allow_cloud, rpm=_opt_int(body, "rpm"),
            tokens_per_day=_opt_int(body, "tokens_per_day"), expires_at=expires)
    except KeyError_ as exc:
        raise _key_error(exc) from None
    return JSONResponse({"key": key.as_dict(), "secret": secret}, status_code=201)


async def rotate_key(request: Request) -> Response:
    sec = _security(request)
    body = await read_json(request, sec.settings.max_body_bytes, allow_empty=True)
    if body is not None and not isinstance(body, dict):
        raise BadRequest('send a JSON object like {"overlap": "1h"}, or no body for an immediate rotation')
    overlap = (body or {}).get("overlap", 0)
    try:
        seconds = float(overlap) if isinstance(overlap, (int, float)) else parse_duration(str(overlap))
        key, secret = sec.keys.rotate(request.path_params["name"], seconds)
    except KeyError_ as exc:
        raise _key_error(exc) from None
    return JSONResponse({"key": key.as_dict(), "secret": secret})


async def revoke_key(request: Request) -> Response:
    sec = _security(request)
    try:
        key = sec.keys.revoke(request.path_params["name"])
    except KeyError_ as exc:
        raise _key_error(exc) from None
    return JSONResponse({"key": key.as_dict()})


def _since(request: Request, clock: Any) -> float | None:
    text = request.query_params.get("since")
    if not text:
        return None
    try:
        return parse_when(text, clock, future=False)
    except KeyError_ as exc:
        raise BadRequest(str(exc), param="since") from None


async def usage(request: Request) -> Response:
    sec = _security(request)
    by = request.query_params.get("by", "key")
    await sec.settle_usage()
    since = _since(request, sec.clock)
    try:
        rows = sec.usage.summary(by, since)
    except ValueError as exc:
        raise BadRequest(str(exc), param="by") from None
    return JSONResponse({"by": by, "rows": rows})


async def privacy(request: Request) -> Response:
    sec = _security(request)
    await sec.settle_usage()
    return JSONResponse(build_report(sec.settings, sec.keys, sec.usage, _since(request, sec.clock)))


async def upstreams(request: Request) -> Response:
    """Each upstream: kind, models, and its replicas' health, load and last error."""
    engines = request.app.state.hearth.engines
    return JSONResponse({"upstreams": [e.status() for e in engines if hasattr(e, "status")]})


def routes() -> list[Route]:
    """The admin routes and /metrics."""
    return [
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys", create_key, methods=["POST"]),
        Route("/admin/keys/{name}/rotate", rotate_key, methods=["POST"]),
        Route("/admin/keys/{name}/revoke", revoke_key, methods=["POST"]),
        Route("/admin/keys/{name}", revoke_key, methods=["DELETE"]),
        Route("/admin/usage", usage, methods=["GET"]),
        Route("/admin/privacy", privacy, methods=["GET"]),
        Route("/admin/upstreams", upstreams, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
