"""The live viewer (``headatlas serve``): a Starlette app (:mod:`.app`) and how to run it."""

from __future__ import annotations

import logging
from pathlib import Path

from ..atlas import Atlas
from ..datasets import default_model_gguf
from ..errors import HeadatlasError
from .app import create_app

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "atlas_model", "create_app", "run"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def atlas_model(atlas: Atlas) -> str | None:
    """Return what to pass to :func:`headatlas.load` for the model an atlas was scanned from.

    ``"default"`` for the packaged model, the recorded path when it still exists, the recorded
    hub id otherwise, ``None`` for an in-memory model.
    """
    source = atlas.meta.get("model", {}).get("source")
    if not source or source == "in-memory":
        return None
    try:
        if Path(source).resolve() == default_model_gguf().resolve():
            return "default"
    except HeadatlasError:
        pass
    return str(source)


def run(app: object, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")  # type: ignore[arg-type]
