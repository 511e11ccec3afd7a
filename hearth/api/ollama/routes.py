"""Thin Ollama routes (placeholder until the dialect lands)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


def routes() -> list[Route]:
    """The Ollama dialect's routes."""
    return [Route("/", root, methods=["GET", "HEAD"])]
