"""Battery ``needle`` → scores ``retrieval`` and ``retrieval_tf``: retrieval heads.

Wu et al. 2024 ("Retrieval Head Mechanistically Explains Long-Context Factuality") find a few
heads that copy-paste from a needle hidden in a long context. Their score: during greedy decoding
after a needle-in-a-haystack prompt, a head *copy-pastes* at a step when its top-1 attended key
lies inside the needle and the emitted token equals the prompt token at that key. Trials are built
by :mod:`.needle_prompts` (EWT haystack, our own seeded needles, exact token spans).

- ``retrieval`` (Wu et al.): greedy decoding of up to :data:`MAX_NEW_TOKENS` tokens, one token per
  forward with the KV cache; per trial and head, the number of *distinct* needle-value positions
  copy-pasted divided by the value's length in tokens. Only trials whose answer recalls the needle
  count (ROUGE-1 recall of the value's words > 0.5, Wu et al.'s filter).
- ``retrieval_tf``: the same test on one teacher-forced forward over prompt + gold answer: at
  gold position j the query is the position that predicts gold token j and the "emitted" token is
  the gold one. The gold answer is the needle sentence's lead followed by its value ("The special
  magic number of Paris is 482913"), because instruct models answer that way; forcing the bare
  value right after the assistant header puts the first value token where the model would say
  "The", which no head copies. Trials count when the model's own argmax predicts more than half of
  the value's gold tokens (the teacher-forced analogue of the recall filter). One forward instead
  of a decoding loop.

Differences from the reference implementation (github.com/nightdessert/Retrieval_Head), on
purpose: the needle span is recorded exactly, where the reference re-finds it by token-set overlap
(which can miss: the span is then (-1, -1), every head scores 0 and the trial still counts); the
needle goes at a sentence boundary found from the text, not from hard-coded period token ids of
one tokenizer family; each needle position counts once per trial (the reference adds
``1/|needle|`` at every matching step, so copying one token twice scores like copying two and a
trial can exceed 1); results are not appended to those of earlier runs. Like the reference,
heads are scored per query head (GQA included) and the final score is the mean over counted
trials (:class:`~headatlas.atlas.stats.HeadStats`).

Task metric (``headatlas verify --score retrieval``): :func:`needle_accuracy`, the share of trials
whose greedy answer contains the needle's value.

Measured on the default model (SmolLM2-135M-Instruct, 30 × 9 heads; 27 trials of 256/512/1024
tokens, seed 0): 26 of 27 answers recall the needle; 7.4% of heads (20/270) have ``retrieval``
> 0.1 (Wu et al. report < 5% on 7B models); top heads L18.H6 0.96, L17.H4 0.70, L17.H3 0.69,
L18.H7 0.65. ``retrieval_tf`` agrees almost exactly: Spearman 0.99997 over the 270 heads, top-10
and top-20 overlap 10/10 and 20/20, the same 7.4% above 0.1, largest per-head difference 0.02.
That is by construction: when the model answers with the gold sentence, the teacher-forced
forward sees the very tokens decoding fed, so the attention is the same; it differs only where the
answer does (quotes, a failed trial). With the bare value as gold the top-10 overlap was 8/10. The
teacher-forced chunk costs about a seventh of the decoding loop (5 s vs 35 s on a loaded 2-core
CPU); the prompt prefill both need (66 s) dominates at these lengths.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from ..atlas.stats import HeadStats
from ..capture import DenseView, capture, supports_backend
from ..capture.views import AttentionView
from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from ..data.ud import ewt_sentences
from ..model.compat import cache_kwargs, output_cache
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult
from .needle_prompts import (
    DEFAULT_DEPTHS,
    DEFAULT_LENGTHS,
    TEMPLATES,
    Trial,
    build_trials,
    contains_value,
    prompt_start,
    rouge1_recall,
)

MAX_NEW_TOKENS = 24
"""Greedy decoding stops after this many tokens (or at EOS, or at a newline after the answer)."""
RECALL_THRESHOLD = 0.5
"""A decoded trial counts when the ROUGE-1 recall of the needle's value exceeds this (Wu et al.)."""


def copy_paste_hits(
    top_keys: torch.Tensor, span: tuple[int, int], emitted: int, prompt_ids: torch.Tensor
) -> torch.Tensor:
    """Return which needle position each head copy-pastes from at one step (Wu et al. 2024).

    A head copy-pastes when its top-1 key lies in ``span`` and the prompt token there equals the
    emitted token. Pure function: nothing is modified.

    Args:
        top_keys: ``[..., head]`` key index of each head's largest attention weight at this step.
        span: ``(start, end)`` of the needle (value) tokens in the prompt, end exclusive.
        emitted: the token emitted at this step (greedy output or gold next token).
        prompt_ids: ``[key]`` the prompt's token ids (keys past the prompt are never in ``span``).

    Returns:
        bool ``[..., head, end - start]``: True at the needle offset a head copied from.
    """
    start, end = span
    width = end - start
    offset = top_keys.long() - start  # [..., head]
    inside = (offset >= 0) & (offset < width)  # [..., head]
    where = offset.clamp(0, width - 1)  # [..., head]
    needle = prompt_ids[start:end].to(top_keys.device)  # [span]
    hit = inside & (needle[where] == emitted)  # [..., head]
    onehot = torch.nn.functional.one_hot(where, width).bool()  # [..., head, span]
    return onehot & hit[..., None]  # [..., head, span]


def retrieval_from_hits(covered: torch.Tensor) -> torch.Tensor:
    """Return the retrieval score: the share of needle positions copied at least once.

    ``covered`` is bool ``[..., head, span]`` (the union of :func:`copy_paste_hits` over steps);
    the result is ``[..., head]`` in [0, 1].
    """
    return covered.float().mean(-1)  # [..., head]


@dataclass
class DecodeResult:
    """A greedy answer.

    ``tokens`` emitted (EOS excluded), their ``text``, and ``covered``: bool ``[layer, head, span]``,
    the union of copy-paste hits over steps (all False when decoding ran without capture).
    """

    tokens: list[int]
    text: str
    covered: torch.Tensor


def _text(tokenizer: Any, ids: list[int]) -> str:
    """Return ``ids`` decoded, special tokens dropped."""
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def _stop_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (
        loaded.tokenizer.eos_token_id,
        getattr(loaded.model.generation_config, "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids


def _top_keys_collector() -> tuple[dict[int, torch.Tensor], Callable[[AttentionView], None]]:
    """Return ``(found, on_view)``: ``on_view`` stores each layer's argmax key ``[head, query]``."""
    found: dict[int, torch.Tensor] = {}

    def on_view(view: AttentionView) -> None:
        if not isinstance(view, DenseView):  # capture(mode="dense") only sends dense views
            raise HeadatlasError("the needle battery needs dense attention views")
        top = view.probs[0].argmax(-1)  # [head, query]
        if view.layer in found:  # a later block of query rows of the same layer
            top = torch.cat([found[view.layer], top], dim=-1)  # [head, query]
        found[view.layer] = top

    return found, on_view


def _stack_layers(found: dict[int, torch.Tensor], n_layers: int) -> torch.Tensor:
    """Return the collected argmax keys as ``[layer, head, query]`` (CPU); raise if a layer is missing."""
    if sorted(found) != list(range(n_layers)):
        raise HeadatlasError(
            f"captured {len(found)} of {n_layers} layers: the model's attention was not seen"
        )
    return torch.stack([found[layer] for layer in range(n_layers)]).cpu()  # [layer, head, query]


def prefill(loaded: LoadedModel, trial: Trial) -> Any:
    """Run the prompt except its last token (no capture) and return the KV cache."""
    ids = torch.tensor([trial.ids[:-1]], device=loaded.device)  # [batch=1, key]
    with torch.no_grad():
        return output_cache(loaded.model.base_model(input_ids=ids, use_cache=True))  # no LM head


def greedy_decode(
    loaded: LoadedModel,
    trial: Trial,
    cache: Any,
    max_new_tokens: int | None = None,
    score: bool = True,
) -> DecodeResult:
    """Decode greedily from ``cache`` (the prompt minus its last token) and return the answer.

    Each step feeds one token. With ``score=True`` each step runs under dense capture and the
    copy-paste hits of every head are accumulated (:func:`copy_paste_hits`); with ``score=False``
    the steps are plain forwards (so :func:`headatlas.ablate` hooks are all that changes the
    model). Stops at EOS, at a newline once the answer has text, or after ``max_new_tokens``
    (default :data:`MAX_NEW_TOKENS`). ``cache`` is extended in place.
    """
    info = loaded.info
    tokenizer = loaded.tokenizer
    stops = _stop_ids(loaded)
    prompt = torch.tensor(trial.ids)  # [key]
    width = trial.span[1] - trial.span[0]
    covered = torch.zeros(info.n_layers, info.n_heads, width, dtype=torch.bool)  # [layer, head, span]
    found, on_view = _top_keys_collector()
    token = torch.tensor([[trial.ids[-1]]], device=loaded.device)  # [batch=1, query=1]
    emitted: list[int] = []
    with ExitStack() as stack:
        session = stack.enter_context(capture(loaded, on_view, mode="dense")) if score else None
        for _ in range(MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens):
            found.clear()
            if session is not None:
                out = session.forward(input_ids=token, **cache_kwargs(loaded.model, cache), use_cache=True)
            else:
                with torch.no_grad():
                    out = loaded.model(input_ids=token, **cache_kwargs(loaded.model, cache), use_cache=True)
            cache = output_cache(out)
            nxt = int(out.logits[0, -1].argmax())
            if session is not None:
                top = _stack_layers(found, info.n_layers)[:, :, -1]  # [layer, head]
                covered |= copy_paste_hits(top, trial.span, nxt, prompt)  # [layer, head, span]
            if nxt in stops:
                break
            emitted.append(nxt)
            if "\n" in _text(tokenizer, [nxt]) and _text(tokenizer, emitted).strip():
                break
            token = torch.tensor([[nxt]], device=loaded.device)  # [batch=1, query=1]
    text = _text(tokenizer, emitted).strip()
    return DecodeResult(emitted, text, covered)


def teacher_forced(loaded: LoadedModel, trial: Trial, cache: Any) -> tuple[torch.Tensor, float]:
    """Score one trial teacher-forced: feed the last prompt token + the gold answer in one forward.

    The gold answer is :attr:`Trial.gold_ids` (the needle's lead, then its value, as the model
    would answer). ``cache`` holds the prompt minus its last token and is extended in place.
    Query j of the chunk predicts gold token j, which plays the emitted token of
    :func:`copy_paste_hits` (every gold position is tested, as every decoding step is).

    Returns ``(covered, accuracy)``: bool ``[layer, head, span]`` needle positions copied, and the
    share of the value's gold tokens that the model's own argmax predicts.
    """
    info = loaded.info
    gold = torch.tensor(trial.gold_ids)  # [query]
    chunk = torch.tensor([[trial.ids[-1], *trial.gold_ids[:-1]]], device=loaded.device)  # [batch=1, query]
    found, on_view = _top_keys_collector()
    with capture(loaded, on_view, mode="dense") as session:
        out = session.forward(input_ids=chunk, **cache_kwargs(loaded.model, cache), use_cache=True)
    predicted = out.logits[0].argmax(-1).cpu()  # [query]
    v0, v1 = trial.gold_value
    accuracy = float((predicted[v0:v1] == gold[v0:v1]).float().mean())
    top = _stack_layers(found, info.n_layers)  # [layer, head, query]
    prompt = torch.tensor(trial.ids)  # [key]
    width = trial.span[1] - trial.span[0]
    covered = torch.zeros(info.n_layers, info.n_heads, width, dtype=torch.bool)  # [layer, head, span]
    for j, token in enumerate(trial.gold_ids):
        covered |= copy_paste_hits(top[:, :, j], trial.span, token, prompt)  # [layer, head, span]
    return covered, accuracy


def _check_model(loaded: LoadedModel, capture_needed: bool) -> None:
    if not loaded.info.causal:
        raise HeadatlasError(
            f"needle needs a decoder: {loaded.info.name!r} is an encoder (bidirectional) model"
        )
    if capture_needed and not supports_backend(loaded):
        raise HeadatlasError(
            f"needle needs a model that can swap attention backends: {type(loaded.model).__name__} cannot"
        )


def needle_trials(loaded: LoadedModel, config: FunctionalConfig) -> list[Trial]:
    """Return the battery's seeded trials for ``loaded`` under ``config`` (the same on every call).

    Lengths are :data:`~.needle_prompts.DEFAULT_LENGTHS` capped by ``config.max_len`` and by the
    model's context minus :data:`MAX_NEW_TOKENS`; ``config.n_prompts`` caps the number of trials.
    Raises :class:`HeadatlasError` when the needle and question alone do not fit, or when the EWT
    data is not installed.
    """
    cap = DEFAULT_LENGTHS[-1]
    if loaded.info.context_length:
        cap = min(cap, loaded.info.context_length - MAX_NEW_TOKENS)
    if config.max_len is not None:
        cap = min(cap, config.max_len)
    if cap < 1:
        raise HeadatlasError(f"needle prompts cannot be {cap} tokens long: raise --max-len")
    lengths = sorted({min(length, cap) for length in DEFAULT_LENGTHS})
    corpus = ewt_sentences("train")
    return build_trials(
        loaded.tokenizer, corpus, lengths, DEFAULT_DEPTHS, TEMPLATES, config.seed, config.n_prompts
    )


def _add(stats: HeadStats, name: str, scores: torch.Tensor, counted: bool) -> None:
    """Add one trial's ``scores [layer, head]`` as one row per layer (valid only when ``counted``)."""
    valid = torch.tensor([[counted]])  # [batch=1, query=1]
    for layer in range(scores.shape[0]):
        stats.add(name, layer, scores[layer][None, :, None], valid)  # values [batch=1, head, query=1]


def run_needle(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Run the ``needle`` battery and return ``retrieval`` and ``retrieval_tf`` per head (Wu et al. 2024).

    Per trial the prompt (minus its last token) is prefilled once without capture; the
    teacher-forced chunk runs on a copy of that cache and greedy decoding on the cache itself.
    ``params`` records the grid, how many trials counted for each score and the time each part
    took; table ``needle_trials`` holds one row per trial (answer, recall, accuracy, spans). Trials run
    one at a time (``config.batch_size`` is not used).
    """
    import pandas as pd

    _check_model(loaded, capture_needed=True)
    trials = needle_trials(loaded, config)
    info = loaded.info
    stats = HeadStats(info.n_layers, info.n_heads)
    rows: list[dict[str, Any]] = []
    seconds = {"prefill": 0.0, "teacher_forced": 0.0, "decode": 0.0}
    for index, trial in enumerate(trials):
        t0 = time.perf_counter()
        cache = prefill(loaded, trial)
        t1 = time.perf_counter()
        tf_covered, tf_accuracy = teacher_forced(loaded, trial, copy.deepcopy(cache))
        t2 = time.perf_counter()
        decoded = greedy_decode(loaded, trial, cache, score=True)
        t3 = time.perf_counter()
        seconds["prefill"] += t1 - t0
        seconds["teacher_forced"] += t2 - t1
        seconds["decode"] += t3 - t2
        recall = rouge1_recall(trial.needle.answer, decoded.text)
        counted, tf_counted = recall > RECALL_THRESHOLD, tf_accuracy > RECALL_THRESHOLD
        _add(stats, "retrieval", retrieval_from_hits(decoded.covered), counted)
        _add(stats, "retrieval_tf", retrieval_from_hits(tf_covered), tf_counted)
        rows.append(
            {
                "trial": index,
                "template": trial.needle.template,
                "length": trial.length,
                "n_tokens": len(trial.ids),
                "depth": trial.depth,
                "span_start": trial.span[0],
                "span_end": trial.span[1],
                "answer": trial.needle.answer,
                "response": decoded.text,
                "recall": recall,
                "counted": counted,
                "tf_accuracy": tf_accuracy,
                "tf_counted": tf_counted,
            }
        )
        progress(index + 1, len(trials))
    params = {
        "paper": SPEC_PAPER,
        "n_trials": len(trials),
        "n_counted": int(sum(r["counted"] for r in rows)),
        "n_counted_tf": int(sum(r["tf_counted"] for r in rows)),
        "lengths": sorted({t.length for t in trials}),
        "depths": list(DEFAULT_DEPTHS),
        "templates": list(TEMPLATES),
        "max_new_tokens": MAX_NEW_TOKENS,
        "recall_threshold": RECALL_THRESHOLD,
        "seed": config.seed,
        "sequence_start": prompt_start(loaded.tokenizer),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    return FunctionalResult("needle", stats, params, {"needle_trials": pd.DataFrame(rows)})


def needle_accuracy(loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress) -> float:
    """Return needle retrieval accuracy: the share of trials whose greedy answer contains the value.

    The task metric of ``headatlas verify --score retrieval`` (Wu et al. 2024 mask retrieval heads
    and watch this drop). Same seeded trials as :func:`run_needle`; plain forwards without capture,
    so it measures whatever :func:`headatlas.ablate` hooks are active.
    """
    _check_model(loaded, capture_needed=False)
    trials = needle_trials(loaded, config)
    found = 0
    for index, trial in enumerate(trials):
        decoded = greedy_decode(loaded, trial, prefill(loaded, trial), score=False)
        found += contains_value(trial.needle.answer, decoded.text)
        progress(index + 1, len(trials))
    return found / len(trials)


SPEC_PAPER = "Wu et al. 2024, Retrieval Head Mechanistically Explains Long-Context Factuality"

SPEC = BatterySpec(
    name="needle",
    run=run_needle,
    metric=needle_accuracy,
    metric_name="needle retrieval accuracy",
    higher_is_better=True,
)
