"""Tool calling, dialect-neutral: checking tool definitions and choices, call ids, arguments.

Tools are kept in the OpenAI shape (`{"type": "function", "function": {name,
description, parameters}}`), which Ollama's API uses as well; both dialects
check them here so that a malformed tool gets the same 400 everywhere.
"""

from __future__ import annotations

import random
import re
from typing import Any

import orjson

from hearth.core.errors import BadRequest
from hearth.core.types import Message, ToolCall

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
CHOICES = ("auto", "none", "required")


def check_tools(tools: list[Any] | None, param: str = "tools") -> list[dict[str, Any]]:
    """Function tools, checked; a 400 names the first bad one and what it needs."""
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools or []):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"{where}: only function tools are supported: "
                             '{"type": "function", "function": {"name": ..., "parameters": {...}}}', param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise BadRequest(f"{where}.function.name is required: 1-64 letters, digits, '_', '-' or '.'",
                             param=f"{where}.function.name")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"{where}.function.parameters must be a JSON schema object",
                             param=f"{where}.function.parameters")
        out.append({"type": "function", "function": fn})
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any] | None:
    """`tool_choice`, checked against the tools it may name."""
    if choice is None or choice in CHOICES:
        if choice in ("auto", "required") and not tools:
            raise BadRequest(f"tool_choice {choice!r} needs `tools`; send the tools the model may call",
                             param="tool_choice")
        return choice  # type: ignore[no-any-return]
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise BadRequest('tool_choice must be "auto", "none", "required" or '
                         '{"type": "function", "function": {"name": ...}}', param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise BadRequest(f"tool_choice names {name!r}, which is not one of `tools`", param="tool_choice")
    return {"type": "function", "function": {"name": name}}


def new_call_id() -> str:
    """An id for a tool call whose source gave none (Ollama's calls have no ids)."""
    return f"call_{random.getrandbits(64):016x}"


def arguments_text(arguments: Any) -> str:
    """Arguments as JSON text: objects are serialised, text is kept as sent."""
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return orjson.dumps(arguments).decode()


def calls_of(wire_calls: Any) -> list[ToolCall]:
    """The tool calls of a history message, from either dialect's wire shape
    (`id`, `function.name`, `function.arguments` as text or object); missing ids are made up."""
    return [ToolCall(name=c.function.name, arguments=arguments_text(c.function.arguments),
                     id=c.id or new_call_id()) for c in wire_calls or ()]


def arguments_object(call: ToolCall) -> dict[str, Any] | None:
    """Arguments as an object (Ollama's shape); None when they are not a JSON object."""
    try:
        value = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def answered_calls(messages: list[Message]) -> dict[int, ToolCall]:
    """For each `tool` message (by position), the call it answers.

    OpenAI names the call by `tool_call_id`, Ollama by the function's `name`;
    an upstream of the other dialect needs the other one. A result without
    either answers the earliest call not answered yet.
    """
    out: dict[int, ToolCall] = {}
    pending: list[ToolCall] = []
    for i, m in enumerate(messages):
        if m.tool_calls:
            pending = list(m.tool_calls)
        elif m.role == "tool":
            match = next((c for c in pending if m.tool_call_id and c.id == m.tool_call_id), None) or \
                next((c for c in pending if m.name and c.name == m.name), None) or \
                (pending[0] if pending else None)
            if match is not None:
                pending.remove(match)
                out[i] = match
    return out
