"""The OpenAPI 3.1 document of the gateway's HTTP API.

``openapi.json`` (beside this module) describes every operation; the record schemas it refers
to (``Contact``, ``Event``) are not copied into it but filled in from the shipped JSON Schemas
(``gateway/schemas/*.schema.json``) when the document is loaded, so the two never drift. The
channels ``POST /v1/intake`` takes are the registered media, filled in the same way.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

import orjson

from gateway.adapters import load_media

SHIPPED: dict[str, str] = {"Contact": "contact.schema.json", "Event": "event.schema.json"}
"""Component name -> shipped JSON Schema file (``gateway/schemas/``)."""


def shipped_schema(name: str) -> dict[str, Any]:
    """The shipped JSON Schema of record ``name`` as it is embedded in the document: without
    ``$schema`` and ``$id``, its own ``#/$defs/`` references pointed at its component."""
    raw = files("gateway").joinpath("schemas", SHIPPED[name]).read_text(encoding="utf-8")
    schema = {k: v for k, v in orjson.loads(raw).items() if k not in ("$schema", "$id")}
    text = orjson.dumps(schema).decode()
    return dict(orjson.loads(text.replace('"#/$defs/', f'"#/components/schemas/{name}/$defs/')))


@functools.cache
def _document_bytes(media: tuple[str, ...]) -> bytes:
    doc = orjson.loads(files("gateway.cases.api").joinpath("openapi.json").read_bytes())
    schemas = doc["components"]["schemas"]
    channel = schemas["IntakeRequest"]["properties"]["channel"]
    del channel["pattern"]
    channel["enum"] = list(media)
    for name in SHIPPED:
        if name in schemas:
            raise ValueError(f"openapi.json must not carry its own copy of {name}")
        schemas[name] = shipped_schema(name)
    return orjson.dumps(doc)


def document() -> dict[str, Any]:
    """The whole document (a fresh copy)."""
    return dict(orjson.loads(document_bytes()))


def document_bytes() -> bytes:
    """The document as served at ``/v1/openapi.json``."""
    return _document_bytes(load_media().names())
