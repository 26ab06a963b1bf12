"""Battery ``translate`` → score ``translation``: does a head look up the word being translated?

Prompts are word-list translations built from our own list of common words
(``data/word_pairs.json``: English with French, German, Spanish and Turkish)::

    English: house, water, dog, book, tree, milk
    French: maison, eau, chien, livre, arbre, lait

``k`` = :data:`WORDS_PER_PROMPT` distinct words per prompt, chosen with a seeded generator, and
``config.n_prompts`` (default :data:`DEFAULT_PROMPTS`) prompts per language pair. Each prompt
starts as the tokenizer starts a text (:mod:`headatlas.data.sequences`: BOS only where the tokenizer
adds one), as in every battery of :mod:`headatlas.batteries.base`.

For every target word ``i`` the *query* is the position that predicts its first token: the last
token before the word starts (``":"`` before the first word, the ``","`` separator before the
others — SmolLM2 and Gemma tokenise ``", maison"`` as ``","`` then ``" maison"`` pieces). A head
*hits* on that row when its argmax attention, over the keys before the query minus the first
token (the attention sink), lands on a token of source word ``i``. ``translation`` is the mean hit
rate over all (prompt, target word) rows. A head attending at random hits about as often as
``params["chance"]`` (source-word tokens / candidate keys, ~1/prompt length). This is the
"translation" behaviour of induction-like heads shown by Olsson et al. 2022 ("In-context Learning
and Induction Heads", Transformer Circuits Thread): while writing the French word the head
attends to the English word it translates. Reading a head by its argmax follows Clark et al. 2019
("What Does BERT Look At?"), and attention as word alignment follows Garg et al. 2019 ("Jointly
Learning to Align and Translate with Transformer Models").

The task metric :func:`translation_accuracy` is teacher-forced: the fraction of target words whose
first token is the model's greedy prediction at the query position, on the same prompts.

A language pair is skipped when the tokenizer cannot represent its words (see
:func:`pair_problem`); with none left, :class:`HeadatlasError` says to use a multilingual model.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from ..atlas.stats import HeadStats
from ..batteries.base import Batch, ProbeSequence, make_batch, pad_id
from ..capture import attention_maps, padded_positions
from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from ..data.sequences import sequence_frame
from ..data.words import WORD_PAIRS_RESOURCE, load_word_pairs
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult

DEFAULT_PROMPTS = 20
"""Prompts per language pair when ``config.n_prompts`` is ``None``."""
WORDS_PER_PROMPT = 6
"""Words ``k`` in each list (source and target)."""
MIN_CHARS_PER_TOKEN = 1.5
"""A target language whose words average fewer characters per token is spelt out, not represented."""
MAX_TOKEN_RATIO = 3.0
"""A target language needing more than this many times the English tokens per word is skipped."""


@dataclass(frozen=True)
class TranslationPrompt:
    """One prompt: token ids (started as the tokenizer starts a text) and token spans of its words.

    Spans are ``(start, end)`` token positions, end exclusive; word ``i`` of the target list
    translates word ``i`` of the source list, and is predicted at position ``target_spans[i][0] - 1``.
    """

    target: str
    text: str
    ids: tuple[int, ...]
    source_spans: tuple[tuple[int, int], ...]
    target_spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch of prompts and, per (prompt, target word) row, what the score needs.

    ``queries [batch, row]`` predicting positions, ``sources [batch, row, key]`` the tokens of the
    aligned source word, ``targets [batch, row]`` the first token id of the target word,
    ``keys_ok [batch, key]`` real tokens other than the first, ``valid [batch, row]`` real rows.
    """

    batch: Batch
    queries: torch.Tensor
    sources: torch.Tensor
    targets: torch.Tensor
    keys_ok: torch.Tensor
    valid: torch.Tensor


def _segments(
    names: tuple[str, str], source: list[str], target: list[str]
) -> list[tuple[str, tuple[int, int] | None]]:
    """Return the prompt as ``(text, (side, word index) or None)`` pieces; side 0 = source, 1 = target."""
    pieces: list[tuple[str, tuple[int, int] | None]] = []
    for side, (name, words) in enumerate(zip(names, (source, target), strict=True)):
        pieces.append((("\n" if side else "") + f"{name}:", None))
        for i, word in enumerate(words):
            pieces.append(((", " if i else " "), None))
            pieces.append((word, (side, i)))
    return pieces


def encode_segments(
    tokenizer: Any, pieces: list[tuple[str, tuple[int, int] | None]]
) -> tuple[list[int], dict[tuple[int, int], tuple[int, int]]]:
    """Encode the joined text; return ``(ids, {(side, i): (start, end) token span})``, no special tokens.

    Fast tokenizers encode the whole text and map words to the tokens whose character offsets
    overlap them; slow ones (no offsets) encode piece by piece.
    """
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    if getattr(tokenizer, "is_fast", False):
        text = "".join(p for p, _ in pieces)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        pos = 0
        for piece, word in pieces:
            start, end = pos, pos + len(piece)
            pos = end
            if word is None:
                continue
            hits = [t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            if hits:
                spans[word] = (hits[0], hits[-1] + 1)
        return ids, spans
    ids = []
    for piece, word in pieces:
        part = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if word is not None and part:
            spans[word] = (len(ids), len(ids) + len(part))
        ids.extend(part)
    return ids, spans


def build_prompt(
    tokenizer: Any, names: tuple[str, str], target: str, pairs: list[tuple[str, str]]
) -> TranslationPrompt | None:
    """Return the prompt translating ``pairs`` (source word, target word), or ``None`` if its words
    cannot be told apart in tokens (a word with no token, or words sharing a token)."""
    source_words, target_words = [s for s, _ in pairs], [t for _, t in pairs]
    pieces = _segments(names, source_words, target_words)
    ids, spans = encode_segments(tokenizer, pieces)
    start = sequence_frame(tokenizer).prefix
    shift = len(start)
    keys = [(0, i) for i in range(len(pairs))] + [(1, i) for i in range(len(pairs))]
    if any(k not in spans for k in keys):
        return None
    ordered = [spans[k] for k in keys]
    if any(a[1] > b[0] for a, b in pairwise(ordered)):  # words must not share tokens
        return None
    if ordered[len(pairs)][0] - 1 < ordered[len(pairs) - 1][1]:  # the first query must follow the sources
        return None
    moved = [(a + shift, b + shift) for a, b in ordered]
    return TranslationPrompt(
        target=target,
        text="".join(p for p, _ in pieces),
        ids=(*start, *ids),
        source_spans=tuple(moved[: len(pairs)]),
        target_spans=tuple(moved[len(pairs) :]),
    )


def pair_problem(tokenizer: Any, names: tuple[str, str], pairs: list[tuple[str, str]]) -> str | None:
    """Return why the tokenizer cannot represent this language pair, or ``None`` when it can.

    All the pair's words are encoded as one list prompt. The pair is unusable when (1) a word
    contains the unknown token, (2) the target words average fewer than
    :data:`MIN_CHARS_PER_TOKEN` characters per token (spelt out by single characters or bytes),
    (3) they need more than :data:`MAX_TOKEN_RATIO` times as many tokens per word as the source
    (English) words, or (4) words cannot be told apart in tokens.
    """
    prompt = build_prompt(tokenizer, names, "", pairs)
    if prompt is None:
        return f"{names[1]} words run together into shared tokens"
    unk = tokenizer.unk_token_id
    for name, spans in zip(names[::-1], (prompt.target_spans, prompt.source_spans), strict=True):
        if isinstance(unk, int) and any(unk in prompt.ids[a:b] for a, b in spans):
            return f"{name} words become the unknown token"
    n_source = sum(b - a for a, b in prompt.source_spans) / len(pairs)
    n_target = sum(b - a for a, b in prompt.target_spans) / len(pairs)
    chars = sum(len(t) for _, t in pairs) / len(pairs)
    if chars / n_target < MIN_CHARS_PER_TOKEN:
        return f"{names[1]} words are spelt out at {chars / n_target:.1f} characters per token"
    if n_target > MAX_TOKEN_RATIO * n_source:
        return f"{names[1]} words take {n_target:.1f} tokens each vs {n_source:.1f} for {names[0]}"
    return None


def translation_prompts(
    tokenizer: Any, model_name: str, n_prompts: int, seed: int, k: int = WORDS_PER_PROMPT
) -> tuple[list[TranslationPrompt], dict[str, Any]]:
    """Return the prompts of every usable language pair and a JSON-ready description.

    Each pair draws ``k`` distinct words per prompt from ``numpy.random.default_rng((seed, index))``,
    so the prompts are identical on every call. Raises :class:`HeadatlasError` when no pair is
    usable (an English-only tokenizer) or ``k`` exceeds the list.
    """
    words = load_word_pairs()
    prompts: list[TranslationPrompt] = []
    used: list[str] = []
    skipped: dict[str, str] = {}
    for index, target in enumerate(words.targets):
        names = (words.languages[words.source], words.languages[target])
        pairs = words.pair(target)
        if not 1 <= k <= len(pairs):
            raise HeadatlasError(f"cannot draw {k} words from the {len(pairs)} {names[1]} pairs: lower k")
        problem = pair_problem(tokenizer, names, pairs)
        rng = np.random.default_rng((seed, index))
        chosen: list[TranslationPrompt] = []
        for _ in range(n_prompts if problem is None else 0):
            picks = rng.choice(len(pairs), size=k, replace=False)
            prompt = build_prompt(tokenizer, names, target, [pairs[int(p)] for p in picks])
            if prompt is None:
                problem = f"{names[1]} words run together into shared tokens"
                break
            chosen.append(prompt)
        if problem is None:
            prompts.extend(chosen)
            used.append(target)
        else:
            skipped[target] = problem
    if not prompts:
        languages = "/".join(words.languages[t] for t in words.targets)
        first = next(iter(skipped.values()), "no language pairs")
        raise HeadatlasError(
            f"the tokenizer of {model_name} has no tokens for {languages} words ({first}): "
            "translate needs a multilingual model such as gemma3-270m"
        )
    params = {
        "pairs": [f"{words.source}-{t}" for t in used],
        "skipped": {f"{words.source}-{t}": why for t, why in skipped.items()},
        "prompts_per_pair": n_prompts,
        "words_per_prompt": k,
        "seed": seed,
        "words": f"headatlas/data/{WORD_PAIRS_RESOURCE}",
        "example": prompts[0].text,
    }
    return prompts, params


def prompt_batches(prompts: list[TranslationPrompt], pad: int, batch_size: int) -> list[PromptBatch]:
    """Left-pad ``prompts`` into :class:`PromptBatch` es of ``batch_size`` with :func:`make_batch`."""
    out = []
    for b0 in range(0, len(prompts), batch_size):
        chunk = prompts[b0 : b0 + batch_size]
        batch = make_batch([ProbeSequence(p.ids) for p in chunk], pad)
        n, seq = batch.input_ids.shape
        rows = max(len(p.target_spans) for p in chunk)
        queries = torch.zeros((n, rows), dtype=torch.long)  # [batch, row]
        sources = torch.zeros((n, rows, seq), dtype=torch.bool)  # [batch, row, key]
        targets = torch.zeros((n, rows), dtype=torch.long)  # [batch, row]
        valid = torch.zeros((n, rows), dtype=torch.bool)  # [batch, row]
        keys_ok = batch.attention_mask.bool().clone()  # [batch, key]
        for r, p in enumerate(chunk):
            shift = seq - len(p.ids)
            keys_ok[r, shift] = False
            for i, ((s0, s1), (t0, _)) in enumerate(zip(p.source_spans, p.target_spans, strict=True)):
                queries[r, i] = shift + t0 - 1
                sources[r, i, shift + s0 : shift + s1] = True
                targets[r, i] = p.ids[t0]
                valid[r, i] = True
        out.append(PromptBatch(batch, queries, sources, targets, keys_ok, valid))
    return out


def translation_hits(
    probs: torch.Tensor, queries: torch.Tensor, sources: torch.Tensor, keys_ok: torch.Tensor
) -> torch.Tensor:
    """Return ``[batch, head, row]``: 1.0 where a head's argmax attention hits the aligned source word.

    ``probs [batch, head, query, key]`` attention; ``queries [batch, row]`` the predicting
    position of each target word; ``sources [batch, row, key]`` the tokens of its source word;
    ``keys_ok [batch, key]`` keys that may win (real tokens other than the first, the sink). Only
    keys before the query compete. Ties go to the earliest key. The argmax readout is Clark et
    al. 2019's; the query/key pairing is Olsson et al. 2022's translation example.
    """
    batch, heads, _, n_key = probs.shape
    rows = queries.shape[1]
    index = queries[:, None, :, None].expand(batch, heads, rows, n_key)  # [batch, head, row, key]
    attn = probs.gather(2, index)  # [batch, head, row, key]
    before = torch.arange(n_key, device=probs.device) < queries[..., None]  # [batch, row, key]
    allowed = before & keys_ok[:, None, :]  # [batch, row, key]
    scores = attn.masked_fill(~allowed[:, None], float("-inf"))  # [batch, head, row, key]
    best = scores.argmax(-1)  # [batch, head, row]
    aligned = sources[:, None].expand(batch, heads, rows, n_key)  # [batch, head, row, key]
    return aligned.gather(-1, best[..., None]).squeeze(-1).to(probs.dtype)  # [batch, head, row]


def chance_hits(
    queries: torch.Tensor, sources: torch.Tensor, keys_ok: torch.Tensor, valid: torch.Tensor
) -> tuple[float, int]:
    """Return ``(sum over valid rows of the chance hit rate, number of valid rows)``.

    The chance rate of a row is (source-word tokens) / (keys that may win), what a head with a
    random argmax would score; shapes as in :func:`translation_hits`, ``valid [batch, row]``.
    """
    n_key = sources.shape[-1]
    before = torch.arange(n_key) < queries[..., None]  # [batch, row, key]
    allowed = before & keys_ok[:, None, :]  # [batch, row, key]
    rate = (sources & allowed).sum(-1) / allowed.sum(-1).clamp(min=1)  # [batch, row]
    return float(rate[valid].sum()), int(valid.sum())


def _prompt_setup(loaded: LoadedModel, config: FunctionalConfig) -> tuple[list[PromptBatch], dict[str, Any]]:
    """Prompts and batches of a run; raise for encoders and for unusable tokenizers."""
    if not loaded.info.causal:
        raise HeadatlasError(
            f"translate needs a causal (decoder) language model: {loaded.info.name} is bidirectional"
        )
    if config.batch_size < 1:
        raise HeadatlasError("the batch size must be at least 1")
    n_prompts = DEFAULT_PROMPTS if config.n_prompts is None else config.n_prompts
    if n_prompts < 1:
        raise HeadatlasError("translate needs at least 1 prompt per language pair")
    prompts, params = translation_prompts(loaded.tokenizer, loaded.info.name, n_prompts, config.seed)
    longest = max(len(p.ids) for p in prompts)
    limit = loaded.info.context_length
    if limit is not None and longest > limit:
        raise HeadatlasError(f"translate prompts are {longest} tokens, beyond the model's context of {limit}")
    params["max_tokens"] = longest
    return prompt_batches(prompts, pad_id(loaded.tokenizer), config.batch_size), params


def run_translate(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Score every head on word-list translation; return ``translation`` per (prompt, target word) row.

    Attention comes from :func:`headatlas.capture.attention_maps` (full maps; prompts are short).
    ``params`` records the pairs used and skipped, the example prompt and the chance level.
    """
    batches, params = _prompt_setup(loaded, config)
    info = loaded.info
    stats = HeadStats(info.n_layers, info.n_heads)
    chance_sum, n_rows = 0.0, 0
    for done, pb in enumerate(batches, start=1):
        maps = attention_maps(loaded, pb.batch.input_ids, pb.batch.attention_mask)
        for layer, probs in maps.items():  # probs [batch, head, query, key]
            hits = translation_hits(probs, pb.queries, pb.sources, pb.keys_ok)  # [batch, head, row]
            stats.add("translation", layer, hits, pb.valid)
        part, rows = chance_hits(pb.queries, pb.sources, pb.keys_ok, pb.valid)
        chance_sum, n_rows = chance_sum + part, n_rows + rows
        progress(done, len(batches))
    params.update(rows=n_rows, chance=chance_sum / max(n_rows, 1))
    return FunctionalResult("translate", stats, params)


def _next_token(loaded: LoadedModel, pb: PromptBatch) -> torch.Tensor:
    """Greedy next-token prediction ``[batch, row]`` at each row's query position.

    The body runs once; only the query rows go through the output embedding (a 262k-word vocab
    times every position would not fit comfortably). Final logit soft-capping is monotone, so
    the argmax is the model's.
    """
    model = loaded.model
    device = loaded.device
    ids = pb.batch.input_ids.to(device)  # [batch, seq]
    mask = pb.batch.attention_mask.to(device)  # [batch, seq]
    head = model.get_output_embeddings()
    with torch.no_grad():
        if head is None:
            logits = model(input_ids=ids, attention_mask=mask, **padded_positions(model, mask)).logits
            index = pb.queries.to(device)[..., None].expand(-1, -1, logits.shape[-1])  # [batch, row, vocab]
            return logits.gather(1, index).argmax(-1).cpu()  # [batch, row]
        body = model.base_model
        hidden = body(input_ids=ids, attention_mask=mask, **padded_positions(body, mask))[
            0
        ]  # [batch, seq, d_model]
        index = pb.queries.to(device)[..., None].expand(-1, -1, hidden.shape[-1])  # [batch, row, d_model]
        rows = hidden.gather(1, index)  # [batch, row, d_model]
        return head(rows).argmax(-1).cpu()  # [batch, row]


def translation_accuracy(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> float:
    """Return the teacher-forced word-list translation accuracy in [0, 1].

    The fraction of target words (same seeded prompts as :func:`run_translate`) whose first token
    is the model's greedy prediction at the position before the word. Only runs the model, so it
    measures the effect of :func:`headatlas.ablate` hooks around it.
    """
    batches, _ = _prompt_setup(loaded, config)
    correct, total = 0, 0
    for done, pb in enumerate(batches, start=1):
        predicted = _next_token(loaded, pb)  # [batch, row]
        correct += int(((predicted == pb.targets) & pb.valid).sum())
        total += int(pb.valid.sum())
        progress(done, len(batches))
    return correct / max(total, 1)


SPEC = BatterySpec(
    name="translate",
    run=run_translate,
    metric=translation_accuracy,
    metric_name="translation accuracy",
    higher_is_better=True,
)
