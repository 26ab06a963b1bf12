"""Packaged models converted once: a GGUF to fp32 safetensors, a CTranslate2 Whisper to a Hugging
Face checkpoint, each written atomically into ``$HEADATLAS_CACHE/models``.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import HeadatlasError
from ..core.storage import atomic_dir, cache_dir
from .identity import bytes_sha256, file_sha256, weight_files
from .packaged import PACKAGED_MODELS, PackagedModel, assemble_packaged_gguf, packaged_model_path
from .quiet import quiet_third_party

logger = logging.getLogger(__name__)
_SOURCE_FILE = "headatlas-source.json"
"""In a converted model's cache dir: where its GGUF came from and the GGUF's sha256."""


def gguf_size(path: Path) -> tuple[int, int]:
    """Return ``(bytes on disk, bytes the header promises)`` of GGUF file ``path``: the header and
    tensor table are read (as the ``gguf`` package reads them), the tensors' data is not.

    Raises :class:`HeadatlasError` for a file whose header cannot be read.
    """
    import gguf
    import numpy as np

    class _Header(gguf.GGUFReader):  # type: ignore[misc]
        promised = 0

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            for field in fields:
                _length, _name, _n_dims, dims, raw_dtype, offset = field.parts
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_dtype[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * size // block
                self.promised = max(self.promised, end)

    try:
        header = _Header(str(path))
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise HeadatlasError(f"{str(path)!r} is not a readable GGUF file ({str(exc)[:120]})") from None
    return path.stat().st_size, int(header.promised)


def check_gguf(path: Path) -> None:
    """Raise :class:`HeadatlasError` unless the GGUF file ``path`` holds every byte its header promises
    (a truncated download or copy says so, before any conversion)."""
    have, promised = gguf_size(path)
    if have < promised:
        raise HeadatlasError(
            f"{str(path)!r} is truncated ({have:,} of {promised:,} bytes): copy or download it again"
        )


def needs_conversion(spec: str) -> bool:
    """Whether loading packaged model ``spec`` will first convert its GGUF (once, tens of seconds)."""
    entry = PACKAGED_MODELS.get(spec)
    return bool(
        entry and entry.cache_name and not (cache_dir() / "models" / entry.cache_name / _SOURCE_FILE).exists()
    )


def _convert_gguf(gguf: Path, target: Path, sha256: str, origin: str) -> None:
    """Convert ``gguf`` to fp32 safetensors (model + tokenizer) in ``target``, atomically.

    ``target/headatlas-source.json`` records ``origin`` (where the GGUF came from) and its sha256.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    logger.info("converting %s to fp32 safetensors in %s (once)", gguf.name, target)
    with quiet_third_party():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp, quiet_third_party():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps({"gguf": origin, "sha256": sha256}, indent=1))


def _convert_ct2(source: Path, target: Path, sha256: str, origin: str) -> None:
    """Convert the CTranslate2 Whisper dir ``source`` to a Hugging Face checkpoint in ``target``,
    atomically (``target/headatlas-source.json`` records where it came from and its sha256)."""
    from .ct2 import convert_whisper

    logger.info("converting %s to a Hugging Face checkpoint in %s (once)", source, target)
    with atomic_dir(target) as tmp, quiet_third_party():
        convert_whisper(source, tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps({"ct2": origin, "sha256": sha256}, indent=1))


def packaged_dir(entry: PackagedModel) -> tuple[Path, str, str | None]:
    """Return (model dir, source, sha256) of a packaged model, converting its GGUF once if needed.

    The source is the GGUF file in the package, the model dir in the package, or, for a GGUF
    assembled from chunk packages (deleted after converting), the converted dir in the cache.
    Raises :class:`HeadatlasError` if the packages are missing or the conversion fails.
    """
    located = packaged_model_path(entry.name)
    if entry.cache_name is None:
        weights = weight_files(located)
        return located, str(located), file_sha256(weights) if weights else None
    target = cache_dir() / "models" / entry.cache_name
    marker = target / _SOURCE_FILE
    if not marker.exists():
        gguf_path = located
        try:
            if entry.converter == "ct2":
                _convert_ct2(located, target, file_sha256([located / "model.bin"]), str(located))
            elif not entry.assembled:
                _convert_gguf(located, target, file_sha256([located]), str(located))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=f".{entry.cache_name}-", dir=target.parent) as tmp:
                    gguf = gguf_path = assemble_packaged_gguf(entry.name, Path(tmp))
                    origin = f"{entry.packages[0]}:{entry.path}"
                    _convert_gguf(gguf, target, bytes_sha256([gguf]), origin)
        except (OSError, ValueError, ImportError, KeyError, struct.error, HeadatlasError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].replace(
                f"{str(gguf_path)!r} ", ""
            )
            raise HeadatlasError(
                f"could not convert the packaged {entry.name} model {entry.path}: {first[:200]}"
            ) from exc
    sha = json.loads(marker.read_text())["sha256"]
    return target, str(target if entry.assembled else located), sha
