"""Tool calling on the in-box engine: the prompt, the grammar that forces a call, and parsing calls.

A GGUF whose chat template knows `tools` (Qwen 2.5/3, Llama 3.1+, Mistral,
Hermes) renders them itself. Any other model (the bundled Gemma 3 among them)
gets hearth's tool prompt: the tools as JSON lines in the system turn and the
Hermes call format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
earlier calls and tool results are written back in that format.

`tool_choice: "required"` or a named function is enforced with a grammar, so
even a small model answers with a well-formed call whose arguments follow the
function's JSON schema. With `"auto"` the model decides; the same grammar
applies lazily, from the moment it opens a `<tool_call>`. Its answer is
parsed for calls in the formats models are trained on: Hermes `<tool_call>`
blocks, Mistral `[TOOL_CALLS] [...]`, and Llama 3's bare JSON object (with
`parameters` or `arguments`, optionally after `<|python_tag|>`).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from hearth.core.errors import BadRequest
from hearth.core.structured import check_enforceable, for_grammar
from hearth.core.tools import arguments_object, new_call_id
from hearth.core.types import GenerateRequest, Message, ToolCall

log = logging.getLogger("hearth.engine.tools")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
# Text that starts a call; streamed text is held back while it may be one of these.
MARKERS = (OPEN, "[TOOL_CALLS]", "<|python_tag|>")
HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

PROMPT = """You can call functions (tools) to help answer. To call one, reply with
<tool_call>
{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}
</tool_call>
and nothing else; write one such block per call. When no function is needed, answer normally.
A function's result comes back as <tool_response>...</tool_response>.

The functions:
{tools}"""


def active_tools(req: GenerateRequest) -> list[dict[str, Any]]:
    """The tools the model may call for this request (none when tool_choice is "none")."""
    return [] if req.tool_choice == "none" else list(req.tools)


def forced(req: GenerateRequest) -> bool:
    """True when the answer must be a call ("required" or a named function)."""
    return bool(active_tools(req)) and req.tool_choice not in (None, "auto")


# -- the prompt ---------------------------------------------------------------------


def system_text(tools: list[dict[str, Any]]) -> str:
    """hearth's tool prompt for a model whose template has no tool support."""
    return PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def call_text(call: ToolCall) -> str:
    """One earlier call, as the model is asked to write it."""
    args = arguments_object(call)
    body = {"name": call.name, "arguments": args if args is not None else call.arguments}
    return f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}"


def plain_messages(messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    """Messages with tools, calls and results written as text, for templates that know none of them.

    Results become user turns (consecutive ones joined into one), so that
    templates insisting on user/assistant turns accept them.
    """
    out: list[Message] = []
    if tools:
        if messages and messages[0].role == "system":
            out.append(Message(role="system", content=messages[0].content + "\n\n" + system_text(tools)))
            messages = messages[1:]
        else:
            out.append(Message(role="system", content=system_text(tools)))
    for m in messages:
        if m.role == "tool":
            text = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = Message(role="user", content=out[-1].content + "\n" + text)
            else:
                out.append(Message(role="user", content=text))
        elif m.tool_calls:
            parts = [m.content] if m.content else []
            parts += [call_text(c) for c in m.tool_calls]
            out.append(Message(role="assistant", content="\n".join(parts)))
        else:
            out.append(m)
    return out


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them, tool calls and results included."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": arguments_object(c) or {}}}
                for c in m.tool_calls]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


# -- the grammar --------------------------------------------------------------------


# "auto": free text until the model opens a call, then the call follows the grammar.
TRIGGER = r"[\s\S]*?(<tool_call>[\s\S]*)"
MAX_CALLS = 8  # parallel calls one answer may hold (the grammar bounds them)


def grammar(req: GenerateRequest) -> str:
    """GBNF for calls: one or more when the request sets `parallel_tool_calls:
    true`, else exactly one (llama-server's default too: small models asked for
    "one or more" keep calling until max_tokens). For "auto" it is used lazily
    (`TRIGGER`): the model may answer in text, but a call it opens is well-formed."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    tools = active_tools(req)
    choice = req.tool_choice
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    options = []
    for t in tools:
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object"}
        if fn.get("strict"):
            _check_strict(fn["name"], params)
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    try:
        body = json_schema_to_gbnf(json.dumps(for_grammar(schema)))
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise BadRequest(f"a tool's parameters cannot be turned into a grammar: {exc}; simplify the schema",
                         param="tools") from None
    body = re.sub(r"^root ::=", "hearth-call-json ::=", body, count=1, flags=re.MULTILINE)
    many = not isinstance(choice, dict) and req.parallel_tool_calls is True
    lazy = not forced(req)  # the model chose to open a call: let it lay it out as it likes
    ws = '[ \\t\\n]*' if lazy else '"\\n"'
    root = f'hearth-call ::= "<tool_call>" {ws} hearth-call-json {ws} "</tool_call>"\n'
    # a bound on parallel calls: small models asked for "one or more" repeat calls until max_tokens
    root += f'root ::= hearth-call ({ws} hearth-call){{0,{MAX_CALLS - 1}}}\n' if many else "root ::= hearth-call\n"
    return root + body


def sampling_grammar(req: GenerateRequest) -> tuple[str | None, list[str] | None]:
    """The grammar for a request with tools, and its triggers (None: it applies from the start).

    With "auto", a schema the grammar cannot express leaves calls unconstrained
    (they are still parsed) unless a function is strict.
    """
    if forced(req):
        return grammar(req), None
    try:
        return grammar(req), [TRIGGER]
    except BadRequest as exc:
        if any(t["function"].get("strict") for t in active_tools(req)):
            raise
        log.info("tool calls left unconstrained: %s", exc.message)
        return None, None


def _check_strict(name: str, params: dict[str, Any]) -> None:
    """`strict: true` promises arguments that follow the schema: fail closed on what the grammar cannot enforce.
    (Without it, keywords the grammar cannot express, such as `format: email`, are best effort.)"""
    try:
        check_enforceable(params)
    except BadRequest as exc:
        raise BadRequest(f"function {name!r} is strict, but {exc.message}", param="tools",
                         code="unsupported_schema_keyword") from None


# -- parsing ------------------------------------------------------------------------


def held_back(text: str) -> int:
    """How many characters at the end of `text` may be the start of a call marker."""
    for n in range(min(len(text), max(map(len, MARKERS)) - 1), 0, -1):
        tail = text[-n:]
        if any(m.startswith(tail) for m in MARKERS):
            return n
    return 0


def call_start(text: str, at_start: bool) -> int:
    """Where a call begins in `text` (-1 if nowhere). A JSON object or array counts
    only at the very start of the answer (Llama 3 and Mistral write no marker)."""
    found = [i for i in (text.find(m) for m in MARKERS) if i >= 0]
    if at_start and text.lstrip()[:1] in ("{", "["):
        found.append(len(text) - len(text.lstrip()))
    return min(found) if found else -1


def _call(obj: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False), id=new_call_id())


def _json_values(text: str) -> list[Any] | None:
    """The JSON values in `text`, one after another (separated by space or ';'); None if anything else is there."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse(text: str, names: set[str]) -> tuple[str, list[ToolCall]] | None:
    """The text before the calls, and the calls; None unless everything after
    the first marker is well-formed calls to known functions."""
    start = call_start(text, at_start=True)
    if start < 0:
        return None
    before, rest = text[:start].strip(), text[start:].strip()
    if rest.startswith(OPEN):
        bodies = HERMES.findall(rest)
        if HERMES.sub("", rest).strip():
            return None  # text after the calls: not a clean call answer
        values = [_json_values(b) for b in bodies]
        objs = [v for vs in values if vs is not None for v in vs]
        if any(v is None or len(v) != 1 for v in values):
            return None
    else:
        for marker in MARKERS[1:]:
            rest = rest.removeprefix(marker)
        found = _json_values(rest)
        if not found:
            return None
        objs = [o for v in found for o in (v if isinstance(v, list) else [v])]
    calls = [_call(o, names) for o in objs]
    if not calls or any(c is None for c in calls):
        return None
    return before, [c for c in calls if c is not None]
