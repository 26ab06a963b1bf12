"""Battery ``syntax`` → score ``syntactic``: does a head attend along gold dependency arcs?

Clark, Khandelwal, Levy and Manning 2019, "What Does BERT Look At? An Analysis of BERT's
Attention" (clarkkev/attention-analysis), Section 4.1. Every head is read as a parser: for each
word of a UD English EWT sentence, the predicted related word is the argmax of the head's
word-level attention over the *other words* (itself, [CLS]/[SEP]/BOS and any sink token left out).
Per dependency relation (the UD relation without its subtype: ``nmod:poss`` → ``nmod``; ``root``
and ``punct`` skipped) and direction, the head's accuracy is compared with the best fixed-offset
baseline (always predict the word ``k`` places away, best ``k`` in −3..2, ``k ≠ 0``) on the same
examples.

Directions (one *example* per query word and relation):

- ``dep->head``: the query is the dependent; correct when the argmax is its gold head word.
- ``head->dep``: the query is the head word; correct when the argmax is one of its dependents with
  that relation (a verb with two ``obl`` dependents is one example, hit by either of them; Clark et
  al. score this direction on the transposed map instead).

Decoders attend backwards only, so for them an example exists only where the target precedes the
query (``det`` then counts as ``head->dep`` only) and the offset baseline uses ``k < 0``.

Word-level attention (Clark et al. 2019, Section 4.1): attention *to* a word is the sum over its
pieces, attention *from* a word the mean over its pieces.

``syntactic`` of a head is its best margin (accuracy − baseline accuracy) over the (relation,
direction) pairs with at least :data:`MIN_EXAMPLES` examples. In :class:`~headatlas.atlas.stats.HeadStats`
the arrays are set directly so that ``mean`` is that margin, ``n`` the example count of that pair
and ``std`` the std over its examples of ``hit − baseline_hit`` (each 0 or 1). Because the best pair
is chosen after the whole run, merging two runs' stats is exact only when they chose the same pair.
Every pair's numbers are in the side table ``syntax_relations``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from ..atlas.stats import HeadStats
from ..batteries.base import ProbeSequence, make_batch, pad_id
from ..capture import attention_maps
from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from ..data.sequences import sequence_frame
from ..data.ud import Sentence, read_conllu, ud_path
from ..detectors.words import word_attention
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult

DEFAULT_SENTENCES = 300
"""Sentences scored when ``config.n_prompts`` is ``None``."""
DEFAULT_SPLIT = "dev"
"""UD English EWT split read by default."""
MAX_WORDS = 64
"""Sentences with more words are skipped."""
MAX_TOKENS = 128
"""Sentences with more tokens (special tokens included) are skipped; ``config.max_len`` overrides."""
MIN_EXAMPLES = 50
"""A (relation, direction) pair needs this many examples to count for ``syntactic``."""
SKIPPED_RELATIONS = frozenset({"root", "punct"})
"""Relations never scored (as in Clark et al. 2019)."""
DEP_TO_HEAD = "dep->head"
HEAD_TO_DEP = "head->dep"
DIRECTIONS = (DEP_TO_HEAD, HEAD_TO_DEP)
"""Directions, in pair order: pair index = relation index · 2 + direction index."""
ENCODER_OFFSETS = (-3, -2, -1, 1, 2)
"""Baseline offsets for bidirectional models (Clark et al.: −3..2 without 0)."""
DECODER_OFFSETS = (-3, -2, -1)
"""Baseline offsets for causal models (only earlier words can be attended to)."""


@dataclass(frozen=True)
class Encoded:
    """One sentence as the model reads it: token ids and each token's word (−1: special or sink)."""

    sentence: Sentence
    ids: tuple[int, ...]
    word_ids: tuple[int, ...]


@dataclass(frozen=True)
class RelationExample:
    """One scored query: word ``query`` (0-based) is correct when its argmax is in ``targets``."""

    query: int
    targets: tuple[int, ...]
    relation: str
    direction: str


@dataclass(frozen=True)
class RelationScores:
    """Per (relation, direction) *pair* results of :func:`relation_scores`.

    Attributes:
        n: examples per pair, ``[pair]``.
        accuracy: head accuracy, ``[layer, head, pair]`` (NaN where ``n == 0``).
        baseline_accuracy: accuracy of the best offset, ``[pair]`` (NaN where ``n == 0``).
        baseline_offset: index (into the offsets) of the best offset, ``[pair]``.
        margin: ``accuracy − baseline_accuracy``, ``[layer, head, pair]``.
        diff_sq: ``Σ (hit − baseline_hit)²`` over the pair's examples, ``[layer, head, pair]``.
    """

    n: torch.Tensor
    accuracy: torch.Tensor
    baseline_accuracy: torch.Tensor
    baseline_offset: torch.Tensor
    margin: torch.Tensor
    diff_sq: torch.Tensor


def base_relation(deprel: str) -> str:
    """Return the UD relation without its subtype (``nmod:poss`` → ``nmod``)."""
    return deprel.split(":", 1)[0]


def predict_words(word_attn: torch.Tensor, word_valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """Return each word's predicted related word: argmax attention over the other valid words.

    Args:
        word_attn: ``[batch, head, word, word]`` from :func:`word_attention`.
        word_valid: ``[batch, word]`` True for words that have tokens.
        causal: only earlier words are candidates (decoders).

    Returns:
        ``[batch, head, word]`` word index (first maximum on ties), −1 where no candidate exists.
    """
    n = word_attn.shape[-1]
    idx = torch.arange(n, device=word_attn.device)  # [word]
    allowed = word_valid[:, None, :] & (idx[:, None] != idx[None, :])  # [batch, word, word]
    if causal:
        allowed = allowed & (idx[None, :] < idx[:, None])  # [batch, word, word]
    scores = word_attn.masked_fill(~allowed[:, None], float("-inf"))  # [batch, head, word, word]
    pred = scores.argmax(-1)  # [batch, head, word]
    return torch.where(allowed.any(-1)[:, None], pred, -1)  # [batch, head, word]


def example_hits(
    pred: torch.Tensor, ex_batch: torch.Tensor, ex_query: torch.Tensor, ex_targets: torch.Tensor
) -> torch.Tensor:
    """Return whether each head's prediction hits each example's targets, ``[head, example]`` bool.

    Args:
        pred: ``[batch, head, word]`` from :func:`predict_words`.
        ex_batch: ``[example]`` row of the example's sentence in the batch.
        ex_query: ``[example]`` query word.
        ex_targets: ``[example, word]`` True at the words counted correct.
    """
    chosen = pred[ex_batch, :, ex_query]  # [example, head]
    hit = ex_targets.gather(1, chosen.clamp(min=0)) & (chosen >= 0)  # [example, head]
    return hit.T  # [head, example]


def offset_hits(ex_query: torch.Tensor, ex_targets: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Return whether "the word at offset k" hits each example's targets, ``[offset, example]`` bool.

    The fixed-offset baseline of Clark et al. 2019; a guess outside the sentence is a miss.

    Args:
        ex_query: ``[example]`` query word.
        ex_targets: ``[example, word]`` True at the words counted correct (False past the sentence).
        offsets: the relative offsets ``k``.
    """
    n_words = ex_targets.shape[1]
    shift = torch.tensor(list(offsets), dtype=torch.long, device=ex_query.device)  # [offset]
    guess = ex_query[None, :] + shift[:, None]  # [offset, example]
    inside = (guess >= 0) & (guess < n_words)  # [offset, example]
    table = ex_targets.T[None].expand(len(offsets), -1, -1)  # [offset, word, example]
    hit = table.gather(1, guess.clamp(0, n_words - 1)[:, None, :])[:, 0]  # [offset, example]
    return hit & inside  # [offset, example]


def relation_scores(
    hits: torch.Tensor, baseline_hits: torch.Tensor, pair: torch.Tensor, n_pairs: int
) -> RelationScores:
    """Aggregate per-example hits into per-pair accuracies, best offset baselines and margins.

    Args:
        hits: ``[layer, head, example]`` bool from :func:`example_hits`.
        baseline_hits: ``[offset, example]`` bool from :func:`offset_hits`.
        pair: ``[example]`` (relation, direction) pair index in ``[0, n_pairs)``.
        n_pairs: number of pairs.

    Returns:
        A :class:`RelationScores` (the best offset is the first with the highest accuracy).
    """
    onehot = torch.nn.functional.one_hot(pair, n_pairs).to(torch.float64)  # [example, pair]
    n = onehot.sum(0)  # [pair]
    correct = hits.to(torch.float64) @ onehot  # [layer, head, pair]
    base_correct = baseline_hits.to(torch.float64) @ onehot  # [offset, pair]
    best_offset = base_correct.argmax(0)  # [pair]
    best_correct = base_correct.gather(0, best_offset[None])[0]  # [pair]
    denom = n.clamp(min=1.0)  # [pair]
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    accuracy = torch.where(n > 0, correct / denom, nan)  # [layer, head, pair]
    base_acc = torch.where(n > 0, best_correct / denom, nan)  # [pair]
    ex_base = baseline_hits[best_offset[pair], torch.arange(pair.shape[0])]  # [example]
    both = (hits & ex_base).to(torch.float64) @ onehot  # [layer, head, pair]
    diff_sq = correct + best_correct - 2.0 * both  # [layer, head, pair]
    return RelationScores(n, accuracy, base_acc, best_offset, accuracy - base_acc, diff_sq)


def best_pairs(margin: torch.Tensor, n: torch.Tensor, min_examples: int) -> torch.Tensor:
    """Return each head's best eligible pair (highest margin, ``n ≥ min_examples``), −1 if none.

    Args:
        margin: ``[layer, head, pair]``.
        n: ``[pair]`` examples per pair.
        min_examples: the least examples a pair needs.

    Returns:
        ``[layer, head]`` pair index (first maximum on ties).
    """
    eligible = (n >= min_examples) & (n > 0)  # [pair]
    masked = margin.masked_fill(~eligible, float("-inf"))  # [layer, head, pair]
    best = masked.argmax(-1)  # [layer, head]
    return torch.where(eligible.any(), best, -1)  # [layer, head]


def sentence_examples(
    sentence: Sentence, causal: bool, valid: Sequence[bool] | None = None
) -> list[RelationExample]:
    """Return the scored examples of one gold tree (see the module docstring for the directions).

    ``valid[w]`` False drops word ``w`` as a query and as a target (a word with no tokens).
    For ``causal`` models only targets before the query are kept.
    """
    n = len(sentence.words)
    ok = list(valid) if valid is not None else [True] * n
    out: list[RelationExample] = []
    dependents: dict[tuple[int, str], list[int]] = {}
    for dep, (head1, deprel) in enumerate(zip(sentence.heads, sentence.deprels, strict=True)):
        relation = base_relation(deprel)
        if relation in SKIPPED_RELATIONS or head1 < 1 or head1 > n:
            continue
        head = head1 - 1
        if not (ok[dep] and ok[head]) or head == dep:
            continue
        if not causal or head < dep:
            out.append(RelationExample(dep, (head,), relation, DEP_TO_HEAD))
        if not causal or dep < head:
            dependents.setdefault((head, relation), []).append(dep)
    for (head, relation), deps in sorted(dependents.items()):
        out.append(RelationExample(head, tuple(deps), relation, HEAD_TO_DEP))
    return out


def encode_sentence(tokenizer: Any, sentence: Sentence, causal: bool) -> Encoded:
    """Tokenise the words (joined by spaces), framed as the tokenizer frames a text, and align
    pieces to words.

    Each token belongs to the word of the first word character in its offset span (a span of only
    spaces goes to the next word); frame tokens (BOS, [CLS], [SEP]) belong to none
    (:mod:`headatlas.data.sequences`). When a causal model's first token is a word piece (the tokenizer
    adds no BOS), that token is the sink and belongs to no word either. Raises
    :class:`HeadatlasError` when the tokenizer cannot give offsets.
    """
    char_word: list[int] = []
    for w, text_of_word in enumerate(sentence.words):
        if w:
            char_word.append(-1)
        char_word.extend([w] * len(text_of_word))
    text = " ".join(sentence.words)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as exc:
        raise _slow_tokenizer_error(tokenizer) from exc
    body_words: list[int] = []
    for start, end in enc["offset_mapping"]:
        owner = next((c for c in char_word[start:] if c >= 0), -1) if end > start else -1
        body_words.append(owner)
    ids, words = sequence_frame(tokenizer).wrap([int(i) for i in enc["input_ids"]], body_words)
    words = list(words or [])
    if causal and words and words[0] >= 0:
        words[0] = -1
    return Encoded(sentence, tuple(ids), tuple(words))


def _slow_tokenizer_error(tokenizer: Any) -> HeadatlasError:
    return HeadatlasError(
        f"the syntax battery needs a fast tokenizer with offsets to align pieces to words, got "
        f"{type(tokenizer).__name__}: load the model with its tokenizer.json (use_fast=True)"
    )


def _valid_words(encoded: Encoded) -> list[bool]:
    present = set(encoded.word_ids)
    return [w in present for w in range(len(encoded.sentence.words))]


def choose_sentences(
    tokenizer: Any, pool: Sequence[Sentence], n: int, seed: int, causal: bool, max_tokens: int
) -> list[Encoded]:
    """Return up to ``n`` encoded sentences drawn from ``pool`` in a seeded order.

    Sentences with more than :data:`MAX_WORDS` words or ``max_tokens`` tokens, or without any
    scored example, are skipped.
    """
    order = np.random.default_rng(seed).permutation(len(pool))
    chosen: list[Encoded] = []
    for i in order:
        sentence = pool[int(i)]
        if not 1 < len(sentence.words) <= MAX_WORDS:
            continue
        encoded = encode_sentence(tokenizer, sentence, causal)
        if len(encoded.ids) > max_tokens or not sentence_examples(sentence, causal, _valid_words(encoded)):
            continue
        chosen.append(encoded)
        if len(chosen) >= n:
            break
    return chosen


def _read_split(split: str) -> list[Sentence]:
    try:
        return list(read_conllu(ud_path("en_ewt", split)))
    except HeadatlasError as exc:
        raise HeadatlasError(f"the syntax battery needs UD English EWT gold trees: {exc}") from exc


def _batch_examples(
    batch: Sequence[Encoded], causal: bool, pair_index: dict[tuple[str, str], int], n_words: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``ex_batch [example]``, ``ex_query [example]``, ``ex_targets [example, word]``, ``pair [example]``."""
    rows, queries, pairs = [], [], []
    targets: list[list[int]] = []
    for row, encoded in enumerate(batch):
        for ex in sentence_examples(encoded.sentence, causal, _valid_words(encoded)):
            rows.append(row)
            queries.append(ex.query)
            targets.append(list(ex.targets))
            pairs.append(pair_index[(ex.relation, ex.direction)])
    ex_targets = torch.zeros((len(rows), n_words), dtype=torch.bool)  # [example, word]
    for e, tgt in enumerate(targets):
        ex_targets[e, tgt] = True
    as_long = [torch.tensor(x, dtype=torch.long) for x in (rows, queries, pairs)]  # [example] each
    return as_long[0], as_long[1], ex_targets, as_long[2]


def relations_table(
    scores: RelationScores, pairs: Sequence[tuple[str, str]], offsets: Sequence[int]
) -> pd.DataFrame:
    """Return the side table: one row per (layer, head, relation, direction) with examples.

    Columns: layer, head, relation, direction, accuracy, n, baseline_accuracy, baseline_offset,
    margin.
    """
    n_layers, n_heads, n_pairs = scores.accuracy.shape
    layer, head, p = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(n_pairs), indexing="ij")
    keep = (scores.n.numpy() > 0)[p.ravel()]
    p = p.ravel()[keep]
    names: list[tuple[str, str]] = [pairs[int(i)] for i in p]
    frame = {
        "layer": layer.ravel()[keep],
        "head": head.ravel()[keep],
        "relation": [r for r, _ in names],
        "direction": [d for _, d in names],
        "accuracy": scores.accuracy.numpy().ravel()[keep],
        "n": scores.n.numpy()[p].astype(np.int64),
        "baseline_accuracy": scores.baseline_accuracy.numpy()[p],
        "baseline_offset": np.asarray(offsets, dtype=np.int64)[scores.baseline_offset.numpy()[p]],
        "margin": scores.margin.numpy().ravel()[keep],
    }
    return pd.DataFrame(frame)


def syntactic_stats(scores: RelationScores, best: torch.Tensor) -> HeadStats:
    """Return :class:`HeadStats` whose ``syntactic`` mean/std/n describe each head's best pair.

    ``best [layer, head]`` from :func:`best_pairs`; heads without an eligible pair get ``n = 0``
    (mean NaN).
    """
    n_layers, n_heads, _ = scores.accuracy.shape
    stats = HeadStats(n_layers, n_heads)
    has = best >= 0  # [layer, head]
    idx = best.clamp(min=0)[..., None]  # [layer, head, 1]
    n = torch.where(has, scores.n[best.clamp(min=0)], 0.0)  # [layer, head]
    margin = scores.margin.gather(2, idx)[..., 0]  # [layer, head]
    diff_sq = scores.diff_sq.gather(2, idx)[..., 0]  # [layer, head]
    stats.total["syntactic"] = torch.where(has, margin * n, 0.0).numpy()
    stats.total_sq["syntactic"] = torch.where(has, diff_sq, 0.0).numpy()
    stats.count["syntactic"] = n.numpy()
    return stats


def run_syntax(
    loaded: LoadedModel,
    config: FunctionalConfig,
    progress: Progress = no_progress,
    *,
    sentences: Sequence[Sentence] | None = None,
    split: str = DEFAULT_SPLIT,
    min_examples: int = MIN_EXAMPLES,
) -> FunctionalResult:
    """Score every head as a dependency parser (Clark et al. 2019); return ``syntactic`` + side table.

    Reads ``config.n_prompts`` sentences (default :data:`DEFAULT_SENTENCES`, seeded by
    ``config.seed``) of UD English EWT ``split``, or of ``sentences`` when given, and runs them
    ``config.batch_size`` at a time (left-padded by :func:`~headatlas.batteries.base.make_batch`), holding one batch's
    attention maps at a time. ``config.max_len`` caps tokens per sentence (default
    :data:`MAX_TOKENS`, and the model's context). A (relation, direction) pair counts for
    ``syntactic`` from ``min_examples`` examples on.
    """
    tokenizer = loaded.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise _slow_tokenizer_error(tokenizer)
    info = loaded.info
    causal = info.causal
    offsets = DECODER_OFFSETS if causal else ENCODER_OFFSETS
    max_tokens = min(config.max_len or MAX_TOKENS, info.context_length or MAX_TOKENS)
    pool = list(sentences) if sentences is not None else _read_split(split)
    wanted = config.n_prompts or DEFAULT_SENTENCES
    chosen = choose_sentences(tokenizer, pool, wanted, config.seed, causal, max_tokens)
    if not chosen:
        raise HeadatlasError(
            f"no sentence of at most {MAX_WORDS} words and {max_tokens} tokens has a scorable "
            "dependency: give longer sentences or a larger max_len"
        )
    chosen.sort(key=lambda e: len(e.ids))
    relations = sorted(
        {ex.relation for e in chosen for ex in sentence_examples(e.sentence, causal, _valid_words(e))}
    )
    pairs = [(r, d) for r in relations for d in DIRECTIONS]
    pair_index = {p: i for i, p in enumerate(pairs)}
    pad = pad_id(tokenizer)
    size = max(1, config.batch_size)
    n_batches = math.ceil(len(chosen) / size)
    hit_parts: list[torch.Tensor] = []
    base_parts: list[torch.Tensor] = []
    pair_parts: list[torch.Tensor] = []
    for b in range(n_batches):
        part = chosen[b * size : (b + 1) * size]
        n_words = max(len(e.sentence.words) for e in part)
        batch = make_batch([ProbeSequence(e.ids, e.word_ids) for e in part], pad)
        word_ids = cast(torch.Tensor, batch.word_ids)  # [batch, seq]; every Encoded carries word ids
        ex_batch, ex_query, ex_targets, pair = _batch_examples(part, causal, pair_index, n_words)
        slots = torch.arange(n_words)  # [word]
        word_valid = (word_ids[:, None, :] == slots[None, :, None]).any(-1)  # [batch, word]
        hits = torch.zeros(info.n_layers, info.n_heads, len(pair), dtype=torch.bool)  # [layer, head, ex]
        maps = attention_maps(loaded, batch.input_ids, batch.attention_mask)
        for layer in list(maps):
            probs = maps.pop(layer)  # [batch, head, query, key]
            pred = predict_words(
                word_attention(probs, word_ids, n_query_words=n_words, n_key_words=n_words),
                word_valid,
                causal,
            )
            hits[layer] = example_hits(pred, ex_batch, ex_query, ex_targets)  # [head, example]
        hit_parts.append(hits)
        base_parts.append(offset_hits(ex_query, ex_targets, offsets))  # [offset, example]
        pair_parts.append(pair)
        progress(b + 1, n_batches)
    scores = relation_scores(
        torch.cat(hit_parts, dim=2), torch.cat(base_parts, dim=1), torch.cat(pair_parts), len(pairs)
    )
    best = best_pairs(scores.margin, scores.n, min_examples)
    params: dict[str, Any] = {
        "split": split if sentences is None else "given",
        "n_sentences": len(chosen),
        "n_words": sum(len(e.sentence.words) for e in chosen),
        "n_examples": int(scores.n.sum()),
        "min_examples": min_examples,
        "directions": list(DIRECTIONS),
        "offsets": list(offsets),
        "max_words": MAX_WORDS,
        "max_tokens": max_tokens,
        "seed": config.seed,
        "eligible_pairs": [
            f"{r} {d}" for (r, d), k in zip(pairs, scores.n.tolist(), strict=True) if k >= min_examples
        ],
    }
    return FunctionalResult(
        battery="syntax",
        stats=syntactic_stats(scores, best),
        params=params,
        tables={"syntax_relations": relations_table(scores, pairs, offsets)},
    )


SPEC = BatterySpec(
    name="syntax",
    run=run_syntax,
    metric=None,
)
