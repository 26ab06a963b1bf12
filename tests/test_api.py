"""The public API is small and exported; the CLI starts fast and fails with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import headatlas
from conftest import requires_default_model

CLI = [sys.executable, "-m", "headatlas.cli"]


def test_all_imports_are_exported() -> None:
    for name in headatlas.__all__:
        assert getattr(headatlas, name) is not None, name
    assert set(headatlas.__all__) >= {
        "load",
        "scan",
        "Atlas",
        "ablate",
        "HeadatlasError",
        "patch",
        "head_outputs",
        "Guard",
    }
    assert callable(headatlas.load) and callable(headatlas.scan) and callable(headatlas.ablate)


def test_import_and_help_do_not_load_torch() -> None:
    code = "import sys, headatlas, headatlas.cli; print(json.dumps(['torch' in sys.modules, 'transformers' in sys.modules]))"
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [False, False]
    helped = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True)
    assert "scan" in helped.stdout and "show" in helped.stdout


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200", **(env or {})}
    )


def _one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in lines[0]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    _one_line_error(_cli("show", str(tmp_path / "nothing")), "no atlas")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "atlas.parquet").write_bytes(b"garbage")
    _one_line_error(_cli("show", str(tmp_path / "bad")), "not a readable atlas")
    _one_line_error(_cli("scan", "./missing-model", "--out", str(tmp_path / "o")), "no model at")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "atlas.parquet").write_bytes(b"x")
    _one_line_error(_cli("scan", "--out", str(tmp_path / "full")), "--force")


@pytest.mark.slow
@requires_default_model
def test_cli_scan_and_show_on_the_default_model(tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    scan = _cli("scan", "--out", str(out), "--n-prompts", "2", "--seq-len", "64", "--batch-size", "2")
    assert scan.returncode == 0, scan.stderr
    assert "270 heads" in scan.stdout
    too_long = _cli("scan", "--out", str(tmp_path / "x"), "--seq-len", "100000")
    _one_line_error(too_long, "beyond")
    shown = _cli("show", str(out), "--top", "5", "--by", "induction")
    assert shown.returncode == 0, shown.stderr
    assert "induct" in shown.stdout
    _one_line_error(_cli("show", str(out), "--by", "nonsense"), "no score")
