"""The sweep: every family built tiny and checked, one row each, one family never breaking the rest.

:func:`run_family` builds the family (:mod:`.families`), runs every check (:mod:`.checks`, plus
the extra ones a caller passes: the CLI adds the KV cache) under a per-family time limit, and
returns a :class:`Row`. :func:`category` files a row under exactly one heading: exact on the fast
path, exact on the dense path, exact through eager ``output_attentions``, refused (a one-line
reason), unverified (no independent reference: eager returns maps for other layers), wrong (a number off its reference: a defect), error (a crash), cannot build tiny, or no
attention.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ...capture.session import supports_backend
from ...core.errors import HeadatlasError
from ...core.progress import Progress
from ...model.info import LoadedModel
from .checks import CHECKS, Check, Outcome, run_check
from .families import CannotBuild, Family, families, load_tiny

logger = logging.getLogger(__name__)

TIME_LIMIT = 120.0
"""Seconds one family may take (build and every check) before it is reported as a timeout (the
slowest families take ~25 s on an idle 2-core CPU, over 60 s when it is shared)."""

CATEGORIES = (
    "exact (fast path)",
    "exact (dense path)",
    "exact (eager fallback)",
    "refused",
    "unverified",
    "wrong",
    "error",
    "cannot build tiny",
    "no attention",
)
"""Where a family lands, in page order."""


@dataclass
class Row:
    """One family's result: its :class:`Family`, the outcome of each check by name, the build
    failure (``None`` when it built) and the seconds it took."""

    family: Family
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    build: str | None = None
    seconds: float = 0.0
    interface: bool | None = None
    """Whether the model runs through transformers' attention interface (can swap backends)."""


class _Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise an exception in the block after ``seconds`` (SIGALRM; no limit off the main thread)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum: int, _frame: object) -> None:
        raise _Timeout(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_all(loaded: LoadedModel, checks: dict[str, Check]) -> dict[str, Outcome]:
    """Return every check's :class:`Outcome` on ``loaded``, in the order of ``checks``."""
    return {name: run_check(check, loaded) for name, check in checks.items()}


def run_family(family: Family, checks: dict[str, Check] | None = None, limit: float = TIME_LIMIT) -> Row:
    """Build ``family`` tiny and run ``checks`` (default :data:`~.checks.CHECKS`) on it; return its :class:`Row`."""
    row = Row(family)
    started = time.perf_counter()
    torch.manual_seed(0)
    try:
        with time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                loaded = load_tiny(family)
            except CannotBuild as error:
                row.build = f"cannot build tiny: {error}"
            except HeadatlasError as error:
                text = " ".join(str(error).split())
                refused = "no attention layers" not in text
                row.build = f"{'refused' if refused else 'no attention'}: {text}"
                if refused:  # counted in the goal's denominator like the families that loaded
                    row.interface = _class_uses_interface(family)
            else:
                row.interface = supports_backend(loaded)
                row.outcomes = check_all(loaded, checks or CHECKS)
    except _Timeout as error:
        row.build = row.build or f"error: timeout {error}"
        for name in checks or CHECKS:
            row.outcomes.setdefault(name, Outcome("error", None, f"timeout {error}"))
    row.seconds = time.perf_counter() - started
    return row


def _class_uses_interface(family: Family) -> bool:
    """Whether ``family``'s model class runs through transformers' attention interface."""
    import transformers

    return bool(getattr(getattr(transformers, family.class_name, None), "_supports_attention_backend", False))


def sweep(
    chosen: list[Family] | None = None,
    checks: dict[str, Check] | None = None,
    progress: Progress | None = None,
    limit: float = TIME_LIMIT,
) -> list[Row]:
    """Run :func:`run_family` over ``chosen`` (default: every family of the three mappings); returns
    the rows in order. ``progress(done, total)`` is called after each family."""
    todo = families() if chosen is None else chosen
    rows = []
    for i, family in enumerate(todo):
        rows.append(run_family(family, checks, limit))
        logger.info("%s %s: %s (%.1f s)", family.kind, family.name, category(rows[-1]), rows[-1].seconds)
        if progress is not None:
            progress(i + 1, len(todo))
    return rows


def category(row: Row) -> str:
    """Return the one :data:`CATEGORIES` heading ``row`` lands under (from its capture outcome)."""
    if row.build is not None:
        if row.build.startswith(("no attention", "refused")):
            return row.build.split(":")[0]
        return "error" if row.build.startswith("error") else "cannot build tiny"
    capture = row.outcomes.get("capture")
    if capture is None:
        return "error"
    if capture.status == "ok":
        if capture.detail.startswith("eager"):
            return "exact (eager fallback)"
        return "exact (fast path)" if "fast" in capture.detail else "exact (dense path)"
    if capture.status in ("refused", "wrong"):
        return capture.status
    if capture.status == "n/a":
        return "unverified"
    if any(o.status == "wrong" for o in row.outcomes.values()):
        return "wrong"
    return "error"


def by_name(names: list[str], kinds: tuple[str, ...] | None = None) -> list[Family]:
    """Return the families named ``names`` (every mapping that holds one); raise
    :class:`HeadatlasError` for a name no mapping holds."""
    everything = families() if kinds is None else families(kinds)
    chosen = [f for f in everything if f.name in set(names)]
    missing = sorted(set(names) - {f.name for f in chosen})
    if missing:
        raise HeadatlasError(
            f"no family {missing[0]!r} in transformers' causal, masked or seq2seq mappings: "
            "give a model_type such as llama or gpt_neox"
        )
    return chosen


CheckFactory = Callable[[], dict[str, Check]]
