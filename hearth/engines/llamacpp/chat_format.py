"""Render chat messages into a prompt with the model's own template.

A GGUF that carries `tokenizer.chat_template` is rendered with it (Jinja, in a
sandbox). A model without one gets the documented fallback for its
architecture (README, "Chat templates"):

| architecture            | fallback |
|-------------------------|----------|
| gemma, gemma2, gemma3   | Gemma turns: `<start_of_turn>user ... <end_of_turn>`, system text prepended to the first user turn |
| llama (3.x)             | Llama 3 headers: `<|start_header_id|>role<|end_header_id|>` ... `<|eot_id|>` |
| anything else           | ChatML: `<|im_start|>role ... <|im_end|>` |

Tools go to a template that knows them; for any other template (and the
fallbacks) they, earlier calls and their results are written into the
messages as text (`tool_calls.plain_messages`).
"""

from __future__ import annotations

from datetime import date
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hearth.core.errors import BadRequest
from hearth.core.types import Message
from hearth.engines.llamacpp import tool_calls


def _raise(message: str) -> None:
    raise BadRequest(f"the model's chat template rejected the messages: {message}", param="messages")


def gemma(messages: list[Message], bos: str) -> str:
    out = [bos]
    system = ""
    for m in messages:
        if m.role == "system":
            system += m.content + "\n\n"
            continue
        role = "model" if m.role == "assistant" else "user"
        content = m.content
        if role == "user" and system:
            content, system = system + content, ""
        out.append(f"<start_of_turn>{role}\n{content.strip()}<end_of_turn>\n")
    if system:
        out.append(f"<start_of_turn>user\n{system.strip()}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def llama3(messages: list[Message], bos: str) -> str:
    out = [bos]
    for m in messages:
        out.append(f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def chatml(messages: list[Message], bos: str) -> str:
    out = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def fallback_for(architecture: str) -> str:
    """Name of the fallback format used for an architecture without a template."""
    if architecture.startswith("gemma"):
        return "gemma"
    if architecture == "llama":
        return "llama3"
    return "chatml"


FALLBACKS = {"gemma": gemma, "llama3": llama3, "chatml": chatml}


class ChatFormatter:
    """Turns messages into a prompt for one model."""

    def __init__(self, template: str | None, architecture: str, bos: str, eos: str) -> None:
        self.source = template
        self.architecture = architecture
        self.bos = bos
        self.eos = eos
        self.fallback = fallback_for(architecture)
        self._compiled: Any = None
        if template:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
            self._compiled = env.from_string(template)

    @property
    def description(self) -> str:
        return "gguf" if self._compiled is not None else f"fallback:{self.fallback}"

    @property
    def knows_tools(self) -> bool:
        """True when the model's own template renders tools, calls and results."""
        return self._compiled is not None and "tools" in (self.source or "")

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text, ending where the assistant's answer begins."""
        native = self.knows_tools
        if not native and (tools or any(m.tool_calls or m.role == "tool" for m in messages)):
            messages = tool_calls.plain_messages(messages, tools or [])
        if self._compiled is None:
            return FALLBACKS[self.fallback](messages, self.bos)
        extra: dict[str, Any] = {"tools": tools} if native and tools else {}
        try:
            return self._compiled.render(
                messages=tool_calls.template_messages(messages),
                add_generation_prompt=True,
                bos_token=self.bos,
                eos_token=self.eos,
                **extra,
            )
        except TemplateError as exc:
            raise BadRequest(f"the model's chat template failed: {exc}", param="messages") from None
