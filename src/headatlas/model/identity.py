"""Which weights a model holds: sha256 of weight files (cached by path, size and mtime) and of
parameter values, and the record fitted artefacts (steering, guard) keep to refuse other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import HeadatlasError
from ..core.storage import cache_dir, write_json

if TYPE_CHECKING:
    from .info import LoadedModel

    pass

logger = logging.getLogger(__name__)


def parameters_sha256(model: Any) -> str:
    """Return the sha256 of ``model``'s parameters and buffers: names in order, values as float32
    bytes. Equal for the same weights however they were loaded (files, GGUF, built in memory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_record(loaded: LoadedModel) -> dict[str, str]:
    """Return what a fitted artefact (steering, guard) records of the weights it was fitted on:
    ``model_sha256`` (the files' sha256, or the parameters' for a model built in memory) and
    ``params_sha256`` (always the parameters'), for :func:`same_weights`."""
    params = parameters_sha256(loaded.model)
    return {"model_sha256": loaded.info.sha256 or params, "params_sha256": params}


def same_weights(recorded: dict[str, Any], loaded: LoadedModel) -> bool:
    """Return whether ``loaded`` holds the weights of a :func:`weights_record`: the same files, or
    the same parameter values (a model saved and reloaded, or loaded from files and from memory).
    Records without ``params_sha256`` (older files) match on ``model_sha256`` alone."""
    if loaded.info.sha256 and recorded.get("model_sha256") == loaded.info.sha256:
        return True
    params = parameters_sha256(loaded.model)
    return params in (recorded.get("params_sha256"), recorded.get("model_sha256"))


def file_sha256(paths: list[Path]) -> str:
    """Return the sha256 hex digest of the concatenated bytes of ``paths`` (sorted by name).

    Digests are cached in ``$HEADATLAS_CACHE/hashes.json`` keyed by path, size and mtime.
    """
    paths = sorted(paths)
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    store = cache_dir() / "hashes.json"
    try:
        known: dict[str, str] = json.loads(store.read_text()) if store.exists() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    known[key] = bytes_sha256(paths)
    try:
        write_json(store, known)
    except OSError:  # a read-only cache only costs a re-hash next time
        logger.debug("could not write %s", store)
    return known[key]


def weight_files(directory: Path) -> list[Path]:
    """Return the weight files (``.safetensors``, ``.bin``, ``.gguf``) directly in ``directory``."""
    files = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    return files


def bytes_sha256(paths: list[Path]) -> str:
    """Return the sha256 hex digest of the concatenated bytes of ``paths`` in the given order (never cached)."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def check_finite_weights(model: Any, name: str) -> None:
    """Raise :class:`HeadatlasError` naming the first parameter or buffer of ``model`` that holds a
    NaN or an infinite value (a damaged file of the right size loads without complaint otherwise)."""
    import torch

    with torch.no_grad():
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if (
                tensor.is_floating_point()
                and tensor.device.type != "meta"
                and not bool(torch.isfinite(tensor).all())
            ):
                raise HeadatlasError(
                    f"model {name!r} holds NaN or infinite values in {key}: its weights are damaged, "
                    "reinstall or re-download them"
                )
