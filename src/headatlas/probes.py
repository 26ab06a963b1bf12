"""Probe batteries: the token sequences a scan runs, and which detectors read them.

- ``natural``: English text (UD English EWT sentences by default, or the user's text file) packed
  into sequences of ``seq_len`` tokens, BOS first when the tokenizer has one. Word ids come from
  the fast tokenizer's pre-tokenisation, for the subword score.
- ``repeat``: uniformly random tokens ``x`` of length ``P = (seq_len - 1) // 2`` repeated twice
  after a BOS, ``[BOS, x, x]`` — TransformerLens' induction battery (its ``evals.induction_loss``
  draws tokens in [100, 20000); we draw in [min(100, V/10), min(20000, V)) minus special ids).
- ``texts``: exactly the given texts, one sequence each, as the tokenizer encodes them.

Everything is seeded: the same seed gives the same sequences, so a resumed scan sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import HeadatlasError

BATTERIES = ("natural", "repeat")
BATTERY_DETECTORS: dict[str, tuple[str, ...]] = {
    "natural": ("positional", "entropy", "subword", "distance"),
    "repeat": ("repeat",),
    "texts": ("positional", "entropy", "subword", "distance"),
}


@dataclass(frozen=True)
class ProbeSequence:
    """One sequence: token ids and, where known, a word id per token (-1 = not part of a word)."""

    ids: tuple[int, ...]
    word_ids: tuple[int, ...] | None = None


@dataclass
class Battery:
    """A named list of sequences plus what its detectors need (``period`` for ``repeat``)."""

    name: str
    sequences: list[ProbeSequence]
    detectors: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    period: int | None = None
    repeat_start: int = 1

    @property
    def n_tokens(self) -> int:
        """Total tokens over all sequences."""
        return sum(len(s.ids) for s in self.sequences)


@dataclass(frozen=True)
class Batch:
    """Left-padded tensors for one forward pass.

    ``input_ids``/``attention_mask``/``positions``/``word_ids`` are all ``[batch, seq]``;
    ``positions`` is the logical position of each token (-1 for padding).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    word_ids: torch.Tensor | None


def pad_id(tokenizer: Any) -> int:
    """Return the id used for padding: the tokenizer's pad, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def make_batch(sequences: list[ProbeSequence], pad: int) -> Batch:
    """Left-pad ``sequences`` into a :class:`Batch` (no special tokens are added)."""
    seq = max(len(s.ids) for s in sequences)
    n = len(sequences)
    ids = torch.full((n, seq), pad, dtype=torch.long)  # [batch, seq]
    mask = torch.zeros((n, seq), dtype=torch.long)  # [batch, seq]
    positions = torch.full((n, seq), -1, dtype=torch.long)  # [batch, seq]
    has_words = all(s.word_ids is not None for s in sequences)
    words = torch.full((n, seq), -1, dtype=torch.long) if has_words else None  # [batch, seq]
    for row, s in enumerate(sequences):
        length = len(s.ids)
        start = seq - length
        ids[row, start:] = torch.tensor(s.ids)
        mask[row, start:] = 1
        positions[row, start:] = torch.arange(length)
        if words is not None and s.word_ids is not None:
            words[row, start:] = torch.tensor(s.word_ids)
    return Batch(ids, mask, positions, words)


def _bos(tokenizer: Any) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if isinstance(bos, int) else []


def _encode_words(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[int] | None]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens)
    ids = list(enc["input_ids"])
    try:
        words = enc.word_ids()
    except (ValueError, AttributeError):  # slow tokenizers have no word ids
        return ids, None
    return ids, [-1 if w is None else int(w) for w in words]


def text_battery(tokenizer: Any, texts: Iterable[str], max_len: int | None) -> Battery:
    """Battery ``texts``: each text is one sequence, encoded as the tokenizer does by default."""
    sequences = []
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise HeadatlasError(f"text {i} is empty: give non-empty text")
        ids, words = _encode_words(tokenizer, text, add_special_tokens=True)
        if not ids:
            raise HeadatlasError(f"text {i} encodes to no tokens: give text the tokenizer can read")
        if max_len is not None and len(ids) > max_len:
            raise HeadatlasError(
                f"text {i} is {len(ids)} tokens, beyond the model's context of {max_len}: shorten it"
            )
        sequences.append(ProbeSequence(tuple(ids), None if words is None else tuple(words)))
    if not sequences:
        raise HeadatlasError("no texts given: pass at least one non-empty text")
    return Battery("texts", sequences, BATTERY_DETECTORS["texts"], {"n_texts": len(sequences)})


def natural_battery(
    tokenizer: Any, corpus: list[str], n_prompts: int, seq_len: int, seed: int, source: str
) -> Battery:
    """Battery ``natural``: ``n_prompts`` sequences of exactly ``seq_len`` tokens packed from ``corpus``.

    Passages are drawn in a seeded random order; each sequence starts with BOS (if the tokenizer
    has one) and is filled with whole passages, the last one cut at ``seq_len``.
    """
    corpus = [t for t in corpus if t.strip()]
    if not corpus:
        raise HeadatlasError(f"no text in {source}: give a non-empty text file")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus))
    bos = _bos(tokenizer)
    sequences: list[ProbeSequence] = []
    ids: list[int] = list(bos)
    words: list[int] = [-1] * len(bos)
    next_word = 0
    cursor = 0
    passes = 0
    while len(sequences) < n_prompts:
        if cursor == len(order):
            cursor, passes = 0, passes + 1
            if passes > 1 and not sequences:
                raise HeadatlasError(f"{source} holds too little text for one {seq_len}-token sequence")
        text = corpus[order[cursor]]
        cursor += 1
        piece, piece_words = _encode_words(tokenizer, (" " if len(ids) > len(bos) else "") + text, False)
        ids.extend(piece)
        base = next_word
        pw = piece_words or [-1] * len(piece)
        words.extend(-1 if w < 0 else base + w for w in pw)
        next_word = base + 1 + max(pw, default=-1)
        while len(ids) >= seq_len and len(sequences) < n_prompts:
            sequences.append(ProbeSequence(tuple(ids[:seq_len]), tuple(words[:seq_len])))
            ids, words = list(bos), [-1] * len(bos)
    params = {"n_prompts": n_prompts, "seq_len": seq_len, "seed": seed, "source": source}
    return Battery("natural", sequences, BATTERY_DETECTORS["natural"], params)


def repeat_battery(tokenizer: Any, vocab_size: int, n_prompts: int, seq_len: int, seed: int) -> Battery:
    """Battery ``repeat``: ``[BOS, x, x]`` with ``x`` uniformly random tokens, ``|x| = (seq_len - 1) // 2``."""
    bos = _bos(tokenizer)
    period = (seq_len - len(bos)) // 2
    if period < 2:
        raise HeadatlasError(f"--seq-len {seq_len} is too short for the repeat battery: use at least 8")
    low, high = min(100, vocab_size // 10), min(20000, vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = np.array([t for t in range(low, high) if t not in special])
    rng = np.random.default_rng(seed + 1)
    sequences = []
    for _ in range(n_prompts):
        x = rng.choice(pool, size=period).tolist()
        sequences.append(ProbeSequence(tuple(bos + x + x), None))
    params = {
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "period": period,
        "seed": seed,
        "token_range": [low, high],
    }
    return Battery(
        "repeat", sequences, BATTERY_DETECTORS["repeat"], params, period=period, repeat_start=len(bos)
    )


def read_text_file(path: str | Path) -> list[str]:
    """Return the non-empty lines of a UTF-8 text file, or raise :class:`HeadatlasError`."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise HeadatlasError(f"cannot read text file {str(file)!r}: {exc.__class__.__name__}") from exc
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise HeadatlasError(f"text file {str(file)!r} is empty: give a file with text")
    return texts
