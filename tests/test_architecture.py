"""The folders are the architecture: one layer per folder, imports only downward, every application
a package that imports no other, no import circles, small files and functions, and a development
page that shows the same picture. Read from the source tree with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "headatlas"

LAYERS = (
    "core",
    "model",
    "data",
    "atlas",
    "capture",
    "detectors",
    "batteries",
    "functional",
    "scanning",
    "report",
    "serve",
    "apps",
    "cli",
)
"""The floors, lowest first: a module may import from its own folder or one to its left, never to its
right. ``atlas`` is the table type every later stage passes around (``scan`` builds one)."""
COMMON_APP = "common"
"""``apps/common``: code several applications share; it imports no application."""
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
"""Limits on size. A typer command's signature (its option block) does not count: only its body."""


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted, relative to headatlas ("" for the package root)
    target: str  # the imported module, dotted, relative to headatlas
    line: int
    type_only: bool  # inside ``if TYPE_CHECKING:``
    lazy: bool  # inside a function


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The modules ``node`` imports: ``from pkg import sub`` imports module ``pkg.sub``."""
    if node.level:
        package = module.split(".") if module else []
        if not is_package:
            package = package[:-1]
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    elif node.module and (node.module == "headatlas" or node.module.startswith("headatlas.")):
        target = node.module[len("headatlas") :].lstrip(".")
    else:
        return []
    subs = [
        f"{target}.{a.name}".lstrip(".") for a in node.names if f"{target}.{a.name}".lstrip(".") in MODULES
    ]
    return subs or [target]


def _imports() -> list[Import]:
    found: list[Import] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(module, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name[len("headatlas.") :] for a in node.names if a.name.startswith("headatlas.")]
            for target in targets:
                found.append(Import(module, target, node.lineno, *_context(node, parents)))
    return found


def _context(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> tuple[bool, bool]:
    """``(type_only, lazy)``: whether ``node`` sits under ``if TYPE_CHECKING:`` / in a function."""
    type_only = lazy = False
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only = True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy = True
    return type_only, lazy


IMPORTS = _imports()


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def _app(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "apps" and len(parts) > 1 else None


def test_the_top_level_is_the_layers() -> None:
    """``ls src/headatlas`` shows the floors and nothing else (the package root and its marker file)."""
    entries = {p.name for p in SRC.iterdir() if p.name != "__pycache__"}
    assert entries == {*LAYERS, "__init__.py", "py.typed"}
    for layer in LAYERS:
        assert (SRC / layer / "__init__.py").is_file(), layer


def test_every_app_is_a_package() -> None:
    apps = SRC / "apps"
    loose = sorted(p.name for p in apps.glob("*.py") if p.name != "__init__.py")
    assert loose == []
    for folder in apps.iterdir():
        if folder.is_dir() and folder.name != "__pycache__":
            assert (folder / "__init__.py").is_file(), folder.name


def test_modules_never_import_from_a_later_layer() -> None:
    bad = []
    for imp in IMPORTS:
        own, other = _layer(imp.module), _layer(imp.target)
        if imp.module == "" or other is None:  # the package root exports lazily from every floor
            continue
        assert own is not None, imp.module
        if other > own:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    assert bad == []


def test_no_app_imports_another_app() -> None:
    bad = []
    for imp in IMPORTS:
        own, other = _app(imp.module), _app(imp.target)
        if own is None or other is None or own == other:
            continue
        if other != COMMON_APP or own == COMMON_APP:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    for imp in IMPORTS:  # nothing below the apps imports one
        if _layer(imp.module) is not None and _layer(imp.module) < LAYERS.index("apps") and _app(imp.target):
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
    assert bad == []


def test_there_are_no_import_circles() -> None:
    """No two modules import each other, directly or through others, even from inside a function
    (imports for type checking aside). A package's ``__init__`` re-exporting its own submodules is
    not a circle of design, so edges from a package into its own subtree are left out."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.type_only or imp.target not in MODULES or imp.target == imp.module:
            continue
        if imp.module == "" or imp.target.startswith(imp.module + "."):
            continue
        graph[imp.module].add(imp.target)
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def _function_spans(tree: ast.AST) -> list[tuple[str, int]]:
    """``(name, body lines)`` of every function: from the first statement after the docstring."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]
            spans.append((node.name, (node.end_lineno or 0) - body[0].lineno + 1))
    return spans


def test_files_and_functions_stay_small() -> None:
    """No file over ~500 lines; no function body over ~80 lines (docstrings and a typer command's
    option block do not count)."""
    big_files = [
        f"{m} ({n} lines)"
        for m, p in MODULES.items()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    long_functions = [
        f"{module}.{name} ({n} lines)"
        for module, path in MODULES.items()
        for name, n in _function_spans(ast.parse(path.read_text()))
        if n > MAX_FUNCTION_LINES
    ]
    assert big_files == [] and long_functions == []


def test_the_development_page_shows_every_folder() -> None:
    """``docs/development.md`` draws the same tree: every layer, every app and every module."""
    page = (ROOT / "docs" / "development.md").read_text()
    tree = page[page.index("src/headatlas/") :]
    missing = [layer for layer in LAYERS if f"{layer}/" not in tree]
    apps = [p.name for p in (SRC / "apps").iterdir() if p.is_dir() and p.name != "__pycache__"]
    missing += [f"apps/{app}" for app in apps if not re.search(rf"\b{app}/", tree)]
    for module, path in MODULES.items():
        name = path.name if path.name != "__init__.py" else path.parent.name + "/"
        if module and not re.search(rf"(?<![\w.]){re.escape(name)}", tree):
            missing.append(module)
    assert missing == []


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_says_what_it_holds(layer: str) -> None:
    init = ast.parse((SRC / layer / "__init__.py").read_text())
    assert ast.get_docstring(init), f"{layer}/__init__.py has no docstring"
