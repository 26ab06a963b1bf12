"""How a sequence starts and ends: the one place that decides, from what the tokenizer itself does.

Every battery, ``headatlas map`` and the viewer build their token sequences here, so the model
sees text framed exactly as its own tokenizer frames it: ``tokenizer(text)`` with its default
``add_special_tokens`` behaviour. A tokenizer that adds BOS (Llama, Gemma) gets BOS; one that has a
BOS token but never adds it (Qwen2, SmolLM2) gets none, and the first token the model sees is the
text's first token; an encoder gets its ``[CLS] … [SEP]``. Prompts in a chat template start as the
rendered template starts (:func:`chat_frame`).

Packed sequences (many passages cut to a fixed length) need the frame apart from the text:
:func:`sequence_frame` finds it by encoding a probe text with and without special tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import HeadatlasError

_PROBE = "The cat sat on the mat."
_SENTINEL = "\u2063HEADATLAS_CONTENT\u2063"


@dataclass(frozen=True)
class SequenceFrame:
    """The special tokens a tokenizer puts around a text: ``prefix + text + suffix``.

    Attributes:
        prefix: token ids before the text (``()`` when the tokenizer adds none).
        suffix: token ids after the text.
        start: how sequences start, for ``atlas.json``: ``"none"``, ``"bos <s>"`` (the BOS
            token) or ``"special [CLS]"`` (other special tokens).
        end: the same for the end (``"none"``, ``"eos </s>"``, ``"special [SEP]"``).
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    start: str
    end: str

    def wrap(
        self,
        ids: list[int] | tuple[int, ...],
        words: list[int] | tuple[int, ...] | None = None,
        end: bool = True,
    ) -> tuple[list[int], list[int] | None]:
        """Return ``(prefix + ids [+ suffix], words)``; frame tokens get word id −1.

        ``end=False`` leaves the suffix off, for prompts the model continues (decoding).
        """
        tail = list(self.suffix) if end else []
        framed = [*self.prefix, *ids, *tail]
        if words is None:
            return framed, None
        return framed, [-1] * len(self.prefix) + list(words) + [-1] * len(tail)

    def room(self, length: int, end: bool = True) -> int:
        """Return how many text tokens fit in a framed sequence of ``length`` tokens."""
        return length - len(self.prefix) - (len(self.suffix) if end else 0)

    def describe(self) -> dict[str, str]:
        """Return ``{"sequence_start": ..., "sequence_end": ...}`` for the atlas metadata."""
        return {"sequence_start": self.start, "sequence_end": self.end}


def _token_text(tokenizer: Any, ids: tuple[int, ...]) -> str:
    return " ".join(str(t) for t in tokenizer.convert_ids_to_tokens(list(ids)))


def _describe(tokenizer: Any, ids: tuple[int, ...], own: int | None, own_kind: str) -> str:
    if not ids:
        return "none"
    kind = own_kind if isinstance(own, int) and ids == (own,) else "special"
    return f"{kind} {_token_text(tokenizer, ids)}"


def _find(needle: list[int], haystack: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return -1


def sequence_frame(tokenizer: Any) -> SequenceFrame:
    """Return the :class:`SequenceFrame` ``tokenizer`` puts around a text by default.

    Found by encoding a probe sentence with and without special tokens: what the default adds
    before and after the plain encoding is the frame. Raises :class:`HeadatlasError` when the
    two encodings cannot be aligned (the tokenizer changes the text itself, not only its ends).
    """
    framed = [int(i) for i in tokenizer(_PROBE, add_special_tokens=True)["input_ids"]]
    plain = [int(i) for i in tokenizer(_PROBE, add_special_tokens=False)["input_ids"]]
    start = _find(plain, framed) if plain else -1
    if start < 0:
        raise HeadatlasError(
            f"{type(tokenizer).__name__} encodes text differently with and without special tokens "
            "(not only at the ends): headatlas cannot tell how its sequences start"
        )
    prefix, suffix = tuple(framed[:start]), tuple(framed[start + len(plain) :])
    return SequenceFrame(
        prefix,
        suffix,
        _describe(tokenizer, prefix, getattr(tokenizer, "bos_token_id", None), "bos"),
        _describe(tokenizer, suffix, getattr(tokenizer, "eos_token_id", None), "eos"),
    )


def read_utf8(path: str | Path) -> str:
    """Return the text of a UTF-8 file; raise :class:`HeadatlasError` saying what is wrong with it."""
    file = Path(path)
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HeadatlasError(
            f"text file {str(file)!r} is not UTF-8 (byte {exc.start} cannot be read): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise HeadatlasError(
            f"cannot read text file {str(file)!r}: {exc.strerror or type(exc).__name__}"
        ) from None


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map, which byte-level BPE token strings are written in."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(visible)
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, codes, strict=True)}


_BYTE_DECODER = _byte_decoder()
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _token_bytes(tokenizer: Any, token_id: int) -> bytes | None:
    """The raw bytes a token covers, for byte-level BPE and byte-fallback tokens; else ``None``."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or not piece:
        return None
    found = _BYTE_TOKEN.match(piece)
    if found:
        return bytes([int(found.group(1), 16)])
    if all(ch in _BYTE_DECODER for ch in piece):
        return bytes(_BYTE_DECODER[ch] for ch in piece)
    return None


def token_strings(tokenizer: Any, ids: list[int] | tuple[int, ...]) -> list[str]:
    """Return each token id decoded on its own (what examples, labels and the viewer show).

    A token that is only part of a character (a piece of an emoji or of a CJK or Hebrew letter,
    which decodes alone to "�") is shown as the bytes it covers, e.g. ``⟨f0 9f⟩``.
    """
    out = []
    for token_id in ids:
        text = str(tokenizer.decode([int(token_id)]))
        if "\ufffd" in text:
            raw = _token_bytes(tokenizer, token_id)
            if raw is not None:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = "⟨" + " ".join(f"{b:02x}" for b in raw) + "⟩"
        out.append(text)
    return out


def encode_words(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Return ``text``'s token ids without special tokens and a word id per token (``None`` when
    the tokenizer cannot say: slow tokenizers have no word ids)."""
    enc = tokenizer(text, add_special_tokens=False)
    ids = [int(i) for i in enc["input_ids"]]
    try:
        words = enc.word_ids()
    except (ValueError, AttributeError):
        return ids, None
    return ids, [-1 if w is None else int(w) for w in words]


def encode_split_words(
    tokenizer: Any, words: list[str], target: bool = False, leading_space: bool = False
) -> tuple[list[int], list[int]]:
    """Return the token ids (no special tokens) of ``words`` joined by spaces, as the tokenizer
    encodes that text, and the index of the word each token belongs to (−1 for none).

    A fast tokenizer encodes the joined text once and its character offsets say which word each
    token covers (the token's last character decides); a slow one encodes each word on its own
    after a space (for SentencePiece, as in Marian and T5, that is the joint encoding).
    ``target=True`` encodes as a decoder target (``text_target``: Marian's target vocabulary);
    ``leading_space`` puts a space before the first word (Whisper's transcripts start so).
    """
    key = "text_target" if target else "text"
    text = (" " if leading_space else "") + " ".join(words)
    if getattr(tokenizer, "is_fast", False):
        ends, at = [], len(text) - len(" ".join(words))
        for word in words:
            ends.append((at, at + len(word)))
            at += len(word) + 1
        enc = tokenizer(**{key: text}, add_special_tokens=False, return_offsets_mapping=True)
        ids, word_ids = [int(i) for i in enc["input_ids"]], []
        for first, last in enc["offset_mapping"]:
            inside = [w for w, (a, b) in enumerate(ends) if a <= last - 1 < b] if last > first else []
            word_ids.append(inside[0] if inside else -1)
        return ids, word_ids
    ids, word_ids = [], []
    for index, word in enumerate(words):
        piece_text = word if index == 0 and not leading_space else " " + word
        piece = [int(i) for i in tokenizer(**{key: piece_text}, add_special_tokens=False)["input_ids"]]
        ids += piece
        word_ids += [index] * len(piece)
    return ids, word_ids


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Return ``text`` framed as the tokenizer frames it, and word ids (frame tokens −1)."""
    ids, words = encode_words(tokenizer, text)
    return sequence_frame(tokenizer).wrap(ids, words)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    """The chat template rendered around ``messages`` with the generation prompt, or ``None``
    when the tokenizer has no template or the template refuses these messages."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that cannot render these turns (e.g. no system role)
        return None
    return text if isinstance(text, str) else None


@dataclass(frozen=True)
class ChatFrame:
    """The rendered chat template around one user message: ``before + message + after``.

    ``start`` describes how the rendered prompt starts (its first special tokens), for the
    metadata of batteries that use the template.
    """

    before: str
    after: str
    start: str


def chat_frame(tokenizer: Any) -> ChatFrame | None:
    """Return the :class:`ChatFrame` of ``tokenizer``'s chat template, or ``None`` without one.

    The template is rendered around one user message with the generation prompt added; its text
    already holds whatever special tokens it starts with (encode ``before`` without adding more).
    A template that cannot render a lone user turn counts as none.
    """
    text = render_chat(tokenizer, [{"role": "user", "content": _SENTINEL}])
    if text is None or text.count(_SENTINEL) != 1:
        return None
    before, after = text.split(_SENTINEL)
    ids = tokenizer(before, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
    lead = tuple(int(i) for i in ids[: next((k for k, i in enumerate(ids) if i not in special), len(ids))])
    return ChatFrame(before, after, "template " + (_token_text(tokenizer, lead) if lead else "text"))
