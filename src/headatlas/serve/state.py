"""What the viewer app holds between requests: :class:`ViewerState`, set on ``app.state.viewer``
by :func:`~.app.create_app` and read by the handlers in :mod:`.routes`, and the request limits."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..atlas.table import Atlas
from ..model.info import LoadedModel

MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_CHARS = 20_000
DEFAULT_MAX_HEADS = 8
DEFAULT_BUSY_TIMEOUT = 30.0
FORMATS = ("float", "uint8")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Host names the viewer always answers."""


class ApiError(HTTPException):
    """An error answered as ``{"error": detail}`` with ``status_code``."""


@dataclass
class ViewerState:
    """What the app serves and its limits; ``lock`` serialises model runs.

    ``hosts`` are the ``Host`` names answered (lower case, no brackets); ``page`` is the viewer
    page and ``headers`` the security headers sent with it; ``cache_ids`` / ``cache`` hold the
    float16 attention of each layer already run on the last text's token ids.
    """

    atlas: Atlas | None = None
    loaded: LoadedModel | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_chars: int = DEFAULT_MAX_CHARS
    max_heads: int = DEFAULT_MAX_HEADS
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    hosts: frozenset[str] = frozenset(LOCAL_HOSTS)
    page: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cache_ids: tuple[int, ...] = ()
    cache: dict[int, np.ndarray] = field(default_factory=dict)

    def shape(self) -> tuple[int, int] | None:
        """Return ``(n_layers, n_heads)`` of the model, else of the atlas, else ``None``."""
        if self.loaded is not None:
            return self.loaded.info.n_layers, self.loaded.info.n_heads
        if self.atlas is not None:
            return self.atlas.shape
        return None

    def model_facts(self) -> dict[str, Any] | None:
        """Return the model's facts (``ModelInfo.to_dict``) from the model, else from the atlas,
        else ``None``."""
        if self.loaded is not None:
            return self.loaded.info.to_dict()
        if self.atlas is not None:
            return self.atlas.model.to_dict()
        return None

    def limits(self) -> dict[str, int]:
        """Return the per-request limits as ``{max_tokens, max_chars, max_heads}``."""
        return {"max_tokens": self.max_tokens, "max_chars": self.max_chars, "max_heads": self.max_heads}


def viewer_state(request: Request) -> ViewerState:
    """Return the :class:`ViewerState` of the app answering ``request`` (``app.state.viewer``)."""
    state: ViewerState = request.app.state.viewer
    return state
