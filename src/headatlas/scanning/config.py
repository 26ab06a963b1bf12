"""What a scan computes: :class:`ScanConfig`, checked when it is made and fingerprinted for resume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..batteries import ATTENTION_BATTERIES
from ..core.errors import HeadatlasError, check_at_least, param
from ..functional import FUNCTIONAL_BATTERIES, FunctionalConfig

MAX_PROMPTS = 100_000
"""Most sequences one attention battery builds (they are all held in memory)."""


@dataclass(frozen=True)
class ScanConfig:
    """What a scan computes. Every field is part of the resume fingerprint (:func:`fingerprint`).

    Attributes:
        probes: batteries: ``natural``, ``repeat`` (attention) and the functional ones
            (``needle``, ``ordinal``, ``copy``, ``translate``, ``syntax``, ``negative``, ``semantic``,
            ``dormant``).
        texts: exactly these texts, one sequence each, in place of the natural battery's corpus.
        text_file: a UTF-8 file whose lines replace UD English EWT in the natural battery.
        n_prompts: sequences per attention battery.
        seq_len: tokens per attention-battery sequence.
        batch_size: sequences per forward pass.
        seed: seed of every random choice (text order, random tokens, functional prompts).
        n_functional: prompts / trials / sentences per functional battery (``None``: each one's default).
        max_len: longest needle prompt in tokens (``None``: the battery's default).
        align_file: the ``align`` battery's pairs with gold word alignments (:mod:`headatlas.batteries.align`).
    """

    probes: tuple[str, ...] = ("natural", "repeat")
    texts: tuple[str, ...] | None = None
    text_file: str | None = None
    n_prompts: int = 64
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    n_functional: int | None = None
    max_len: int | None = None
    align_file: str | None = None

    def __post_init__(self) -> None:
        for name in ("probes", "texts"):  # one string is one item, never its characters
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        check_at_least("n_prompts", self.n_prompts, 1)
        check_at_least("seq_len", self.seq_len, 8)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("seed", self.seed, 0)
        if self.n_functional is not None:
            check_at_least("n_functional", self.n_functional, 1)
        if self.max_len is not None:
            check_at_least("max_len", self.max_len, 8)
        known = (*ATTENTION_BATTERIES, *FUNCTIONAL_BATTERIES)
        if not self.probes:
            raise HeadatlasError(
                f"no probe battery chosen in {param('probes')}: choose from {', '.join(known)}"
            )
        unknown = [p for p in self.probes if p not in known]
        if unknown:
            raise HeadatlasError(f"unknown probe battery {unknown[0]!r}: choose from {', '.join(known)}")
        if self.n_prompts > MAX_PROMPTS:
            raise HeadatlasError(
                f"{param('n_prompts')} {self.n_prompts:,} is over {MAX_PROMPTS:,} sequences per battery: "
                "scan in parts into separate atlases, or lower it"
            )
        if ("align" in self.probes) != (self.align_file is not None):
            raise HeadatlasError(
                f"the align battery and {param('align_file')} go together: give both or neither"
            )
        if self.texts is not None and self.text_file is not None:
            raise HeadatlasError(
                f"{param('texts')} and {param('text_file')} both replace the natural battery's text: give one"
            )
        for given, name in ((self.text_file, "text_file"), (self.texts, "texts")):
            if given is not None and "natural" not in self.probes:
                raise HeadatlasError(
                    f"{param(name)} feeds the natural battery, which {param('probes')} leaves out: add natural"
                )

    @classmethod
    def of(
        cls,
        probes: Sequence[str],
        texts: Sequence[str] | None = None,
        text_file: str | Path | None = None,
        align_file: str | Path | None = None,
        **settings: Any,
    ) -> ScanConfig:
        """Build a config from lists and paths as callers hold them (tuples and strings inside).

        A single string for ``probes`` or ``texts`` is one item (never its characters)."""
        return cls(
            probes=(probes,) if isinstance(probes, str) else tuple(probes),
            texts=None if texts is None else (texts,) if isinstance(texts, str) else tuple(texts),
            text_file=None if text_file is None else str(text_file),
            align_file=None if align_file is None else str(align_file),
            **settings,
        )

    @property
    def functional(self) -> list[str]:
        """The functional batteries asked for, in order, without repeats."""
        return [p for p in dict.fromkeys(self.probes) if p in FUNCTIONAL_BATTERIES]

    def functional_config(self) -> FunctionalConfig:
        """The settings the functional batteries read."""
        return FunctionalConfig(self.n_functional, self.max_len, self.seed, self.batch_size)
