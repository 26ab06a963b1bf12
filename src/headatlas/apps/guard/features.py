"""What the guard reads from one forward pass: each head's last-row attention to the instruction
and to the data, and the last token's residual stream.

Only the last prompt position's attention row is needed per layer. On the fast capture path it is
``exp(scale · q_last·Kᵀ − LSE_last)`` (:meth:`~headatlas.capture.views.LseView.last_row`), exact,
from the fused kernel's log-sum-exp: scoring costs about one plain forward pass, with no eager
attention and no T×T probability buffer (GQA, padding and sliding windows come from the model's
own mask, as in every capture).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...capture import AttentionView, capture, padded_positions
from ...core.errors import HeadatlasError, param
from ...model.info import LoadedModel
from .spans import PromptSpans, prompt_spans

EPS = 1e-8
"""Added to the denominator of the focus ratio, as Attention Tracker does."""


@dataclass(frozen=True)
class Features:
    """Per-row guard features.

    Attributes:
        focus: ``[row, layer, head]`` s = A(instruction) / (A(instruction) + A(data)) at the last
            prompt position (Hung et al. 2024).
        residual: ``[row, layer + 1, d_model]`` the last token's hidden states (embeddings first),
            or ``None`` when not asked for.
        data_tokens: ``[row]`` tokens in the data span (the length baseline).
    """

    focus: np.ndarray
    residual: np.ndarray | None
    data_tokens: np.ndarray

    def take(self, index: np.ndarray) -> Features:
        """Return the rows at ``index``."""
        residual = None if self.residual is None else self.residual[index]
        return Features(self.focus[index], residual, self.data_tokens[index])


def context_length(loaded: LoadedModel) -> int | None:
    """Return the longest prompt the model takes (``max_position_embeddings``), if it says."""
    config = loaded.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text, "max_position_embeddings", None)
    return int(length) if isinstance(length, int) else None


def encode(loaded: LoadedModel, instruction: str, data: str) -> PromptSpans:
    """Return the prompt spans of one row; a prompt longer than the context is an error (never truncated)."""
    if not loaded.info.causal:
        raise HeadatlasError(f"{loaded.info.name} is an encoder: the guard needs a causal (chat) model")
    spans = prompt_spans(loaded.tokenizer, instruction, data)
    limit = context_length(loaded)
    if limit is not None and len(spans.ids) > limit:
        raise HeadatlasError(
            f"the prompt is {len(spans.ids)} tokens but {loaded.info.name} takes at most {limit}: "
            f"shorten {param('data')} (the guard never truncates)"
        )
    return spans


def _batch(
    prompts: Sequence[PromptSpans], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``ids, mask [batch, seq]`` and float span masks ``instruction, data [batch, seq]``."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    inst = torch.zeros(len(prompts), width)
    data = torch.zeros(len(prompts), width)
    for row, p in enumerate(prompts):
        pad = width - len(p.ids)
        ids[row, pad:] = torch.tensor(p.ids)
        mask[row, pad:] = 1
        inst[row, pad + p.instruction[0] : pad + p.instruction[1]] = 1.0
        data[row, pad + p.data[0] : pad + p.data[1]] = 1.0
    return ids, mask, inst, data


def _pad_id(loaded: LoadedModel) -> int:
    tok = loaded.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if isinstance(candidate, int):
            return candidate
    return 0


def forward_batch(
    loaded: LoadedModel, prompts: Sequence[PromptSpans], residual: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Run one left-padded batch; return focus ``[batch, layer, head]`` and residual ``[batch, layer+1, d]``."""
    ids, mask, inst, data = _batch(prompts, _pad_id(loaded))
    device = loaded.device
    inst, data = inst.to(device), data.to(device)
    sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(view: AttentionView) -> None:
        if int(view.q_index[-1]) != ids.shape[1] - 1:
            return  # a dense block that does not hold the last row
        row = view.last_row().float()  # [batch, head, key]
        a_inst = (row * inst[:, None, : row.shape[-1]]).sum(-1)  # [batch, head]
        a_data = (row * data[:, None, : row.shape[-1]]).sum(-1)  # [batch, head]
        sums[view.layer] = (a_inst.cpu(), a_data.cpu())

    hidden: np.ndarray | None = None
    with capture(loaded, keep) as session:
        if residual and not session.fallback:
            out = session.forward(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                output_hidden_states=True,
                logits_to_keep=1,
                **padded_positions(loaded.model, mask.to(device)),
            )
            stack = torch.stack([h[:, -1] for h in out.hidden_states], dim=1)  # [batch, layer+1, d]
            hidden = stack.float().cpu().numpy()
        else:
            session.run(ids, mask, with_head=False)
    if len(sums) != loaded.info.n_layers:
        raise HeadatlasError(f"capture saw {len(sums)} of {loaded.info.n_layers} layers' last rows")
    a_inst = torch.stack([sums[layer][0] for layer in sorted(sums)], dim=1)  # [batch, layer, head]
    a_data = torch.stack([sums[layer][1] for layer in sorted(sums)], dim=1)  # [batch, layer, head]
    return (a_inst / (a_inst + a_data + EPS)).numpy(), hidden


def extract(
    loaded: LoadedModel,
    prompts: Sequence[PromptSpans],
    batch_size: int = 8,
    residual: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Return the :class:`Features` of ``prompts``, batched (``progress(done, total)`` after each batch).

    Batches are left-padded; each row's result equals scoring it alone.
    """
    if batch_size < 1:
        raise HeadatlasError(f"{param('batch_size')} must be at least 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k].ids))  # similar lengths together
    focus: list[np.ndarray] = [np.empty(0)] * len(prompts)
    hidden: list[np.ndarray | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        f, h = forward_batch(loaded, [prompts[k] for k in chunk], residual)
        for j, k in enumerate(chunk):
            focus[k] = f[j]
            hidden[k] = None if h is None else h[j]
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    tokens = np.array([p.data[1] - p.data[0] for p in prompts], dtype=np.float64)
    stacked = None if not residual or any(h is None for h in hidden) else np.stack(hidden)  # type: ignore[arg-type]
    return Features(np.stack(focus), stacked, tokens)
