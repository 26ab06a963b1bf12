"""Battery ``copy`` → score ``copying``: does a head raise (copy) or lower (suppress) the logits of
the tokens it attends to? Measured on real text.

Copying heads write the token they attend to back into the logits (the positive OV "copying"
eigenvalues of Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"); copy-
suppression heads attend to a token and push its logit *down* (McDougall et al. 2023, "Copy
Suppression: Comprehensively Understanding an Attention Head"). Both are read from the head's real
output on real text, not from the weights alone:

    copying(h, i) = Σ_{j ≥ 1} A_h[i, j] · z_h,i(x_j)

where ``z_h,i(t)`` is the z-score over the vocabulary of token ``t``'s direct-logit change from the
head's actual output at position ``i`` (:mod:`.logit_lens`), ``x_j`` the token at key ``j``, and the
first token (the attention sink, whose logit nobody predicts) is left out. So the score is the
attention-weighted z-score of the attended tokens: positive for copying, negative for suppression,
near 0 for heads whose output is unrelated to what they read, in units of vocabulary standard
deviations (a pure copying head of a real model scores several units). Rows are the real tokens at
position ≥ 1 of the ``natural`` text (UD English EWT train, packed into sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..atlas.stats import HeadStats
from ..batteries.base import make_batch, pad_id
from ..batteries.natural import natural_battery
from ..capture import DenseView, capture, head_outputs
from ..core.progress import Progress, no_progress
from ..data.ud import ewt_sentences
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult
from .logit_lens import centered_rows, logit_lens, logit_std, project_rows

DEFAULT_PROMPTS = 16
"""Sequences of EWT text scored by default."""
SEQ_LEN = 128
"""Tokens per sequence."""


def copy_scores(probs: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Return the signed copying score per row, ``[batch, head, query]``.

    Args:
        probs: attention ``[batch, head, query, key]``.
        rows: each key's centred unembedding row projected onto each head's output space
            (:func:`~.logit_lens.project_rows`), ``[batch, key, head, d_head]``; zero for keys that
            do not count (the first token, padding).
        z: the heads' outputs ``[batch, head, query, d_head]``.
        std: the std over the vocabulary of each output's logit change, ``[batch, head, query]``.

    ``Σ_j A[i, j] (W_U[x_j] − μ)·u_i / std_i`` — McDougall et al. 2023 / Elhage et al. 2021.
    """
    expected = torch.einsum("bhqk,bkhd->bhqd", probs, rows)  # [batch, head, query, d_head]
    return (expected * z).sum(-1) / std  # [batch, head, query]


@dataclass
class _CopyBatch:
    """Per-batch context of the copying callback: keys' read-out rows, valid query rows, and each
    layer's attention blocks as capture streams them (consumed by the head-output callback)."""

    rows: torch.Tensor  # [batch, key, d_model]
    valid: torch.Tensor  # [batch, query]
    probs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def run_copy(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Score every head's signed copying on EWT text; return a :class:`FunctionalResult` (``copying``)."""
    info = loaded.info
    lens = logit_lens(loaded)
    n_prompts = config.n_prompts or DEFAULT_PROMPTS
    seq_len = min(SEQ_LEN, info.context_length or SEQ_LEN)
    battery = natural_battery(
        loaded.tokenizer, ewt_sentences("train"), n_prompts, seq_len, config.seed, "UD English EWT train"
    )
    stats = HeadStats(info.n_layers, info.n_heads)
    device = loaded.device
    pad = pad_id(loaded.tokenizer)

    def score(layer: int, z: torch.Tensor, batch: _CopyBatch) -> None:
        if layer not in batch.probs:  # no attention seen for this layer (eager fallback)
            return
        probs = torch.cat(batch.probs.pop(layer), dim=2)  # [batch, head, query, key]
        zf = z.float()  # [batch, query, head, d_head]
        rows = project_rows(lens, layer, batch.rows)  # [batch, key, head, d_head]
        std = logit_std(lens, layer, zf).transpose(1, 2)  # [batch, head, query]
        scores = copy_scores(probs, rows, zf.transpose(1, 2), std)  # [batch, head, query]
        stats.add("copying", layer, scores, batch.valid)

    seqs = battery.sequences
    batches = [seqs[i : i + config.batch_size] for i in range(0, len(seqs), config.batch_size)]
    with head_outputs(loaded, score) as tap:

        def on_view(view: object) -> None:
            if isinstance(view, DenseView):
                tap.context.probs.setdefault(view.layer, []).append(view.probs)

        with capture(loaded, on_view, mode="dense") as session:
            for index, chunk in enumerate(batches):
                batch = make_batch(chunk, pad)
                positions = batch.positions.to(device)  # [batch, seq]
                rows = centered_rows(lens, batch.input_ids.to(device))  # [batch, key, d_model]
                tap.context = _CopyBatch(
                    rows=rows * (positions >= 1)[..., None],  # the first token and padding left out
                    valid=positions >= 1,  # [batch, query]
                )
                session.run(batch.input_ids, batch.attention_mask, with_head=False)
                progress(index + 1, len(batches))
    params = {
        "source": "UD English EWT train",
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "seed": config.seed,
        "unit": "vocabulary standard deviations (z-score of the attended tokens' logits)",
    }
    return FunctionalResult("copy", stats, params)


SPEC = BatterySpec(
    name="copy",
    run=run_copy,
)
