"""``headatlas retain``: continual fine-tuning that keeps earlier tasks' important heads
(SEEKR, He et al. 2024): replay plus attention distillation on heads chosen by forgettability ×
task sensitivity or by an atlas column."""

from .data import BUILTIN_TASKS, Example, accuracy, builtin_task, read_examples, replay_subset
from .seekr import attention_kd, head_attention, seekr_importance, task_sensitivity, top_heads
from .training import (
    RETAIN_REPORT,
    RetainConfig,
    RetainResult,
    check_retain_output,
    retain,
    save_checkpoint,
    trainable_parameters,
)

__all__ = [
    "BUILTIN_TASKS",
    "RETAIN_REPORT",
    "Example",
    "RetainConfig",
    "RetainResult",
    "accuracy",
    "attention_kd",
    "builtin_task",
    "check_retain_output",
    "head_attention",
    "read_examples",
    "replay_subset",
    "retain",
    "save_checkpoint",
    "seekr_importance",
    "task_sensitivity",
    "top_heads",
    "trainable_parameters",
]
