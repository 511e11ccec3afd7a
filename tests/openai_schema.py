"""Validate response bodies against OpenAI's published OpenAPI schemas."""

from __future__ import annotations

import functools
import gzip
import json
import pickle
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# Copies of ../shared/specs (MIT, licenses beside them), gzipped, so a clean clone tests alone.
SPECS = Path(__file__).resolve().parent / "specs"


@functools.cache
def spec(name: str) -> dict[str, Any]:
    """The parsed spec (cached on disk beside the file's mtime: it is 87k lines)."""
    path = SPECS / f"{name}.gz"
    cache = Path("/tmp") / f"hearth-spec3-{name}-{path.stat().st_mtime_ns}.pickle"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data = yaml.load(gzip.decompress(path.read_bytes()).decode(), Loader=loader)
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
