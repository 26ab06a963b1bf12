"""The word lists, one copy each: country capitals, antonyms, chemical symbols, words to capitalise,
and the translation word list (``word_pairs.json``: English with French, German, Spanish and
Turkish). Function-vector tasks (:mod:`headatlas.apps.common.patch_tasks`), the truth facts of
probes and steering (:mod:`headatlas.apps.common.probe_tasks`) and the translate battery
(:mod:`headatlas.functional.translate`) all read them from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from ..core.errors import HeadatlasError

COUNTRY_CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("Hungary", "Budapest"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
    ("Argentina", "Buenos Aires"), ("India", "New Delhi"), ("Australia", "Canberra"),
    ("Mexico", "Mexico City"), ("South Korea", "Seoul"), ("England", "London"), ("Iraq", "Baghdad"),
    ("Israel", "Jerusalem"), ("Brazil", "Brasilia"), ("Switzerland", "Bern"), ("Scotland", "Edinburgh"),
    ("Wales", "Cardiff"), ("Vietnam", "Hanoi"),
)  # fmt: skip
"""(country, capital) pairs; a capital is written as the country's own government names it."""
ANTONYMS: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("happy", "sad"),
    ("good", "bad"), ("high", "low"), ("open", "closed"), ("light", "dark"), ("long", "short"),
    ("early", "late"), ("rich", "poor"), ("hard", "soft"), ("full", "empty"), ("strong", "weak"),
    ("true", "false"), ("wet", "dry"), ("thick", "thin"), ("clean", "dirty"), ("loud", "quiet"),
    ("near", "far"), ("young", "old"), ("win", "lose"), ("in", "out"), ("yes", "no"), ("day", "night"),
    ("left", "right"), ("first", "last"), ("top", "bottom"), ("black", "white"), ("alive", "dead"),
    ("love", "hate"), ("start", "end"), ("cheap", "expensive"), ("safe", "dangerous"), ("easy", "difficult"),
    ("inside", "outside"), ("above", "below"), ("before", "after"),
)  # fmt: skip
"""(word, opposite) pairs."""
CHEMICAL_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"),
    ("sodium", "Na"), ("iron", "Fe"), ("gold", "Au"), ("silver", "Ag"), ("copper", "Cu"),
    ("lead", "Pb"), ("potassium", "K"), ("calcium", "Ca"), ("neon", "Ne"), ("zinc", "Zn"),
    ("tin", "Sn"), ("mercury", "Hg"), ("sulfur", "S"), ("chlorine", "Cl"), ("uranium", "U"),
)  # fmt: skip
"""(element, symbol) pairs."""
CAPITALIZE_WORDS: tuple[str, ...] = (
    "apple", "river", "house", "music", "garden", "window", "paper", "table", "city", "mountain",
    "orange", "summer", "winter", "friend", "family", "money", "water", "bread", "cloud", "forest",
    "horse", "island", "letter", "market", "night", "ocean", "pencil", "queen", "school", "tiger",
)  # fmt: skip
"""Common lower-case nouns (the function-vector ``capitalize`` task)."""

WORD_PAIRS_RESOURCE = "word_pairs.json"
"""The translation word list, inside the package :mod:`headatlas.data`."""


@dataclass(frozen=True)
class WordList:
    """The word list: language names by code, the source language and one dict per concept."""

    languages: dict[str, str]
    source: str
    words: tuple[dict[str, str], ...]

    @property
    def targets(self) -> list[str]:
        """Target language codes, in file order."""
        return [code for code in self.languages if code != self.source]

    def pair(self, target: str) -> list[tuple[str, str]]:
        """Return ``[(source word, target word), ...]`` for language ``target``."""
        return [(w[self.source], w[target]) for w in self.words if self.source in w and target in w]


def load_word_pairs(resource: str = WORD_PAIRS_RESOURCE) -> WordList:
    """Return the packaged :class:`WordList`; raise :class:`HeadatlasError` if it is missing or malformed."""
    where = f"headatlas/data/{resource}"
    try:
        text = resources.files("headatlas.data").joinpath(resource).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise HeadatlasError(
            f"the translate word list {where} is missing: reinstall headatlas (pip install -e .)"
        ) from exc
    try:
        data = json.loads(text)
        languages = {str(k): str(v) for k, v in data["languages"].items()}
        source = str(data["source"])
        words = tuple({str(k): str(v) for k, v in row.items()} for row in data["words"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HeadatlasError(
            f"the translate word list {where} is malformed ({exc}): reinstall headatlas"
        ) from exc
    if source not in languages or len(languages) < 2:
        raise HeadatlasError(f"the translate word list {where} names no source and target languages")
    return WordList(languages, source, words)
