"""Head → head edges of a circuit by path patching (Wang et al. 2022; the edges MIB scores).

A head-level circuit (:mod:`.circuits`) says *which* heads carry a task; its edges say *how they are
wired*. For a set of heads (a circuit's top ``k``), each edge sender → receiver is measured by
path patching (:func:`.circuit.path_effects`): the sender's output takes its counterfactual value,
every other head stays clean, and only the change that reaches the receiver's query, key or value
is let through; the edge's effect is the share of the clean − counterfactual logit difference then
lost. Each head's path straight to the logits is the edge ``head → logits``.

Cost: a receiver and channel take two forward passes over ``pairs × senders`` rows (step 2 records,
step 3 replays), so ``k`` heads cost about ``3 · k`` such batches plus one for the logits — cheap
for a circuit's 10–20 heads. Every head pair of a model would be ``n · (n − 1) / 2 · 3`` edges
(≈ 109,000 for SmolLM2-135M's 270 heads), which is where gradient methods (edge-level EAP-IG)
take over. Under grouped-query attention a key or value edge patches the receiver's KV head, which
its whole group shares.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ...core.errors import HeadatlasError, check_choice
from ...core.heads import Head, check_heads, head_name
from ...core.progress import Progress
from ...core.storage import atomic_path
from ...model.info import LoadedModel
from ..common.patch_tasks import Encoded
from .circuit import CHANNELS, path_base, path_effects

LOGITS = "logits"
EDGE_COLUMNS = ("sender", "receiver", "channel", "effect", "effect_std", "n_pairs")


@dataclass
class Edges:
    """Edges among ``heads``: one row per (sender, receiver, channel), ``receiver == "logits"`` for
    the direct path; ``effect`` is the mean share of the logit difference lost, ``effect_std`` its
    spread over pairs."""

    heads: list[Head]
    table: pd.DataFrame
    seconds: float
    passes: int

    def strongest(self, n: int = 10) -> pd.DataFrame:
        """Return the ``n`` head → head edges (the logits excluded) with the largest ``|effect|``."""
        inner = self.table[self.table["receiver"] != LOGITS]
        return inner.reindex(inner["effect"].abs().sort_values(ascending=False).index).head(n)


def circuit_edges(
    loaded: LoadedModel,
    enc: Encoded,
    heads: Sequence[Head],
    channels: Sequence[str] = CHANNELS,
    rows_per_pass: int = 64,
    progress: Progress | None = None,
) -> Edges:
    """Return every edge among ``heads`` (sender in an earlier layer than its receiver) into each of
    ``channels``, plus each head's direct path to the logits, by path patching (Wang et al. 2022).

    Raises :class:`HeadatlasError` for fewer than two heads, a head outside the model or an
    unknown channel.
    """
    info = loaded.info
    chosen = sorted(dict.fromkeys(check_heads(list(heads), info.n_layers, info.n_heads)))
    if len(chosen) < 2:
        raise HeadatlasError(f"edges need at least two heads, got {len(chosen)}")
    for channel in channels:
        check_choice("channel", channel, CHANNELS)
    start = time.perf_counter()
    base = path_base(loaded, enc)
    jobs = [(r, c) for r in chosen for c in channels if any(s[0] < r[0] for s in chosen)]
    rows: list[tuple[str, str, str, float, float, int]] = []
    n_pairs = len(enc.clean)
    direct = path_effects(loaded, enc, chosen, rows_per_pass=rows_per_pass, base=base)  # [pair, head]
    for i, sender in enumerate(chosen):
        rows.append((head_name(*sender), LOGITS, "", direct[:, i].mean(), direct[:, i].std(), n_pairs))
    per = max(1, rows_per_pass // n_pairs)  # senders per pass, as path_effects batches them
    passes = 2 + -(-len(chosen) // per)
    measured: dict[tuple[int, int, str], np.ndarray] = {}  # a k / v edge patches the KV head its group shares
    for done, (receiver, channel) in enumerate(jobs):
        senders = [s for s in chosen if s[0] < receiver[0]]
        slot = receiver[1] if channel == "q" else info.kv_head(receiver[1])
        values = measured.get((receiver[0], slot, channel))
        if values is None:
            values = path_effects(loaded, enc, senders, [receiver], channel, rows_per_pass, base=base)
            measured[(receiver[0], slot, channel)] = values
            passes += 2 * -(-len(senders) // per)
        for i, sender in enumerate(senders):
            rows.append(
                (
                    head_name(*sender),
                    head_name(*receiver),
                    channel,
                    values[:, i].mean(),
                    values[:, i].std(),
                    n_pairs,
                )
            )
        if progress is not None:
            progress(done + 1, len(jobs))
    table = pd.DataFrame(rows, columns=list(EDGE_COLUMNS))
    table[["effect", "effect_std"]] = table[["effect", "effect_std"]].astype(float).round(6)
    return Edges(chosen, table, time.perf_counter() - start, passes)


def write_edges(edges: Edges, folder: str | Path) -> Path:
    """Write ``edges.csv`` (the columns of :data:`EDGE_COLUMNS`) into ``folder``; return its path."""
    path = Path(folder) / "edges.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".csv") as tmp:
        edges.table.to_csv(tmp, index=False)
    return path
