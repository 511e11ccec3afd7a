"""Build the engines a configuration asks for."""

from __future__ import annotations

from hearth.core.engine import Engine
from hearth.settings import Settings


def build_engines(settings: Settings) -> list[Engine]:
    """The in-box engine (or the fake one with `fake = true`), then each upstream."""
    from hearth.engines.upstream.build import build_upstreams

    upstreams: list[Engine] = list(build_upstreams(settings))
    if settings.fake:
        from hearth.engines.fake import FakeEngine

        return [FakeEngine(delay=0.01), *upstreams]
    from hearth.engines.llamacpp.engine import LlamaCppEngine

    return [LlamaCppEngine(settings), *upstreams]
