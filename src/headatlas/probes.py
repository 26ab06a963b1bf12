"""Probe batteries: the token sequences a scan runs, and which detectors read them.

- ``natural``: English text (UD English EWT sentences by default, or the user's text file) packed
  into sequences of ``seq_len`` tokens, framed as the tokenizer frames a text
  (:mod:`headatlas.sequences`: BOS only where the tokenizer adds one, ``[CLS] … [SEP]`` for BERT).
  Word ids come from the fast tokenizer's pre-tokenisation, for the subword score.
- ``repeat``: uniformly random tokens ``x`` repeated twice inside the same frame,
  ``[frame start, x, x, frame end]`` with ``|x| = P`` filling ``seq_len`` — TransformerLens'
  induction battery (its ``evals.induction_loss`` draws tokens in [100, 20000); we draw in
  [min(100, V/10), min(20000, V)) minus special ids).
- ``texts``: exactly the given texts, one sequence each, as the tokenizer encodes them.
- ``align`` (encoder–decoder models): source–target pairs with gold word alignments from a file
  (:mod:`headatlas.pairs`).
- ``speech`` (speech encoder–decoders: Whisper): synthetic speech with word timings known by
  construction (:mod:`headatlas.speech`).

Everything is seeded: the same seed gives the same sequences, so a resumed scan sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import HeadatlasError, param
from .sequences import encode_words, read_utf8, sequence_frame

logger = logging.getLogger(__name__)

BATTERIES = ("natural", "repeat", "align", "speech")
BATTERY_DETECTORS: dict[str, tuple[str, ...]] = {
    "natural": ("positional", "entropy", "subword", "distance"),
    "repeat": ("repeat",),
    "texts": ("positional", "entropy", "subword", "distance"),
}


@dataclass(frozen=True)
class ProbeSequence:
    """One sequence: token ids and, where known, a word id per token (-1 = not part of a word).

    For encoder–decoder models a sequence may carry its own decoder ``target`` (else the source
    is copied, :mod:`headatlas.pairs`), the target's word ids, and gold word ``links``
    ``(source word, target word, sure)``.
    """

    ids: tuple[int, ...]
    word_ids: tuple[int, ...] | None = None
    target: tuple[int, ...] | None = None
    target_word_ids: tuple[int, ...] | None = None
    links: tuple[tuple[int, int, bool], ...] | None = None
    features: np.ndarray | None = field(default=None, compare=False)
    """The encoder's input when it is not token ids: a speech encoder's log-mel features
    ``[mel, frame]`` (:mod:`headatlas.speech`); ``ids`` then stand for its real frames."""


@dataclass
class Battery:
    """A named list of sequences plus what its detectors need (``period`` for ``repeat``)."""

    name: str
    sequences: list[ProbeSequence]
    detectors: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    period: int | None = None
    repeat_start: int = 1
    cross_detectors: tuple[str, ...] = ("cross_positional", "cross_entropy")
    """Detectors run on the cross-attention layers of encoder–decoder models
    (:data:`headatlas.alignment.CROSS_DETECTORS`)."""

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


def text_battery(tokenizer: Any, texts: Iterable[str], max_len: int | None) -> Battery:
    """Battery ``texts``: each text is one sequence, framed as the tokenizer frames a text."""
    frame = sequence_frame(tokenizer)
    sequences = []
    for i, text in enumerate(texts):
        if not text or not text.strip():
            raise HeadatlasError(f"text {i} is empty: give non-empty text")
        body, body_words = encode_words(tokenizer, text)
        if not body:
            raise HeadatlasError(f"text {i} encodes to no tokens: give text the tokenizer can read")
        ids, words = frame.wrap(body, body_words)
        if max_len is not None and len(ids) > max_len:
            raise HeadatlasError(
                f"text {i} is {len(ids)} tokens, beyond the model's context of {max_len}: shorten it"
            )
        sequences.append(ProbeSequence(tuple(ids), None if words is None else tuple(words)))
    if not sequences:
        raise HeadatlasError("no texts given: pass at least one non-empty text")
    params = {"n_texts": len(sequences), **frame.describe()}
    return Battery("texts", sequences, BATTERY_DETECTORS["texts"], params)


def natural_battery(
    tokenizer: Any, corpus: list[str], n_prompts: int, seq_len: int, seed: int, source: str
) -> Battery:
    """Battery ``natural``: up to ``n_prompts`` sequences of ``seq_len`` tokens packed from ``corpus``.

    Passages are drawn in a seeded random order and joined by spaces; each sequence is framed as
    the tokenizer frames a text (:func:`~headatlas.sequences.sequence_frame`) and filled with
    whole passages, the last one cut to fit. The corpus is read once: text is never repeated. When
    it runs out first, what is left becomes one shorter last sequence, a warning says how many
    tokens there were against how many were asked for, and ``params`` records both.
    """
    corpus = [t for t in corpus if t.strip()]
    if not corpus:
        raise HeadatlasError(f"no text in {source}: give a non-empty text file")
    frame = sequence_frame(tokenizer)
    room = frame.room(seq_len)
    if room < 1:
        raise HeadatlasError(
            f"{param('seq_len')} {seq_len} leaves no room for text inside the tokenizer's frame"
        )
    order = np.random.default_rng(seed).permutation(len(corpus))
    sequences: list[ProbeSequence] = []
    ids: list[int] = []
    words: list[int] = []
    next_word = 0
    available = 0

    def emit(length: int) -> None:
        nonlocal ids, words
        framed, framed_words = frame.wrap(ids[:length], words[:length])
        sequences.append(ProbeSequence(tuple(framed), tuple(framed_words or ())))
        ids, words = [], []

    for index in order:
        if len(sequences) == n_prompts:
            break
        piece, piece_words = encode_words(tokenizer, (" " if ids else "") + corpus[int(index)])
        available += len(piece)
        ids.extend(piece)
        pw = piece_words or [-1] * len(piece)
        words.extend(-1 if w < 0 else next_word + w for w in pw)
        next_word += 1 + max(pw, default=-1)
        while len(ids) >= room and len(sequences) < n_prompts:
            emit(room)
    if len(sequences) < n_prompts and ids:
        emit(len(ids))  # what is left: one shorter sequence
    if not sequences:
        raise HeadatlasError(f"{source} encodes to no tokens: give text the tokenizer can read")
    params = {"n_prompts": n_prompts, "seq_len": seq_len, "seed": seed, "source": source, **frame.describe()}
    if len(sequences) < n_prompts or len(sequences[-1].ids) < seq_len:
        asked = n_prompts * room
        logger.warning(
            "%s holds %d tokens of text, fewer than the %d asked for (%d × %d): scanning %d sequence(s), "
            "the last %d tokens long; nothing is repeated",
            source,
            available,
            asked,
            n_prompts,
            seq_len,
            len(sequences),
            len(sequences[-1].ids),
        )
        params.update({"tokens_available": available, "tokens_asked": asked, "n_sequences": len(sequences)})
    return Battery("natural", sequences, BATTERY_DETECTORS["natural"], params)


def repeat_battery(tokenizer: Any, vocab_size: int, n_prompts: int, seq_len: int, seed: int) -> Battery:
    """Battery ``repeat``: ``x`` uniformly random tokens twice, ``[frame start, x, x, frame end]``.

    ``|x| = P`` is as long as ``seq_len`` allows inside the tokenizer's frame.
    """
    frame = sequence_frame(tokenizer)
    period = frame.room(seq_len) // 2
    if period < 2:
        raise HeadatlasError(
            f"{param('seq_len')} {seq_len} is too short for the repeat battery: use at least 8"
        )
    low, high = min(100, vocab_size // 10), min(20000, vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = np.array([t for t in range(low, high) if t not in special])
    rng = np.random.default_rng(seed + 1)
    sequences = []
    for _ in range(n_prompts):
        x = rng.choice(pool, size=period).tolist()
        sequences.append(ProbeSequence(tuple(frame.wrap(x + x)[0]), None))
    params = {
        "n_prompts": n_prompts,
        "seq_len": seq_len,
        "period": period,
        "seed": seed,
        "token_range": [low, high],
        **frame.describe(),
    }
    return Battery(
        "repeat",
        sequences,
        BATTERY_DETECTORS["repeat"],
        params,
        period=period,
        repeat_start=len(frame.prefix),
    )


def read_text_file(path: str | Path) -> list[str]:
    """Return the non-empty lines of a UTF-8 text file, or raise :class:`HeadatlasError`."""
    file = Path(path)
    lines = read_utf8(file).splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise HeadatlasError(f"text file {str(file)!r} is empty: give a file with text")
    return texts
