"""Validate response bodies against OpenAI's published OpenAPI schemas."""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs"


@functools.cache
def spec(name: str) -> dict[str, Any]:
    """The parsed spec (cached on disk beside the YAML's mtime: it is 87k lines)."""
    path = SPECS / name
    cache = Path("/tmp") / f"hearth-spec2-{name}-{path.stat().st_mtime_ns}.pickle"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(path.read_text(), Loader=loader)
    data = denullable(json.loads(json.dumps(data, default=str)))
    cache.write_bytes(pickle.dumps(data))
    return data


def denullable(node: Any) -> Any:
    """OpenAPI 3.0 `nullable: true` -> JSON Schema `anyOf [..., null]` (the spec mixes both)."""
    if isinstance(node, list):
        return [denullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: denullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def validate(body: Any, schema_name: str, spec_name: str = "openai-openapi.yaml") -> None:
    """Raise jsonschema.ValidationError if `body` does not match the named component schema."""
    doc = spec(spec_name)
    resource = Resource.from_contents(doc, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:spec", resource)
    schema = {"$ref": f"urn:spec#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(body)
