"""Inference-time intervention (Li et al. 2023, "Inference-Time Intervention: Eliciting Truthful
Answers from a Language Model"): shift the outputs of the heads whose probes work best.

- :func:`fit`: probes on a binary task (:mod:`headatlas.apps.common.head_features`), heads ranked by dev (validation)
  accuracy, the top ``k`` kept. Direction per head: the mass-mean shift (mean of the positive
  class − mean of the negative, normalised) or the probe's weight (normalised, in the raw feature
  space); σ = std of the training activations projected on it. A control of ``k`` random heads
  with random directions (σ measured the same way) is fitted alongside.
- :func:`applied`: within the block every forward pass (while generating too) adds α·σ·θ̂ to the
  kept heads' outputs at every position, through the one head-output hook
  (:func:`headatlas.capture.head_outputs`), so it works with any attention backend and GQA.
- Saved as ``steer.json`` + ``steer.safetensors`` with the model's sha256; loading refuses
  another model. Evaluation and export are in :mod:`.steer_eval`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...capture import HeadTap, head_outputs
from ...core.errors import HeadatlasError, check_choice, param
from ...core.heads import check_heads, head_name, parse_head
from ...core.outputs import Folder
from ...core.records import check_record, is_dict, is_int, is_number, is_text, list_of, one_of, optional
from ...core.storage import atomic_path, write_json
from ...model.identity import same_weights, weights_record
from ...model.info import LoadedModel
from ...model.load import reload_spec
from ..common.head_features import bad_heads, collect_features
from ..common.logreg import L2_GRID, choose_l2, raw_direction, standardise
from ..common.probe_tasks import ProbeTask, build_probe_task

DIRECTIONS = ("mass-mean", "probe")
STEER_JSON = "steer.json"
STEER_TENSORS = "steer.safetensors"
STEER_FOLDER = Folder("steer fit", STEER_JSON)
"""A steering directory: ``steer fit`` writes :data:`STEER_JSON` and :data:`STEER_TENSORS` there."""
DEFAULT_ALPHA = 15.0
"""Li et al. 2023's α."""


@dataclass
class HeadShift:
    """Shifts of some heads: ``heads`` (layer, head), unit ``directions [k, d_head]``, ``sigma [k]``."""

    heads: list[tuple[int, int]]
    directions: torch.Tensor
    sigma: torch.Tensor

    def by_layer(self, alpha: float, n_heads: int) -> dict[int, torch.Tensor]:
        """Return ``{layer: shift [head, d_head]}``: α·σ·θ̂ on kept heads, 0 elsewhere."""
        out: dict[int, torch.Tensor] = {}
        for (layer, head), direction, sigma in zip(self.heads, self.directions, self.sigma, strict=True):
            shift = out.setdefault(layer, torch.zeros(n_heads, direction.shape[0]))  # [head, d_head]
            shift[head] += alpha * float(sigma) * direction
        return out


@dataclass
class Steering:
    """A fitted intervention: the kept heads' shift, a random-head control, and how it was made."""

    model_sha256: str
    model_name: str
    n_layers: int
    n_heads: int
    task: str
    direction: str
    alpha: float
    shift: HeadShift
    control: HeadShift
    val_accuracy: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    params_sha256: str | None = None
    """The fitted model's parameter sha256 (:func:`headatlas.model.identity.weights_record`), so the same
    weights loaded another way are accepted; ``None`` in files written before it was recorded."""

    def save(self, directory: str | Path) -> Path:
        """Write ``steer.json`` and ``steer.safetensors`` into ``directory`` (atomically); return it."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "directions": self.shift.directions.float().contiguous(),
            "sigma": self.shift.sigma.float().contiguous(),
            "control_directions": self.control.directions.float().contiguous(),
            "control_sigma": self.control.sigma.float().contiguous(),
        }
        with atomic_path(out / STEER_TENSORS) as tmp:
            save_file(tensors, str(tmp))
        meta = {
            "model_sha256": self.model_sha256,
            "params_sha256": self.params_sha256,
            "model_name": self.model_name,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "task": self.task,
            "direction": self.direction,
            "alpha": self.alpha,
            "heads": [head_name(*h) for h in self.shift.heads],
            "control_heads": [head_name(*h) for h in self.control.heads],
            "val_accuracy": self.val_accuracy,
            "params": self.params,
        }
        write_json(out / STEER_JSON, meta)
        return out


STEER_FIELDS = {
    "model_sha256": is_text,
    "params_sha256": optional(is_text),
    "model_name": is_text,
    "n_layers": is_int(1),
    "n_heads": is_int(1),
    "task": is_text,
    "direction": one_of(*DIRECTIONS),
    "alpha": is_number,
    "heads": list_of(is_text),
    "control_heads": list_of(is_text),
    "val_accuracy": list_of(is_number),
    "params": is_dict,
}
"""The fields of ``steer.json`` (:func:`load_steering` checks them)."""
_TENSORS = ("directions", "sigma", "control_directions", "control_sigma")


def _check_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Raise unless ``steer.safetensors`` holds one direction and one σ per listed head, finite,
    and every head exists in a model of the recorded shape."""
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise HeadatlasError(f"{where / STEER_TENSORS} has no {missing[0]!r} tensor: fit the steering again")
    for kind, prefix in (("heads", ""), ("control_heads", "control_")):
        heads = check_heads(meta[kind], meta["n_layers"], meta["n_heads"])
        directions, sigma = tensors[prefix + "directions"], tensors[prefix + "sigma"]
        if directions.dim() != 2 or len(directions) != len(heads) or sigma.shape != (len(heads),):
            raise HeadatlasError(f"{where}: {kind} and the tensors in {STEER_TENSORS} do not match in number")
        if not (bool(torch.isfinite(directions).all()) and bool(torch.isfinite(sigma).all())):
            raise HeadatlasError(
                f"{where / STEER_TENSORS} holds NaN or infinite values: fit the steering again"
            )


def load_steering(directory: str | Path, loaded: LoadedModel | None = None) -> Steering:
    """Read a steering directory; with ``loaded``, refuse it unless it was fitted on that model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = Path(directory)
    try:
        meta = json.loads((where / STEER_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(where / STEER_TENSORS))
    except (OSError, ValueError, SafetensorError) as exc:
        raise HeadatlasError(
            f"{param('steer')} {where} is not a readable steering directory ({exc.__class__.__name__}): "
            "make one with `headatlas steer fit`"
        ) from None
    check_record(meta, STEER_FIELDS, str(where / STEER_JSON), "steering file", frozenset({"params_sha256"}))
    _check_tensors(meta, tensors, where)
    if loaded is not None and not same_weights(meta, loaded):
        raise HeadatlasError(
            f"{param('steer')} {where} was fitted on another model ({meta['model_name']}, sha256 "
            f"{meta['model_sha256'][:12]}…), not {loaded.info.name}: fit it again on this model"
        )
    shift = HeadShift([parse_head(h) for h in meta["heads"]], tensors["directions"], tensors["sigma"])
    control = HeadShift(
        [parse_head(h) for h in meta["control_heads"]],
        tensors["control_directions"],
        tensors["control_sigma"],
    )
    return Steering(
        meta["model_sha256"], meta["model_name"], meta["n_layers"], meta["n_heads"], meta["task"],
        meta["direction"], float(meta["alpha"]), shift, control, list(meta["val_accuracy"]), meta["params"],
        meta.get("params_sha256"),
    )  # fmt: skip


def positive_class(task: ProbeTask) -> int:
    """Return the index of the class the direction points to: ``true`` when present, else the last
    class in sorted order (``positive`` before ``negative``… sorted: ``negative, positive``)."""
    if len(task.classes) != 2:
        raise HeadatlasError(
            f"steering needs a task with two classes, {task.name!r} has {len(task.classes)}: "
            'use truth or a JSONL file of {"text", "label"} rows with two labels'
        )
    return task.classes.index("true") if "true" in task.classes else 1


@dataclass
class HeadRanking:
    """Every head's probe (dev accuracy ``val [group]``, heads best first in ``order [group]``) and
    its shift: unit ``directions [group, d_head]`` and ``sigma [group]``; group = layer · n_heads + head."""

    val: torch.Tensor
    order: torch.Tensor
    directions: torch.Tensor
    sigma: torch.Tensor
    n_heads: int
    l2: float
    l2_path: dict[float, float]

    def shift(self, groups: torch.Tensor | list[int]) -> HeadShift:
        """Return the :class:`HeadShift` of the heads ``groups`` (flat indices), in that order."""
        index = torch.as_tensor(groups, dtype=torch.long)  # [k]
        heads = [(int(g) // self.n_heads, int(g) % self.n_heads) for g in index]
        return HeadShift(heads, self.directions[index], self.sigma[index])

    def top(self, k: int) -> HeadShift:
        """Return the shift of the ``k`` heads whose probes did best on dev."""
        return self.shift(self.order[:k])


def rank_heads(
    train: tuple[torch.Tensor, torch.Tensor],
    dev: tuple[torch.Tensor, torch.Tensor],
    n_heads: int,
    direction: str = "mass-mean",
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> HeadRanking:
    """Rank every head by its probe's dev accuracy and give each a direction and σ (Li et al. 2023).

    ``train`` and ``dev`` are ``(features [group, n, d_head], labels [n] in {0, 1})``: one logistic
    probe per head on standardised ``train`` features (L2 strength chosen on ``dev``). The direction
    is the mass-mean shift (mean of label 1 − mean of label 0) or the probe's weight, normalised; σ is
    the std of the features projected on it. Both use ``pool`` (default: ``train``)."""
    check_choice("direction", direction, DIRECTIONS)
    (raw_train, y_train), (raw_dev, y_dev) = train, dev
    scaler = standardise(raw_train)
    probe, path = choose_l2((scaler(raw_train), y_train), (scaler(raw_dev), y_dev), 2, L2_GRID)
    val = probe.accuracy(scaler(raw_dev), y_dev)  # [group]
    x, y = pool if pool is not None else train
    if direction == "mass-mean":
        positive = y.bool()
        vectors = x[:, positive].mean(1) - x[:, ~positive].mean(1)  # [group, d_head]
    else:
        vectors = raw_direction(probe, scaler)  # [group, d_head]
    unit = torch.nn.functional.normalize(vectors, dim=-1)  # [group, d_head]
    sigma = torch.einsum("gnd,gd->gn", x, unit).std(1)  # [group]
    return HeadRanking(val, torch.argsort(-val, stable=True), unit, sigma, n_heads, probe.l2, path)


def fit(
    loaded: LoadedModel,
    task: str = "truth",
    k: int = 16,
    direction: str = "mass-mean",
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
    batch_size: int = 16,
) -> Steering:
    """Fit ITI steering on ``task`` (``truth``, a JSONL of two-label sentences or TruthfulQA's CSV) and return it:
    the top-``k`` heads by dev accuracy of their probes, each with a unit direction and σ, and a
    control of ``k`` random heads with random directions — ``ha.steer.fit``."""
    check_choice("direction", direction, DIRECTIONS)
    bad_heads(loaded, k)
    built = build_probe_task(loaded.tokenizer, task, 400, seed)
    positive = positive_class(built)
    ys = {
        split: torch.tensor([int(lab == built.classes[positive]) for lab in built.labels(split)])
        for split in ("train", "dev")
    }
    raw_train = collect_features(loaded, built.splits["train"], batch_size)  # [group, n, d_head]
    raw_dev = collect_features(loaded, built.splits["dev"], batch_size)  # [group, n, d_head]
    n_heads = loaded.info.n_heads
    ranking = rank_heads((raw_train, ys["train"]), (raw_dev, ys["dev"]), n_heads, direction)
    order = ranking.order[:k]  # [k]
    rng = np.random.default_rng(seed)
    random_groups = torch.as_tensor(rng.choice(raw_train.shape[0], size=k, replace=False))  # [k]
    gen = torch.Generator().manual_seed(seed)
    random_dirs = torch.nn.functional.normalize(
        torch.randn(k, raw_train.shape[-1], generator=gen), dim=-1
    )  # [k, d_head]
    random_sigma = torch.einsum("knd,kd->kn", raw_train[random_groups], random_dirs).std(1)  # [k]

    def heads_of(groups: torch.Tensor) -> list[tuple[int, int]]:
        return [(int(g) // n_heads, int(g) % n_heads) for g in groups]

    return Steering(
        **weights_record(loaded),
        model_name=loaded.info.name,
        n_layers=loaded.info.n_layers,
        n_heads=n_heads,
        task=built.name,
        direction=direction,
        alpha=float(alpha),
        shift=ranking.shift(order),
        control=HeadShift(heads_of(random_groups), random_dirs, random_sigma),
        val_accuracy=[round(float(v), 4) for v in ranking.val[order]],
        params={
            **built.params,
            "model_spec": reload_spec(loaded.info),
            "k": k,
            "positive_class": built.classes[positive],
            "l2": ranking.l2,
            "l2_dev_path": {str(a): b for a, b in ranking.l2_path.items()},
            "n_train": int(ys["train"].numel()),
            "n_dev": int(ys["dev"].numel()),
            "position": "last token",
        },
    )


@contextmanager
def applied(
    loaded: LoadedModel, steering: Steering, alpha: float | None = None, control: bool = False
) -> Iterator[None]:
    """Within the block, add α·σ·θ̂ to the steered heads' outputs at every position of every
    forward pass (``generate`` included). ``alpha`` defaults to the steering's; ``control`` applies
    the random-head, random-direction control instead. Refuses a steering fitted on another model
    shape."""
    if (steering.n_layers, steering.n_heads) != (loaded.info.n_layers, loaded.info.n_heads):
        raise HeadatlasError(
            f"{param('steer')} was fitted on a model of {steering.n_layers} × {steering.n_heads} heads, "
            f"this one has {loaded.info.n_layers} × {loaded.info.n_heads}"
        )
    shift = steering.control if control else steering.shift
    with shifted(loaded, shift, steering.alpha if alpha is None else float(alpha)):
        yield


@contextmanager
def shifted(loaded: LoadedModel, shift: HeadShift, alpha: float) -> Iterator[HeadTap]:
    """Within the block, add α·σ·θ̂ to ``shift``'s heads on every forward pass: at every position,
    or where the yielded tap's ``context`` (a bool mask ``[batch, seq]``) is true."""
    by_layer = {
        layer: delta.to(loaded.device) for layer, delta in shift.by_layer(alpha, loaded.info.n_heads).items()
    }

    def add(layer: int, z: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        delta = by_layer[layer].to(dtype=z.dtype)  # [head, d_head]
        if where is None:
            return z + delta  # [batch, query, head, d_head]
        return z + where[:, :, None, None].to(z.dtype) * delta  # [batch, query, head, d_head]

    with head_outputs(loaded, add, layers=sorted(by_layer)) as tap:
        yield tap
