"""Attention batteries: the token sequences a scan streams through capture, and which detectors
read them. One module each, each exposing ``SPEC`` (an
:class:`~.base.AttentionBatterySpec`): :mod:`.natural` (``natural``; ``texts`` when exact texts
are given), :mod:`.repeat`, :mod:`.align` (encoder–decoder pairs with gold word alignments),
:mod:`.speech` (Whisper-style models). :mod:`.base` holds what they share
(:class:`~.base.ProbeSequence`, :class:`~.base.Battery`, the left-padded :class:`~.base.Batch`).

Adding a battery is a module with a ``SPEC`` and a line in :data:`ATTENTION_BATTERIES`.
"""

from __future__ import annotations

import importlib

from ..core.errors import HeadatlasError
from .base import AttentionBatterySpec

ATTENTION_BATTERIES: dict[str, str] = {
    "natural": "headatlas.batteries.natural",
    "repeat": "headatlas.batteries.repeat",
    "align": "headatlas.batteries.align",
    "speech": "headatlas.batteries.speech",
}
"""Every attention battery by name → the module holding its ``SPEC`` (imported on first use)."""


def attention_battery(name: str) -> AttentionBatterySpec:
    """Return the :class:`~.base.AttentionBatterySpec` of attention battery ``name``; raise on an
    unknown name."""
    if name not in ATTENTION_BATTERIES:
        raise HeadatlasError(
            f"unknown attention battery {name!r}: choose from {', '.join(ATTENTION_BATTERIES)}"
        )
    spec: AttentionBatterySpec = importlib.import_module(ATTENTION_BATTERIES[name]).SPEC
    return spec


__all__ = ["ATTENTION_BATTERIES", "AttentionBatterySpec", "attention_battery"]
