"""Check the built wheel and sdist the way a user meets them: ``python tools/check_wheel.py DIST``.

1. Both archives hold every package-data file of ``src/headatlas`` (taken from the source tree, so a
   new data file is checked without editing this script) and the sdist holds the sources.
2. A fresh venv (``.venv-wheel``) gets torch first (the local CPU wheel), then the wheel alone, no
   dev extras: pinned by ``constraints.txt`` (what CI tests), or with ``--latest`` resolved the way
   ``pip install headatlas`` resolves today.
3. From a folder outside the checkout (so ``src/`` cannot be imported by accident), the installed
   package runs: ``import headatlas`` (without torch), ``headatlas data status``, a scan of a tiny
   saved model, ``report``, the word lists and speech data; a missing extra (Ray, bastioncorpus)
   is a one-line error naming ``headatlas[...]``.
4. Each extra (``ray``, ``docs``, ``guard-data``) resolves alone (``pip install --dry-run``).

Exits non-zero at the first failure, with what failed. Prints one line per step and the wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
EXTRAS = ("ray", "docs", "guard-data")

_TINY_MODEL = """
import sys
from tiny_models import BUILDERS, make_tokenizer
BUILDERS["llama"](0).save_pretrained(sys.argv[1])
make_tokenizer().save_pretrained(sys.argv[1])
"""
_IMPORT = """
import sys
import headatlas
assert "torch" not in sys.modules, "import headatlas imported torch"
assert "/site-packages/" in headatlas.__file__, headatlas.__file__
print(headatlas.__version__, headatlas.__file__)
"""
_PACKAGE_DATA = """
from importlib import resources
from headatlas.data.words import load_word_pairs
from headatlas.batteries.speech import _sentences
words = load_word_pairs()
assert len(words.words) > 50 and words.targets, words.targets
sentences = _sentences()
assert len(sentences) == 8 and all(audio.size > 1000 and len(spans) == len(words) for audio, spans, words in sentences)
schema = resources.files("headatlas") / "atlas" / "atlas.schema.json"
assert schema.is_file()
print(len(words.words), "word concepts,", len(sentences), "spoken sentences, schema present")
"""
_MISSING_EXTRAS = """
from headatlas.core.errors import HeadatlasError
from headatlas.apps.guard import bastion_rows
from headatlas.scanning.parallel import _import_ray
for call, extra in ((bastion_rows, "headatlas[guard-data]"), (_import_ray, "headatlas[ray]")):
    try:
        call()
    except HeadatlasError as exc:
        assert extra in str(exc) and "\\n" not in str(exc), str(exc)
        print("one line:", exc)
    else:
        raise SystemExit(f"{call.__name__} ran without its extra {extra}")
"""


def step(title: str, command: list[str], **kwargs: object) -> str:
    """Run ``command``; print ``title`` and the last line of its output; exit on failure."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        print(f"FAIL {title}: {' '.join(command)}\n{output[-3000:]}", file=sys.stderr)
        raise SystemExit(1)
    lines = [line for line in output.splitlines() if not line.startswith("WARNING:")]
    last = lines[-1] if lines else ""
    print(f"ok   {title} ({time.perf_counter() - started:.1f} s){': ' + last if last else ''}")
    return output


def check_archives(dist: Path) -> tuple[Path, Path]:
    """Return ``(wheel, sdist)`` in ``dist`` after checking that they hold the package data."""
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        raise SystemExit(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
    package = ROOT / "src" / "headatlas"
    data = [
        p.relative_to(package.parent).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    sources = [p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")]
    in_wheel = set(zipfile.ZipFile(wheels[0]).namelist())
    with tarfile.open(sdists[0]) as tar:
        prefix = tar.getnames()[0].split("/")[0]
        in_sdist = {name.removeprefix(prefix + "/") for name in tar.getnames()}
    missing = [f"wheel: {f}" for f in data if f not in in_wheel]
    missing += [f"sdist: src/{f}" for f in data if f"src/{f}" not in in_sdist]
    missing += [f"sdist: {f}" for f in [*sources, "pyproject.toml", "README.md"] if f not in in_sdist]
    if missing:
        raise SystemExit("missing from the archives:\n  " + "\n  ".join(missing))
    print(f"ok   archives: {wheels[0].name} and {sdists[0].name} hold {len(data)} data files")
    return wheels[0], sdists[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dist", type=Path, help="folder with the built wheel and sdist")
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-wheel")
    parser.add_argument("--latest", action="store_true", help="no constraints: newest allowed versions")
    args = parser.parse_args()
    started = time.perf_counter()
    wheel, _ = check_archives(args.dist)

    shutil.rmtree(args.venv, ignore_errors=True)
    step("fresh venv", [sys.executable, "-m", "venv", str(args.venv)])
    python = str(args.venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    constraints = [] if args.latest else ["-c", str(ROOT / "constraints.txt")]
    step("torch first", [*pip, TORCH])
    step("the wheel, no extras", pip + constraints + [str(wheel.resolve())])
    step(
        "versions",
        [python, "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"],
    )

    with tempfile.TemporaryDirectory(prefix="headatlas-wheel-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "HEADATLAS_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        cli = str(args.venv / "bin" / "headatlas")
        run = {"cwd": work, "env": env}
        step("import headatlas", [python, "-c", _IMPORT], **run)
        step("headatlas --help", [cli, "--help"], **run)
        step("headatlas data status", [cli, "data", "status"], **run)
        helpers = {**env, "PYTHONPATH": str(ROOT / "tests")}  # the test suite's tiny-model builders only
        step("a tiny saved model", [python, "-c", _TINY_MODEL, str(work / "tiny")], cwd=work, env=helpers)
        text = work / "text.txt"
        text.write_text(
            "\n".join(f"The cat number {i} sat on the mat and looked at the dog." for i in range(8))
        )
        scan = [cli, "scan", str(work / "tiny"), "--probes", "natural,repeat", "--text-file", str(text)]
        scan += ["--n-prompts", "4", "--seq-len", "32", "--batch-size", "4", "--out", str(work / "atlas")]
        step("headatlas scan (tiny model)", scan, **run)
        step("headatlas report", [cli, "report", str(work / "atlas")], **run)
        html = (work / "atlas" / "report.html").read_text()
        if "<style" not in html or "<script" not in html:
            raise SystemExit("report.html lacks its inlined assets (style, script)")
        step("package data", [python, "-c", _PACKAGE_DATA], **run)
        step("missing extras", [python, "-c", _MISSING_EXTRAS], **run)
        for extra in EXTRAS:
            requirement = f"headatlas[{extra}] @ {wheel.resolve().as_uri()}"
            step(f"extra [{extra}] resolves", [*pip, "--dry-run", *constraints, requirement], **run)
    print(f"wheel check passed in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
