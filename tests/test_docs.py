"""The documentation: every public object has a docstring, the site builds strictly, the README is
a landing page whose links resolve."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "headatlas"


def _missing_docstrings(root: Path) -> list[str]:
    missing = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(f"{path.relative_to(root)} (module)")
        for node in tree.body:
            kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            if isinstance(node, kinds) and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return missing


def test_every_public_module_function_and_class_has_a_docstring() -> None:
    assert _missing_docstrings(SOURCE) == []


def test_the_docstring_check_finds_a_missing_docstring(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text(
        '"""A module."""\n\ndef public():\n    return 1\n\ndef _private():\n    return 2\n'
    )
    assert _missing_docstrings(tmp_path) == ["mod.py:3 public"]


def test_readme_is_a_landing_page_whose_links_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.index("make demo") < text.index("## ")  # the two commands come first
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target


def test_every_docs_page_is_in_the_site_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    in_nav = set(re.findall(r":\s*([\w.-]+\.md)\s*$", config, flags=re.M))
    assert pages == in_nav


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count('class="doc doc-object') > 10
