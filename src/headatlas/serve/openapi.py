"""The viewer's JSON API as an OpenAPI 3.1 document (served at ``/openapi.json``).

Response schemas list every field an answer always holds as ``required`` and allow no others
(``tests/test_serve.py`` validates real answers against them).
"""

from __future__ import annotations

from typing import Any

from .. import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any], optional: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    """An object schema with exactly ``properties``, all required except ``optional``."""
    return {
        "type": "object",
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
        "properties": properties,
        **extra,
    }


_ERROR = _json(_ref("Error"), "error")
_INTEGER = {"type": "integer"}
_INDEX = {"type": "integer", "minimum": 0}
_STRING = {"type": "string"}
_BOOLEAN = {"type": "boolean"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_NULLABLE_STRING = {"type": ["string", "null"]}
_COLOR = {"type": "string", "pattern": "^#[0-9a-f]{6}$"}
_PER_HEAD = {
    "type": "array",
    "items": _NULLABLE_NUMBER,
    "description": "one value per head (null: not finite)",
}

_SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": {"type": "string", "description": "one line saying what went wrong"}}),
    "HeadRef": _object({"layer": _INDEX, "head": _INDEX}),
    "ModelInfo": _object(
        {
            "name": _STRING,
            "source": _STRING,
            "sha256": _NULLABLE_STRING,
            "arch": _STRING,
            "n_layers": _INTEGER,
            "n_heads": _INTEGER,
            "n_kv_heads": _INTEGER,
            "head_dim": _INTEGER,
            "causal": _BOOLEAN,
            "context_length": {"type": ["integer", "null"]},
            "sliding_window": {"type": ["integer", "null"]},
            "attn_kinds": {
                "type": "array",
                "items": {"enum": ["encoder", "decoder", "cross"]},
                "description": "encoder–decoder models only: the kind of each atlas layer",
            },
        },
        optional=("attn_kinds",),
        description="facts about the model (as recorded in an atlas)",
    ),
    "ScoreEntry": _object(
        {
            "name": _STRING,
            "label": _STRING,
            "description": _STRING,
            "signed": _BOOLEAN,
            "bounded": _BOOLEAN,
            "threshold": _NULLABLE_NUMBER,
            "role": _NULLABLE_STRING,
        }
    ),
    "RoleEntry": _object(
        {
            "role": _STRING,
            "score": _NULLABLE_STRING,
            "threshold": _NULLABLE_NUMBER,
            "meaning": _STRING,
            "color": _COLOR,
            "count": {"type": "integer", "minimum": 0},
        }
    ),
    "HeadTable": _object(
        {
            "layer": {"type": "array", "items": _INDEX},
            "head": {"type": "array", "items": _INDEX},
            "kv_head": {"type": "array", "items": _INDEX, "description": "empty when the atlas has none"},
            "roles": {"type": "array", "items": {"type": "array", "items": _STRING}},
            "scores": {"type": "object", "additionalProperties": _PER_HEAD},
            "std": {"type": "object", "additionalProperties": _PER_HEAD},
            "profile": {
                "type": "array",
                "items": {"type": "array", "items": _NULLABLE_NUMBER},
                "description": "attention by distance, one list per head",
            },
        },
        optional=("profile",),
        description="one entry per head, sorted by (layer, head); scores rounded to 4 digits",
    ),
    "RankedHead": _object(
        {
            "layer": _INDEX,
            "head": _INDEX,
            "kv_head": {"type": ["integer", "null"], "minimum": 0},
            "roles": {"type": "array", "items": _STRING},
            "scores": {"type": "object", "additionalProperties": _NULLABLE_NUMBER},
        }
    ),
    "AttentionMap": _object(
        {
            "layer": _INDEX,
            "head": _INDEX,
            "kv_head": _INDEX,
            "attention": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "number"}},
                "description": "format float: [query][key], rounded to 4 digits",
            },
            "data": {
                "type": "string",
                "contentEncoding": "base64",
                "pattern": "^[A-Za-z0-9+/]*={0,2}$",
                "description": "format uint8: base64 of round(A·255), row-major [query, key]",
            },
        },
        optional=("attention", "data"),
        oneOf=[{"required": ["attention"]}, {"required": ["data"]}],
    ),
}

_INFO = _object(
    {
        "version": _STRING,
        "model": {"oneOf": [_ref("ModelInfo"), {"type": "null"}]},
        "live": {"type": "boolean", "description": "a model is loaded"},
        "atlas": {"type": "boolean", "description": "an atlas is loaded"},
        "limits": _object({"max_tokens": _INTEGER, "max_chars": _INTEGER, "max_heads": _INTEGER}),
    }
)

_ATLAS = _object(
    {
        "model": _ref("ModelInfo"),
        "scores": {"type": "array", "items": _ref("ScoreEntry")},
        "roles": {"type": "array", "items": _ref("RoleEntry")},
        "no_role_color": _COLOR,
        "heads": _ref("HeadTable"),
    }
)

_ATTENTION_REQUEST = _object(
    {
        "text": {"type": "string", "minLength": 1},
        "heads": {"type": "array", "minItems": 1, "items": _ref("HeadRef")},
        "format": {
            "type": "string",
            "enum": ["float", "uint8"],
            "default": "float",
            "description": "float: attention as nested lists rounded to 4 digits; "
            "uint8: base64 of round(A·255), row-major [query, key]",
        },
    },
    optional=("format",),
)

_ATTENTION = _object(
    {
        "model": _STRING,
        "tokens": {"type": "array", "items": _STRING},
        "n_tokens": {"type": "integer", "minimum": 1},
        "causal": _BOOLEAN,
        "format": {"type": "string", "enum": ["float", "uint8"]},
        "maps": {"type": "array", "items": _ref("AttentionMap")},
    },
    oneOf=[
        {"properties": {"format": {"const": "float"}, "maps": {"items": {"required": ["attention"]}}}},
        {"properties": {"format": {"const": "uint8"}, "maps": {"items": {"required": ["data"]}}}},
    ],
)

_DOCUMENT = {
    "type": "object",
    "required": ["openapi", "info", "paths"],
    "properties": {
        "openapi": {"type": "string", "pattern": "^3\\.1\\."},
        "info": {"type": "object", "required": ["title", "version"]},
        "paths": {"type": "object"},
        "components": {"type": "object"},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "headatlas viewer API",
        "version": __version__,
        "description": (
            "Live attention of a loaded model and the head table of an atlas. Errors are JSON "
            "{error}. One model run at a time: a request that waits too long gets 429."
        ),
    },
    "paths": {
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json(_DOCUMENT)},
            }
        },
        "/api/info": {
            "get": {
                "summary": "Model facts, whether an atlas and a model are loaded, request limits",
                "responses": {"200": _json(_INFO)},
            }
        },
        "/api/atlas": {
            "get": {
                "summary": "The atlas head table, column-wise (as embedded in the report)",
                "responses": {"200": _json(_ATLAS), "404": _ERROR},
            }
        },
        "/api/heads": {
            "get": {
                "summary": "Heads ranked by a score and/or holding a role",
                "parameters": [
                    {
                        "name": "score",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "sort by it",
                    },
                    {
                        "name": "role",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "only heads holding it",
                    },
                    {
                        "name": "top",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 20},
                    },
                ],
                "responses": {
                    "200": _json(_object({"heads": {"type": "array", "items": _ref("RankedHead")}})),
                    "400": _ERROR,
                    "404": _ERROR,
                },
            }
        },
        "/api/attention": {
            "post": {
                "summary": "Attention of chosen heads on a text (one forward pass, cached per text)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ATTENTION_REQUEST}},
                },
                "responses": {
                    "200": _json(_ATTENTION),
                    "400": _ERROR,
                    "413": _ERROR,
                    "415": _ERROR,
                    "422": _ERROR,
                    "429": _ERROR,
                    "503": _ERROR,
                },
            }
        },
    },
    "components": {"schemas": _SCHEMAS},
}
"""OpenAPI 3.1 description of every JSON route (the viewer page ``/`` is HTML)."""
