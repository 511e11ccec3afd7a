"""Routing with less per-request work than Starlette's defaults (same results).

- `PathRouter` finds a fixed path (`/v1/chat/completions`, `/api/chat` ...) with
  one dict lookup instead of trying each route's regex in turn; paths with
  parameters, wrong methods (405) and misses (404) go the usual way.
- `DirectRoute` calls an async endpoint without the per-request exception
  wrapper Starlette adds around every route: `ErrorBoundary` sees the same
  exceptions and answers them with the same handlers.
- `LeanStarlette` builds its middleware stack with one `ErrorBoundary` in
  place of Starlette's ServerErrorMiddleware and ExceptionMiddleware (two
  layers on the way in and two on every `send`) and calls the router's
  `app` directly.

On the proxy path every microsecond is added latency, and these were about a
fifth of what hearth spent on a request.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send

HTTPHandler = Callable[[Request, Exception], Awaitable[Response]]


class DirectRoute(Route):
    """A Route whose async endpoint is awaited directly (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.is_async = inspect.iscoroutinefunction(self.endpoint)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self.methods and scope["method"] not in self.methods) or not self.is_async:
            await super().handle(scope, receive, send)  # 405, or a sync endpoint (thread pool)
            return
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


def direct(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The same routes, plain `Route`s turned into `DirectRoute`s."""
    out: list[BaseRoute] = []
    for r in routes:
        if type(r) is Route:  # a sync endpoint still goes Starlette's way (DirectRoute.handle)
            out.append(DirectRoute(r.path, r.endpoint, methods=sorted(r.methods or ()) or None, name=r.name,
                                   include_in_schema=r.include_in_schema))
        else:
            out.append(r)
    return out


class PathRouter(Router):
    """A Router that finds fixed paths by dict lookup (see the module docstring)."""

    def __init__(self, routes: Sequence[BaseRoute], **kwargs: Any) -> None:
        super().__init__(routes=list(routes), **kwargs)
        self._fixed: dict[str, list[Route]] = {}
        for i, route in enumerate(self.routes):
            if not isinstance(route, Route) or "{" in route.path:
                continue
            probes = [{"type": "http", "path": route.path, "root_path": "", "method": m}
                      for m in route.methods or {"GET"}]
            if any(r.matches(p)[0] is Match.FULL for r in self.routes[:i] for p in probes):
                continue  # an earlier route wins this path: leave it to the regular search
            self._fixed.setdefault(route.path, []).append(route)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            for route in self._fixed.get(scope["path"], ()):
                if route.methods is None or scope["method"] in route.methods:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope["endpoint"] = route.endpoint
                    scope["path_params"] = {}
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)


class ErrorBoundary:
    """Answers an exception from the app with the handler registered for its class (nearest in its MRO).

    With `Exception` registered every error is answered. If the response had
    already started, sending the error's response fails and the server cuts
    the connection: a half-sent answer is never followed by a second one.
    """

    def __init__(self, app: ASGIApp, handlers: dict[Any, ExceptionHandler]) -> None:
        self.app = app
        # hearth registers async HTTP handlers only (starlette's type also allows sync and websocket ones)
        self.handlers = {k: cast(HTTPHandler, v) for k, v in handlers.items() if isinstance(k, type)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            handler = next((self.handlers[c] for c in type(exc).__mro__ if c in self.handlers), None)
            if handler is None or scope["type"] != "http":
                raise
            response = await handler(Request(scope, receive, send), exc)
            exc.__traceback__ = None  # a reused exception instance must not collect tracebacks
            await response(scope, receive, send)


class LeanStarlette(Starlette):
    """Starlette whose middleware stack is the user middleware around one `ErrorBoundary` (see above)."""

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = ErrorBoundary(self.router.app, self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app
