"""Batteries of text: ``natural`` (English text packed into ``seq_len``-token sequences, framed as
the tokenizer frames a text) and ``texts`` (exactly the given texts, one sequence each).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import HeadatlasError, param
from ..data.sequences import encode_words, sequence_frame
from ..data.ud import ewt_sentences
from .base import (
    TEXT_DETECTORS,
    AttentionBatterySpec,
    Battery,
    BatterySettings,
    ProbeSequence,
    check_fits_context,
    read_text_file,
)

if TYPE_CHECKING:
    from ..model.info import LoadedModel

logger = logging.getLogger(__name__)


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
    return Battery("texts", sequences, TEXT_DETECTORS, params)


def natural_battery(
    tokenizer: Any, corpus: list[str], n_prompts: int, seq_len: int, seed: int, source: str
) -> Battery:
    """Battery ``natural``: up to ``n_prompts`` sequences of ``seq_len`` tokens packed from ``corpus``.

    Passages are drawn in a seeded random order and joined by spaces; each sequence is framed as
    the tokenizer frames a text (:func:`~headatlas.data.sequences.sequence_frame`) and filled to
    ``seq_len``; a passage that does not fit goes on in the next sequence, so no text is dropped
    and one long passage (a one-line file) fills as many sequences as it has tokens for. The
    corpus is read once: text is never repeated. When
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
        """Frame the first ``length`` tokens as one sequence; the rest starts the next one (a word cut
        at the boundary has its leading pieces marked as no word there, so none is a fake
        continuation)."""
        nonlocal ids, words
        framed, framed_words = frame.wrap(ids[:length], words[:length])
        sequences.append(ProbeSequence(tuple(framed), tuple(framed_words or ())))
        cut = words[length - 1] if length else -1
        ids, words = ids[length:], words[length:]
        for k, word in enumerate(words):
            if cut < 0 or word != cut:
                break
            words[k] = -1

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
    return Battery("natural", sequences, TEXT_DETECTORS, params)


def build(loaded: LoadedModel, settings: BatterySettings) -> Battery:
    """The ``natural`` battery a scan runs: ``settings.texts`` one sequence each (``texts``), else
    ``settings.text_file``'s lines or UD English EWT packed into ``seq_len``-token sequences."""
    tok = loaded.tokenizer
    if settings.texts is not None:
        return text_battery(tok, settings.texts, loaded.info.context_length)
    check_fits_context(loaded.info, settings.seq_len)
    if settings.text_file is not None:
        corpus, source = read_text_file(settings.text_file), str(settings.text_file)
    else:
        corpus, source = ewt_sentences("train"), "UD English EWT train"
    return natural_battery(tok, corpus, settings.n_prompts, settings.seq_len, settings.seed, source)


SPEC = AttentionBatterySpec(
    "natural",
    TEXT_DETECTORS,
    build,
    "English text: UD English EWT, a text file's lines, or exactly given texts",
)
