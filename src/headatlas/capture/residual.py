"""The final residual stream: what the norm before the LM head reads, and the per-position scale it
divides by — what direct logit attribution in logit units needs (Elhage et al. 2021, "A Mathematical
Framework for Transformer Circuits": the direct path of a head is ``W_U · norm(c_h)`` with the final
norm's scale frozen at its value on the real residual).

``hidden_states[-1]`` of a Hugging Face model is already normed, so the residual itself is read
here, by the one forward pre-hook on the final norm.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import HeadatlasError
from ..model.archs import arch_spec
from ..model.info import LoadedModel, check_loaded


def final_norm(loaded: LoadedModel) -> torch.nn.Module:
    """Return the norm applied before the LM head; raise :class:`HeadatlasError` if there is none."""
    spec = arch_spec(check_loaded(loaded).info.arch)
    base = loaded.model.base_model
    found = next((getattr(base, name) for name in spec.final_norm if hasattr(base, name)), None)
    if not isinstance(found, torch.nn.Module):
        raise HeadatlasError(f"cannot find the final norm of a {loaded.info.arch!r} model")
    return found


def norm_scale(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return the per-position scale ``s`` a LayerNorm / RMSNorm divides ``x [..., d_model]`` by, ``[...]``.

    Read from the module itself, whatever its epsilon or gain convention: with ``g`` its gain and
    ``P`` its centring (LayerNorm) or the identity (RMSNorm), ``norm(x) − b = g ⊙ P x / s``, so
    ``s = ‖g ⊙ P x‖ / ‖norm(x) − b‖``.
    """
    xf = x.float()
    bias = getattr(norm, "bias", None)
    weight = getattr(norm, "weight", None)
    centres = isinstance(norm, torch.nn.LayerNorm) or (bias is not None and weight is not None)
    with torch.no_grad():
        normed = norm(x).float()  # [..., d_model]
        ones = torch.ones(1, x.shape[-1], dtype=x.dtype, device=x.device)
        gain = (
            norm(ones)[0].float() if not centres else (weight.detach().float() if weight is not None else 1.0)
        )
    if centres:
        xf = xf - xf.mean(-1, keepdim=True)
        if bias is not None:
            normed = normed - bias.detach().float()
    return (gain * xf).norm(dim=-1) / normed.norm(dim=-1).clamp_min(1e-30)  # [...]


@dataclass
class ResidualTap:
    """What :func:`final_residual` yields: the last forward pass's final residual."""

    value: torch.Tensor | None = None
    """``[batch, seq, d_model]``: the input of the final norm (detached)."""
    norm: torch.nn.Module | None = field(default=None, repr=False)
    """The final norm module."""

    def scale(self) -> torch.Tensor:
        """Return the final norm's per-position scale ``[batch, seq]`` on the recorded residual."""
        if self.value is None or self.norm is None:
            raise HeadatlasError("no forward pass has run inside final_residual() yet")
        return norm_scale(self.norm, self.value)


@contextmanager
def final_residual(loaded: LoadedModel) -> Iterator[ResidualTap]:
    """Within the ``with`` block, record the input of the final norm on each forward pass.

    Yields a :class:`ResidualTap`; the hook is removed on exit, also on error. Weights are never
    touched and nothing is replaced.
    """
    norm = final_norm(loaded)
    tap = ResidualTap(norm=norm)

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        tap.value = x.detach()  # [batch, seq, d_model]

    handle = norm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield tap
    finally:
        handle.remove()
