"""The live viewer: a small Starlette app over an atlas and/or a loaded model.

Endpoints (documented in :data:`OPENAPI`, served at ``/openapi.json``; handlers in :mod:`.routes`):

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

import html
from collections.abc import Collection

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.routing import Route

from .. import __version__
from ..atlas.table import Atlas, check_same_model
from ..core.errors import HeadatlasError
from ..model.info import LoadedModel
from ..report.html import asset, content_security_policy, fill, page_script
from . import routes
from .openapi import OPENAPI
from .state import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_HEADS,
    DEFAULT_MAX_TOKENS,
    FORMATS,
    LOCAL_HOSTS,
    MAX_BODY_BYTES,
    ApiError,
    ViewerState,
)

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_MAX_HEADS",
    "DEFAULT_MAX_TOKENS",
    "FORMATS",
    "LOCAL_HOSTS",
    "MAX_BODY_BYTES",
    "OPENAPI",
    "ApiError",
    "ViewerState",
    "create_app",
]


def _viewer_page(state: ViewerState) -> tuple[str, dict[str, str]]:
    """Return the viewer page titled with the model's name, and the security headers to send with it."""
    script = page_script("common.js", "viewer.js")
    title = str((state.model_facts() or {}).get("name") or "model")
    page = fill(
        asset("viewer.html"),
        {"TITLE": html.escape(title), "STYLE": asset("style.css"), "SCRIPT": script, "VERSION": __version__},
    )
    security = {
        "Content-Security-Policy": content_security_policy(script, connect_self=True),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return page, security


def create_app(
    atlas: Atlas | None = None,
    loaded: LoadedModel | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_heads: int = DEFAULT_MAX_HEADS,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    hosts: Collection[str] = (),
) -> Starlette:
    """Return the viewer app over ``atlas`` and/or ``loaded`` (either may be ``None``, not both).

    With both, they must be of the same model (:func:`~headatlas.atlas.table.check_same_model`). Requests
    are answered only when their ``Host`` is ``127.0.0.1``, ``localhost``, ``::1`` or one of
    ``hosts`` (the address the server binds), so a web page cannot reach the API by DNS rebinding.
    The app's :class:`~.state.ViewerState` is ``app.state.viewer``.
    """
    if atlas is None and loaded is None:
        raise HeadatlasError("the viewer needs an atlas, a model, or both")
    if atlas is not None and loaded is not None:
        check_same_model(atlas, loaded.info, "the served atlas")
    state = ViewerState(
        atlas=atlas,
        loaded=loaded,
        max_tokens=max_tokens,
        max_chars=max_chars,
        max_heads=max_heads,
        busy_timeout=busy_timeout,
        hosts=frozenset(h.strip("[]").lower() for h in (*LOCAL_HOSTS, *hosts)),
    )
    state.page, state.headers = _viewer_page(state)
    app = Starlette(
        routes=[
            Route("/", routes.index, methods=["GET"]),
            Route("/openapi.json", routes.openapi, methods=["GET"]),
            Route("/api/info", routes.info, methods=["GET"]),
            Route("/api/atlas", routes.atlas_table, methods=["GET"]),
            Route("/api/heads", routes.heads, methods=["GET"]),
            Route("/api/attention", routes.attention, methods=["POST"]),
        ],
        exception_handlers={HTTPException: routes.http_error, Exception: routes.server_error},
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=routes.check_host)],
    )
    app.state.viewer = state
    return app
