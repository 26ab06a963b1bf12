"""The live viewer (``headatlas serve``): a Starlette app (:mod:`.app`) and how to run it."""

from __future__ import annotations

import logging
from pathlib import Path

from ..atlas.table import Atlas
from ..core.errors import HeadatlasError, param
from ..core.storage import TABLE_FILE
from ..model.load import reload_spec
from .app import create_app

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "atlas_model", "check_port", "create_app", "resolve_target", "run"]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
SHUTDOWN_SECONDS = 1
"""Longest wait for open connections when the viewer stops."""


def atlas_model(atlas: Atlas) -> str | None:
    """Return what to pass to :func:`headatlas.load` for the model an atlas was scanned from
    (:func:`headatlas.model.load.reload_spec` of its recorded facts), ``None`` for an in-memory model."""
    return reload_spec(atlas.model)


def resolve_target(target: str, model: str | None = None) -> tuple[Atlas | None, str | None]:
    """Return ``(atlas, model to load)`` for ``headatlas serve TARGET [--model M]``.

    ``target`` is an atlas dir (its model is :func:`atlas_model`, unless ``model`` names another)
    or a model spec. Raises :class:`HeadatlasError` for a directory that holds neither.
    """
    path = Path(target)
    if (path / TABLE_FILE).exists():
        atlas = Atlas.load(target)
        return atlas, model if model is not None else atlas_model(atlas)
    if path.is_dir() and not (path / "config.json").exists():
        raise HeadatlasError(f"{target!r} holds neither an atlas nor a model: give an atlas dir or a model")
    return None, model if model is not None else target


def check_port(host: str, port: int) -> None:
    """Raise :class:`HeadatlasError` unless ``host:port`` can be bound now (before saying it is served)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "is in use" if exc.errno in (98, 48) else f"cannot be bound ({exc.strerror})"
            raise HeadatlasError(
                f"port {port} on {host} {why}: try {param('port')} with another number"
            ) from None


def run(app: object, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``app`` with uvicorn until interrupted; Ctrl-C stops it within about a second (open
    keep-alive connections of a browser are not waited for longer than :data:`SHUTDOWN_SECONDS`)."""
    import uvicorn

    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        timeout_keep_alive=SHUTDOWN_SECONDS,
    )
