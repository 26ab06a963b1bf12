"""What every functional battery shares: its spec, its configuration, its result.

A *functional* battery measures what job a head does (retrieval, successor, copying, translation,
syntax), not only where it looks. Unlike the attention batteries of :mod:`headatlas.batteries.base`,
which a scan streams through :mod:`headatlas.detectors.attention`, a functional battery may decode, read
head outputs or compare against gold data, so each one is a function
``run(loaded, config, progress) -> FunctionalResult`` registered in
:data:`headatlas.functional.FUNCTIONAL_BATTERIES`. Scores are still aggregated per row with
:class:`~headatlas.atlas.stats.HeadStats` (mean, std, count per head; mergeable), so they land in the
atlas exactly like the attention scores.

Each battery may also define a *task metric* (``metric(loaded, config, progress) -> float``) that
``headatlas verify`` re-runs with heads ablated, to confirm causally what the score claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..atlas.stats import HeadStats
from ..core.errors import check_at_least
from ..core.progress import Progress
from ..core.scores import SCORES, battery_scores

if TYPE_CHECKING:
    import pandas as pd

    from ..model.info import LoadedModel


@dataclass(frozen=True)
class FunctionalConfig:
    """Settings shared by the functional batteries (each documents how it reads them).

    Attributes:
        n_prompts: prompts (or trials, sentences) per battery; ``None`` = the battery's default.
        max_len: longest prompt in tokens (needle haystacks); ``None`` = the battery's default,
            capped by the model's context.
        seed: seed for every random choice, so a rerun sees the same prompts.
        batch_size: sequences per forward pass where the battery batches.
    """

    n_prompts: int | None = None
    max_len: int | None = None
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.n_prompts is not None:
            check_at_least("n_prompts", self.n_prompts, 1)
        if self.max_len is not None:
            check_at_least("max_len", self.max_len, 8)
        check_at_least("seed", self.seed, 0)
        check_at_least("batch_size", self.batch_size, 1)


@dataclass
class FunctionalResult:
    """What one functional battery produced.

    Attributes:
        battery: the battery's name.
        stats: per-head statistics of its scores (one :meth:`HeadStats.add` per row).
        params: the battery's parameters and facts of the run, for ``atlas.json``.
        tables: side tables written next to the atlas as ``DIR/<name>.parquet`` (e.g. the
            per-relation accuracies of ``syntax``).
    """

    battery: str
    stats: HeadStats
    params: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


RunFn = Callable[["LoadedModel", FunctionalConfig, Progress], FunctionalResult]
MetricFn = Callable[["LoadedModel", FunctionalConfig, Progress], float]


@dataclass(frozen=True)
class BatterySpec:
    """A functional battery: its name, how it runs and its task metric.

    The atlas columns it writes and the paper behind them are facts of its scores, read from
    :data:`headatlas.core.scores.SCORES` (:attr:`scores`, :attr:`paper`).

    Attributes:
        name: the name given to ``--probes`` (``needle``, ``ordinal``, ``copy``, ...).
        run: computes the scores.
        metric: the battery's task metric for ``headatlas verify`` (``None`` if it has none).
        metric_name: what the metric measures, e.g. ``"needle retrieval accuracy"``.
        higher_is_better: whether a larger metric means the model does the task better.
    """

    name: str
    run: RunFn
    metric: MetricFn | None = None
    metric_name: str = ""
    higher_is_better: bool = True

    @property
    def scores(self) -> tuple[str, ...]:
        """Atlas score columns it writes (each also gets ``_std`` and ``_n``), from the score specs."""
        return battery_scores(self.name)

    @property
    def paper(self) -> str:
        """The paper that defines the battery's main score."""
        return SCORES[self.scores[0]].paper
