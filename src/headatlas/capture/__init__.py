"""Capture: run a model and stream exact per-layer attention views to a callback (see ``session``),
and the one hook on per-head outputs (``heads``) that ablation, gates, probes and patching use."""

from .ablate import MODES, ablate, check_mode
from .hook import HeadCallback, HeadTap, head_outputs, output_projections, output_weight
from .session import CaptureSession, attention_maps, capture, padded_positions, supports_backend
from .views import AttentionView, DenseView, LseView

__all__ = [
    "MODES",
    "AttentionView",
    "CaptureSession",
    "DenseView",
    "HeadCallback",
    "HeadTap",
    "LseView",
    "ablate",
    "attention_maps",
    "capture",
    "check_mode",
    "head_outputs",
    "output_projections",
    "output_weight",
    "padded_positions",
    "supports_backend",
]
