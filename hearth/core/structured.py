"""Structured output: which JSON-schema keywords can be enforced, and the final check.

Enforcement happens in an engine (a grammar while sampling); this module decides
up front whether a schema can be enforced at all (fail closed: a keyword the
grammar cannot express is a 400 naming it) and validates the finished text.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

import logging

from hearth.core.errors import BadRequest, HearthError
from hearth.core.types import ResponseFormat

log = logging.getLogger("hearth.structured")

# Keywords the GBNF converter enforces exactly.
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
    "minItems", "maxItems", "minLength", "maxLength", "pattern", "format",
}
# Keywords that do not constrain values.
ANNOTATIONS = {
    "title", "description", "examples", "default", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "strict", "nullable",
}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
SCHEMA_MAPS = ("properties", "$defs", "definitions")
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


def for_grammar(schema: Any) -> Any:
    """`schema` as the GBNF converter reads it right.

    A type list (`"type": ["string", "null"]`, how OpenAI's strict mode writes an
    optional field) makes the converter build a bare union of the types and drop
    every other keyword beside it (an `enum`, `properties`, `maxLength`); as an
    `anyOf` of one schema per type, each keeps them.
    """
    if isinstance(schema, list):
        return [for_grammar(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    # keywords it cannot enforce are left out (a strict request was refused them up front; without
    # strict they are best effort, checked on the finished text)
    kept = {k: v for k, v in schema.items() if (k in ENFORCED or k in ANNOTATIONS)
            and not (k == "format" and v not in FORMATS)}
    out = {k: _child(k, v) for k, v in kept.items()}
    types = out.get("type")
    if isinstance(types, list) and len(out) > 1 and not any(k in out for k in ("$ref", "anyOf", "oneOf", "allOf")) \
            and not _has_ref(out):  # the converter cannot follow a $ref (a recursive one) into the copies
        rest = {k: v for k, v in out.items() if k != "type" and k not in ANNOTATIONS}
        branches = [{**copy.deepcopy(rest), "type": t} if t != "null" else {"type": "null"} for t in types]
        # the other keys stay beside the anyOf (which the converter reads first), so `$ref` paths into
        # this node still resolve
        return {k: v for k, v in out.items() if k != "type"} | {"anyOf": branches}
    return out


def _child(key: str, value: Any) -> Any:
    """A keyword's value with the schemas inside it made fit for the grammar."""
    if key in SCHEMA_LISTS or key in ("items", "additionalProperties"):
        return for_grammar(value)
    if key in SCHEMA_MAPS and isinstance(value, dict):
        return {name: for_grammar(sub) for name, sub in value.items()}
    return value


def _has_ref(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "$ref" in schema or any(_has_ref(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_ref(v) for v in schema)
    return False


def check_enforceable(schema: Any, path: str = "$") -> None:
    """Raise BadRequest naming the first keyword a grammar cannot enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise BadRequest(f"response_format schema at {path} must be an object, got {type(schema).__name__}",
                         param="response_format")
    _refuse_combinations(schema, path)
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise BadRequest(
                f"JSON schema keyword {key!r} at {path} cannot be enforced by the grammar; "
                f"remove it or check the value yourself (supported: {', '.join(sorted(ENFORCED))})",
                param="response_format",
                code="unsupported_schema_keyword",
            )
        if key == "format" and value not in FORMATS:
            raise BadRequest(
                f"JSON schema format {value!r} at {path} cannot be enforced; supported formats: "
                f"{', '.join(sorted(FORMATS))}",
                param="response_format",
                code="unsupported_schema_keyword",
            )
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_enforceable(sub, f"{path}.{key}.{name}")
        elif key in SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                check_enforceable(sub, f"{path}.{key}[{i}]")
        elif key in ("items", "additionalProperties") and isinstance(value, (dict, bool)):
            check_enforceable(value, f"{path}.{key}")
    try:
        if path == "$":
            jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise BadRequest(f"response_format schema is not a valid JSON schema: {exc.message}",
                         param="response_format") from None


def _refuse_combinations(schema: dict[str, Any], path: str) -> None:
    """Keywords the converter takes one at a time: together, one of them would be lost unsaid."""
    combined = [k for k in ("allOf", "anyOf", "oneOf") if k in schema]
    if combined and "properties" in schema:
        raise BadRequest(f"JSON schema at {path} has 'properties' beside {combined[0]!r}, which the grammar "
                         f"cannot enforce together; move the properties into each {combined[0]!r} branch "
                         "(or merge the branches into one 'properties')", param="response_format",
                         code="unsupported_schema_keyword")
    n = len(schema["prefixItems"]) if isinstance(schema.get("prefixItems"), list) else 0
    if n and not (schema.get("minItems", 0) <= n <= schema.get("maxItems", n)):  # the grammar gives exactly n
        raise BadRequest(f"JSON schema at {path} has 'prefixItems' with 'minItems'/'maxItems', which the grammar "
                         "cannot enforce together; list every position in 'prefixItems' instead",
                         param="response_format", code="unsupported_schema_keyword")


def check_schema(schema: Any) -> None:
    """Raise BadRequest unless `schema` is a valid JSON schema (any keywords)."""
    if not isinstance(schema, (dict, bool)):
        raise BadRequest(f"response_format schema must be an object, got {type(schema).__name__}",
                         param="response_format")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise BadRequest(f"response_format schema is not a valid JSON schema: {exc.message}",
                         param="response_format") from None


def output_problem(text: str, fmt: ResponseFormat) -> str | None:
    """Why `text` does not satisfy `fmt` (None when it does)."""
    if fmt.type == "text":
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"the output is not valid JSON: {exc}"
    if fmt.type == "json" and not isinstance(value, dict):
        return "the output is JSON but not an object"
    if fmt.type == "json_schema" and fmt.schema is not None:
        try:
            jsonschema.validate(value, fmt.schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            return f"the output does not match the schema at {where}: {exc.message}"
    return None


class StructuredOutputError(HearthError):
    """The model's output did not satisfy the requested format."""

    status = 422
    type = "invalid_response_error"
    code = "structured_output_invalid"


def validate_output(text: str, fmt: ResponseFormat, finish_reason: str | None) -> None:
    """Raise if `text` is not JSON (matching the schema) when JSON was requested.

    A request that asked for `strict: false` gets invalid output as a success
    (with a warning in the log); the length check applies either way.
    """
    if fmt.type == "text":
        return
    if not fmt.strict and finish_reason != "length":
        problem = output_problem(text, fmt)
        if problem:
            log.warning("returning structured output that failed validation (strict: false): %s", problem)
        return
    if finish_reason == "length":
        raise StructuredOutputError(
            "finish_reason=length: generation hit the token limit before the JSON was complete; "
            "raise max_tokens (or num_predict) and retry",
            code="structured_output_incomplete",
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StructuredOutputError(f"the model's output is not valid JSON: {exc}") from None
    if fmt.type == "json" and not isinstance(value, dict):
        raise StructuredOutputError("the model's output is JSON but not an object")
    if fmt.type == "json_schema" and fmt.schema is not None:
        try:
            jsonschema.validate(value, fmt.schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise StructuredOutputError(
                f"the model's output does not match the schema at {where}: {exc.message}"
            ) from None
