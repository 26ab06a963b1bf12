"""A transformers v5 ``Cache`` whose layers really hold less: full KV heads keep every token,
streaming heads keep ``sink`` first tokens, a ring buffer of the ``recent`` last ones and
optionally one compensation token (the running mean of the dropped keys and values,
RazorAttention, Tang et al. 2024). Two-cache layout after DuoAttention (Xiao et al. 2024).

The attention over the two groups lives in :mod:`headatlas.apps.kv.backends.headwise`; this module holds
the tensors. Streaming slots are one preallocated buffer ``[batch, n_stream, sink + recent + 1,
d_head]`` (the last slot is the compensation token), so a long decode never grows it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .backends.headwise import PENDING

_BIG = 1 << 62


class HeadwiseLayer(CacheLayerMixin):
    """One layer: ``full_heads`` (KV head indices) keep every token, the others are streaming.

    ``streaming_prefill``: when true, streaming heads see only sink + window keys from the first
    token on (DuoAttention's way); when false, a prompt chunk is attended in full and compressed
    afterwards (kvpress's way). Decoding one token at a time is the same in both modes.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        n_kv_heads: int,
        group_size: int,
        full_heads: list[int],
        sink: int,
        recent: int,
        compensate: bool,
        streaming_prefill: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        full = sorted(set(full_heads))
        stream = [h for h in range(n_kv_heads) if h not in full]
        self.full_kv = torch.tensor(full, dtype=torch.long)
        self.stream_kv = torch.tensor(stream, dtype=torch.long)
        g = torch.arange(group_size)
        self.full_q = (self.full_kv[:, None] * group_size + g).reshape(-1)  # query heads of full KV heads
        self.stream_q = (self.stream_kv[:, None] * group_size + g).reshape(-1)
        self.n_full, self.n_stream, self.n_kv = len(full), len(stream), n_kv_heads
        self.sink, self.recent, self.compensate = sink, recent, compensate
        self.streaming_prefill = streaming_prefill
        self.count = 0  # tokens seen (padding included)
        self.pointer = 0  # next ring slot to overwrite (the oldest)
        self.sinks_full = False
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- transformers' layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the streaming buffer (``[batch, n_stream, sink + recent + 1, d_head]``) and empty full keys."""
        batch, _, _, d_k = key_states.shape
        d_v = value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        slots = self.sink + self.recent + 1
        self.keys = key_states.new_empty(batch, self.n_full, 0, d_k)  # full heads [batch, n_full, key, d]
        self.values = value_states.new_empty(batch, self.n_full, 0, d_v)
        self.s_keys = key_states.new_zeros(batch, self.n_stream, slots, d_k)  # streaming slots
        self.s_values = value_states.new_zeros(batch, self.n_stream, slots, d_v)
        self.s_pos = torch.full((batch, slots - 1), -1, dtype=torch.long)  # absolute position, -1 empty
        self.comp_n = torch.zeros(batch)  # tokens averaged into the compensation slot
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the full heads' new keys/values, hold the streaming heads' ones until attention
        (:meth:`commit`); return the full heads' ``[batch, n_full, key, d_head]`` keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.n_stream == 0:
            new_k, new_v = key_states, value_states
        else:
            new_k = key_states.index_select(1, self.full_kv.to(key_states.device))
            new_v = value_states.index_select(1, self.full_kv.to(value_states.device))
            stream = self.stream_kv.to(key_states.device)
            self.pending = (key_states.index_select(1, stream), value_states.index_select(1, stream))
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        self.keys = torch.cat([self.keys, new_k], dim=-2)
        self.values = torch.cat([self.values, new_v], dim=-2)
        PENDING.set(self)
        if self.n_stream == 0:
            self.count += key_states.shape[-2]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the full heads' mask: every token seen plus the new ones."""
        return self.count + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (the position of the next token)."""
        return self.count

    def get_max_length(self) -> int:
        """No maximum: full heads grow."""
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every held tensor along the batch for beam search."""
        if self.is_initialized:
            for name in ("keys", "values", "s_keys", "s_values"):
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))
            self.s_pos = self.s_pos.index_select(0, beam_idx.cpu())
            self.comp_n = self.comp_n.index_select(0, beam_idx.cpu())

    def nbytes(self) -> int:
        """Bytes of the tensors this layer holds (full keys/values, streaming slots, positions)."""
        if not self.is_initialized:
            return 0
        held = (self.keys, self.values, self.s_keys, self.s_values, self.s_pos, self.comp_n)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    # --- the streaming heads, called by the attention backend ----------------------------------
    def _valid(self) -> torch.Tensor:
        """``[batch, slots]`` bool: which streaming slots hold a token (the last: compensation)."""
        return torch.cat([self.s_pos >= 0, (self.comp_n > 0)[:, None]], dim=1)

    def streaming_keys(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values and ``[batch, query, key]`` mask of the streaming heads for the pending tokens.

        ``real [batch, query]`` marks the new tokens that are not padding. One real-token decode
        step with full sinks writes the token into the ring first (evicting the oldest) and
        attends over the buffer; otherwise (a prompt chunk) the buffer and the new tokens are
        attended together and :meth:`commit` stores them.
        """
        if self.pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: streaming_keys without a pending update")
        new_k, new_v = self.pending  # [batch, n_stream, query, d]
        q_len = new_k.shape[-2]
        if q_len == 1 and self.sinks_full:
            self._write_ring(new_k, new_v, torch.where(real[:, 0], self.count, -1))
            return self.s_keys, self.s_values, self._valid()[:, None, :]
        self._choose_sinks(real)
        new_pos = torch.arange(self.count, self.count + q_len)  # [query]
        allowed_new = (new_pos[None, :, None] >= new_pos[None, None, :]) & real[:, None, :]  # [b, q, k]
        allowed_old = self._valid()[:, None, :].expand(-1, q_len, -1).clone()  # [batch, query, slots]
        if self.streaming_prefill:
            window_new = (new_pos[:, None] - new_pos[None, :]) < self.recent  # [query, key]
            allowed_new &= window_new[None] | self._new_sink[:, None, :]
            ring = self.s_pos[:, self.sink :]  # [batch, recent]
            in_window = (new_pos[None, :, None] - ring[:, None, :]) < self.recent  # [batch, query, recent]
            allowed_old[:, :, self.sink : self.sink + self.recent] &= in_window
        keys = torch.cat([self.s_keys, new_k], dim=-2)  # [batch, n_stream, slots + query, d]
        values = torch.cat([self.s_values, new_v], dim=-2)
        return keys, values, torch.cat([allowed_old, allowed_new], dim=-1)

    def commit(self, real: torch.Tensor) -> None:
        """Store the pending tokens: new sinks, then the ring keeps the ``recent`` last positions;
        evicted real tokens go into the compensation mean when ``compensate`` is on."""
        if self.pending is None:
            raise RuntimeError(f"layer {self.layer_idx}: commit without a pending update")
        new_k, new_v = self.pending
        q_len = new_k.shape[-2]
        self.pending = None
        if q_len == 1 and self.sinks_full:
            self.count += 1
            return
        new_pos = torch.arange(self.count, self.count + q_len)  # [query]
        # sinks: per row, the first `sink` real tokens among the old sinks and the new tokens
        cand_k = torch.cat([self.s_keys[:, :, : self.sink], new_k], dim=-2)  # [batch, n, sink + q, d]
        cand_v = torch.cat([self.s_values[:, :, : self.sink], new_v], dim=-2)
        cand_pos = torch.cat([self.s_pos[:, : self.sink], torch.where(real, new_pos, -1)], dim=1)
        order = self._sink_order  # [batch, sink] indices into the candidates
        pos = cand_pos.gather(1, order)
        idx = order[:, None, :, None].to(cand_k.device)
        sink_k = cand_k.gather(2, idx.expand(-1, self.n_stream, -1, cand_k.shape[-1]))
        sink_v = cand_v.gather(2, idx.expand(-1, self.n_stream, -1, cand_v.shape[-1]))
        # ring: chronological old ring, then the new tokens that are not sinks; keep the last `recent`
        roll = (self.pointer + torch.arange(self.recent)) % self.recent + self.sink  # [recent]
        ring_pos = torch.where(real & ~self._new_sink, new_pos, -1)  # [batch, query]
        all_pos = torch.cat([self.s_pos[:, roll], ring_pos], dim=1)  # [batch, recent + query]
        all_k = torch.cat([self.s_keys[:, :, roll], new_k], dim=-2)
        all_v = torch.cat([self.s_values[:, :, roll], new_v], dim=-2)
        if self.compensate:
            self._absorb(all_k[:, :, :q_len], all_v[:, :, :q_len], all_pos[:, :q_len] >= 0)
        self.s_keys[:, :, : self.sink] = sink_k
        self.s_values[:, :, : self.sink] = sink_v
        self.s_pos[:, : self.sink] = pos
        self.s_keys[:, :, self.sink : self.sink + self.recent] = all_k[:, :, q_len:]
        self.s_values[:, :, self.sink : self.sink + self.recent] = all_v[:, :, q_len:]
        self.s_pos[:, self.sink :] = all_pos[:, q_len:]
        self.pointer = 0
        self.count += q_len
        self.sinks_full = bool((self.s_pos[:, : self.sink] >= 0).all())

    def _choose_sinks(self, real: torch.Tensor) -> None:
        """Pick, per row, the first ``sink`` real tokens among old sinks and new tokens (by position)."""
        q_len = real.shape[1]
        new_pos = torch.arange(self.count, self.count + q_len)
        cand = torch.cat([self.s_pos[:, : self.sink], torch.where(real, new_pos, -1)], dim=1)
        key = torch.where(cand >= 0, cand, _BIG)  # [batch, sink + query]
        order = key.argsort(dim=1, stable=True)[:, : self.sink]  # [batch, sink]
        chosen = torch.zeros_like(cand, dtype=torch.bool).scatter_(1, order, True)
        self._sink_order = order
        self._new_sink = chosen[:, self.sink :] & real  # [batch, query]

    def _write_ring(self, new_k: torch.Tensor, new_v: torch.Tensor, pos: torch.Tensor) -> None:
        """Overwrite the oldest ring slot with one token (``new_k [batch, n, 1, d]``, ``pos [batch]``)."""
        slot = self.sink + self.pointer
        if self.compensate:
            self._absorb(
                self.s_keys[:, :, slot : slot + 1],
                self.s_values[:, :, slot : slot + 1],
                self.s_pos[:, slot : slot + 1] >= 0,
            )
        self.s_keys[:, :, slot : slot + 1] = new_k
        self.s_values[:, :, slot : slot + 1] = new_v
        self.s_pos[:, slot] = pos
        self.pointer = (self.pointer + 1) % self.recent

    def _absorb(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Fold dropped tokens (``k``/``v [batch, n, m, d]``, ``valid [batch, m]``) into the compensation mean."""
        w = valid.to(k.dtype).to(k.device)[:, None, :, None]  # [batch, 1, m, 1]
        added = valid.sum(1).to(self.comp_n.dtype)  # [batch]
        total = self.comp_n + added
        denom = total.clamp_min(1).to(k.dtype).to(k.device)[:, None, None, None]
        n_old = self.comp_n.to(k.dtype).to(k.device)[:, None, None, None]
        self.s_keys[:, :, -1:] = (self.s_keys[:, :, -1:] * n_old + (k * w).sum(2, keepdim=True)) / denom
        self.s_values[:, :, -1:] = (self.s_values[:, :, -1:] * n_old + (v * w).sum(2, keepdim=True)) / denom
        self.comp_n = total


class SpanLayer(CacheLayerMixin):
    """One layer whose streaming KV heads each keep their own window (MoA, Fu et al. 2024).

    ``windows[k]`` is KV head ``k``'s window (``None``: the head keeps every token). Full heads
    grow as in :class:`HeadwiseLayer`; the streaming heads that share a window form one group, a
    :class:`HeadwiseLayer` of their own with no full head, so each group is one ring buffer
    ``[batch, heads in group, sink + window + 1, d_head]`` and nothing is padded to a longer window.
    The attention backend runs each group (``groups``: KV heads, query heads, ring) on its own.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        group_size: int,
        windows: list[int | None],
        sink: int,
        compensate: bool,
        streaming_prefill: bool = False,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        g = torch.arange(group_size)
        self.full_kv = torch.tensor([k for k, w in enumerate(windows) if w is None], dtype=torch.long)
        self.full_q = (self.full_kv[:, None] * group_size + g).reshape(-1)  # query heads of full KV heads
        self.n_full, self.n_kv = len(self.full_kv), len(windows)
        self.n_stream = self.n_kv - self.n_full
        self.count = 0
        by_window: dict[int, list[int]] = {}
        for k, w in enumerate(windows):
            if w is not None:
                by_window.setdefault(w, []).append(k)
        self.groups: list[tuple[torch.Tensor, torch.Tensor, HeadwiseLayer]] = []
        for w, heads in sorted(by_window.items()):
            kv = torch.tensor(heads, dtype=torch.long)
            ring = HeadwiseLayer(
                layer_idx, len(heads), group_size, [], sink, w, compensate, streaming_prefill
            )
            self.groups.append((kv, (kv[:, None] * group_size + g).reshape(-1), ring))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Empty full keys/values ``[batch, n_full, 0, d_head]`` (the rings allocate their own)."""
        batch, _, _, d_k = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(batch, self.n_full, 0, d_k)
        self.values = value_states.new_empty(batch, self.n_full, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the full heads' new keys/values, hand each group its heads' new ones (held until
        attention); return the full heads' ``[batch, n_full, key, d_head]`` keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full = self.full_kv.to(key_states.device)
        assert self.keys is not None and self.values is not None  # set by lazy_initialization
        self.keys = torch.cat([self.keys, key_states.index_select(1, full)], dim=-2)
        self.values = torch.cat([self.values, value_states.index_select(1, full)], dim=-2)
        for kv, _, ring in self.groups:
            idx = kv.to(key_states.device)
            ring.update(key_states.index_select(1, idx), value_states.index_select(1, idx))
        self.count += key_states.shape[-2]
        PENDING.set(self)
        return self.keys, self.values

    def compress(self, real: torch.Tensor) -> None:
        """Store the pending tokens of every group without attending (``real [batch, query]``)."""
        for _, _, ring in self.groups:
            ring.streaming_keys(real)
            ring.commit(real)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the full heads' mask: every token seen plus the new ones."""
        return self.count + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far."""
        return self.count

    def get_max_length(self) -> int:
        """No maximum: full heads grow."""
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every held tensor along the batch for beam search."""
        if self.is_initialized:
            assert self.keys is not None and self.values is not None  # set by lazy_initialization
            self.keys = self.keys.index_select(0, beam_idx.to(self.device))
            self.values = self.values.index_select(0, beam_idx.to(self.device))
            for _, _, ring in self.groups:
                ring.reorder_cache(beam_idx)

    def nbytes(self) -> int:
        """Bytes of the full heads' keys/values and of every group's ring (slots and positions)."""
        if not self.is_initialized:
            return 0
        own = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return own + sum(ring.nbytes() for _, _, ring in self.groups)

    def slots(self) -> list[int]:
        """Per KV head, the slots its ring holds (``sink + window + 1``; 0 for a full head)."""
        out = [0] * self.n_kv
        for kv, _, ring in self.groups:
            for k in kv.tolist():
                out[k] = ring.sink + ring.recent + 1
        return out


def layer_nbytes(layer: Any) -> int:
    """Bytes of the tensors a cache layer holds (``keys``/``values`` for transformers' own layers)."""
    if isinstance(layer, HeadwiseLayer | SpanLayer):
        return layer.nbytes()
    held = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
    return sum(t.numel() * t.element_size() for t in held)


class HeadwiseCache(Cache):
    """A ``Cache`` of :class:`HeadwiseLayer` (global layers) and transformers' sliding layers."""

    def __init__(self, layers: list[Any]) -> None:
        super().__init__(layers=layers)

    def nbytes(self, per_layer: bool = False) -> int | list[int]:
        """Bytes of every tensor the cache holds now (an int, or one per layer with ``per_layer``)."""
        sizes = [layer_nbytes(layer) for layer in self.layers]
        return sizes if per_layer else sum(sizes)

    def streaming_lengths(self) -> list[int]:
        """Per layer, the streaming slots held (``sink + recent + 1``; 0 for layers without streaming
        heads; a :class:`SpanLayer`'s longest ring)."""
        return [
            int(layer.s_keys.shape[-2])
            if isinstance(layer, HeadwiseLayer) and layer.is_initialized
            else max(layer.slots(), default=0)
            if isinstance(layer, SpanLayer)
            else 0
            for layer in self.layers
        ]


def plain_layers(config: Any) -> list[Any]:
    """transformers' own dynamic layers for ``config`` (full or sliding per layer), for comparison."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    window = getattr(text, "sliding_window", None)
    return [
        DynamicSlidingWindowLayer(window) if t == "sliding_attention" and window else DynamicLayer()
        for t in types
    ]
