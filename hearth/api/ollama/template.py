"""The `template` of /api/generate: a small, honest subset of Go's text/template.

Ollama runs a request's `template` with Go's template engine over the
request's fields. hearth does not embed Go, so it renders the common case and
refuses the rest with a 400 instead of guessing:

- `{{ .System }}`, `{{ .Prompt }}`: replaced by the request's system and prompt;
- `{{ .Response }}`: ends the prompt there (the model writes the response);
- `{{ if .System }}...{{ else }}...{{ end }}` (also `.Prompt`): conditionals;
- `{{-` and `-}}` trim the whitespace next to the action, as in Go.

Anything else (`range .Messages`, `.Tools`, functions, pipelines) is a 400
naming the action, with the fix: omit `template` to use the model's own chat
template, or send a fully formatted prompt with `raw: true`.
"""

from __future__ import annotations

import re

from hearth.core.errors import BadRequest

ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)
FIELDS = (".System", ".Prompt", ".Response")
HELP = ("hearth renders only {{ .System }}, {{ .Prompt }}, {{ .Response }} and "
        "{{ if .System }}/{{ if .Prompt }} ... {{ else }} ... {{ end }}; omit `template` to use the "
        "model's own chat template, or send a formatted prompt with raw: true")


def _tokens(template: str) -> list[tuple[str, str]]:
    """Split into ("text", s) and ("action", s) tokens, applying trim markers."""
    out: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", " ".join(m.group(2).split())))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    out.append(("text", tail.lstrip() if trim_next else tail))
    return out


def _unsupported(action: str) -> BadRequest:
    return BadRequest(f"template action {{{{ {action} }}}} is not supported; {HELP}", param="template")


def render_template(template: str, *, system: str, prompt: str) -> str:
    """Render a Go-style prompt template over `system` and `prompt` (see module doc)."""
    values = {".System": system, ".Prompt": prompt}
    out: list[str] = []
    stack: list[tuple[bool, bool]] = []  # (enclosing block active, this branch's condition)
    active = True
    for kind, value in _tokens(template):
        if kind == "text":
            if active:
                out.append(value)
        elif value == ".Response":
            if active:
                return "".join(out)
        elif value in values:
            if active:
                out.append(values[value])
        elif value.startswith("if ") and value[3:] in FIELDS:
            cond = bool(values.get(value[3:], ""))
            stack.append((active, cond))
            active = active and cond
        elif value == "else" and stack:
            outer, cond = stack[-1]
            active = outer and not cond
        elif value == "end" and stack:
            active = stack.pop()[0]
        elif value.startswith("/*") and value.endswith("*/"):
            continue  # a comment
        else:
            raise _unsupported(value)
    if stack:
        raise BadRequest(f"template has {len(stack)} unclosed {{{{ if }}}}; add {{{{ end }}}}", param="template")
    return "".join(out)
