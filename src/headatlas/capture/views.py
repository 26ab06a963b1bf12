"""Views of one layer's attention that detectors read: dense blocks or exact sparse reads.

Detectors never need the whole T×T matrix: every score reads probabilities at a few relative
offsets (A[i, i-d]), at one key per sequence (the first token), or the row entropy. A view
answers exactly those questions:

- :class:`DenseView` from materialised probabilities (eager fallback, soft-capping, sinks, maps);
- :class:`LseView` from the query/key tensors and the per-row log-sum-exp returned by the fused
  attention kernel: ``A[i, j] = exp(scale * q_i·k_j - LSE_i)`` is exact in O(1) per entry, and the
  entropy is ``H_i = LSE_i - scale * q_i·(A K)_i`` where ``A K`` is one more fused attention call
  with the keys as values. No T×T buffer is ever built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch


class AttentionView(Protocol):
    """One layer's attention for a block of query rows (see module docstring).

    Attributes: ``layer``; ``q_index [query]`` key-axis index of each row; ``n_keys [batch,
    query]`` keys each row may attend to.
    """

    layer: int
    q_index: torch.Tensor
    n_keys: torch.Tensor

    def offsets(self, distances: Sequence[int]) -> torch.Tensor:
        """Return ``A[i, i - d]`` for each d, ``[batch, head, query, len(distances)]`` (0 outside)."""
        ...

    def at_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Return ``A[i, keys[b]]`` for one key index per sequence ``keys [batch]``, ``[batch, head, query]``."""
        ...

    def entropy(self) -> torch.Tensor:
        """Return the row entropy −Σ_j A log A in nats, ``[batch, head, query]``."""
        ...

    def last_row(self) -> torch.Tensor:
        """Return the probabilities of this view's last query row, ``[batch, head, key]``."""
        ...


def _offset_index(
    q_index: torch.Tensor, distances: Sequence[int], n_key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.as_tensor(list(distances), device=q_index.device, dtype=torch.long)  # [offset]
    keys = q_index[:, None] - d[None, :]  # [query, offset]
    inside = (keys >= 0) & (keys < n_key)  # [query, offset]
    return keys.clamp(0, n_key - 1), inside


BAND = 64
"""Offsets 0..BAND-1 are computed together (the distance profile and subword scores need them all)."""
BAND_ROWS = 128
"""Query rows per band block."""


class DenseView:
    """A view over materialised probabilities ``probs [batch, head, query, key]``."""

    def __init__(self, layer: int, probs: torch.Tensor, q_start: int, n_keys: torch.Tensor) -> None:
        self.layer = layer
        self.probs = probs
        self.n_keys = n_keys
        self.q_index = torch.arange(q_start, q_start + probs.shape[2], device=probs.device)

    def offsets(self, distances: Sequence[int]) -> torch.Tensor:
        batch, heads, n_query, n_key = self.probs.shape
        keys, inside = _offset_index(self.q_index, distances, n_key)  # [query, offset]
        index = keys[None, None].expand(batch, heads, n_query, keys.shape[1])  # [batch, head, query, offset]
        return self.probs.gather(-1, index) * inside  # [batch, head, query, offset]

    def at_keys(self, keys: torch.Tensor) -> torch.Tensor:
        batch, heads, n_query, _ = self.probs.shape
        index = keys.view(batch, 1, 1, 1).expand(batch, heads, n_query, 1)  # [batch, head, query, 1]
        return self.probs.gather(-1, index).squeeze(-1)  # [batch, head, query]

    def entropy(self) -> torch.Tensor:
        p = self.probs
        return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [batch, head, query]

    def last_row(self) -> torch.Tensor:
        return self.probs[:, :, -1]  # [batch, head, key]


class LseView:
    """Exact sparse reads from ``query``/``key`` and the fused kernel's log-sum-exp.

    Args:
        layer: layer index.
        query: ``[batch, head, query, d_head]``; key: ``[batch, kv_head, key, d_head]``.
        lse: ``[batch, head, query]`` natural-log log-sum-exp of the scaled, masked logits.
        scaling: logit scale.
        allowed: bool ``[batch, 1, query, key]`` mask, or ``None`` for plain causal/full attention.
        causal: whether keys after the query are blocked when ``allowed`` is ``None``.
        n_keys: ``[batch, query]``.
        keys_times_attention: computes ``A K`` ``[batch, head, query, d_head]`` on demand (entropy),
            with ``A`` normalised over the keys alone.
        row_mass: ``[batch, head, query]`` share of each row's mass on the keys when a learned sink
            takes the rest (then ``lse`` includes the sink), or ``None``.
    """

    def __init__(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        lse: torch.Tensor,
        scaling: float,
        allowed: torch.Tensor | None,
        causal: bool,
        n_keys: torch.Tensor,
        keys_times_attention: Callable[[], torch.Tensor],
        row_mass: torch.Tensor | None = None,
    ) -> None:
        self.layer = layer
        _batch, heads, n_query, _d_head = query.shape
        self.group = heads // key.shape[1]
        self.query = query.float()  # [batch, head, query, d_head]
        self.key = key.float()  # [batch, kv_head, key, d_head]
        self.lse = lse.float()  # [batch, head, query]
        self.scaling = scaling
        self.allowed = allowed
        self.causal = causal
        self.n_keys = n_keys
        self.q_index = torch.arange(key.shape[2] - n_query, key.shape[2], device=query.device)
        self._ak = keys_times_attention
        self.row_mass = row_mass
        self._cache: dict[int, torch.Tensor] = {}
        self._band_cache: torch.Tensor | None = None

    def _grouped_query(self) -> torch.Tensor:
        batch, heads, n_query, d_head = self.query.shape
        return self.query.view(batch, heads // self.group, self.group, n_query, d_head)

    def _allowed_at(self, keys: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Bool ``[batch, 1, query, offset]`` for key indices ``keys [query, offset]``."""
        if self.allowed is None:
            ok = inside & ((keys <= self.q_index[:, None]) | (not self.causal))  # [query, offset]
            return ok[None, None]
        batch = self.allowed.shape[0]
        index = keys[None, None].expand(batch, 1, *keys.shape)  # [batch, 1, query, offset]
        return self.allowed[:, :1].gather(-1, index) & inside  # [batch, 1, query, offset]

    def _one_offset(self, distance: int) -> torch.Tensor:
        if distance not in self._cache:
            n_key = self.key.shape[2]
            keys, inside = _offset_index(self.q_index, [distance], n_key)  # [query, 1]
            k = self.key.index_select(2, keys[:, 0])  # [batch, kv_head, query, d_head]
            logits = (self._grouped_query() * k[:, :, None]).sum(-1)  # [batch, kv_head, group, query]
            logits = logits.flatten(1, 2) * self.scaling  # [batch, head, query]
            allowed = self._allowed_at(keys, inside)[..., 0]  # [batch | 1, 1, query]
            probs = torch.exp(logits - self.lse)
            self._cache[distance] = torch.where(allowed, probs, torch.zeros_like(probs))
        return self._cache[distance]

    def _band(self) -> torch.Tensor:
        """Probabilities at offsets 0..BAND-1 for every row, ``[batch, head, query, BAND]``.

        Computed a block of query rows at a time as one matmul against the keys those rows can
        reach at these offsets, then gathered along the diagonals.
        """
        if self._band_cache is None:
            batch, heads, n_query, _ = self.query.shape
            width = BAND
            keys = torch.nn.functional.pad(
                self.key, (0, 0, width - 1, 0)
            )  # [batch, kv_head, width-1+key, d_head]
            grouped = self._grouped_query()  # [batch, kv_head, group, query, d_head]
            band = torch.empty(batch, heads, n_query, width, device=self.query.device)
            first = int(self.q_index[0])
            for r0 in range(0, n_query, BAND_ROWS):
                r1 = min(n_query, r0 + BAND_ROWS)
                k_win = keys[
                    :, :, first + r0 : first + r1 + width - 1
                ]  # [batch, kv_head, rows+width-1, d_head]
                logits = grouped[:, :, :, r0:r1] @ k_win[:, :, None].transpose(-1, -2)
                logits = logits.flatten(1, 2)  # [batch, head, rows, rows+width-1]
                rows = torch.arange(r1 - r0, device=band.device)
                col = (
                    rows[:, None] + (width - 1) - torch.arange(width, device=band.device)[None, :]
                )  # [rows, width]
                band[:, :, r0:r1] = logits.gather(-1, col[None, None].expand(batch, heads, r1 - r0, width))
            keys_idx, inside = _offset_index(self.q_index, range(width), self.key.shape[2])  # [query, width]
            allowed = self._allowed_at(keys_idx, inside)  # [batch | 1, 1, query, width]
            probs = torch.exp(band * self.scaling - self.lse[..., None])  # [batch, head, query, width]
            self._band_cache = torch.where(allowed, probs, torch.zeros_like(probs))
        return self._band_cache

    def offsets(self, distances: Sequence[int]) -> torch.Tensor:
        wanted = list(distances)
        if wanted and max(wanted) < BAND and min(wanted) >= 0:
            band = self._band()
            if wanted == list(range(wanted[0], wanted[-1] + 1)):
                return band[..., wanted[0] : wanted[-1] + 1]
            return band[..., wanted]
        return torch.stack([self._one_offset(d) for d in wanted], dim=-1)  # [batch, head, query, offset]

    def at_keys(self, keys: torch.Tensor) -> torch.Tensor:
        batch, kv_heads, _, d_head = self.key.shape
        index = keys.view(batch, 1, 1, 1).expand(batch, kv_heads, 1, d_head)
        k = self.key.gather(2, index)  # [batch, kv_head, 1, d_head]
        logits = (self._grouped_query() * k[:, :, None]).sum(-1).flatten(
            1, 2
        ) * self.scaling  # [batch, head, query]
        probs = torch.exp(logits - self.lse)  # [batch, head, query]
        q_ok = (
            keys.view(batch, 1) <= self.q_index[None, :]
            if self.causal
            else torch.ones_like(self.n_keys, dtype=torch.bool)
        )
        if self.allowed is not None:
            q_ok = self.allowed[:, 0].gather(
                -1, keys.view(batch, 1, 1).expand(batch, self.q_index.shape[0], 1)
            )[..., 0]
        return torch.where(q_ok[:, None], probs, torch.zeros_like(probs))

    def entropy(self) -> torch.Tensor:
        ak = self._ak().float()  # [batch, head, query, d_head]
        dot = (self.query * ak).sum(-1) * self.scaling  # [batch, head, query]
        ent = self.lse - dot  # [batch, head, query]
        if self.row_mass is not None:
            # With a sink, A'_j = m·A_j and log A'_j = scale·q·k_j − LSE', so H = m·(LSE' − dot).
            ent = self.row_mass * ent  # [batch, head, query]
        return torch.where(torch.isfinite(ent), ent, torch.zeros_like(ent)).clamp_min(0.0)

    def last_row(self) -> torch.Tensor:
        """``A[last, j] = exp(scale · q_last·k_j − LSE_last)`` for every key: one row, no T×T buffer."""
        batch, heads, _, _ = self.query.shape
        q = self._grouped_query()[:, :, :, -1]  # [batch, kv_head, group, d_head]
        logits = torch.einsum("bkgd,bktd->bkgt", q, self.key).reshape(batch, heads, -1)  # [batch, head, key]
        probs = torch.exp(logits * self.scaling - self.lse[:, :, -1, None])  # [batch, head, key]
        if self.allowed is not None:
            probs = torch.where(self.allowed[:, :1, -1], probs, torch.zeros_like(probs))
        elif self.causal:
            keys = torch.arange(self.key.shape[2], device=probs.device)  # [key]
            probs = torch.where(keys <= self.q_index[-1], probs, torch.zeros_like(probs))
        return torch.nan_to_num(probs, nan=0.0)
