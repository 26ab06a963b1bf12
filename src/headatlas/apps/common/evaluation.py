"""Held-out text, language-modelling loss, perplexity, head gates and timing for the apps.

The loss is next-token cross-entropy for decoders. For bidirectional encoders it is masked-LM
loss (15 % of non-special tokens replaced by the mask token, seeded) when the model has a
masked-LM head; a model without a language-modelling head gets a clear error. Held-out text
is UD English EWT ``dev`` (for choosing heads) and ``test`` (for measuring perplexity), packed
into fixed-length sequences by :func:`headatlas.batteries.natural.natural_battery`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ...batteries.base import Batch, ProbeSequence, make_batch, pad_id, read_text_file
from ...batteries.natural import natural_battery
from ...capture import head_outputs
from ...core.errors import HeadatlasError
from ...core.progress import Progress
from ...data.ud import ewt_sentences
from ...model.info import LoadedModel

logger = logging.getLogger(__name__)

MLM_FRACTION = 0.15


@dataclass(frozen=True)
class EvalData:
    """Batches of held-out text and where they came from (for the atlas metadata)."""

    batches: list[Batch]
    source: str
    n_seqs: int
    seq_len: int

    @property
    def n_tokens(self) -> int:
        """Real tokens over all batches."""
        return int(sum(int(b.attention_mask.sum()) for b in self.batches))

    def describe(self) -> dict[str, object]:
        """JSON-ready description."""
        return {
            "source": self.source,
            "n_seqs": self.n_seqs,
            "seq_len": self.seq_len,
            "tokens": self.n_tokens,
        }


def heldout_data(
    loaded: LoadedModel,
    data: str = "natural",
    split: str = "test",
    n_seqs: int = 16,
    seq_len: int = 256,
    batch_size: int = 4,
    seed: int = 0,
) -> EvalData:
    """Pack held-out text into ``n_seqs`` sequences of ``seq_len`` tokens, in batches.

    ``data`` is ``"natural"`` (UD English EWT ``split``) or a path to a UTF-8 text file.
    """
    if n_seqs < 1 or seq_len < 4 or batch_size < 1:
        raise HeadatlasError("need at least 1 sequence of at least 4 tokens and a batch size of at least 1")
    context = loaded.info.context_length
    if context is not None and seq_len > context:
        raise HeadatlasError(f"--seq-len {seq_len} is beyond the model's context of {context}: lower it")
    if data == "natural":
        corpus, source = ewt_sentences(split), f"UD English EWT {split}"
    else:
        if not Path(data).is_file():
            raise HeadatlasError(f"--data {data!r}: give 'natural' or an existing text file")
        corpus, source = read_text_file(data), str(data)
    battery = natural_battery(loaded.tokenizer, corpus, n_seqs, seq_len, seed, source)
    pad = pad_id(loaded.tokenizer)
    seqs = battery.sequences
    batches = [make_batch(seqs[i : i + batch_size], pad) for i in range(0, len(seqs), batch_size)]
    return EvalData(batches, source, n_seqs, seq_len)


def _has_lm_head(loaded: LoadedModel) -> bool:
    name = type(loaded.model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForConditionalGeneration"))


def check_lm(loaded: LoadedModel) -> None:
    """Raise :class:`HeadatlasError` unless the model has a language-modelling head."""
    if not _has_lm_head(loaded):
        kind = "masked-LM" if not loaded.info.causal else "causal-LM"
        raise HeadatlasError(
            f"{loaded.info.name} ({type(loaded.model).__name__}) has no {kind} head: importance, "
            "pruning and perplexity need a model that predicts tokens"
        )


def _mlm_inputs(loaded: LoadedModel, batch: Batch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(masked input_ids, targets)`` (``[batch, seq]``; target -100 where not masked)."""
    tok = loaded.tokenizer
    mask_id = tok.mask_token_id
    if not isinstance(mask_id, int):
        raise HeadatlasError(f"{loaded.info.name}'s tokenizer has no mask token: masked-LM loss needs one")
    ids = batch.input_ids  # [batch, seq]
    special = torch.tensor(tok.all_special_ids or [-1])
    candidates = batch.attention_mask.bool() & ~torch.isin(ids, special)  # [batch, seq]
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(ids.shape, generator=gen) < MLM_FRACTION) & candidates  # [batch, seq]
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), targets


def batch_loss(loaded: LoadedModel, batch: Batch, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Return ``(mean loss over predicted tokens, number of predicted tokens)`` for one batch.

    Runs with whatever grad mode the caller chose, so gates can receive gradients.
    """
    device = loaded.device
    mask = batch.attention_mask.to(device)  # [batch, seq]
    if loaded.info.causal:
        ids = batch.input_ids.to(device)  # [batch, seq]
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits  # [batch, seq, vocab]
        targets = ids[:, 1:].masked_fill(~(mask[:, 1:].bool() & mask[:, :-1].bool()), -100)  # [batch, seq-1]
        logits = logits[:, :-1]
    else:
        masked, targets = _mlm_inputs(loaded, batch, seed)
        logits = loaded.model(input_ids=masked.to(device), attention_mask=mask).logits
        targets = targets.to(device)
    n = int((targets != -100).sum())
    if n == 0:
        raise HeadatlasError("the held-out text gives no tokens to predict: use longer sequences")
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    )
    return loss, n


def perplexity(loaded: LoadedModel, data: EvalData, progress: Progress | None = None) -> float:
    """Return exp(mean token loss) over ``data`` (masked-LM pseudo-perplexity for encoders)."""
    check_lm(loaded)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(data.batches):
            loss, n = batch_loss(loaded, batch, seed=i)
            total += float(loss) * n
            count += n
            if progress:
                progress(i + 1, len(data.batches))
    return math.exp(total / count)


@contextmanager
def head_gates(loaded: LoadedModel) -> Iterator[torch.Tensor]:
    """Yield gates ``[layer, head]`` (ones, ``requires_grad``) multiplying each head's output.

    The gate ξ_h of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?"), put on the
    one head-output hook (:func:`headatlas.capture.head_outputs`; transformers v5 has no
    ``head_mask``), so it works with every attention backend. Hooks are removed on exit.
    """
    info = loaded.info
    gates = torch.ones(info.n_layers, info.n_heads, device=loaded.device, requires_grad=True)  # [layer, head]

    def gate(layer: int, z: torch.Tensor, _context: object) -> torch.Tensor:
        return z * gates[layer].to(z.dtype)[:, None]  # [batch, query, head, d_head]

    with head_outputs(loaded, gate):
        yield gates


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def forward_seconds(loaded: LoadedModel, batch: Batch, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of one no-grad forward pass over ``batch`` (after a warm-up)."""
    ids, mask = batch.input_ids.to(loaded.device), batch.attention_mask.to(loaded.device)
    best = math.inf
    with torch.no_grad():
        loaded.model(input_ids=ids, attention_mask=mask)
        for _ in range(repeats):
            start = time.perf_counter()
            loaded.model(input_ids=ids, attention_mask=mask)
            best = min(best, time.perf_counter() - start)
    return best


def next_token_logits(
    loaded: LoadedModel, seqs: Sequence[Sequence[int]], batch_size: int = 16
) -> torch.Tensor:
    """Return the next-token logits after each token sequence, ``[n, vocab]`` (float; left-padded
    batches with their real positions, only the last position through the LM head), under whatever
    hooks are active (ablation, steering). Needs a causal LM that takes ``logits_to_keep``."""
    from ...capture import padded_positions

    out = []
    pad = pad_id(loaded.tokenizer)
    for start in range(0, len(seqs), batch_size):
        batch = make_batch([ProbeSequence(tuple(s)) for s in seqs[start : start + batch_size]], pad)
        mask = batch.attention_mask.to(loaded.device)  # [batch, seq]
        with torch.no_grad():
            logits = loaded.model(
                input_ids=batch.input_ids.to(loaded.device),
                attention_mask=mask,
                **padded_positions(loaded.model, mask),
                logits_to_keep=1,
            ).logits
        out.append(logits[:, -1].float())  # [batch, vocab]
    return torch.cat(out)
