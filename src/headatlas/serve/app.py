"""The live viewer: a small Starlette app over an atlas and/or a loaded model.

Endpoints (documented in :data:`OPENAPI`, served at ``/openapi.json``):

- ``GET /`` the viewer page (one HTML document, code inlined, CSP allows only its own origin);
- ``GET /api/info`` model facts, whether an atlas is loaded, request limits;
- ``GET /api/atlas`` the head table (as in the report) — 404 without an atlas;
- ``GET /api/heads?score=&role=&top=`` heads ranked by a score and/or holding a role;
- ``POST /api/attention`` ``{"text", "heads": [{"layer", "head"}], "format": "float"|"uint8"}``.

Limits: request bodies up to :data:`MAX_BODY_BYTES`, texts up to ``max_chars`` characters and
``max_tokens`` tokens, at most ``max_heads`` heads per request, and one model run at a time (a
lock; a request that waits longer than ``busy_timeout`` seconds gets 429). Every error is a 4xx
(or 503 when no model is loaded) JSON ``{"error": "..."}``; unexpected failures are logged and
answered with a bare 500 JSON, never a traceback.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..atlas import Atlas, check_same_model
from ..errors import HeadatlasError
from ..heads import check_heads
from ..loading import LoadedModel
from ..report.data import NO_ROLE_COLOR, heads_payload, quantize, role_entries, score_entries
from ..report.html import asset, content_security_policy, fill, page_script
from ..roles import RULES
from ..sequences import token_strings
from .openapi import OPENAPI

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_CHARS = 20_000
DEFAULT_MAX_HEADS = 8
FORMATS = ("float", "uint8")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names the viewer always answers."""


def _host_name(header: str) -> str:
    """The host of a ``Host`` header without its port: ``[::1]:8765`` → ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class ApiError(HTTPException):
    """An error answered as ``{"error": detail}`` with ``status_code``."""


@dataclass
class ViewerState:
    """What the app serves and its limits; ``lock`` serialises model runs."""

    atlas: Atlas | None = None
    loaded: LoadedModel | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_chars: int = DEFAULT_MAX_CHARS
    max_heads: int = DEFAULT_MAX_HEADS
    busy_timeout: float = 30.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    cache_ids: tuple[int, ...] = ()
    cache: dict[int, np.ndarray] = field(default_factory=dict)

    def shape(self) -> tuple[int, int] | None:
        """``(n_layers, n_heads)`` of the model, else of the atlas, else ``None``."""
        if self.loaded is not None:
            return self.loaded.info.n_layers, self.loaded.info.n_heads
        if self.atlas is not None:
            return self.atlas.shape
        return None


def _model_facts(state: ViewerState) -> dict[str, Any] | None:
    if state.loaded is not None:
        return state.loaded.info.to_dict()
    if state.atlas is not None:
        return dict(state.atlas.meta.get("model", {}))
    return None


async def _read_json(request: Request) -> Any:
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


def create_app(
    atlas: Atlas | None = None,
    loaded: LoadedModel | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_heads: int = DEFAULT_MAX_HEADS,
    busy_timeout: float = 30.0,
    hosts: Collection[str] = (),
) -> Starlette:
    """Return the viewer app over ``atlas`` and/or ``loaded`` (either may be ``None``, not both).

    With both, they must be of the same model (:func:`~headatlas.atlas.check_same_model`). Requests
    are answered only when their ``Host`` is ``127.0.0.1``, ``localhost``, ``::1`` or one of
    ``hosts`` (the address the server binds), so a web page cannot reach the API by DNS rebinding.
    """
    if atlas is None and loaded is None:
        raise HeadatlasError("the viewer needs an atlas, a model, or both")
    if atlas is not None and loaded is not None:
        check_same_model(atlas, loaded.info, "the served atlas")
    allowed = {h.strip("[]").lower() for h in (*LOCAL_HOSTS, *hosts)}
    state = ViewerState(atlas, loaded, max_tokens, max_chars, max_heads, busy_timeout)
    script = page_script("common.js", "viewer.js")
    csp = content_security_policy(script, connect_self=True)
    title = str((_model_facts(state) or {}).get("name") or "model")
    page = fill(
        asset("viewer.html"),
        {"TITLE": html.escape(title), "STYLE": asset("style.css"), "SCRIPT": script, "VERSION": __version__},
    )
    security = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=security)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def info(request: Request) -> Response:
        return JSONResponse(
            {
                "version": __version__,
                "model": _model_facts(state),
                "live": state.loaded is not None,
                "atlas": state.atlas is not None,
                "limits": {"max_tokens": max_tokens, "max_chars": max_chars, "max_heads": max_heads},
            }
        )

    def need_atlas() -> Atlas:
        if state.atlas is None:
            raise ApiError(404, "no atlas loaded: start `headatlas serve DIR` with an atlas directory")
        return state.atlas

    async def atlas_table(request: Request) -> Response:
        current = need_atlas()
        shape = state.shape() or (0, 0)
        return JSONResponse(
            {
                "model": {**(_model_facts(state) or {}), "n_layers": shape[0], "n_heads": shape[1]},
                "scores": score_entries(current),
                "roles": role_entries(current),
                "no_role_color": NO_ROLE_COLOR,
                "heads": heads_payload(current),
            }
        )

    async def heads(request: Request) -> Response:
        current = need_atlas()
        params = request.query_params
        unknown = sorted(set(params) - {"score", "role", "top"})
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}: use score, role, top")
        score, role = params.get("score"), params.get("role")
        try:
            top = int(params.get("top", "20"))
        except ValueError:
            raise ApiError(400, "top must be an integer") from None
        if not 1 <= top <= 10_000:
            raise ApiError(400, "top must be in 1..10000")
        if score is not None and score not in current.scores:
            raise ApiError(400, f"no score {score!r}: choose from {', '.join(current.scores)}")
        if role is not None and role not in {r.role for r in RULES}:
            raise ApiError(400, f"unknown role {role!r}: choose from {', '.join(r.role for r in RULES)}")
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

    async def attention(request: Request) -> Response:
        text, wanted, fmt = _parse_attention(state, await _read_json(request))
        ids, maps = await run_in_threadpool(_compute, state, text, wanted)
        loaded = state.loaded
        if loaded is None:  # _compute answers 503 first; this keeps the type checker informed
            raise ApiError(503, "no model loaded")
        info_ = loaded.info
        out = []
        for layer, head in wanted:
            m = maps[layer][head].astype(np.float32)  # [query, key]
            item: dict[str, Any] = {"layer": layer, "head": head, "kv_head": info_.kv_head(head)}
            if fmt == "uint8":
                item["data"] = base64.b64encode(quantize(m).tobytes()).decode("ascii")
            else:
                item["attention"] = np.round(m.astype(np.float64), 4).tolist()
            out.append(item)
        return JSONResponse(
            {
                "model": info_.name,
                "tokens": token_strings(loaded.tokenizer, ids),
                "n_tokens": len(ids),
                "causal": info_.causal,
                "format": fmt,
                "maps": out,
            }
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = getattr(exc, "detail", "error")
        return JSONResponse({"error": str(detail)}, status_code=status)

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("viewer request %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": "internal error (see the server log)"}, status_code=500)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
        Route("/api/atlas", atlas_table, methods=["GET"]),
        Route("/api/heads", heads, methods=["GET"]),
        Route("/api/attention", attention, methods=["POST"]),
    ]

    async def check_host(request: Request, call_next: Any) -> Response:
        if _host_name(request.headers.get("host", "")) not in allowed:
            return JSONResponse(
                {"error": "unknown Host header: open the viewer at the address it printed"}, 400
            )
        return await call_next(request)  # type: ignore[no-any-return]

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=check_host)],
    )
    app.state.viewer = state
    return app
