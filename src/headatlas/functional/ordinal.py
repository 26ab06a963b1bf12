"""Battery ``ordinal`` → scores ``successor`` and ``successor_logit``: successor heads.

Gould et al. 2023 ("Successor Heads: Recurring, Interpretable Attention Heads In The Wild") found
heads whose OV circuit maps an ordinal token (``Monday``, ``3``, ``March``, ``C``) to its
successor (``Tuesday``, ``4``, ``April``, ``D``). We measure that in context: on comma-separated
runs of consecutive items (``" Monday, Tuesday, Wednesday"``) we take, at every item token, the
head's own value vector there — what the head would write if it attended to that token — read it
out as direct logit changes (:mod:`.logit_lens`) and compare the items of the same sequence:

- ``successor``: 1 when the next item gets the largest logit change among all items of its set,
  else 0; mean over item tokens that have a successor. Chance is about 1/|set|.
- ``successor_logit``: the z-scored logit change (vocabulary standard deviations) of the next item
  minus that of the item itself: how much the head raises the successor over the token it reads.

Gould et al. read the OV circuit of an "effective embedding" (the token after the first MLP); the
value vector in context plays that role here. Items are kept only where ``" item"`` is one token
of the model's vocabulary; sets with fewer than 4 such items are skipped.

The task metric (``headatlas verify --score successor``) is next-item accuracy: at each comma
after at least two items, whether the model's top prediction is the next item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..atlas.stats import HeadStats
from ..batteries.base import ProbeSequence, make_batch, pad_id
from ..capture import capture, padded_positions
from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from ..data.sequences import sequence_frame
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult
from .logit_lens import centered_rows, logit_lens, logit_std, project_rows

ORDINAL_SETS: dict[str, tuple[str, ...] | list[str]] = {
    "number words": [
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ],
    "ordinals": [
        "first",
        "second",
        "third",
        "fourth",
        "fifth",
        "sixth",
        "seventh",
        "eighth",
        "ninth",
        "tenth",
    ],
    "digits": tuple(str(d) for d in range(1, 10)),
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
    "letters": tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
}
"""Ordered sets (ours): each item's successor is the next item; the last has none."""

DEFAULT_PROMPTS = 48
"""Prompts by default, spread evenly over the usable sets."""
RUN_LENGTH = (4, 7)
"""Items per prompt, drawn uniformly from this inclusive range."""
MIN_ITEMS = 4


@dataclass(frozen=True)
class OrdinalSet:
    """A usable set: its name, the items kept and their single-token ids (``" item"``)."""

    name: str
    items: tuple[str, ...]
    ids: tuple[int, ...]


@dataclass(frozen=True)
class OrdinalPrompt:
    """One prompt: token ids, the set it draws from and, per item, its token index and set index."""

    sequence: ProbeSequence
    set_index: int
    item_positions: tuple[int, ...]
    item_ranks: tuple[int, ...]


def usable_sets(tokenizer: Any) -> list[OrdinalSet]:
    """Return the ordinal sets whose items are single tokens (with a leading space) for ``tokenizer``.

    A set keeps its longest run of consecutive single-token items (successors must stay adjacent).
    Raises :class:`HeadatlasError` when none has at least 4 items, or when ``","`` is not one token.
    """
    if len(tokenizer.encode(",", add_special_tokens=False)) != 1:
        raise HeadatlasError("the tokenizer does not encode ',' as one token: the ordinal battery cannot run")
    out = []
    for name, items in ORDINAL_SETS.items():
        best: list[tuple[str, int]] = []
        run: list[tuple[str, int]] = []
        for item in items:
            ids = tokenizer.encode(" " + item, add_special_tokens=False)
            if len(ids) == 1:
                run.append((item, ids[0]))
                best = run if len(run) > len(best) else best
            else:
                run = []
        if len(best) >= MIN_ITEMS and len({i for _, i in best}) == len(best):
            out.append(OrdinalSet(name, tuple(w for w, _ in best), tuple(i for _, i in best)))
    if not out:
        raise HeadatlasError(
            "no ordinal set (numbers, days, months, letters) has 4 single-token items in this tokenizer: "
            "the ordinal battery cannot run on it"
        )
    return out


def ordinal_prompts(tokenizer: Any, sets: list[OrdinalSet], n_prompts: int, seed: int) -> list[OrdinalPrompt]:
    """Return ``n_prompts`` seeded prompts ``item_k , item_k+1 , …`` cycling over ``sets``, started
    as the tokenizer starts a text (:mod:`headatlas.data.sequences`; the model continues them, so no end)."""
    rng = np.random.default_rng(seed)
    comma = tokenizer.encode(",", add_special_tokens=False)[0]
    start_ids = list(sequence_frame(tokenizer).prefix)
    prompts = []
    for n in range(n_prompts):
        index = n % len(sets)
        chosen = sets[index]
        length = int(rng.integers(RUN_LENGTH[0], RUN_LENGTH[1] + 1))
        length = min(length, len(chosen.ids))
        start = int(rng.integers(0, len(chosen.ids) - length + 1))
        ids = list(start_ids)
        positions, ranks = [], []
        for rank in range(start, start + length):
            if rank > start:
                ids.append(comma)
            positions.append(len(ids))
            ranks.append(rank)
            ids.append(chosen.ids[rank])
        prompts.append(OrdinalPrompt(ProbeSequence(tuple(ids)), index, tuple(positions), tuple(ranks)))
    return prompts


def successor_scores(logits: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(hit, margin)`` per head and item, both ``[head, item]``.

    Args:
        logits: z-scored logit change of every item of the set, ``[head, item, set_item]``, at the
            OV output read from each item token.
        ranks: the set index of each item token, ``[item]``; each must have a successor
            (``rank + 1 < set_item``).

    ``hit`` is 1.0 where the successor has the largest logit change in the set; ``margin`` is the
    successor's z minus the item's own (Gould et al. 2023).
    """
    heads = logits.shape[0]
    idx = ranks.view(1, -1, 1).expand(heads, -1, 1)  # [head, item, 1]
    own = logits.gather(-1, idx).squeeze(-1)  # [head, item]
    nxt = logits.gather(-1, idx + 1).squeeze(-1)  # [head, item]
    hit = (logits.argmax(-1) == ranks.view(1, -1) + 1).float()  # [head, item]
    return hit, nxt - own


def _prompts(loaded: LoadedModel, config: FunctionalConfig) -> tuple[list[OrdinalSet], list[OrdinalPrompt]]:
    if not loaded.info.causal:
        raise HeadatlasError("the ordinal battery needs a decoder (causal) language model")
    sets = usable_sets(loaded.tokenizer)
    n_prompts = config.n_prompts or DEFAULT_PROMPTS
    if n_prompts < 1:
        raise HeadatlasError(f"the ordinal battery needs at least 1 prompt, got {n_prompts}")
    return sets, ordinal_prompts(loaded.tokenizer, sets, n_prompts, config.seed)


def _batches(prompts: list[OrdinalPrompt], size: int) -> list[list[OrdinalPrompt]]:
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


def run_ordinal(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Score every head as a successor head; return a :class:`FunctionalResult` (``successor``,
    ``successor_logit``). Gould et al. 2023 (see module docstring)."""
    info = loaded.info
    sets, prompts = _prompts(loaded, config)
    lens = logit_lens(loaded)
    device = loaded.device
    candidates = [torch.tensor(s.ids, device=device) for s in sets]
    stats = HeadStats(info.n_layers, info.n_heads)
    group = info.group_size
    pad = pad_id(loaded.tokenizer)

    def on_values(
        layer: int, _query: torch.Tensor, _key: torch.Tensor, value: torch.Tensor, chunk: Any
    ) -> None:
        values = value.repeat_interleave(group, dim=1).float()  # [batch, head, key, d_head]
        seq = values.shape[2]
        hits = torch.zeros(len(chunk), info.n_heads, seq, device=device)  # [batch, head, query]
        margins = torch.zeros_like(hits)  # [batch, head, query]
        valid = torch.zeros(len(chunk), seq, dtype=torch.bool, device=device)  # [batch, query]
        set_rows = {  # each set's items read out once per layer: [set_item, head, d_head]
            index: project_rows(lens, layer, centered_rows(lens, candidates[index]))
            for index in {p.set_index for p in chunk}
        }
        for b, prompt in enumerate(chunk):
            offset = seq - len(prompt.sequence.ids)  # left padding
            n_set = len(sets[prompt.set_index].ids)
            keep = [  # the first token the model sees is the sink, whatever item it is: not scored
                (p + offset, r)
                for p, r in zip(prompt.item_positions, prompt.item_ranks, strict=True)
                if r + 1 < n_set and p > 0
            ]
            if not keep:
                continue
            pos = torch.tensor([p for p, _ in keep], device=device)  # [item]
            ranks = torch.tensor([r for _, r in keep], device=device)  # [item]
            z = values[b][:, pos]  # [head, item, d_head]
            rows = set_rows[prompt.set_index]  # [set_item, head, d_head]
            raw = torch.einsum("hid,shd->his", z, rows)  # [head, item, set_item]
            std = logit_std(lens, layer, z.transpose(0, 1)).transpose(0, 1)  # [head, item]
            hit, margin = successor_scores(raw / std[..., None], ranks)  # [head, item]
            hits[b][:, pos] = hit
            margins[b][:, pos] = margin
            valid[b, pos] = True
        stats.add("successor", layer, hits, valid)
        stats.add("successor_logit", layer, margins, valid)

    batches = _batches(prompts, config.batch_size)
    with capture(loaded, lambda _view: None, mode="none") as session:
        session.on_qkv = on_values
        for index, chunk in enumerate(batches):
            batch = make_batch([p.sequence for p in chunk], pad)
            session.run(batch.input_ids, batch.attention_mask, with_head=False, context=chunk)
            progress(index + 1, len(batches))
    params = {
        "sets": {s.name: list(s.items) for s in sets},
        "n_prompts": len(prompts),
        "run_length": list(RUN_LENGTH),
        "seed": config.seed,
    }
    return FunctionalResult("ordinal", stats, params)


def next_item_accuracy(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> float:
    """Return the fraction of items (after the first two of a prompt) that the model predicts as its
    top next token at the preceding comma — the task successor heads serve (Gould et al. 2023)."""
    _sets, prompts = _prompts(loaded, config)
    pad = pad_id(loaded.tokenizer)
    device = loaded.device
    hits = total = 0
    batches = _batches(prompts, config.batch_size)
    with torch.no_grad():
        for index, chunk in enumerate(batches):
            batch = make_batch([p.sequence for p in chunk], pad)
            mask = batch.attention_mask.to(device)  # [batch, seq]
            logits = loaded.model(
                input_ids=batch.input_ids.to(device),
                attention_mask=mask,
                **padded_positions(loaded.model, mask),
            ).logits  # [batch, seq, vocab]
            seq = logits.shape[1]
            for b, prompt in enumerate(chunk):
                offset = seq - len(prompt.sequence.ids)
                ids = prompt.sequence.ids
                for k, pos in enumerate(prompt.item_positions):
                    if k < 2:
                        continue
                    hits += int(int(logits[b, offset + pos - 1].argmax()) == ids[pos])
                    total += 1
            progress(index + 1, len(batches))
    if total == 0:
        raise HeadatlasError("the ordinal prompts hold no item to predict: use more prompts")
    return hits / total


SPEC = BatterySpec(
    name="ordinal",
    run=run_ordinal,
    metric=next_item_accuracy,
    metric_name="next-item accuracy",
    higher_is_better=True,
)
