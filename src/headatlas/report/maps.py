"""Attention maps of a text: encode it as a scan would, run capture, keep the requested layers.

Long texts stay bounded in memory: with ``tile`` each layer's maps are max-pooled to at most
``tile × tile`` cells block by block as the layer streams out of capture (max, not mean, so a
one-token stripe such as an induction diagonal stays visible).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..batteries.base import ProbeSequence, make_batch, pad_id
from ..capture import AttentionView, DenseView, capture
from ..core.errors import HeadatlasError, param
from ..core.heads import check_heads, check_layer
from ..data.sequences import encode_words, read_utf8, sequence_frame
from ..data.sequences import token_strings as decoded_tokens
from ..model.info import LoadedModel


class TextTooLong(HeadatlasError):
    """The text has more tokens than allowed."""


@dataclass
class TextAttention:
    """A text's tokens and the attention of some layers on it.

    ``maps[layer]`` is ``[head, query, key]`` float32; when ``pool > 1`` each axis was max-pooled
    by ``pool`` (so the map is ``ceil(T / pool)`` square and ``tokens`` has T entries).
    """

    ids: list[int]
    tokens: list[str]
    maps: dict[int, np.ndarray] = field(default_factory=dict)
    pool: int = 1


def read_text(text: str | None, text_file: str | Path | None) -> str:
    """Return the text given directly or read from ``text_file`` (UTF-8); exactly one must be given."""
    if (text is None) == (text_file is None):
        raise HeadatlasError("give the text with --text or --text-file (one of them)")
    if text_file is not None:
        text = read_utf8(text_file)
    if text is None or not text.strip():
        raise HeadatlasError("the text is empty: give some text")
    return text


def encode_text(loaded: LoadedModel, text: str, max_tokens: int | None = None) -> list[int]:
    """Return the token ids a scan would use for ``text``: framed as the tokenizer frames a text
    (:mod:`headatlas.data.sequences`; BOS only where the tokenizer adds one, [CLS] … [SEP] for BERT).

    Raises :class:`HeadatlasError` for empty text or more than ``max_tokens`` (or the context).
    """
    if not text.strip():
        raise HeadatlasError("the text is empty: give some text")
    body, _words = encode_words(loaded.tokenizer, text)
    if not body:
        raise HeadatlasError("the text encodes to no tokens: give text the tokenizer can read")
    ids, _ = sequence_frame(loaded.tokenizer).wrap(body)
    limit = loaded.info.context_length
    if max_tokens is not None:
        limit = max_tokens if limit is None else min(limit, max_tokens)
    if limit is not None and len(ids) > limit:
        raise TextTooLong(f"the text is {len(ids)} tokens, over the limit of {limit}: shorten it")
    return ids


def token_strings(loaded: LoadedModel, ids: list[int]) -> list[str]:
    """Return each token id decoded on its own (what the examples and labels show)."""
    return decoded_tokens(loaded.tokenizer, ids)


def max_pool(maps: np.ndarray, factor: int, axis: int) -> np.ndarray:
    """Return ``maps`` max-pooled by ``factor`` along ``axis`` (zero-padded at the end); a new array."""
    if factor <= 1:
        return np.array(maps, copy=True)
    length = maps.shape[axis]
    out_len = math.ceil(length / factor)
    pad = [(0, 0)] * maps.ndim
    pad[axis] = (0, out_len * factor - length)
    padded = np.pad(maps, pad)
    shape = list(padded.shape)
    shape[axis : axis + 1] = [out_len, factor]
    return padded.reshape(shape).max(axis=axis + 1)


def layer_maps(
    loaded: LoadedModel, ids: list[int], layers: set[int] | None = None, tile: int | None = None
) -> tuple[dict[int, np.ndarray], int]:
    """Return ``({layer: [head, query, key]}, pool)`` for one sequence ``ids``.

    Only ``layers`` are kept (all when ``None``). With ``tile`` and more than ``tile`` tokens both
    axes are max-pooled by ``pool = ceil(T / tile)`` while the layer streams (memory stays
    ``heads × T × T / pool`` per kept layer).
    """
    n = len(ids)
    pool = 1 if tile is None or n <= tile else math.ceil(n / tile)
    rows: dict[int, list[np.ndarray]] = {}

    def keep(view: AttentionView) -> None:
        if not isinstance(view, DenseView) or (layers is not None and view.layer not in layers):
            return
        block = view.probs[0].detach().to(torch.float32).cpu().numpy()  # [head, block, key]
        rows.setdefault(view.layer, []).append(max_pool(block, pool, axis=2))

    batch = make_batch([ProbeSequence(tuple(ids))], pad_id(loaded.tokenizer))
    with capture(loaded, keep, mode="dense") as session:
        session.run(batch.input_ids, batch.attention_mask, with_head=False)
    out = {
        layer: max_pool(np.concatenate(parts, axis=1), pool, axis=1) for layer, parts in sorted(rows.items())
    }
    return out, pool


def text_attention(
    loaded: LoadedModel,
    text: str,
    layers: set[int] | None = None,
    max_tokens: int | None = None,
    tile: int | None = None,
) -> TextAttention:
    """Encode ``text`` (see :func:`encode_text`) and return its :class:`TextAttention` for ``layers``."""
    for layer in sorted(layers or ()):
        check_layer(layer, loaded.info.n_layers)
    ids = encode_text(loaded, text, max_tokens)
    maps, pool = layer_maps(loaded, ids, layers, tile)
    return TextAttention(ids, token_strings(loaded, ids), maps, pool)


def check_head(loaded: LoadedModel, layer: int | None, head: int | None) -> None:
    """Raise :class:`HeadatlasError` unless ``(layer, head)`` names a head (``head`` alone is refused)."""
    info = loaded.info
    if head is not None and layer is None:
        raise HeadatlasError(f"{param('head')} needs {param('layer')} too")
    if layer is not None:
        check_layer(layer, info.n_layers)
    if layer is not None and head is not None:
        check_heads([(layer, head)], info.n_layers, info.n_heads)
