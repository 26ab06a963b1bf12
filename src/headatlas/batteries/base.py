"""What a battery is: :class:`ProbeSequence`, :class:`Battery`, and the left-padded :class:`Batch`
that every stage runs through a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..core.errors import HeadatlasError, param
from ..data.sequences import read_utf8

if TYPE_CHECKING:
    from ..model.info import LoadedModel, ModelInfo

TEXT_DETECTORS = ("positional", "entropy", "subword", "distance")
"""Detectors of the batteries of text (``natural``, ``texts``)."""
CROSS_BASE = ("cross_positional", "cross_entropy")
"""Cross-attention detectors every battery runs on an encoder–decoder model."""


class BatterySettings(Protocol):
    """What an attention battery is built from (:class:`~headatlas.scanning.config.ScanConfig` has it)."""

    @property
    def texts(self) -> tuple[str, ...] | None: ...
    @property
    def text_file(self) -> str | None: ...
    @property
    def n_prompts(self) -> int: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def align_file(self) -> str | None: ...


@dataclass(frozen=True)
class ProbeSequence:
    """One sequence: token ids and, where known, a word id per token (-1 = not part of a word).

    For encoder–decoder models a sequence may carry its own decoder ``target`` (else the source
    is copied, :mod:`headatlas.batteries.align`), the target's word ids, and gold word ``links``
    ``(source word, target word, sure)``.
    """

    ids: tuple[int, ...]
    word_ids: tuple[int, ...] | None = None
    target: tuple[int, ...] | None = None
    target_word_ids: tuple[int, ...] | None = None
    links: tuple[tuple[int, int, bool], ...] | None = None
    features: np.ndarray | None = field(default=None, compare=False)
    """The encoder's input when it is not token ids: a speech encoder's log-mel features
    ``[mel, frame]`` (:mod:`headatlas.batteries.speech`); ``ids`` then stand for its real frames."""


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
    (:data:`headatlas.detectors.cross.CROSS_DETECTORS`)."""

    @property
    def n_tokens(self) -> int:
        """Total tokens over all sequences."""
        return sum(len(s.ids) for s in self.sequences)


@dataclass(frozen=True)
class AttentionBatterySpec:
    """An attention battery as data: its name, the scores' detectors, what it feeds and its builder.

    ``build(loaded, settings)`` returns the :class:`Battery`; ``reads`` is what the model's encoder
    must read (``"text"`` token ids or ``"audio"`` features); ``cross`` marks a battery that scores
    cross-attention and so needs an encoder–decoder model.
    """

    name: str
    detectors: tuple[str, ...]
    build: Callable[[LoadedModel, BatterySettings], Battery]
    summary: str
    reads: str = "text"
    cross: bool = False


def reads_audio(model: Any) -> bool:
    """Whether ``model``'s encoder reads audio features (``main_input_name == "input_features"``)."""
    return getattr(model, "main_input_name", "input_ids") == "input_features"


def check_fits_context(info: ModelInfo, seq_len: int) -> None:
    """Raise :class:`HeadatlasError` when ``seq_len`` is beyond the model's context (packed batteries)."""
    if info.context_length is not None and seq_len > info.context_length:
        raise HeadatlasError(
            f"{param('seq_len')} {seq_len} is beyond {info.name}'s context of {info.context_length} tokens: "
            "use a smaller one"
        )


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


def read_text_file(path: str | Path) -> list[str]:
    """Return the non-empty lines of a UTF-8 text file, or raise :class:`HeadatlasError`."""
    file = Path(path)
    lines = read_utf8(file).splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise HeadatlasError(f"text file {str(file)!r} is empty: give a file with text")
    return texts
