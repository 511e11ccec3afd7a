"""Sampling settings sent to the worker, and how a request maps onto them.

Pure Python (no native calls), so the gateway can build them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hearth.core.errors import BadRequest
from hearth.core.structured import for_grammar
from hearth.core.types import GenerateRequest


@dataclass(slots=True)
class SamplerSpec:
    """Per-request sampling, as sent over the worker socket (llama.cpp defaults)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    grammar: str | None = None
    grammar_triggers: list[str] | None = None  # regexes: the grammar applies once one matches (lazy)
    logprobs: int = -1  # -1: off; N >= 0: the sampled token's log probability and the N likeliest


def grammar_for(req: GenerateRequest) -> str | None:
    """GBNF for the request's response_format (None for plain text)."""
    fmt = req.response_format
    if fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if fmt.type == "json" or fmt.schema is None:
        return JSON_GBNF  # root ::= object, as json_object promises
    try:
        return json_schema_to_gbnf(json.dumps(for_grammar(fmt.schema)))
    except (AssertionError, ValueError, KeyError, TypeError) as exc:
        raise BadRequest(
            f"response_format schema cannot be turned into a grammar: {exc}; simplify the schema",
            param="response_format", code="unsupported_schema_keyword",
        ) from None


def sampler_spec(req: GenerateRequest) -> SamplerSpec:
    """Core sampling -> worker SamplerSpec (None fields keep llama.cpp defaults)."""
    s = req.sampling
    spec = SamplerSpec(grammar=grammar_for(req), seed=s.seed, logit_bias=dict(s.logit_bias) or None,
                       logprobs=-1 if req.logprobs is None else req.logprobs)
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if value is not None:
            setattr(spec, name, value)
    return spec
