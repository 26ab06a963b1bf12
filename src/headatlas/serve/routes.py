"""The viewer's request handlers: each reads what it serves from ``request.app.state.viewer``
(a :class:`~.state.ViewerState`); :func:`~.app.create_app` routes them."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from .. import __version__
from ..atlas.table import Atlas
from ..core.errors import HeadatlasError
from ..core.heads import check_heads
from ..core.roles import RULES
from ..data.sequences import token_strings
from ..report.data import NO_ROLE_COLOR, heads_payload, quantize, role_entries, score_entries
from .openapi import OPENAPI
from .state import FORMATS, MAX_BODY_BYTES, ApiError, ViewerState, viewer_state

logger = logging.getLogger(__name__)

HEADS_PARAMS = ("score", "role", "top")
"""The query parameters of ``GET /api/heads``."""


def host_name(header: str) -> str:
    """Return the host of a ``Host`` header without its port: ``[::1]:8765`` → ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def check_host(request: Request, call_next: Any) -> Response:
    """Return the app's answer to ``request``, or a 400 when its ``Host`` is not one the app answers
    (so a web page cannot reach the API by DNS rebinding)."""
    if host_name(request.headers.get("host", "")) not in viewer_state(request).hosts:
        return JSONResponse({"error": "unknown Host header: open the viewer at the address it printed"}, 400)
    return await call_next(request)  # type: ignore[no-any-return]


async def http_error(request: Request, exc: Exception) -> Response:
    """Return an HTTP error (an :class:`~.state.ApiError`, a 404, a 405...) as ``{"error": detail}``."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    return JSONResponse({"error": str(detail)}, status_code=status)


async def server_error(request: Request, exc: Exception) -> Response:
    """Log an unexpected failure and return a bare 500 ``{"error": ...}``, never a traceback."""
    logger.exception("viewer request %s %s failed", request.method, request.url.path)
    return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)


async def index(request: Request) -> Response:
    """Return the viewer page with its security headers (the content security policy among them)."""
    state = viewer_state(request)
    return HTMLResponse(state.page, headers=state.headers)


async def openapi(request: Request) -> Response:
    """Return the OpenAPI document of the API (:data:`~.openapi.OPENAPI`)."""
    return JSONResponse(OPENAPI)


async def info(request: Request) -> Response:
    """Return the version, the model's facts, whether a model and an atlas are loaded, and the limits."""
    state = viewer_state(request)
    return JSONResponse(
        {
            "version": __version__,
            "model": state.model_facts(),
            "live": state.loaded is not None,
            "atlas": state.atlas is not None,
            "limits": state.limits(),
        }
    )


def _need_atlas(state: ViewerState) -> Atlas:
    if state.atlas is None:
        raise ApiError(404, "no atlas loaded: start `headatlas serve DIR` with an atlas directory")
    return state.atlas


async def atlas_table(request: Request) -> Response:
    """Return the atlas's head table as in the report (404 without an atlas)."""
    state = viewer_state(request)
    current = _need_atlas(state)
    shape = state.shape() or (0, 0)
    return JSONResponse(
        {
            "model": {**(state.model_facts() or {}), "n_layers": shape[0], "n_heads": shape[1]},
            "scores": score_entries(current),
            "roles": role_entries(current),
            "no_role_color": NO_ROLE_COLOR,
            "heads": heads_payload(current),
        }
    )


def _heads_query(atlas: Atlas, params: Any) -> tuple[str | None, str | None, int]:
    """Return ``(score, role, top)`` of ``GET /api/heads``'s query, checked against ``atlas``."""
    unknown = sorted(set(params) - set(HEADS_PARAMS))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}: use {', '.join(HEADS_PARAMS)}")
    score, role = params.get("score"), params.get("role")
    try:
        top = int(params.get("top", "20"))
    except ValueError:
        raise ApiError(400, "top must be an integer") from None
    if not 1 <= top <= 10_000:
        raise ApiError(400, "top must be in 1..10000")
    if score is not None and score not in atlas.scores:
        raise ApiError(400, f"no score {score!r}: choose from {', '.join(atlas.scores)}")
    if role is not None and role not in {r.role for r in RULES}:
        raise ApiError(400, f"unknown role {role!r}: choose from {', '.join(r.role for r in RULES)}")
    return score, role, top


async def heads(request: Request) -> Response:
    """Return the first ``top`` heads, ranked by ``score`` and/or holding ``role`` (404 without an atlas)."""
    current = _need_atlas(viewer_state(request))
    score, role, top = _heads_query(current, request.query_params)
    table = current.with_role(role) if role else current.table
    if score is not None:
        table = table.sort_values(score, ascending=False, na_position="last")
    names = current.scores
    rows = [
        {
            "layer": int(row["layer"]),
            "head": int(row["head"]),
            "kv_head": int(row["kv_head"]) if "kv_head" in row else None,
            "roles": [r for r in str(row.get("roles") or "").split(",") if r],
            "scores": {n: None if not np.isfinite(row[n]) else round(float(row[n]), 4) for n in names},
        }
        for _, row in table.head(top).iterrows()
    ]
    return JSONResponse({"heads": rows})


async def _read_json(request: Request) -> Any:
    """Return the request's JSON body: 415 unless sent as JSON, 413 over :data:`MAX_BODY_BYTES`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        # a cross-site form post cannot send application/json without a CORS preflight
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply") from None


def _parse_attention(state: ViewerState, payload: Any) -> tuple[str, list[tuple[int, int]], str]:
    """Return ``(text, heads, format)`` of a ``POST /api/attention`` body, checked against the limits."""
    if not isinstance(payload, dict):
        raise ApiError(422, "the body must be a JSON object with 'text' and 'heads'")
    unknown = sorted(set(payload) - {"text", "heads", "format"})
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}: use text, heads, format")
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, "text must be a non-empty string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "text is not valid Unicode (it holds a lone surrogate)") from None
    if len(text) > state.max_chars:
        raise ApiError(413, f"text is {len(text)} characters, over the limit of {state.max_chars}")
    fmt = payload.get("format", "float")
    if fmt not in FORMATS:
        raise ApiError(422, f"format must be one of {', '.join(FORMATS)}")
    heads = payload.get("heads")
    if not isinstance(heads, list) or not heads:
        raise ApiError(422, "heads must be a non-empty list of {layer, head} objects")
    if len(heads) > state.max_heads:
        raise ApiError(422, f"at most {state.max_heads} heads per request, got {len(heads)}")
    shape = state.shape()
    if shape is None:
        raise ApiError(503, "no model loaded")
    out = []
    for item in heads:
        if not isinstance(item, dict) or set(item) != {"layer", "head"}:
            raise ApiError(422, "each head must be an object {layer, head}")
        try:
            out.extend(check_heads([(item["layer"], item["head"])], *shape))
        except HeadatlasError as exc:
            raise ApiError(422, str(exc)) from None
    return text, out, fmt


def _compute(
    state: ViewerState, text: str, heads: list[tuple[int, int]]
) -> tuple[list[int], dict[int, np.ndarray]]:
    """Return the token ids of ``text`` and the float16 attention of each layer of ``heads``
    (one model run at a time, under ``state.lock``; layers already run on these ids are cached)."""
    loaded = state.loaded
    if loaded is None:
        raise ApiError(503, "no model loaded: start `headatlas serve` with a model to see live attention")
    from ..report.maps import TextTooLong, encode_text, layer_maps  # torch: only with a live model

    if not state.lock.acquire(timeout=state.busy_timeout):
        raise ApiError(429, "the model is busy with another request: try again")
    try:
        try:
            ids = encode_text(loaded, text, state.max_tokens)
        except TextTooLong as exc:
            raise ApiError(413, str(exc)) from None
        except HeadatlasError as exc:
            raise ApiError(422, str(exc)) from None
        if tuple(ids) != state.cache_ids:
            state.cache_ids, state.cache = tuple(ids), {}
        missing = {layer for layer, _ in heads} - set(state.cache)
        if missing:
            maps, _ = layer_maps(loaded, ids, missing)
            state.cache.update({layer: m.astype(np.float16) for layer, m in maps.items()})
        return ids, {layer: state.cache[layer] for layer, _ in heads}
    finally:
        state.lock.release()


async def attention(request: Request) -> Response:
    """Return the attention of the requested heads on the requested text, as floats or uint8 base64."""
    state = viewer_state(request)
    text, wanted, fmt = _parse_attention(state, await _read_json(request))
    ids, maps = await run_in_threadpool(_compute, state, text, wanted)
    loaded = state.loaded
    if loaded is None:  # _compute answers 503 first; this keeps the type checker informed
        raise ApiError(503, "no model loaded")
    model = loaded.info
    out = []
    for layer, head in wanted:
        m = maps[layer][head].astype(np.float32)  # [query, key]
        item: dict[str, Any] = {"layer": layer, "head": head, "kv_head": model.kv_head(head)}
        if fmt == "uint8":
            item["data"] = base64.b64encode(quantize(m).tobytes()).decode("ascii")
        else:
            item["attention"] = np.round(m.astype(np.float64), 4).tolist()
        out.append(item)
    return JSONResponse(
        {
            "model": model.name,
            "tokens": token_strings(loaded.tokenizer, ids),
            "n_tokens": len(ids),
            "causal": model.causal,
            "format": fmt,
            "maps": out,
        }
    )
