"""The guard's prompt layout: an instruction and a data part, and where each lies in the tokens.

:func:`prompt_spans` renders them through the tokenizer's chat template (or a plain layout) with
invisible marks, so the token ranges of the instruction and the data are known exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...core.errors import HeadatlasError, param
from ...data.sequences import render_chat

#: The layout of an instruction and its data for a tokenizer without a chat template (framed by
#: the tokenizer's own special tokens, as :func:`encode_text` frames text).
PLAIN_LAYOUT = "Instruction: {instruction}\n\nData: {data}\n\nAnswer:"

_MARKS = tuple(f"\u2063HEADATLAS_SPAN_{k}\u2063" for k in "ABCD")


@dataclass(frozen=True)
class PromptSpans:
    """A prompt holding an instruction and untrusted data, tokenized as the model sees it.

    Attributes:
        ids: token ids of the whole prompt, special and template tokens included.
        instruction: ``(start, stop)`` token range of the instruction's text.
        data: ``(start, stop)`` token range of the data's text.
        layout: ``"system turn"`` (the instruction is the system message), ``"first user turn"``
            (the template has no system role: instruction, a blank line, then the data, in one
            user message) or ``"plain"`` (no chat template: :data:`PLAIN_LAYOUT`).
    """

    ids: tuple[int, ...]
    instruction: tuple[int, int]
    data: tuple[int, int]
    layout: str


def _marked_prompt(tokenizer: Any, instruction: str, data: str) -> tuple[str, str]:
    """The prompt text with the four span marks around instruction and data, and its layout."""
    a, b, c, d = _MARKS
    inst, dat = a + instruction + b, c + data + d

    def complete(text: str | None) -> bool:
        return text is not None and all(text.count(m) == 1 for m in _MARKS)

    text = render_chat(tokenizer, [{"role": "system", "content": inst}, {"role": "user", "content": dat}])
    if complete(text):
        return str(text), "system turn"
    text = render_chat(tokenizer, [{"role": "user", "content": inst + "\n\n" + dat}])
    if complete(text):
        return str(text), "first user turn"
    return PLAIN_LAYOUT.format(instruction=inst, data=dat), "plain"


def _unmark(text: str) -> tuple[str, dict[str, int]]:
    """Remove the span marks; return the clean text and each mark's character position in it."""
    found = sorted((text.index(m), m) for m in _MARKS)
    parts: list[str] = []
    where: dict[str, int] = {}
    last = 0
    for at, mark in found:
        parts.append(text[last:at])
        where[mark] = sum(map(len, parts))
        last = at + len(mark)
    parts.append(text[last:])
    return "".join(parts), where


def _token_range(offsets: list[tuple[int, int]], lo: int, hi: int, name: str) -> tuple[int, int]:
    """Tokens whose characters overlap ``[lo, hi)``, as a ``(start, stop)`` range without token 0."""
    inside = [k for k, (s, e) in enumerate(offsets) if e > s and s < hi and e > lo and k > 0]
    if not inside:
        raise HeadatlasError(f"{param(name)} has no token of its own in the prompt")
    return inside[0], inside[-1] + 1


def prompt_spans(tokenizer: Any, instruction: str, data: str) -> PromptSpans:
    """Return the :class:`PromptSpans` of ``instruction`` and ``data`` in ``tokenizer``'s chat template.

    The instruction goes in the system turn (or the first user turn when the template has no
    system role), the data in the user turn, with the generation prompt added, as Attention
    Tracker (Hung et al. 2024) lays prompts out. Both spans are found from the tokenizer's offset
    mapping of the rendered prompt: the template is rendered once with invisible marks around
    each text, the marks are removed, and the tokens whose characters fall between them are the
    span. No per-family offsets; template tokens and token 0 (the sink) are in neither span.
    Text holding the template's own special strings is tokenized as the model would see it (so
    ``<|im_start|>`` in the data is a special token inside the data span). Leading and trailing
    whitespace is stripped, as templates do. Raises :class:`HeadatlasError` for empty text or a
    tokenizer without offsets (a slow tokenizer).
    """
    clean_in, clean_data = instruction.strip(), data.strip()
    for name, text in (("instruction", clean_in), ("data", clean_data)):
        if not text:
            raise HeadatlasError(f"{param(name)} is empty")
        if any(m in text for m in _MARKS):
            raise HeadatlasError(f"{param(name)} holds headatlas' own span mark")
    marked, layout = _marked_prompt(tokenizer, clean_in, clean_data)
    text, where = _unmark(marked)
    if not getattr(tokenizer, "is_fast", False):
        raise HeadatlasError(
            f"{type(tokenizer).__name__} is a slow tokenizer without offsets: load the fast one"
        )
    enc = tokenizer(text, add_special_tokens=layout == "plain", return_offsets_mapping=True)
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    a, b, c, d = (where[m] for m in _MARKS)
    inst = _token_range(offsets, a, b, "instruction")
    dat = _token_range(offsets, c, d, "data")
    if inst[1] > dat[0] and dat[1] > inst[0]:
        raise HeadatlasError("the instruction and data share a token: separate them with a space")
    return PromptSpans(tuple(int(i) for i in enc["input_ids"]), inst, dat, layout)
