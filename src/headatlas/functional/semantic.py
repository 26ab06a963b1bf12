"""Battery ``semantic`` → semantic induction heads: does a head, attending to a word, raise the logit
of a word *related* to it?

Ren et al. 2024 ("Identifying Semantic Induction Heads to Understand In-Context Learning") find
heads that, when they attend to the head token of a relation (a syntactic head word, a country, a
word), raise the output logit of its tail token (the dependent, the capital, the opposite). Plain
induction heads copy the token that followed; these recall a token that is *related*. Scored
like ``copying`` (:mod:`.copying`), with the attended token's read-out row replaced by its
related token's:

    semantic_r(h, e) = Σ_{j ∈ head word} A_h[i, j] · z_h,i(tail)

for each example ``e`` of relation ``r``: query ``i`` is the position that predicts the tail's
first token, the keys ``j`` are the pieces of the head word, and ``z_h,i(t)`` is the z-score over
the vocabulary of token ``t``'s direct-logit change from the head's output at ``i``
(:mod:`.logit_lens`). Positive: the head reads the head word and writes its tail; in vocabulary
standard deviations, weighted by how much the head attends to the head word.

Relations (each an atlas column ``semantic_<relation>``):

- ``dependency``: UD English EWT dev, every arc head → dependent whose head word comes at least two
  words before the dependent (adjacent arcs are bigrams, the previous-token heads' job), ``root``
  and ``punct`` left out; per-relation means are in the side table ``semantic_relations``.
- ``capital``: country → capital (:data:`~headatlas.data.words.COUNTRY_CAPITALS`) in
  :data:`TEMPLATES`;
- ``antonym``: word → opposite (:data:`~headatlas.data.words.ANTONYMS`) in :data:`TEMPLATES`.

Pairs whose tail starts with a token of the head word are skipped (that would be copying).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..atlas.stats import HeadStats
from ..batteries.base import ProbeSequence, make_batch, pad_id
from ..capture import DenseView, capture, head_outputs
from ..core.errors import HeadatlasError
from ..core.progress import Progress, no_progress
from ..data.sequences import sequence_frame
from ..data.ud import read_conllu, ud_path
from ..data.words import ANTONYMS, COUNTRY_CAPITALS
from ..model.info import LoadedModel
from .base import BatterySpec, FunctionalConfig, FunctionalResult
from .logit_lens import centered_rows, logit_lens, logit_std, project_rows
from .syntax import SKIPPED_RELATIONS, base_relation, encode_sentence

RELATIONS = ("dependency", "capital", "antonym")
"""Relation types, one atlas column each (``semantic_<relation>``)."""
TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {head} is {tail}",
        "{head} is a country. Its capital city is {tail}",
        "We flew to {head} and spent a week in its capital, {tail}",
    ),
    "antonym": (
        "The opposite of {head} is {tail}",
        "It was not {head} at all. It was {tail}",
        "{head} and its opposite, {tail}",
    ),
}
"""Prompt templates of the knowledge relations; the prompt ends right before the tail."""
PAIRS: dict[str, tuple[tuple[str, str], ...]] = {"capital": COUNTRY_CAPITALS, "antonym": ANTONYMS}
DEFAULT_SENTENCES = 64
"""EWT sentences scored for ``dependency`` by default."""
MAX_TOKENS = 96
"""Longest sentence in tokens."""
MIN_DISTANCE = 2
"""A dependency arc counts when the head word is at least this many words before the dependent."""


@dataclass(frozen=True)
class Example:
    """One scored prediction: at token ``query`` the next token is ``tail``, related to the head word
    whose pieces are the tokens ``keys`` (all indices into the unpadded sequence)."""

    query: int
    keys: tuple[int, ...]
    tail: int
    relation: str
    label: str


@dataclass
class Prompt:
    """One sequence and its examples."""

    ids: tuple[int, ...]
    examples: list[Example] = field(default_factory=list)


def template_prompts(tokenizer: Any, relation: str) -> list[Prompt]:
    """Return one prompt per (pair, template) of a knowledge relation, the tail appended."""
    frame = sequence_frame(tokenizer)
    shift = len(frame.prefix)
    prompts = []
    for template in TEMPLATES[relation]:
        for head, tail in PAIRS[relation]:
            head_text = head[:1].upper() + head[1:] if template.startswith("{head}") else head
            prefix = template.split("{tail}")[0].rstrip().format(head=head_text)
            enc = tokenizer(prefix, add_special_tokens=False, return_offsets_mapping=True)
            full = tokenizer(prefix + " " + tail, add_special_tokens=False)["input_ids"]
            ids = [int(i) for i in enc["input_ids"]]
            if full[: len(ids)] != ids or len(full) == len(ids):
                continue  # the tail's first token merges with the prompt's last
            start = len(template.split("{head}")[0])
            keys = tuple(
                shift + k
                for k, (a, b) in enumerate(enc["offset_mapping"])
                if a < start + len(head_text) and b > start
            )
            tail_id = int(full[len(ids)])
            if not keys or tail_id in {ids[k - shift] for k in keys}:
                continue
            framed = frame.wrap(ids)[0]
            example = Example(shift + len(ids) - 1, keys, tail_id, relation, relation)
            prompts.append(Prompt(tuple(framed[: shift + len(ids)]), [example]))
    return prompts


def dependency_prompts(tokenizer: Any, n: int, seed: int, max_tokens: int) -> list[Prompt]:
    """Return up to ``n`` UD English EWT dev sentences with their head → dependent examples."""
    try:
        pool = list(read_conllu(ud_path("en_ewt", "dev")))
    except HeadatlasError as exc:
        raise HeadatlasError(f"the semantic battery needs UD English EWT gold trees: {exc}") from exc
    prompts: list[Prompt] = []
    for index in np.random.default_rng(seed).permutation(len(pool)):
        sentence = pool[int(index)]
        encoded = encode_sentence(tokenizer, sentence, causal=True)
        if len(encoded.ids) > max_tokens:
            continue
        tokens_of: dict[int, list[int]] = {}
        for t, w in enumerate(encoded.word_ids):
            if w >= 0:
                tokens_of.setdefault(w, []).append(t)
        examples = []
        for dep, (head1, deprel) in enumerate(zip(sentence.heads, sentence.deprels, strict=True)):
            relation, head = base_relation(deprel), head1 - 1
            if relation in SKIPPED_RELATIONS or head < 0 or dep - head < MIN_DISTANCE:
                continue
            if head not in tokens_of or dep not in tokens_of or tokens_of[dep][0] < 1:
                continue
            first = tokens_of[dep][0]
            tail = encoded.ids[first]
            if tail in {encoded.ids[k] for k in tokens_of[head]}:
                continue
            examples.append(Example(first - 1, tuple(tokens_of[head]), tail, "dependency", relation))
        if examples:
            prompts.append(Prompt(encoded.ids, examples))
        if len(prompts) >= n:
            break
    return prompts


def semantic_prompts(loaded: LoadedModel, config: FunctionalConfig) -> list[Prompt]:
    """Return every prompt of the battery: EWT sentences, then the knowledge-relation templates."""
    n = config.n_prompts or DEFAULT_SENTENCES
    max_tokens = min(config.max_len or MAX_TOKENS, loaded.info.context_length or MAX_TOKENS)
    prompts = dependency_prompts(loaded.tokenizer, n, config.seed, max_tokens)
    for relation in PAIRS:
        prompts.extend(template_prompts(loaded.tokenizer, relation))
    if not prompts:
        raise HeadatlasError("the semantic battery built no prompt: the tokenizer splits every tail away")
    return prompts


def example_scores(
    probs: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, z: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Return ``semantic(h, e) = Σ_{j∈keys_e} A[i_e, j] · z_h,i_e(tail_e)`` per example, ``[example, head]``.

    Args:
        probs: each example's attention row, ``[example, head, key]``.
        keys: the head word's tokens, ``[example, key]`` bool.
        rows: the tail's centred unembedding projected per head, ``[example, head, d_head]``.
        z: the heads' outputs at the example's query, ``[example, head, d_head]``.
        std: the std over the vocabulary of each output's logit change, ``[example, head]``.

    Ren et al. 2024 (semantic induction heads); the read-out is the direct logit attribution of
    Elhage et al. 2021.
    """
    attention = (probs * keys[:, None].to(probs.dtype)).sum(-1)  # [example, head]
    return attention * (rows * z).sum(-1) / std  # [example, head]


@dataclass
class _Batch:
    ex_row: torch.Tensor  # [example]
    ex_query: torch.Tensor  # [example]
    ex_keys: torch.Tensor  # [example, key]
    tails: torch.Tensor  # [example]
    names: list[str]
    probs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def _batch_examples(chunk: Sequence[Prompt], seq: int) -> _Batch:
    rows, queries, tails, names = [], [], [], []
    keys = []
    for r, prompt in enumerate(chunk):
        shift = seq - len(prompt.ids)  # left padding
        for ex in prompt.examples:
            rows.append(r)
            queries.append(shift + ex.query)
            tails.append(ex.tail)
            names.append(ex.label if ex.relation == "dependency" else ex.relation)
            mask = torch.zeros(seq, dtype=torch.bool)
            mask[[shift + k for k in ex.keys]] = True
            keys.append(mask)
    return _Batch(torch.tensor(rows), torch.tensor(queries), torch.stack(keys), torch.tensor(tails), names)


def run_semantic(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> FunctionalResult:
    """Score every head's semantic induction per relation type (Ren et al. 2024); return a
    :class:`FunctionalResult` (``semantic_<relation>``, side table ``semantic_relations``)."""
    import pandas as pd

    info = loaded.info
    lens = logit_lens(loaded)
    prompts = semantic_prompts(loaded, config)
    stats = HeadStats(info.n_layers, info.n_heads)
    detail = HeadStats(info.n_layers, info.n_heads)
    device = loaded.device
    pad = pad_id(loaded.tokenizer)

    def score(layer: int, z: torch.Tensor, batch: _Batch) -> None:
        if layer not in batch.probs:
            return
        probs = torch.cat(batch.probs.pop(layer), dim=2)  # [batch, head, query, key]
        rows_e, q_e = batch.ex_row.to(device), batch.ex_query.to(device)
        p = probs[rows_e, :, q_e]  # [example, head, key]
        z_e = z[rows_e, q_e].float()  # [example, head, d_head]
        proj = project_rows(
            lens, layer, centered_rows(lens, batch.tails.to(device))
        )  # [example, head, d_head]
        values = example_scores(p, batch.ex_keys.to(device), proj, z_e, logit_std(lens, layer, z_e))
        for name in dict.fromkeys(batch.names):
            pick = torch.tensor([n == name for n in batch.names], device=device)
            chosen = values[pick][..., None]  # [example, head, 1]
            ok = torch.ones(chosen.shape[0], 1, dtype=torch.bool, device=device)
            target = stats if name in RELATIONS else detail
            target.add(f"semantic_{name}", layer, chosen, ok)
            if name not in RELATIONS:
                stats.add("semantic_dependency", layer, chosen, ok)

    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    with head_outputs(loaded, score) as tap:

        def on_view(view: object) -> None:
            if isinstance(view, DenseView):
                tap.context.probs.setdefault(view.layer, []).append(view.probs)

        with capture(loaded, on_view, mode="dense") as session:
            for index, chunk in enumerate(batches):
                batch = make_batch([ProbeSequence(p.ids) for p in chunk], pad)
                tap.context = _batch_examples(chunk, batch.input_ids.shape[1])
                session.run(batch.input_ids, batch.attention_mask, with_head=False)
                progress(index + 1, len(batches))
    table = []
    for name in detail.names:
        mean, n = detail.mean(name), detail.n(name)
        for layer in range(info.n_layers):
            for head in range(info.n_heads):
                relation = name.removeprefix("semantic_")
                table.append({"layer": layer, "head": head, "relation": relation, "score": float(mean[layer, head]),
                              "n": int(n[layer, head])})  # fmt: skip
    params = {
        "relations": list(RELATIONS),
        "n_sentences": sum(1 for p in prompts if p.examples[0].relation == "dependency"),
        "n_examples": {r: sum(1 for p in prompts for e in p.examples if e.relation == r) for r in RELATIONS},
        "templates": {k: list(v) for k, v in TEMPLATES.items()},
        "min_distance": MIN_DISTANCE,
        "source": "UD English EWT dev; headatlas word lists",
        "seed": config.seed,
        "unit": "attention on the head word × z-score of the tail's logit (vocabulary std)",
    }
    return FunctionalResult("semantic", stats, params, {"semantic_relations": pd.DataFrame(table)})


def tail_logprobs(
    loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress
) -> dict[str, float]:
    """Return each relation type's mean log-probability of the tail token at its examples' queries —
    the prediction semantic induction heads serve (Ren et al. 2024)."""
    prompts = semantic_prompts(loaded, config)
    pad = pad_id(loaded.tokenizer)
    sums: dict[str, list[float]] = {}
    batches = [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]
    with torch.no_grad():
        for index, chunk in enumerate(batches):
            batch = make_batch([ProbeSequence(p.ids) for p in chunk], pad)
            ex = _batch_examples(chunk, batch.input_ids.shape[1])
            logits = loaded.model(
                input_ids=batch.input_ids.to(loaded.device),
                attention_mask=batch.attention_mask.to(loaded.device),
            ).logits  # [batch, seq, vocab]
            logp = torch.log_softmax(logits[ex.ex_row, ex.ex_query].float(), dim=-1)  # [example, vocab]
            picked = logp.gather(1, ex.tails.to(logp.device)[:, None])[:, 0]  # [example]
            for name, value in zip(ex.names, picked.tolist(), strict=True):
                sums.setdefault(name if name in RELATIONS else "dependency", []).append(value)
            progress(index + 1, len(batches))
    return {relation: float(np.mean(values)) for relation, values in sums.items()}


def tail_logprob(loaded: LoadedModel, config: FunctionalConfig, progress: Progress = no_progress) -> float:
    """Return the tail log-probability of :func:`tail_logprobs`, averaged over the relation types."""
    return float(np.mean(list(tail_logprobs(loaded, config, progress).values())))


SPEC = BatterySpec(
    name="semantic",
    run=run_semantic,
    metric=tail_logprob,
    metric_name="log-probability of the related (tail) token",
    higher_is_better=True,
)
