"""The viewer's JSON API as an OpenAPI 3.1 document (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from .. import __version__

_ERROR = {
    "description": "error",
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
        }
    },
}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_HEAD_REF = {"$ref": "#/components/schemas/HeadRef"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}

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
        "/api/info": {
            "get": {
                "summary": "Model facts, whether an atlas and a model are loaded, request limits",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "version": {"type": "string"},
                                "model": {"type": ["object", "null"]},
                                "live": {"type": "boolean", "description": "a model is loaded"},
                                "atlas": {"type": "boolean", "description": "an atlas is loaded"},
                                "limits": {
                                    "type": "object",
                                    "properties": {
                                        "max_tokens": {"type": "integer"},
                                        "max_chars": {"type": "integer"},
                                        "max_heads": {"type": "integer"},
                                    },
                                },
                            },
                        }
                    )
                },
            }
        },
        "/api/atlas": {
            "get": {
                "summary": "The atlas head table, column-wise (as embedded in the report)",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "model": {"type": "object"},
                                "scores": {"type": "array", "items": {"type": "object"}},
                                "roles": {"type": "array", "items": {"type": "object"}},
                                "heads": {
                                    "type": "object",
                                    "description": "layer, head, kv_head, roles: one entry per head; "
                                    "scores/std: {score: [value per head]}; profile: [[64 floats] per head]",
                                },
                            },
                        }
                    ),
                    "404": _ERROR,
                },
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
                        "schema": {"type": "integer", "minimum": 1, "default": 20},
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "heads": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "layer": {"type": "integer"},
                                            "head": {"type": "integer"},
                                            "kv_head": {"type": ["integer", "null"]},
                                            "roles": {"type": "array", "items": {"type": "string"}},
                                            "scores": {
                                                "type": "object",
                                                "additionalProperties": _NULLABLE_NUMBER,
                                            },
                                        },
                                    },
                                }
                            },
                        }
                    ),
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
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["text", "heads"],
                                "additionalProperties": False,
                                "properties": {
                                    "text": {"type": "string", "minLength": 1},
                                    "heads": {"type": "array", "minItems": 1, "items": _HEAD_REF},
                                    "format": {
                                        "type": "string",
                                        "enum": ["float", "uint8"],
                                        "default": "float",
                                        "description": "float: attention as nested lists rounded to 4 digits; "
                                        "uint8: base64 of round(A·255), row-major [query, key]",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "model": {"type": "string"},
                                "tokens": {"type": "array", "items": {"type": "string"}},
                                "n_tokens": {"type": "integer"},
                                "causal": {"type": "boolean"},
                                "format": {"type": "string"},
                                "maps": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "layer": {"type": "integer"},
                                            "head": {"type": "integer"},
                                            "kv_head": {"type": "integer"},
                                            "attention": {
                                                "type": "array",
                                                "items": {"type": "array", "items": {"type": "number"}},
                                            },
                                            "data": {"type": "string", "contentEncoding": "base64"},
                                        },
                                    },
                                },
                            },
                        }
                    ),
                    "400": _ERROR,
                    "413": _ERROR,
                    "422": _ERROR,
                    "429": _ERROR,
                    "503": _ERROR,
                },
            }
        },
    },
    "components": {
        "schemas": {
            "HeadRef": {
                "type": "object",
                "required": ["layer", "head"],
                "additionalProperties": False,
                "properties": {
                    "layer": {"type": "integer", "minimum": 0},
                    "head": {"type": "integer", "minimum": 0},
                },
            }
        }
    },
}
"""OpenAPI 3.1 description of every ``/api`` route."""
