"""The progress callback every long job takes: ``progress(done, total)``."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each unit of work (batches, prompts, heads)."""


def no_progress(_done: int, _total: int) -> None:
    """A :data:`Progress` that reports nothing."""
