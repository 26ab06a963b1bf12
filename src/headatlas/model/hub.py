"""Hugging Face hub ids, resolved the way transformers users expect.

Online, ``from_pretrained`` fetches the id at ``revision`` (through the Hugging Face cache, as
transformers always does). Offline (``HF_HUB_OFFLINE``) or with the hub out of reach, the id is
taken from the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``: the layout
``models--Org--Name/snapshots/<commit>/`` that ``huggingface-cli download`` and any earlier
``from_pretrained`` wrote), and a missing one is a one-line error that says what to do.
"""

from __future__ import annotations

import difflib
import socket
from pathlib import Path

from ..core.errors import HeadatlasError
from .packaged import PACKAGED_MODELS

HUB_HOST = "huggingface.co"
HUB_TIMEOUT = 3.0
"""Seconds to wait for the hub before taking it as unreachable."""
_PACKAGED_NAMES = ", ".join(repr(name) for name in PACKAGED_MODELS)


def hub_unreachable() -> str | None:
    """Return why the hub cannot be used now (offline mode, or no answer from ``huggingface.co``
    within :data:`HUB_TIMEOUT` seconds), or ``None`` when it answers."""
    import huggingface_hub.constants as hub

    if hub.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE)"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=HUB_TIMEOUT).close()
    except OSError:
        return f"{HUB_HOST} cannot be reached"
    return None


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """Return the directory of ``repo_id`` at ``revision`` (a branch, tag or commit; ``None``:
    ``main``) in the local Hugging Face cache, or ``None`` when the cache does not hold it (or
    ``repo_id`` is not a valid hub id). Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    path = Path(str(found))
    return path if (path / "config.json").exists() else None


def hub_cache_dir() -> str:
    """Return the Hugging Face cache directory this process reads (``HF_HUB_CACHE``)."""
    import huggingface_hub.constants as hub

    return str(hub.HF_HUB_CACHE)


def locate_hub_id(spec: str, revision: str | None) -> Path | None:
    """Return where to load hub id ``spec`` from: ``None`` when the hub answers (``from_pretrained``
    fetches it, cache first), its snapshot directory in the local Hugging Face cache otherwise.

    Raises a one-line :class:`HeadatlasError` when the hub cannot be used and the cache lacks
    ``spec`` at ``revision``: it names the cache it looked in and how to fill it, and suggests a
    packaged name ``spec`` resembles.
    """
    reason = hub_unreachable()
    if reason is None:
        return None
    snapshot = cached_snapshot(spec, revision)
    if snapshot is not None:
        return snapshot
    close = difflib.get_close_matches(spec, list(PACKAGED_MODELS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    at = f" at revision {revision!r}" if revision else ""
    raise HeadatlasError(
        f"no model {spec!r}{at} here and {reason}: {hint}download it once where the hub answers "
        f"(`huggingface-cli download {spec}` fills the cache {hub_cache_dir()}), or give "
        f"{_PACKAGED_NAMES}, a local Hugging Face model dir or a .gguf file"
    )


def snapshot_commit(path: Path) -> str | None:
    """Return the commit hash of a snapshot directory of the Hugging Face cache
    (``…/models--Org--Name/snapshots/<commit>``), or ``None`` for any other directory."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None
