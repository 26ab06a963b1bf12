"""Capture: run a model and stream exact per-layer attention to a callback (see ``session``)."""

from .ablate import ablate, output_projections
from .session import AttentionBlock, CaptureSession, attention_maps, capture, supports_backend

__all__ = [
    "AttentionBlock",
    "CaptureSession",
    "ablate",
    "attention_maps",
    "capture",
    "output_projections",
    "supports_backend",
]
