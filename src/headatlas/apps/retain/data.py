"""Continual-learning tasks as short generation examples: ``prompt`` → ``answer``.

A task is a list of :class:`Example` rows. They come from a JSON-lines file (one
``{"prompt": ..., "answer": ...}`` object a line) or from the packaged word lists
(:mod:`headatlas.data.words`: country capitals, antonyms, English → French/German/Spanish).
Accuracy is greedy exact match of the answer, read in one teacher-forced pass: the answer is
generated greedily exactly when every answer token is the argmax given the tokens before it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.errors import HeadatlasError, param
from ...core.jsonl import read_jsonl
from ...data.words import ANTONYMS, COUNTRY_CAPITALS, load_word_pairs
from ...model.info import LoadedModel

_ROW_SHAPE = 'each line must be {"prompt": "...", "answer": "..."} with non-empty strings'


@dataclass(frozen=True)
class Example:
    """One generation example: the model should continue ``prompt`` with ``answer``."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids ``[batch, seq]``, their ``attention_mask`` and ``target`` (the next
    token's id at answer positions, ``-100`` elsewhere), all ``[batch, seq]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target: torch.Tensor


BUILTIN_TASKS = ("capitals", "antonyms", "french", "german", "spanish")
"""Word-list tasks :func:`builtin_task` builds."""


def builtin_task(name: str) -> list[Example]:
    """Return the packaged word-list task ``name`` (one of :data:`BUILTIN_TASKS`) as examples.

    ``capitals``: ``"Capital of France:"`` → ``" Paris"``; ``antonyms``: ``"Opposite of hot:"`` →
    ``" cold"``; ``french``/``german``/``spanish``: ``"French for house:"`` → ``" maison"``.
    """
    if name == "capitals":
        return [Example(f"Q: capital of {c}?\nA:", f" {a}") for c, a in COUNTRY_CAPITALS]
    if name == "antonyms":
        return [Example(f"Q: opposite of {w}?\nA:", f" {a}") for w, a in ANTONYMS]
    codes = {"french": "fr", "german": "de", "spanish": "es"}
    if name in codes:
        words = load_word_pairs()
        label = words.languages[codes[name]]
        return [Example(f"Q: {label} for {en}?\nA:", f" {t}") for en, t in words.pair(codes[name])]
    raise HeadatlasError(f"unknown task {name!r}: use a JSON-lines file or one of {', '.join(BUILTIN_TASKS)}")


def read_examples(path: str | Path, name: str = "train") -> list[Example]:
    """Return the examples of JSON-lines file ``path``, or of a builtin task when ``path`` is one of
    :data:`BUILTIN_TASKS`. Raises :class:`HeadatlasError` (naming parameter ``name``) for a missing
    file, a bad line or an empty file."""
    if str(path) in BUILTIN_TASKS and not Path(path).exists():
        return builtin_task(str(path))
    rows: list[Example] = []
    for number, row in read_jsonl(path, _ROW_SHAPE):
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt or not answer.strip():
            raise HeadatlasError(f"{path}:{number}: {_ROW_SHAPE}")
        rows.append(Example(prompt, answer))
    if not rows:
        raise HeadatlasError(f"{param(name)} {str(path)!r} holds no examples; {_ROW_SHAPE}")
    return rows


def replay_subset(examples: Sequence[Example], fraction: float, seed: int) -> list[Example]:
    """Return the replay set: ``fraction`` of ``examples`` (at least one), drawn with ``seed``.

    SEEKR (He et al. 2024) keeps 1 % or 10 % of each earlier task's training data.
    """
    if not 0.0 < fraction <= 1.0:
        raise HeadatlasError(f"{param('replay_fraction')} must be in (0, 1], got {fraction}")
    if not examples:
        raise HeadatlasError(f"{param('replay')} holds no examples to replay")
    count = max(1, round(fraction * len(examples)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:count])]


def encode(loaded: LoadedModel, examples: Sequence[Example], max_tokens: int = 64) -> Batch:
    """Tokenise ``examples`` (the tokenizer's own framing of ``prompt + answer``) into one
    right-padded :class:`Batch`; the loss and accuracy read only the answer's tokens."""
    tokenizer = loaded.tokenizer
    rows: list[tuple[list[int], int]] = []
    for example in examples:
        ids = list(tokenizer(example.prompt + example.answer)["input_ids"])[:max_tokens]
        n_prompt = len(tokenizer(example.prompt)["input_ids"])
        if n_prompt >= len(ids):
            raise HeadatlasError(
                f"the answer of {example.prompt!r} adds no token within {max_tokens} tokens: shorten the prompt"
            )
        rows.append((ids, n_prompt))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)  # [batch, seq]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch, seq]
    target = torch.full((len(rows), width), -100, dtype=torch.long)  # [batch, seq]
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        target[i, n_prompt - 1 : len(ids) - 1] = torch.tensor(ids[n_prompt:])  # predicts token t+1
    return Batch(input_ids, mask, target)


def answer_logits(loaded: LoadedModel, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return LM-head logits ``[n_answer_tokens, vocab]`` at the answer positions only
    (``hidden [batch, seq, d_model]`` is the body's last hidden state; the 49k-row LM head is the
    costliest layer of a small model, and only answer positions need it)."""
    chosen = hidden[target >= 0]  # [n_answer_tokens, d_model]
    return loaded.model.get_output_embeddings()(chosen).float()  # type: ignore[no-any-return,operator]


@torch.no_grad()
def accuracy(loaded: LoadedModel, examples: Sequence[Example], batch_size: int = 32) -> float:
    """Return the fraction of ``examples`` whose answer greedy decoding reproduces exactly (every
    answer token is the argmax after the prompt and the answer tokens before it)."""
    if not examples:
        return float("nan")
    right = 0
    model = loaded.model.base_model
    for start in range(0, len(examples), batch_size):
        batch = encode(loaded, examples[start : start + batch_size])
        hidden = model(
            input_ids=batch.input_ids.to(loaded.device), attention_mask=batch.attention_mask.to(loaded.device)
        ).last_hidden_state  # [batch, seq, d_model]
        target = batch.target.to(loaded.device)
        hit = torch.ones_like(target, dtype=torch.bool)  # [batch, seq]
        hit[target >= 0] = answer_logits(loaded, hidden, target).argmax(-1) == target[target >= 0]
        right += int(hit.all(dim=1).sum())
    return right / len(examples)
