"""Source–target pairs for encoder–decoder models: the ``align`` battery and decoder batches.

An encoder–decoder scan feeds the encoder a left-padded source batch (as every other battery)
and the decoder its target by teacher forcing: decoder row ``i`` reads ``[start] + target[:i]``
and predicts target token ``i``, as in training (``shift_tokens_right``). Targets are
right-padded, the convention of seq2seq tokenizers' ``text_target``. The ``natural`` and
``repeat`` batteries copy the source as the target; the ``align`` battery reads pairs with a gold
word alignment from a file:

``source words ||| target words ||| links``, one pair per UTF-8 line, words split on
whitespace, links as in fast_align / Pharaoh: ``i-j`` a sure link from source word ``i`` to
target word ``j`` (0-based), ``i?j`` a possible one (Och & Ney 2003's S and P). A pair without
``||| links`` still counts for the positional scores. Blank lines and lines starting with ``#``
are skipped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..core.errors import HeadatlasError, param
from ..data.sequences import encode_split_words, read_utf8, sequence_frame
from .base import CROSS_BASE, AttentionBatterySpec, Battery, BatterySettings, ProbeSequence

if TYPE_CHECKING:
    from ..model.info import LoadedModel

SELF_DETECTORS = ("positional", "entropy", "subword", "distance")
"""Detectors the ``align`` battery runs on encoder and decoder self-attention layers."""
MAX_PAIRS = 10_000
_LINK = re.compile(r"^(\d+)([-?p])(\d+)$")


@dataclass(frozen=True)
class GoldPair:
    """One line of an alignment file: source and target words and gold links
    ``(source word, target word, sure)`` (``None`` when the line gives no links)."""

    source: tuple[str, ...]
    target: tuple[str, ...]
    links: tuple[tuple[int, int, bool], ...] | None


def _parse_links(text: str, n_src: int, n_tgt: int, where: str) -> tuple[tuple[int, int, bool], ...]:
    links = []
    for item in text.split():
        found = _LINK.match(item)
        if found is None:
            raise HeadatlasError(f"{where}: link {item!r} is not i-j (sure) or i?j (possible)")
        i, j = int(found.group(1)), int(found.group(3))
        if i >= n_src or j >= n_tgt:
            raise HeadatlasError(
                f"{where}: link {item} is beyond the {n_src} source × {n_tgt} target words of the pair"
            )
        links.append((i, j, found.group(2) == "-"))
    return tuple(dict.fromkeys(links))


def read_aligned_pairs(path: str | Path) -> list[GoldPair]:
    """Return the pairs of an alignment file (module docstring); raise :class:`HeadatlasError`
    naming the line that is wrong."""
    pairs = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{number}"
        parts = [p.strip() for p in line.split("|||")]
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise HeadatlasError(f"{where}: expected 'source ||| target' or 'source ||| target ||| links'")
        source, target = tuple(parts[0].split()), tuple(parts[1].split())
        links = _parse_links(parts[2], len(source), len(target), where) if len(parts) == 3 else None
        pairs.append(GoldPair(source, target, links))
    if not pairs:
        raise HeadatlasError(f"alignment file {str(path)!r} holds no pairs")
    if len(pairs) > MAX_PAIRS:
        raise HeadatlasError(f"alignment file {str(path)!r} holds over {MAX_PAIRS:,} pairs: split it")
    return pairs


def align_battery(tokenizer: Any, path: str | Path, max_len: int | None) -> Battery:
    """Battery ``align``: the pairs of alignment file ``path``, framed as the tokenizer frames a
    source and a target, with word ids for the word-level readout (Och & Ney 2003 AER)."""
    frame = sequence_frame(tokenizer)
    sequences = []
    for index, pair in enumerate(read_aligned_pairs(path)):
        src, src_words = encode_split_words(tokenizer, list(pair.source))
        tgt, tgt_words = encode_split_words(tokenizer, list(pair.target), target=True)
        ids, words = frame.wrap(src, src_words)
        target, target_words = frame.wrap(tgt, tgt_words)
        longest = max(len(ids), len(target))
        if max_len is not None and longest > max_len:
            raise HeadatlasError(f"pair {index} is {longest} tokens, beyond the model's context of {max_len}")
        sequences.append(
            ProbeSequence(
                tuple(ids), tuple(words or ()), tuple(target), tuple(target_words or ()), pair.links
            )
        )
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    gold = sum(1 for s in sequences if s.links is not None)
    params = {
        "file": str(path),
        "sha256": digest,
        "n_pairs": len(sequences),
        "n_gold": gold,
        **frame.describe(),
    }
    return Battery("align", sequences, SELF_DETECTORS, params, cross_detectors=(*CROSS_BASE, "alignment"))


@dataclass(frozen=True)
class TargetBatch:
    """Right-padded decoder tensors for teacher forcing, all ``[batch, target]`` except the links.

    ``input_ids``/``attention_mask``: what the decoder reads (``[start] + target[:-1]``);
    ``positions``: each row's position (−1 = padding); ``input_words``: word id of the token each
    row *reads* (decoder self-attention); ``predicted_words``: word id of the token each row
    *predicts* (cross-attention readout); ``sure``/``possible``: ``[batch, target word, source
    word]`` gold links, ``None`` when no pair of the batch has any.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    input_words: torch.Tensor
    predicted_words: torch.Tensor
    sure: torch.Tensor | None
    possible: torch.Tensor | None


def _target_of(s: ProbeSequence) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The target of a sequence: its own, or a copy of the source (``natural``, ``repeat``)."""
    if s.target is not None:
        return s.target, s.target_word_ids or (-1,) * len(s.target)
    return s.ids, s.word_ids or (-1,) * len(s.ids)


def make_target_batch(sequences: list[ProbeSequence], pad: int, start: int) -> TargetBatch:
    """Right-pad the targets of ``sequences`` (module docstring) into a :class:`TargetBatch`."""
    targets = [_target_of(s) for s in sequences]
    n, width = len(sequences), max(len(t) for t, _ in targets)
    ids = torch.full((n, width), pad, dtype=torch.long)  # [batch, target]
    mask = torch.zeros((n, width), dtype=torch.long)  # [batch, target]
    positions = torch.full((n, width), -1, dtype=torch.long)  # [batch, target]
    read = torch.full((n, width), -1, dtype=torch.long)  # [batch, target]
    predicted = torch.full((n, width), -1, dtype=torch.long)  # [batch, target]
    for row, (target, words) in enumerate(targets):
        length = len(target)
        ids[row, :length] = torch.tensor([start, *target[:-1]])
        mask[row, :length] = 1
        positions[row, :length] = torch.arange(length)
        predicted[row, :length] = torch.tensor(words)
        read[row, 1:length] = torch.tensor(words[:-1])
    sure = possible = None
    if any(s.links for s in sequences):
        n_tw = int(predicted.max().clamp_min(0)) + 1
        n_sw = max(max(s.word_ids or (0,)) for s in sequences) + 1
        sure = torch.zeros((n, n_tw, n_sw), dtype=torch.bool)  # [batch, tw, sw]
        possible = torch.zeros((n, n_tw, n_sw), dtype=torch.bool)  # [batch, tw, sw]
        for row, s in enumerate(sequences):
            for i, j, is_sure in s.links or ():
                possible[row, j, i] = True
                sure[row, j, i] |= is_sure
    return TargetBatch(ids, mask, positions, read, predicted, sure, possible)


def decoder_start(model: Any) -> int:
    """Return the decoder start token id of an encoder–decoder ``model``; raise
    :class:`HeadatlasError` when its config names none."""
    for config in (model.config, getattr(model, "generation_config", None)):
        value = getattr(config, "decoder_start_token_id", None)
        if isinstance(value, int):
            return value
    raise HeadatlasError(
        f"{type(model).__name__} names no decoder_start_token_id in its config: set "
        "model.config.decoder_start_token_id"
    )


def build(loaded: LoadedModel, settings: BatterySettings) -> Battery:
    """The ``align`` battery a scan runs: the pairs of ``settings.align_file``."""
    if settings.align_file is None:
        raise HeadatlasError(f"the align battery reads {param('align_file')}: give the pairs file")
    return align_battery(loaded.tokenizer, settings.align_file, loaded.info.context_length)


SPEC = AttentionBatterySpec(
    "align",
    SELF_DETECTORS,
    build,
    "source–target pairs with gold word alignments (encoder–decoder models)",
    cross=True,
)
