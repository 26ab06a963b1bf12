"""Continual fine-tuning with replay and SEEKR's head-guided attention distillation.

One call of :func:`retain` is one stage of a continual-learning sequence: the model learns the new
task's examples while replaying a few examples of the earlier tasks, and (unless ``heads="none"``)
keeps the chosen heads' attention on those replay examples close to the model it started from —
He et al. 2024's SEEKR. The starting model is the frozen teacher; since its replay set is fixed,
the teacher's maps are computed once, before the first update, and no copy of the model is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...capture import output_projections
from ...core.errors import HeadatlasError, check_at_least, param
from ...core.heads import Head, head_name, parse_heads
from ...core.outputs import Folder, check_output_folder, output_folder
from ...core.progress import Progress, no_progress
from ...core.storage import write_json
from ...model.info import LoadedModel
from .data import Batch, Example, encode
from .seekr import (
    all_maps,
    atlas_heads,
    attention_kd,
    check_heads_k,
    forgettability,
    head_attention,
    lm_loss,
    seekr_importance,
    task_sensitivity,
    top_heads,
)

logger = logging.getLogger(__name__)

RETAIN_REPORT = "headatlas-retain.json"
"""Written into every checkpoint ``retain`` saves; marks a directory it may replace."""
RETAIN_FOLDER = Folder("retain", RETAIN_REPORT)
TRAINABLE = ("attention", "all")
"""Which parameters fine-tuning updates: the attention modules' (q, k, v, o) or all of them."""


@dataclass(frozen=True)
class RetainConfig:
    """Settings of one :func:`retain` stage.

    ``heads``: ``"seekr"`` (forgettability × task sensitivity), ``"atlas:<score>"`` (the top ``k``
    of an atlas column, from ``atlas``), an explicit list ``"L3H1,L17H4"`` (``k`` is then ignored)
    or ``"none"`` (replay without distillation). ``lam`` weighs
    the distillation loss; ``probe_steps`` plain steps on the new task measure forgettability
    (then the weights are put back).
    """

    heads: str = "seekr"
    k: int = 24
    lam: float = 1.0
    steps: int = 20
    lr: float = 1e-4
    batch_size: int = 8
    replay_batch: int = 8
    trainable: str = "attention"
    probe_steps: int = 3
    atlas: str | None = None
    seed: int = 0


@dataclass
class RetainResult:
    """What :func:`retain` did: the distilled heads, the mean losses of the last quarter of the
    steps, and seconds spent."""

    heads: list[str]
    selection: str
    steps: int
    loss_new: float
    loss_replay: float
    loss_kd: float
    seconds: float
    selection_seconds: float
    n_trainable: int
    importance: list[list[float]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


def check_config(config: RetainConfig, loaded: LoadedModel) -> None:
    """Raise :class:`HeadatlasError` for settings :func:`retain` cannot run with."""
    if not isinstance(config.heads, str):
        raise HeadatlasError(
            f"{param('heads')} must be seekr, none, atlas:<score> or L3H1,..., got {config.heads!r}"
        )
    if config.heads not in ("seekr", "none") and not config.heads.startswith("atlas:"):
        parse_heads(config.heads, loaded.info.n_layers, loaded.info.n_heads, "heads")
        return _check_numbers(config)
    if config.heads.startswith("atlas:") and (not config.heads[6:] or config.atlas is None):
        raise HeadatlasError(f"{param('heads')} atlas:<score> needs a score name and {param('atlas')} DIR")
    if config.heads != "none":
        check_heads_k(config.k, loaded.info.n_layers, loaded.info.n_heads)
    _check_numbers(config)


def _check_numbers(config: RetainConfig) -> None:
    if config.trainable not in TRAINABLE:
        raise HeadatlasError(f"{param('trainable')} must be one of {', '.join(TRAINABLE)}")
    for name, low in (("steps", 1), ("batch_size", 1), ("replay_batch", 1), ("probe_steps", 0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise HeadatlasError(f"{param(name)} must be a whole number, got {value!r}")
        check_at_least(name, value, low)
    for name in ("lr", "lam"):
        value = getattr(config, name)
        if not isinstance(value, int | float) or not np.isfinite(value) or value < 0:
            raise HeadatlasError(f"{param(name)} must be a finite number ≥ 0, got {value!r}")


def trainable_parameters(loaded: LoadedModel, which: str) -> list[torch.nn.Parameter]:
    """Return the parameters fine-tuning updates (``which``: ``attention`` = every parameter of the
    modules holding an attention output projection, ``all``) and freeze the others."""
    names = {id(m): n for n, m in loaded.model.named_modules()}
    prefixes = tuple(names[id(m)].rsplit(".", 1)[0] + "." for m in output_projections(loaded).values())
    chosen: list[torch.nn.Parameter] = []
    for name, parameter in loaded.model.named_parameters():
        keep = which == "all" or name.startswith(prefixes)
        parameter.requires_grad_(keep)
        if keep:
            chosen.append(parameter)
    return chosen


def _rows(batch: Batch, index: torch.Tensor) -> Batch:
    return Batch(batch.input_ids[index], batch.attention_mask[index], batch.target[index])


def _step_loss(loaded: LoadedModel, batch: Batch) -> torch.Tensor:
    device = loaded.device
    hidden = loaded.model.base_model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).last_hidden_state  # [batch, seq, d_model]
    return lm_loss(loaded, hidden, batch.target)


class _Sampler:
    """Reshuffled epochs of ``n`` row indices, ``size`` at a time (deterministic by ``seed``)."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        self.n, self.size = n, min(size, n)
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.size:
            self.queue += torch.randperm(self.n, generator=self.generator).tolist()
        chosen, self.queue = self.queue[: self.size], self.queue[self.size :]
        return torch.tensor(chosen)


def select_heads(
    loaded: LoadedModel, config: RetainConfig, new: Batch, replay: Batch | None
) -> tuple[list[Head], np.ndarray | None]:
    """Return the heads to distil and, for ``seekr``, their importance ``[layer, head]``."""
    if config.heads == "none" or replay is None:
        return [], None
    if config.heads != "seekr" and not config.heads.startswith("atlas:"):
        return sorted(parse_heads(config.heads, loaded.info.n_layers, loaded.info.n_heads)), None
    if config.heads.startswith("atlas:"):
        return atlas_heads(loaded, str(config.atlas), config.heads[6:], config.k), None
    sensitivity = task_sensitivity(loaded, replay)
    forget = np.ones_like(sensitivity)
    if config.probe_steps:
        params = trainable_parameters(loaded, config.trainable)
        saved = [p.detach().clone() for p in params]
        before = all_maps(loaded, replay)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        sampler = _Sampler(new.input_ids.shape[0], config.batch_size, config.seed + 1)
        for _ in range(config.probe_steps):
            _step_loss(loaded, _rows(new, sampler.next())).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        forget = forgettability(before, all_maps(loaded, replay), replay.attention_mask)
        with torch.no_grad():
            for parameter, value in zip(params, saved, strict=True):
                parameter.copy_(value)
    importance = seekr_importance(sensitivity, forget)
    return top_heads(importance, config.k), importance


def retain(
    loaded: LoadedModel,
    train: Sequence[Example],
    replay: Sequence[Example],
    config: RetainConfig | None = None,
    progress: Progress | None = None,
) -> RetainResult:
    """Fine-tune ``loaded`` in place on ``train`` with replay of ``replay`` and SEEKR attention
    distillation (He et al. 2024) on the chosen heads; return a :class:`RetainResult`.

    Each step's loss is the answer cross-entropy of a batch of ``train``, plus that of a batch of
    ``replay`` (when given), plus ``lam`` × the KL from the starting model's attention to the
    current one on that replay batch, over the chosen heads. An empty ``replay`` is plain fine-tuning.
    Raises :class:`HeadatlasError` for bad settings or data.
    """
    config = config or RetainConfig()
    progress = progress or no_progress
    check_config(config, loaded)
    if not train:
        raise HeadatlasError(f"{param('train')} holds no examples")
    torch.manual_seed(config.seed)
    new = encode(loaded, train)
    old = encode(loaded, replay) if replay else None
    loaded.model.eval()  # no dropout: the teacher's maps and the student's must be comparable
    flags = [p.requires_grad for p in loaded.model.parameters()]
    start = time.perf_counter()
    try:
        heads, importance = select_heads(loaded, config, new, old)
        selection_seconds = time.perf_counter() - start
        teacher = head_attention(loaded, old, heads, grad=False)[0] if heads and old is not None else None
        params = trainable_parameters(loaded, config.trainable)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        new_rows = _Sampler(new.input_ids.shape[0], config.batch_size, config.seed)
        old_rows = _Sampler(old.input_ids.shape[0], config.replay_batch, config.seed + 2) if old else None
        history: list[tuple[float, float, float]] = []
        for step in range(config.steps):
            loss = _step_loss(loaded, _rows(new, new_rows.next()))
            parts = (loss.item(), float("nan"), float("nan"))
            if old is not None and old_rows is not None:
                index = old_rows.next()
                replay_loss, kd = _replay_loss(loaded, _rows(old, index), heads, teacher, index)
                parts = (parts[0], replay_loss.item(), float("nan") if kd is None else kd.item())
                loss = loss + replay_loss + (0.0 if kd is None else config.lam * kd)
            if not torch.isfinite(loss):
                raise HeadatlasError(f"the loss became {float(loss)} at step {step + 1}: lower {param('lr')}")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append(parts)
            progress(step + 1, config.steps)
    finally:
        for parameter, flag in zip(loaded.model.parameters(), flags, strict=True):
            parameter.requires_grad_(flag)
            parameter.grad = None
    tail = np.array(history[-max(1, len(history) // 4) :], dtype=float)  # [steps, 3]
    means = [float(np.nanmean(col)) if np.isfinite(col).any() else float("nan") for col in tail.T]
    return RetainResult(
        heads=[head_name(layer, head) for layer, head in heads],
        selection="none" if not heads else config.heads,
        steps=config.steps,
        loss_new=means[0],
        loss_replay=means[1],
        loss_kd=means[2],
        seconds=time.perf_counter() - start,
        selection_seconds=selection_seconds,
        n_trainable=sum(p.numel() for p in params),
        importance=None if importance is None else importance.round(6).tolist(),
    )


def _replay_loss(
    loaded: LoadedModel,
    batch: Batch,
    heads: list[Head],
    teacher: torch.Tensor | None,
    index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The replay batch's answer loss and, with a teacher, SEEKR's distillation loss (one pass)."""
    if teacher is None:
        return _step_loss(loaded, batch), None
    maps, hidden = head_attention(loaded, batch, heads, grad=True)  # [batch, heads, seq, seq]
    kd = attention_kd(maps, teacher[index], batch.attention_mask)
    return lm_loss(loaded, hidden, batch.target), kd


def check_retain_output(out: str | Path, model: str | None = None, force: bool = False) -> None:
    """Refuse a checkpoint directory ``retain`` must not write, before any work (a file, an atlas,
    the model's own directory, or a non-empty directory it did not write unless ``force``)."""
    check_output_folder(out, RETAIN_FOLDER, force, model=model)


def save_checkpoint(loaded: LoadedModel, out: str | Path, report: dict[str, object]) -> Path:
    """Write the fine-tuned model (safetensors), its tokenizer and ``report`` to ``out`` atomically:
    a Ctrl-C while saving leaves the old directory (or none), never a mix. Returns ``out``."""
    out = Path(out)
    with output_folder(out, RETAIN_FOLDER) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        write_json(tmp / RETAIN_REPORT, report)
    return out
