"""Causal confirmation of a score (:mod:`.causal`): ablate the top-k heads by the score and k random
heads, and compare what the score's own task loses."""

from .causal import Verification, check_verifiable, metric_for, save_verification, verify

__all__ = ["Verification", "check_verifiable", "metric_for", "save_verification", "verify"]
