"""Path patching and the IOI circuit (Wang et al. 2022, "Interpretability in the Wild").

Activation patching says how much a head matters; path patching says *through what*. A sender
head's output is replaced by its corrupted value while every other head stays at its clean value
(MLPs recompute), and only the change that reaches a chosen place is kept:

- **to the logits**: the logit difference of that run (the sender's effect through the residual
  stream and MLPs, not through any other attention head);
- **to receivers' query, key or value**: the receivers' q/k/v of that run are recorded, then a
  clean run takes just those (every later component recomputes) and its logit difference is read.
  A key or value path patches the receiver's KV head, which under GQA its whole group shares.

An effect is the share of the clean − corrupted logit difference *lost* (the noising direction
of Wang et al.): ``(LD_clean − LD_path) / mean(LD_clean − LD_corrupt)``. Many senders run in one
batch, one row per (pair, sender). Reads and writes go through the capture module's two hooks:
:func:`~headatlas.capture.head_outputs` for head outputs and ``CaptureSession.on_qkv`` for q/k/v.

:func:`ioi_circuit` sorts heads into Wang et al.'s classes, each class the receivers of the next
step: name movers and negative name movers (direct effect on the logits), S-inhibition heads (via
the name movers' queries), induction / duplicate-token heads (via the S-inhibition heads' values),
previous-token heads (via those heads' keys). The thresholds are the roles' (:mod:`headatlas.core.roles`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...batteries.base import make_batch, pad_id
from ...capture import capture, head_outputs
from ...core.errors import HeadatlasError, check_choice
from ...core.heads import Head, head_name
from ...core.progress import Progress
from ...core.roles import RULES
from ...model.info import LoadedModel
from ..common.patch_tasks import Encoded, PatchTask, encode_task, metric
from .patching import clean_outputs

logger = logging.getLogger(__name__)

CHANNELS = ("q", "k", "v")
CLASS_COLUMNS = {
    "name-mover": "ioi_direct",
    "negative-name-mover": "ioi_direct",
    "s-inhibition": "ioi_s_inhibition",
    "ioi-duplicate": "ioi_duplicate",
    "ioi-previous-token": "ioi_previous_token",
}
"""Each IOI class and the atlas column whose rule (in :data:`headatlas.core.roles.RULES`) decides it."""
MAX_PER_CLASS = 8


@dataclass
class _Rows:
    """One batch of path-patching rows: pair and sender per row, the clean and corrupted outputs,
    and the receivers whose inputs are recorded (step 2) or replaced (step 3)."""

    pair: torch.Tensor  # [row]
    sender_layer: torch.Tensor  # [row]
    sender_head: torch.Tensor  # [row]
    clean: dict[int, torch.Tensor]  # layer -> [pair, query, head, d_head]
    corrupt: dict[int, torch.Tensor]
    receivers: list[Head] = field(default_factory=list)
    channel: str = "q"
    kv_group: int = 1
    recorded: dict[Head, torch.Tensor] = field(default_factory=dict)
    replay: bool = False


def _freeze(layer: int, z: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Every head at its clean output, except each row's sender at its corrupted output."""
    out = rows.clean[layer][rows.pair].to(z).clone()  # [row, query, head, d_head]
    mine = (rows.sender_layer == layer).nonzero().flatten()
    if mine.numel():
        heads = rows.sender_head[mine]
        out[mine, :, heads] = rows.corrupt[layer][rows.pair[mine], :, heads].to(z)
    return out


def _receiver_qkv(
    layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: _Rows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Record (step 2) or replace (step 3) the receivers' query, key or value at their layer."""
    mine = [r for r in rows.receivers if r[0] == layer]
    if not mine:
        return None
    tensors = {"q": query, "k": key, "v": value}
    target = tensors[rows.channel]
    if rows.replay:
        target = target.clone()
    for receiver in mine:
        index = receiver[1] if rows.channel == "q" else receiver[1] // rows.kv_group
        if rows.replay:
            target[:, index] = rows.recorded[receiver].to(target)
        else:
            rows.recorded[receiver] = target[:, index].detach().clone()  # [row, position, d_head]
    if not rows.replay:
        return None
    tensors[rows.channel] = target
    return tensors["q"], tensors["k"], tensors["v"]


@dataclass
class PathBase:
    """What every path-patching pass on one set of pairs shares: both runs' head outputs, the clean
    logit difference per pair and the mean clean − corrupted gap."""

    clean_z: dict[int, torch.Tensor]  # layer -> [pair, query, head, d_head]
    corrupt_z: dict[int, torch.Tensor]
    clean_metric: torch.Tensor  # [pair]
    gap: float


def path_base(loaded: LoadedModel, enc: Encoded) -> PathBase:
    """Return the clean and corrupted runs :func:`path_effects` patches between (two forward passes);
    raise :class:`HeadatlasError` when both give the same logit difference."""
    clean_z, clean_logits = clean_outputs(loaded, enc.clean, "all")
    corrupt_z, corrupt_logits = clean_outputs(loaded, enc.corrupt, "all")
    answer, wrong = enc.answer.to(loaded.device), enc.wrong.to(loaded.device)
    clean_m = metric(clean_logits, answer, wrong, "logit_diff").cpu()
    gap = float((clean_m - metric(corrupt_logits, answer, wrong, "logit_diff").cpu()).mean())
    if abs(gap) < 1e-6:
        raise HeadatlasError("clean and corrupted prompts give the same logit difference: nothing to patch")
    return PathBase(clean_z, corrupt_z, clean_m, gap)


def path_effects(
    loaded: LoadedModel,
    enc: Encoded,
    senders: list[Head],
    receivers: list[Head] | None = None,
    channel: str = "q",
    rows_per_pass: int = 64,
    progress: Progress | None = None,
    base: PathBase | None = None,
) -> np.ndarray:
    """Return each sender's path effect ``[pair, sender]`` (share of the logit difference lost).

    ``receivers=None`` measures the path to the logits; otherwise the path into the receivers'
    ``channel`` (``"q"``, ``"k"`` or ``"v"``). Needs clean and corrupted prompts of equal length.
    ``base`` (:func:`path_base` of the same ``enc``) saves its two passes when called many times.
    """
    check_choice("channel", channel, CHANNELS)
    base = base if base is not None else path_base(loaded, enc)
    clean_z, corrupt_z, clean_m, gap = base.clean_z, base.corrupt_z, base.clean_metric, base.gap
    device = loaded.device
    answer, wrong = enc.answer.to(device), enc.wrong.to(device)
    n_pairs = len(enc.clean)
    per = max(1, rows_per_pass // n_pairs)
    chunks = [senders[i : i + per] for i in range(0, len(senders), per)]
    out = np.zeros((n_pairs, len(senders)))
    clean_batch = make_batch(enc.clean, pad_id(loaded.tokenizer))
    for done, chunk in enumerate(chunks):
        k = len(chunk)
        pair_of = torch.arange(n_pairs).repeat_interleave(k)
        picks = torch.tensor(chunk).repeat(n_pairs, 1)  # [row, 2]
        rows = _Rows(pair_of, picks[:, 0], picks[:, 1], clean_z, corrupt_z, list(receivers or []), channel,
                     loaded.info.group_size)  # fmt: skip
        ids, mask = clean_batch.input_ids[pair_of], clean_batch.attention_mask[pair_of]
        with capture(loaded, lambda _view: None, mode="none") as session:
            session.on_qkv = _receiver_qkv
            with head_outputs(loaded, _freeze) as tap:
                tap.context = rows
                logits = session.run(ids, mask, context=rows)[:, -1]  # step 2: sender corrupted, rest frozen
            if receivers:
                rows.replay = True
                logits = session.run(ids, mask, context=rows)[:, -1]  # step 3: clean run, receivers replayed
        path_m = metric(logits, answer[pair_of], wrong[pair_of], "logit_diff").cpu()
        lost = ((clean_m[pair_of] - path_m) / gap).numpy()
        start = done * per
        out[:, start : start + k] = lost.reshape(n_pairs, k)
        if progress is not None:
            progress(done + 1, len(chunks))
    return out


@dataclass
class Circuit:
    """The IOI classes found by :func:`ioi_circuit` and the path effects behind them.

    ``effects[column]`` is ``(mean [layer, head], std [layer, head])`` for each class column;
    ``classes[role]`` the heads holding it; ``receivers[column]`` the heads each step patched into.
    """

    classes: dict[str, list[Head]]
    effects: dict[str, tuple[np.ndarray, np.ndarray]]
    receivers: dict[str, list[Head]]
    params: dict[str, Any]


def _class(values: np.ndarray, role: str) -> list[Head]:
    rule = next(r for r in RULES if r.role == role)
    order = np.argsort(values, axis=None)
    order = order if rule.below else order[::-1]
    picked = [divmod(int(i), values.shape[1]) for i in order if rule.holds(float(values.flat[int(i)]))]
    return [(int(a), int(b)) for a, b in picked[:MAX_PER_CLASS]]


def ioi_circuit(
    loaded: LoadedModel, task: PatchTask, rows_per_pass: int = 64, progress: Progress | None = None
) -> Circuit:
    """Return Wang et al.'s IOI classes on ``task`` by four rounds of path patching (module docstring).

    A step whose receivers are empty (no name mover found, say) ends the search; ``params`` says
    which steps ran.
    """
    info = loaded.info
    enc = encode_task(loaded, task, "all")
    base = path_base(loaded, enc)
    every = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    effects: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    classes: dict[str, list[Head]] = {}
    receivers: dict[str, list[Head]] = {}
    steps = (
        ("ioi_direct", None, "q", ("name-mover", "negative-name-mover")),
        ("ioi_s_inhibition", "name-mover", "q", ("s-inhibition",)),
        ("ioi_duplicate", "s-inhibition", "v", ("ioi-duplicate",)),
        ("ioi_previous_token", "ioi-duplicate", "k", ("ioi-previous-token",)),
    )
    for column, receiver_role, channel, roles in steps:
        into = None if receiver_role is None else classes.get(receiver_role, [])
        if into is not None and not into:
            logger.info("no %s heads: the IOI search stops before %s", receiver_role, column)
            break
        top = max((layer for layer, _ in into or []), default=info.n_layers)  # senders precede a receiver
        senders = [h for h in every if h[0] < top and (into is None or h not in into)]
        values = path_effects(loaded, enc, senders, into, channel, rows_per_pass, progress, base)
        mean = np.full((info.n_layers, info.n_heads), np.nan)
        std = np.full_like(mean, np.nan)
        for i, (layer, head) in enumerate(senders):
            mean[layer, head], std[layer, head] = values[:, i].mean(), values[:, i].std()
        effects[column] = (mean, std)
        receivers[column] = list(into or [])
        for role in roles:
            classes[role] = _class(np.nan_to_num(mean, nan=0.0), role)
    params = {
        "task": task.name,
        "n_pairs": len(enc.clean),
        "steps": list(effects),
        "receivers": {c: [head_name(*h) for h in r] for c, r in receivers.items()},
        "classes": {role: [head_name(*h) for h in heads] for role, heads in classes.items()},
    }
    return Circuit(classes, effects, receivers, params)


def write_circuit(atlas: Any, circuit: Circuit) -> list[str]:
    """Add the class columns (``ioi_direct`` …, + ``_std``, ``_n``) and reassign roles; return them."""
    for column, (mean, std) in circuit.effects.items():
        atlas.set_matrix(column, mean)
        atlas.set_matrix(f"{column}_std", std)
        atlas.set_matrix(f"{column}_n", np.where(np.isnan(mean), 0, circuit.params["n_pairs"]))
    atlas.reassign_roles()
    atlas.meta.setdefault("circuit", {})["ioi"] = circuit.params
    return list(circuit.effects)


COLUMNS = (
    ("ioi-previous-token",),
    ("ioi-duplicate",),
    ("s-inhibition",),
    ("name-mover", "negative-name-mover"),
)
FEEDS = {"ioi-previous-token": "ioi-duplicate", "ioi-duplicate": "s-inhibition", "s-inhibition": "name-mover"}
_TITLES = ("previous-token", "induction / duplicate", "S-inhibition", "name movers (+) / negative (−)")


def circuit_figure(circuit: Circuit, title: str, path: Any) -> Any:
    """Draw the circuit: classes as columns, heads as nodes, an edge from each head to the heads of
    the class it feeds (the name movers feed the logits), as wide as its path effect; negative
    effects in red. Returns the path."""
    from matplotlib.figure import Figure

    from ...report.figures import save_figure

    fig = Figure(figsize=(11, 5.5))
    ax = fig.add_subplot()
    where: dict[Head, tuple[float, float]] = {}
    for col, roles in enumerate(COLUMNS):
        heads = [h for role in roles for h in circuit.classes.get(role, [])]
        gap = 0.6 if len(roles) > 1 and all(circuit.classes.get(r) for r in roles) else 0.0
        for row, head in enumerate(heads):
            below = gap if head in circuit.classes.get(roles[-1], []) and len(roles) > 1 else 0.0
            where[head] = (float(col), (len(heads) - 1) / 2 - row - below)
        ax.text(col, 4.6, _TITLES[col], ha="center", fontsize=9, weight="bold")
    logits = (float(len(COLUMNS)), 0.0)
    ax.text(logits[0], 4.6, "logits", ha="center", fontsize=9, weight="bold")
    peak = max((float(np.nanmax(np.abs(m))) for m, _ in circuit.effects.values()), default=1.0) or 1.0
    for roles in COLUMNS:
        for role in roles:
            mean = circuit.effects.get(CLASS_COLUMNS[role], (None, None))[0]
            if mean is None:
                continue
            feeds = FEEDS.get(role)
            targets = [where[h] for h in circuit.classes.get(feeds, [])] if feeds else [logits]
            for head in circuit.classes.get(role, []):
                effect = float(mean[head])
                for target in targets:
                    ax.plot([where[head][0], target[0]], [where[head][1], target[1]], zorder=1, alpha=0.6,
                            color="#d62728" if effect < 0 else "#1f77b4", linewidth=0.5 + 6 * abs(effect) / peak)  # fmt: skip
    for head, (x, y) in where.items():
        column = next(CLASS_COLUMNS[r] for r, members in circuit.classes.items() if head in members)
        effect = float(circuit.effects[column][0][head])
        ax.scatter([x], [y], s=1100, color="white", edgecolors="black", zorder=2)
        ax.text(x, y, f"{head_name(*head)}\n{effect:+.2f}", ha="center", va="center", fontsize=7.5, zorder=3)
    ax.scatter([logits[0]], [logits[1]], s=1300, color="#eeeeee", edgecolors="black", zorder=2)
    ax.set_xlim(-0.6, len(COLUMNS) + 0.6)
    ax.set_ylim(-4.5, 5.2)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path, dpi=130)
