"""Safety heads: Ships, and what ablating the top ones does to refusals (Zhou et al. 2024, "On the
Role of Attention Heads in Large Language Model Safety").

**Score.** Ships (Safety Head ImPortant Score) of head ``h`` on a harmful request ``q`` is how far
ablating ``h`` alone moves the model's distribution over the first token of its reply:

    Ships(q, h) = KL( p(· | q) ‖ p_{−h}(· | q) )    (nats)

where ``q`` is framed by the model's own chat template. The atlas column ``ships`` is its mean over
the harmful requests. Zhou et al. ablate by scaling the head's query (its attention becomes
uniform) or its output by a small ε; headatlas zero-ablates the output (ε = 0, the same
:func:`headatlas.ablate` every other command uses).

**Causal check.** The top-``k`` heads by Ships (scored on one half of the harmful requests) are
ablated together and the other half is answered greedily: the refusal rate (generation
detector, :mod:`.prompts`), the refusal log-prob, and on harmless requests the over-refusal rate
and the cost — how much less likely the unablated model's own replies become (nats per token) —
against ``k`` random heads over several seeds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atlas.table import Atlas
from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import ablate, padded_positions
from ...core.errors import HeadatlasError, check_at_least
from ...core.heads import HEAD_SET_FORMAT, Head, head_name
from ...core.progress import Progress, no_progress
from ...core.storage import write_json
from ...data.sequences import ChatFrame, chat_frame
from ...model.info import LoadedModel
from ..common.evaluation import next_token_logits
from .prompts import HARMFUL, HARMLESS, REFUSAL_OPENINGS, REPLY_TOKENS, is_refusal

Ids = tuple[int, ...]


def require_chat_frame(loaded: LoadedModel) -> ChatFrame:
    """Return the model's chat frame; raise :class:`HeadatlasError` (one line) for a model without a
    chat template, which cannot be asked the requests as a user."""
    frame = chat_frame(loaded.tokenizer)
    if frame is None:
        raise HeadatlasError(f"{loaded.info.name} has no chat template: safety heads need an instruct model")
    return frame


def chat_prompts(loaded: LoadedModel, requests: Sequence[str]) -> list[Ids]:
    """Return each request framed as one user turn of the model's chat template, with the assistant's
    turn opened; raise :class:`HeadatlasError` for a model without a chat template."""
    frame = require_chat_frame(loaded)
    tok = loaded.tokenizer
    return [
        tuple(int(i) for i in tok(frame.before + r + frame.after, add_special_tokens=False)["input_ids"])
        for r in requests
    ]


def ships_scores(
    loaded: LoadedModel, prompts: Sequence[Ids], batch_size: int = 16, progress: Progress = no_progress
) -> tuple[np.ndarray, np.ndarray]:
    """Return Ships per head, mean and std over ``prompts``, each ``[layer, head]`` (nats; Zhou et al. 2024)."""
    info = loaded.info
    base = next_token_logits(loaded, prompts, batch_size).log_softmax(-1)  # [n, vocab]
    mean = np.zeros((info.n_layers, info.n_heads))
    std = np.zeros((info.n_layers, info.n_heads))
    total = info.n_layers * info.n_heads
    for layer in range(info.n_layers):
        for head in range(info.n_heads):
            with ablate(loaded, [(layer, head)]):
                logp = next_token_logits(loaded, prompts, batch_size).log_softmax(-1)  # [n, vocab]
            kl = (base.exp() * (base - logp)).sum(-1)  # [n]
            mean[layer, head], std[layer, head] = float(kl.mean()), float(kl.std()) if len(kl) > 1 else 0.0
            progress(layer * info.n_heads + head + 1, total)
    return mean, std


def _teacher_forced(
    loaded: LoadedModel, prompts: Sequence[Ids], continuations: Sequence[Ids], batch_size: int
) -> torch.Tensor:
    """Return the summed log-prob of each continuation after its prompt, ``[n]``."""
    out = []
    pad = pad_id(loaded.tokenizer)
    for start in range(0, len(prompts), batch_size):
        pairs = list(
            zip(prompts[start : start + batch_size], continuations[start : start + batch_size], strict=True)
        )
        batch = make_batch([ProbeSequence(p + c) for p, c in pairs], pad)
        mask = batch.attention_mask.to(loaded.device)  # [batch, seq]
        ids = batch.input_ids.to(loaded.device)  # [batch, seq]
        with torch.no_grad():
            logp = loaded.model(
                input_ids=ids, attention_mask=mask, **padded_positions(loaded.model, mask)
            ).logits
        logp = logp.float().log_softmax(-1)  # [batch, seq, vocab]
        seq = ids.shape[1]
        for row, (_, cont) in enumerate(pairs):
            positions = torch.arange(seq - len(cont), seq, device=ids.device)  # the continuation's tokens
            out.append(logp[row, positions - 1, ids[row, positions]].sum())
    return torch.stack(out).cpu() if out else torch.zeros(0)


def refusal_logprob(loaded: LoadedModel, prompts: Sequence[Ids], batch_size: int = 16) -> torch.Tensor:
    """Return ``log Σ_p P(p | prompt)`` over :data:`~.prompts.REFUSAL_OPENINGS` per prompt, ``[n]``."""
    tok = loaded.tokenizer
    openings = [
        tuple(int(i) for i in tok(o, add_special_tokens=False)["input_ids"]) for o in REFUSAL_OPENINGS
    ]
    rows = [(p, o) for p in prompts for o in openings]
    scores = _teacher_forced(loaded, [p for p, _ in rows], [o for _, o in rows], batch_size)
    return scores.view(len(prompts), len(openings)).logsumexp(-1)


def replies(
    loaded: LoadedModel, prompts: Sequence[Ids], max_new_tokens: int = REPLY_TOKENS, batch_size: int = 16
) -> list[Ids]:
    """Return the greedy reply token ids after each prompt (stopped at EOS), under active hooks."""
    pad = pad_id(loaded.tokenizer)
    eos = loaded.tokenizer.eos_token_id
    model: Any = loaded.model
    out: list[Ids] = []
    for start in range(0, len(prompts), batch_size):
        batch = make_batch([ProbeSequence(p) for p in prompts[start : start + batch_size]], pad)
        ids = batch.input_ids.to(loaded.device)  # [batch, seq]
        with torch.no_grad():
            gen = model.generate(
                ids, attention_mask=batch.attention_mask.to(loaded.device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip
        for row in gen[:, ids.shape[1] :].tolist():
            cut = row.index(eos) if eos in row else len(row)
            out.append(tuple(row[:cut]) or (int(eos if eos is not None else pad),))
    return out


def behaviour(
    loaded: LoadedModel, harmful: Sequence[Ids], harmless: Sequence[Ids], base_replies: Sequence[Ids],
    heads: Sequence[Head] = (), batch_size: int = 16,
) -> dict[str, float]:  # fmt: skip
    """Return refusal rates on ``harmful`` and ``harmless`` and the refusal log-prob on ``harmful``
    with ``heads`` zero-ablated, and the cost on harmless requests: the log-prob per token of
    ``base_replies`` (the unablated model's replies to ``harmless``) under the ablated model."""
    tok: Any = loaded.tokenizer

    def refused(prompts: Sequence[Ids]) -> list[bool]:
        found = replies(loaded, prompts, batch_size=batch_size)
        return [is_refusal(str(tok.decode(list(r), skip_special_tokens=True))) for r in found]

    with ablate(loaded, list(heads)):
        bad = refused(harmful)
        good = refused(harmless)
        kept = _teacher_forced(loaded, harmless, base_replies, batch_size)
        bad_lp = refusal_logprob(loaded, harmful, batch_size)
    tokens = sum(len(r) for r in base_replies)
    return {
        "harmful_refusal": float(np.mean(bad)),
        "harmful_refusal_logprob": float(bad_lp.mean()),
        "harmless_refusal": float(np.mean(good)),
        "harmless_reply_logprob_per_token": float(kept.sum()) / max(tokens, 1),
    }


def split_requests(requests: Sequence[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``requests`` in two seeded halves: ``(score, test)``."""
    order = list(requests)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


@dataclass
class SafetyResult:
    """What :func:`safety_heads` measured (written as a head-set file by :func:`write_head_set`)."""

    model: str
    k: int
    heads: list[str]
    n_score: int
    n_test: int
    n_harmless: int
    before: dict[str, float]
    after: dict[str, float]
    random: list[dict[str, Any]]
    scores: np.ndarray
    std: np.ndarray
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready head set and measurements (no score matrices)."""
        keys = self.before.keys()
        return {
            "format": HEAD_SET_FORMAT,
            "model": self.model,
            "heads": self.heads,
            "method": "top-k heads by Ships (Zhou et al. 2024), zero-ablated together",
            "k": self.k,
            "n_score_harmful": self.n_score,
            "n_test_harmful": self.n_test,
            "n_harmless": self.n_harmless,
            "before": self.before,
            "after": self.after,
            "random": self.random,
            "random_mean": {key: float(np.mean([r["behaviour"][key] for r in self.random])) for key in keys}
            if self.random
            else {},
            "random_std": {key: float(np.std([r["behaviour"][key] for r in self.random])) for key in keys}
            if self.random
            else {},
            "top_ships": [
                {
                    "head": head_name(*divmod(int(i), self.scores.shape[1])),
                    "ships": float(self.scores.reshape(-1)[i]),
                }
                for i in np.argsort(-self.scores.reshape(-1), kind="stable")[:10]
            ],
            "seconds": self.seconds,
        }


N_SCORE = 8
"""Harmful requests Ships is scored on (one forward pass per head each); the rest are held out."""
N_HARMLESS = 16
"""Harmless requests the cost of an ablation is measured on."""


def safety_heads(
    loaded: LoadedModel,
    k: int = 5,
    seeds: int = 3,
    seed: int = 0,
    n_score: int = N_SCORE,
    n_harmless: int = N_HARMLESS,
    progress: Progress = no_progress,
) -> SafetyResult:
    """Return Ships for every head (scored on half of the harmful requests) and the refusal and
    harmless-request behaviour with the top ``k`` heads ablated against ``seeds`` draws of ``k``
    random heads (Zhou et al. 2024's ablation check), measured on the held-out half."""
    info = loaded.info
    check_at_least("k", k, 1)
    check_at_least("seeds", seeds, 0)
    if k > info.n_layers * info.n_heads:
        raise HeadatlasError(f"k = {k} is more than the model's {info.n_layers * info.n_heads} heads")
    start = time.perf_counter()
    check_at_least("n_score", n_score, 1)
    score_requests, test_requests = split_requests(HARMFUL, seed)
    score = chat_prompts(loaded, score_requests[:n_score])
    harmful = chat_prompts(loaded, test_requests)
    check_at_least("n_harmless", n_harmless, 1)
    harmless = chat_prompts(loaded, HARMLESS[:n_harmless])
    total = info.n_layers * info.n_heads + seeds + 2
    scores, std = ships_scores(loaded, score, progress=lambda d, _t: progress(d, total))
    order = np.argsort(-scores.reshape(-1), kind="stable")[:k]
    chosen = [divmod(int(i), info.n_heads) for i in order]
    base_replies = replies(loaded, harmless)
    before = behaviour(loaded, harmful, harmless, base_replies)
    done = info.n_layers * info.n_heads + 1
    progress(done, total)
    after = behaviour(loaded, harmful, harmless, base_replies, chosen)
    progress(done + 1, total)
    randoms = []
    for s in range(seeds):
        flat = random.Random(seed * 1000 + s + 1).sample(range(info.n_layers * info.n_heads), k)
        heads = [divmod(i, info.n_heads) for i in flat]
        randoms.append(
            {
                "seed": s,
                "heads": [head_name(*h) for h in heads],
                "behaviour": behaviour(loaded, harmful, harmless, base_replies, heads),
            }
        )
        progress(done + 2 + s, total)
    return SafetyResult(
        info.name, k, [head_name(*h) for h in chosen], len(score), len(harmful), len(harmless),
        before, after, randoms, scores, std, time.perf_counter() - start,
    )  # fmt: skip


def write_head_set(result: SafetyResult, out: str | Path) -> Path:
    """Write ``result`` as a head-set JSON file (atomically); return its path."""
    return write_json(Path(out), result.to_dict())


def write_ships(atlas: Atlas, result: SafetyResult) -> None:
    """Add the ``ships`` column (mean KL, nats) with its std and count to ``atlas``, the run's facts to
    its metadata, and recompute the roles."""
    atlas.set_matrix("ships", result.scores)
    atlas.set_matrix("ships_std", result.std)
    atlas.set_matrix("ships_n", np.full(result.scores.shape, result.n_score))
    atlas.meta["safety"] = {
        "k": result.k,
        "heads": result.heads,
        "before": result.before,
        "after": result.after,
    }
    atlas.reassign_roles()
