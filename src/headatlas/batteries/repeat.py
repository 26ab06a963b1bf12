"""Battery ``repeat``: random tokens repeated twice, TransformerLens' induction battery."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import HeadatlasError, param
from ..data.sequences import sequence_frame
from .base import AttentionBatterySpec, Battery, BatterySettings, ProbeSequence, check_fits_context

if TYPE_CHECKING:
    from ..model.info import LoadedModel

REPEAT_DETECTORS = ("repeat",)


def repeat_battery(tokenizer: Any, vocab_size: int, n_prompts: int, seq_len: int, seed: int) -> Battery:
    """Battery ``repeat``: ``x`` uniformly random tokens twice, ``[frame start, x, x, frame end]``.

    ``|x| = P`` is as long as ``seq_len`` allows inside the tokenizer's frame.
    """
    frame = sequence_frame(tokenizer)
    period = frame.room(seq_len) // 2
    if period < 2:
        raise HeadatlasError(
            f"{param('seq_len')} {seq_len} is too short for the repeat battery: use at least 8"
        )
    low, high = min(100, vocab_size // 10), min(20000, vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = np.array([t for t in range(low, high) if t not in special])
    rng = np.random.default_rng(seed + 1)
    sequences = []
    for _ in range(n_prompts):
        x = rng.choice(pool, size=period).tolist()
        sequences.append(ProbeSequence(tuple(frame.wrap(x + x)[0]), None))
    params = {
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "period": period,
        "seed": seed,
        "token_range": [low, high],
        **frame.describe(),
    }
    return Battery(
        "repeat",
        sequences,
        REPEAT_DETECTORS,
        params,
        period=period,
        repeat_start=len(frame.prefix),
    )


def build(loaded: LoadedModel, settings: BatterySettings) -> Battery:
    """The ``repeat`` battery a scan runs, over the model's whole vocabulary."""
    check_fits_context(loaded.info, settings.seq_len)
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
    return repeat_battery(loaded.tokenizer, vocab, settings.n_prompts, settings.seq_len, settings.seed)


SPEC = AttentionBatterySpec(
    "repeat", REPEAT_DETECTORS, build, "random tokens repeated twice: induction and duplicate-token heads"
)
