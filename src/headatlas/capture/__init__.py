"""Capture: run a model and stream exact per-layer attention views to a callback (see ``session``)."""

from .ablate import ablate, output_projections
from .session import CaptureSession, attention_maps, capture, padded_positions, supports_backend
from .views import AttentionView, DenseView, LseView

__all__ = [
    "AttentionView",
    "CaptureSession",
    "DenseView",
    "LseView",
    "ablate",
    "attention_maps",
    "capture",
    "output_projections",
    "padded_positions",
    "supports_backend",
]
