"""The public API does not change by accident: ``headatlas.__all__`` and every signature in it are
compared with a snapshot (``tests/fixtures/public_api.txt``; regenerate it on purpose with
``python tests/public_api.py --write``). The snapshot is taken in a fresh interpreter, so no
fixture's patch of a method shows in it."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

from public_api import GOLDEN


def test_the_public_api_matches_its_snapshot() -> None:
    script = Path(__file__).with_name("public_api.py")
    now = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
    then = GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(then.splitlines(True), now.splitlines(True), "snapshot", "now"))
    assert now == then, (
        f"the public API changed (regenerate on purpose: python tests/public_api.py --write):\n{diff}"
    )
