"""The public API does not change by accident: ``headatlas.__all__`` and every signature in it are
compared with a snapshot (``tests/fixtures/public_api.txt``; regenerate it on purpose with
``python tests/public_api.py --write``)."""

from __future__ import annotations

import difflib

from public_api import GOLDEN, public_api


def test_the_public_api_matches_its_snapshot() -> None:
    now, then = public_api(), GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(then.splitlines(True), now.splitlines(True), "snapshot", "now"))
    assert now == then, (
        f"the public API changed (regenerate on purpose: python tests/public_api.py --write):\n{diff}"
    )
