"""Direct logit attribution of one head's output: which vocabulary logits a head pushes up or down.

A head's contribution to the residual stream at one position is ``c = W_O[:, h] z_h`` (its slice
of the attention output projection applied to its output ``z_h``). Read out through the final
norm and the unembedding, it changes the logits by ``W_U (g ⊙ c) / s`` where ``g`` is the norm's
gain and ``s`` the per-position scale of the final residual (RMS or std); a LayerNorm also
centres ``c``. Gemma 2/3 normalise the attention output before the residual (a sandwich norm),
which adds that norm's gain. This is the direct path of Elhage et al. 2021 ("A Mathematical
Framework for Transformer Circuits"), with the final norm frozen as is usual.

Every score here is a **z-score over the vocabulary**: a token's logit change minus the mean
change over all tokens, divided by the standard deviation over all tokens. It is invariant to the
per-position scale ``s`` (and to any positive scale of ``c``), so it needs no second pass, and it
is comparable across heads, layers and models. The mean and variance over the vocabulary come
from the unembedding's row mean ``μ`` and covariance ``Σ``: ``mean = μ·u``, ``var = uᵀ Σ u``.
Final-logit soft-capping (Gemma) is monotone and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import output_projections, output_weight
from ..core.errors import HeadatlasError
from ..model.archs import arch_spec
from ..model.info import LoadedModel


@dataclass(frozen=True)
class LogitLens:
    """The linear read-out of head outputs into vocabulary logits (see module docstring).

    Attributes:
        readout: per layer, ``W'_h [head, d_head, d_model]``: head ``h``'s output ``z_h`` moves the
            (centred, gain-scaled) final residual by ``z_h @ W'_h`` — its slice of the output
            projection with the attention-output norm's gain (Gemma), the final LayerNorm's centring
            and the final norm's gain folded in.
        gram: per layer, ``W'_h Σ W'_hᵀ [head, d_head, d_head]``, so the variance over the
            vocabulary of the logit change of ``z_h`` is ``z_hᵀ gram_h z_h``.
        unembed: the unembedding ``[vocab, d_model]`` (not copied).
        mean: the unembedding's row mean ``μ [d_model]``.
    """

    readout: dict[int, torch.Tensor]
    gram: dict[int, torch.Tensor]
    unembed: torch.Tensor
    mean: torch.Tensor


def _norm_gain(module: torch.nn.Module, d_model: int) -> tuple[torch.Tensor, bool]:
    """Return ``(gain [d_model], centres)`` of a LayerNorm/RMSNorm-like module."""
    bias = getattr(module, "bias", None)
    weight = getattr(module, "weight", None)
    if isinstance(module, torch.nn.LayerNorm) or (bias is not None and weight is not None):
        gain = weight.detach().float() if weight is not None else torch.ones(d_model)
        return gain, True
    # RMSNorm variants (incl. Gemma's 1 + w): the output for an all-ones input is the gain
    # (its RMS is 1; the epsilon only rescales every element alike, which z-scores ignore).
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        gain = module(torch.ones(1, d_model, device=device, dtype=dtype))[0].float()  # [d_model]
    return gain, False


def logit_lens(loaded: LoadedModel) -> LogitLens:
    """Return the :class:`LogitLens` of ``loaded``; raise :class:`HeadatlasError` without an LM head.

    Direct logit attribution (Elhage et al. 2021). Per-layer head counts of pruned checkpoints are
    not supported.
    """
    model = loaded.model
    info = loaded.info
    unembed_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed_module is None or not info.causal:
        raise HeadatlasError(
            f"{info.name} has no causal LM head: this battery reads head outputs as next-token logits, "
            "give a decoder language model"
        )
    spec = arch_spec(info.arch)
    base = model.base_model
    final = next((getattr(base, n) for n in spec.final_norm if hasattr(base, n)), None)
    unembed = unembed_module.weight.detach()  # [vocab, d_model]
    d_model = int(unembed.shape[1])
    if final is None:
        gain, center = torch.ones(d_model), False
    else:
        gain, center = _norm_gain(final, d_model)
    out_gain: dict[int, torch.Tensor] = {}
    if spec.attn_out_norm is not None:
        for layer, block in enumerate(getattr(base, "layers", None) or []):
            norm = getattr(block, spec.attn_out_norm, None)
            if norm is not None:
                out_gain[layer] = _norm_gain(norm, d_model)[0]
    with torch.no_grad():
        u = unembed.float()  # [vocab, d_model]
        mean = u.mean(0)  # [d_model]
        cov = (u.t() @ u) / u.shape[0] - torch.outer(mean, mean)  # [d_model, d_model]
        readout: dict[int, torch.Tensor] = {}
        gram: dict[int, torch.Tensor] = {}
        for layer, proj in output_projections(loaded).items():
            weight = output_weight(proj).float()  # [d_model, head * d_head]
            if weight.shape != (d_model, info.n_heads * info.head_dim):
                raise HeadatlasError(
                    f"layer {layer}'s output projection is {tuple(weight.shape)}, not "
                    f"({d_model}, {info.n_heads} × {info.head_dim}): pruned or unusual models are not supported here"
                )
            w = weight.t().reshape(info.n_heads, info.head_dim, d_model)  # [head, d_head, d_model]
            if layer in out_gain:
                w = w * out_gain[layer]
            if center:
                w = w - w.mean(-1, keepdim=True)
            w = w * gain  # [head, d_head, d_model]
            readout[layer] = w.to(unembed.device)
            gram[layer] = (w @ cov @ w.transpose(1, 2)).to(unembed.device)  # [head, d_head, d_head]
    return LogitLens(readout, gram, unembed, mean.to(unembed.device))


def project_rows(lens: LogitLens, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """Project residual-space rows onto each head's output space: ``rows [..., d_model]`` →
    ``[..., head, d_head]`` with ``out[..., h, :] = W'_h rows``, so ``z_h · out_h = rows · (z_h W'_h)``."""
    return torch.einsum("...m,hdm->...hd", rows.float(), lens.readout[layer])  # [..., head, d_head]


def logit_std(lens: LogitLens, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Return the std over the vocabulary of the logit change of head outputs ``z [..., head, d_head]``
    → ``[..., head]``: ``sqrt(z_hᵀ W'_h Σ W'_hᵀ z_h)``."""
    zf = z.float()
    var = torch.einsum("...hd,hde,...he->...h", zf, lens.gram[layer], zf)  # [..., head]
    return var.clamp_min(1e-24).sqrt()


def centered_rows(lens: LogitLens, tokens: torch.Tensor) -> torch.Tensor:
    """Return the centred unembedding rows ``W_U[t] − μ``, ``tokens [...]`` → ``[..., d_model]``."""
    return lens.unembed[tokens].float() - lens.mean
