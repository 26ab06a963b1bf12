"""Which heads carry a behaviour: activation patching and attribution patching on contrastive pairs.

For each pair (:mod:`.patch_tasks`) the model runs the clean and the corrupted prompt; a head's
*effect* is how much of the clean behaviour comes back when that head's output alone is patched
from the clean run into the corrupted one (Wang et al. 2022, "Interpretability in the Wild";
Meng et al. 2022). The patched quantity is each query head's output ``z`` at the input of the
attention output projection — the one head-output hook, :func:`headatlas.capture.head_outputs` —
at the last position or at every position.

- **Metric.** ``logit_diff`` tasks: LD = logit(answer) − logit(wrong) at the last position; a
  pair's effect is ``(LD_patched − LD_corrupt) / mean(LD_clean − LD_corrupt)``, so the mean over
  pairs is the share of the clean–corrupt difference the head restores (1 = all of it).
  ``prob`` tasks (function vectors, Todd et al. 2024): the causal indirect effect
  ``p_patched(answer) − p_corrupt(answer)``, patching the head's *mean* clean output.
- **Activation patching (exact)**, one head at a time but batched: each forward pass carries many
  (pair, head) patches as separate rows of one batch. At the last position the corrupted prompt's
  prefix is run once and its KV cache shared by every row, so a patch costs a one-token forward.
- **Attribution patching** (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms
  Automated Circuit Discovery"): the first-order estimate ``(z_clean − z_corrupt) · ∂M/∂z`` at the
  corrupted run, for every head at once from one clean forward, one corrupted forward and one
  backward.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from ...batteries.base import ProbeSequence, make_batch, pad_id
from ...capture import head_outputs, padded_positions
from ...core.errors import HeadatlasError, check_choice, param
from ...core.progress import Progress
from ...model.compat import cache_kwargs, output_cache
from ...model.info import LoadedModel
from ..common.patch_tasks import Encoded, PatchPair, PatchTask, encode_task, last_logits, metric

logger = logging.getLogger(__name__)

METHODS = ("attribution", "activation", "both")
POSITIONS = ("last", "all")


def clean_outputs(
    loaded: LoadedModel, seqs: list[ProbeSequence], position: str
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Return ``({layer: z}, last-position logits)`` of a no-grad forward over ``seqs``.

    ``z`` is ``[pair, head, d_head]`` at the last position, or ``[pair, query, head, d_head]`` at
    every (left-padded) position for ``position="all"``.
    """
    kept: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor, _ctx: object) -> None:
        kept[layer] = (z[:, -1] if position == "last" else z).detach().clone()

    with head_outputs(loaded, keep), torch.no_grad():
        logits = last_logits(loaded, seqs)
    return kept, logits


@dataclass
class Patches:
    """Rows of one patched batch: which pair each row is, and which (layer, head) it patches."""

    pair: torch.Tensor  # [row]
    layer: torch.Tensor  # [row]
    head: torch.Tensor  # [row]
    source: dict[int, torch.Tensor]  # layer -> [pair, head, d_head] or [pair, query, head, d_head]
    position: str


def _patch(layer: int, z: torch.Tensor, rows: Patches) -> torch.Tensor | None:
    """Head-output callback: rows patching a head of ``layer`` take the source's output for it."""
    chosen = (rows.layer == layer).nonzero().flatten()  # [patched rows]
    if chosen.numel() == 0:
        return None
    out = z.clone()  # [row, query, head, d_head]
    heads, pairs = rows.head[chosen], rows.pair[chosen]
    source = rows.source[layer]
    if rows.position == "last":
        out[chosen, -1, heads] = source[pairs, heads].to(out)
    else:
        out[chosen, :, heads] = source[pairs, :, heads].to(out)
    return out


def _chunks(n_heads_total: int, n_pairs: int, rows_per_pass: int) -> list[range]:
    per = max(1, rows_per_pass // max(n_pairs, 1))
    return [range(i, min(n_heads_total, i + per)) for i in range(0, n_heads_total, per)]


def activation_patching(
    loaded: LoadedModel,
    enc: Encoded,
    source: dict[int, torch.Tensor],
    kind: str,
    position: str = "last",
    rows_per_pass: int = 64,
    progress: Progress | None = None,
    share_prefix: bool = True,
) -> torch.Tensor:
    """Return the exact patched metric ``[pair, layer, head]``: each head's ``source`` output patched
    alone into the corrupted prompt, many (pair, head) rows per forward pass.

    ``rows_per_pass`` bounds the batch (``1`` gives the naive loop: one head per pass). At the last
    position the corrupted prefix runs once and every row reuses its KV cache (``share_prefix=False``
    runs every row in full instead; the results agree to float rounding, tested).
    """
    info = loaded.info
    n_pairs = len(enc.corrupt)
    heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    out = torch.zeros(n_pairs, info.n_layers, info.n_heads)
    device = loaded.device
    prefix = None
    if position == "last" and share_prefix:
        prefix_seqs = [ProbeSequence(s.ids[:-1]) for s in enc.corrupt]
        last_ids = torch.tensor([[s.ids[-1]] for s in enc.corrupt], device=device)  # [pair, 1]
        pre = make_batch(prefix_seqs, pad_id(loaded.tokenizer))
        pre_mask = pre.attention_mask.to(device)
        with torch.no_grad():
            cache = output_cache(loaded.model(
                input_ids=pre.input_ids.to(device), attention_mask=pre_mask, use_cache=True,
                **padded_positions(loaded.model, pre_mask),
            ))  # fmt: skip
        full_mask = torch.cat([pre_mask, torch.ones(n_pairs, 1, dtype=pre_mask.dtype, device=device)], 1)
        prefix = (cache, last_ids, full_mask, full_mask.sum(1, keepdim=True) - 1)
    chunks = _chunks(len(heads), n_pairs, rows_per_pass)
    with head_outputs(loaded, _patch) as tap, torch.no_grad():
        for done, chunk in enumerate(chunks, start=1):
            k = len(chunk)
            pair_of = torch.arange(n_pairs).repeat_interleave(k)  # [row]
            picks = torch.tensor([heads[i] for i in chunk]).repeat(n_pairs, 1)  # [row, 2]
            tap.context = Patches(pair_of, picks[:, 0], picks[:, 1], source, position)
            if prefix is not None:
                cache, last_ids, full_mask, last_pos = prefix
                rows_cache = copy.deepcopy(cache)
                rows_cache.reorder_cache(pair_of.to(device))
                logits = loaded.model(
                    input_ids=last_ids[pair_of], attention_mask=full_mask[pair_of], position_ids=last_pos[pair_of],
                    **cache_kwargs(loaded.model, rows_cache), use_cache=True,
                ).logits[:, -1]  # fmt: skip
            else:
                logits = last_logits(loaded, [enc.corrupt[int(p)] for p in pair_of], logits_to_keep=1)
            values = metric(logits, enc.answer[pair_of].to(device), enc.wrong[pair_of].to(device), kind).cpu()
            out[pair_of, picks[:, 0], picks[:, 1]] = values
            if progress is not None:
                progress(done, len(chunks))
    return out


def attribution_patching(
    loaded: LoadedModel, enc: Encoded, source: dict[int, torch.Tensor], kind: str, position: str = "last"
) -> torch.Tensor:
    """Return the first-order estimate of each head's patched metric change ``[pair, layer, head]``:
    ``Σ (z_source − z_corrupt) · ∂M/∂z`` over the patched positions and ``d_head`` (Nanda 2023).

    One corrupted forward with gradients (from the input embeddings, so frozen weights are fine)
    and one backward give every head at once.
    """
    kept: dict[int, torch.Tensor] = {}

    def track(layer: int, z: torch.Tensor, _ctx: object) -> torch.Tensor:
        out = z.clone()  # the tensor the rest of the model reads, so ∂M/∂out is ∂M/∂z
        kept[layer] = out
        return out

    batch = make_batch(enc.corrupt, pad_id(loaded.tokenizer))
    device = loaded.device
    mask = batch.attention_mask.to(device)
    with head_outputs(loaded, track), torch.enable_grad():
        embeds = loaded.model.get_input_embeddings()(batch.input_ids.to(device)).detach().requires_grad_(True)
        logits = loaded.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            logits_to_keep=1,
            **padded_positions(loaded.model, mask),
        ).logits[:, -1]
        total = metric(logits, enc.answer.to(device), enc.wrong.to(device), kind).sum()
        layers = sorted(kept)
        grads = torch.autograd.grad(total, [kept[layer] for layer in layers])
    info = loaded.info
    out = torch.zeros(len(enc.corrupt), info.n_layers, info.n_heads)
    for layer, grad in zip(layers, grads, strict=True):
        corrupt = kept[layer].detach()  # [pair, query, head, d_head]
        if position == "last":
            delta = source[layer].to(corrupt) - corrupt[:, -1]  # [pair, head, d_head]
            out[:, layer] = (delta * grad[:, -1]).sum(-1).cpu()
        else:
            delta = source[layer].to(corrupt) - corrupt  # [pair, query, head, d_head]
            out[:, layer] = (delta * grad).sum((1, 3)).cpu()
    return out


@dataclass
class PatchResult:
    """What :func:`patch` measured: per-head effects and the task's facts."""

    task: PatchTask
    effects: pd.DataFrame
    """Long table: ``layer, head, effect, effect_std, n, method`` (one row per head and method)."""
    params: dict[str, Any] = field(default_factory=dict)
    matrices: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """``method -> (mean [layer, head], std [layer, head])``."""


def _effects(values: torch.Tensor, base: torch.Tensor, scale: float) -> tuple[np.ndarray, np.ndarray]:
    per_pair = ((values - base[:, None, None]) / scale).numpy()  # [pair, layer, head]
    return per_pair.mean(0), per_pair.std(0)


def patch(
    loaded: LoadedModel,
    task: PatchTask,
    method: str = "attribution",
    position: str = "last",
    rows_per_pass: int = 64,
    progress: Progress | None = None,
) -> PatchResult:
    """Return every head's patching effect on ``task`` (see the module docstring for the metric).

    ``method`` is ``"attribution"``, ``"activation"`` (exact) or ``"both"`` (then ``params``
    holds their Spearman correlation over heads). ``params`` also records the task's clean
    accuracy (how often the model prefers the answer on clean prompts), the clean and corrupted
    metric, and wall times.
    """
    check_choice("method", method, METHODS)
    check_choice("position", position, POSITIONS)
    if not loaded.info.causal:
        raise HeadatlasError("patching reads next-token logits: give a decoder (causal) language model")
    enc = encode_task(loaded, task, position)
    device = loaded.device
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    clean_z, clean_logits = clean_outputs(loaded, enc.clean, position)
    with torch.no_grad():
        corrupt_logits = last_logits(loaded, enc.corrupt)
    answer, wrong = enc.answer.to(device), enc.wrong.to(device)
    clean_m = metric(clean_logits, answer, wrong, task.metric).cpu()  # [pair]
    corrupt_m = metric(corrupt_logits, answer, wrong, task.metric).cpu()  # [pair]
    if task.source == "mean":
        clean_z = {layer: z.mean(0, keepdim=True).expand_as(z) for layer, z in clean_z.items()}
    gap = float((clean_m - corrupt_m).mean())
    if task.metric == "logit_diff" and abs(gap) < 1e-6:
        raise HeadatlasError(
            f"clean and corrupted prompts of {task.name!r} give the same logit difference: nothing to patch"
        )
    scale = gap if task.metric == "logit_diff" else 1.0
    seconds["clean_and_corrupt"] = time.perf_counter() - start
    matrices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if method in ("activation", "both"):
        start = time.perf_counter()
        values = activation_patching(loaded, enc, clean_z, task.metric, position, rows_per_pass, progress)
        matrices["activation"] = _effects(values, corrupt_m, scale)
        seconds["activation"] = time.perf_counter() - start
    if method in ("attribution", "both"):
        start = time.perf_counter()
        values = attribution_patching(loaded, enc, clean_z, task.metric, position)
        matrices["attribution"] = _effects(values + corrupt_m[:, None, None], corrupt_m, scale)
        seconds["attribution"] = time.perf_counter() - start
    rows = []
    for name, (mean, std) in matrices.items():
        for layer in range(mean.shape[0]):
            for head in range(mean.shape[1]):
                rows.append(
                    (layer, head, float(mean[layer, head]), float(std[layer, head]), len(enc.clean), name)
                )
    effects = pd.DataFrame(rows, columns=["layer", "head", "effect", "effect_std", "n", "method"])
    if task.metric == "logit_diff":
        accuracy = float(
            (clean_logits.gather(1, answer[:, None]) > clean_logits.gather(1, wrong[:, None])).float().mean()
        )
    else:
        accuracy = float((clean_logits.argmax(-1) == answer).float().mean())
    params: dict[str, Any] = {
        **(task.params or {}),
        "metric": task.metric,
        "source": task.source,
        "method": method,
        "position": position,
        "n_pairs": len(enc.clean),
        "multi_token_answers": enc.multi_token,
        "clean_accuracy": accuracy,
        "clean_metric": float(clean_m.mean()),
        "corrupt_metric": float(corrupt_m.mean()),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    if len(matrices) == 2:
        a, b = (matrices[m][0].ravel() for m in ("activation", "attribution"))
        params["spearman_attribution_vs_activation"] = float(pd.Series(a).rank().corr(pd.Series(b).rank()))
    return PatchResult(task, effects, params, matrices)


def write_patch(atlas: Any, result: PatchResult) -> list[str]:
    """Add the result to ``atlas`` as score columns and metadata; return the columns written.

    ``patch_<task>`` (+ ``_std``, ``_n``) holds the exact effects when activation patching ran, else
    the attribution estimate; with ``method="both"`` the estimate is also ``patch_<task>_attribution``.
    ``atlas.meta["patch"][task]`` records the parameters.
    """
    column = result.task.column
    written = []
    order = [m for m in ("activation", "attribution") if m in result.matrices]
    for index, method in enumerate(order):
        name = column if index == 0 else f"{column}_{method}"
        mean, std = result.matrices[method]
        atlas.set_matrix(name, mean)
        atlas.set_matrix(f"{name}_std", std)
        atlas.set_matrix(f"{name}_n", np.full(mean.shape, result.params["n_pairs"]))
        written.append(name)
    atlas.meta.setdefault("patch", {})[result.task.name] = {
        **result.params,
        "column": column,
        "columns": written,
    }
    return written


@dataclass
class FunctionVector:
    """Todd et al. 2024's function vector: the sum, in the residual stream, of the top heads' mean
    outputs at the last position over the task's clean prompts.

    Attributes:
        task: the task's name.
        heads: the top heads by causal indirect effect.
        vector: ``[d_model]``, Σ_h W_O[:, h] · mean z_h.
        layer: where it is added (Todd et al.: about a third of the way up).
    """

    task: str
    heads: list[tuple[int, int]]
    vector: torch.Tensor
    layer: int

    def save(self, path: Any) -> Any:
        """Write the heads, vector and layer as ``.npz`` (no pickle) and return the path."""
        from ...core.storage import atomic_path

        arrays = {
            "heads": np.array(self.heads, dtype=np.int64),
            "task": np.array(self.task),
            "vector": self.vector.float().cpu().numpy(),
            "layer": np.array(self.layer),
        }
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
        return path


def function_vector(loaded: LoadedModel, task: PatchTask, result: PatchResult, k: int = 10) -> FunctionVector:
    """Return the function vector of ``task`` from its top-``k`` heads by effect (Todd et al. 2024)."""
    from ...capture import output_projections, output_weight

    method = "activation" if "activation" in result.matrices else "attribution"
    mean = result.matrices[method][0]
    order = np.argsort(-mean, axis=None)[:k]
    heads = [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in order]
    enc = encode_task(loaded, task, "last")
    clean_z, _ = clean_outputs(loaded, enc.clean, "last")
    projections = output_projections(loaded)
    d = loaded.info.head_dim
    vector = sum(
        output_weight(projections[layer]).float()[:, head * d : (head + 1) * d]
        @ clean_z[layer][:, head].mean(0).float()
        for layer, head in heads
    )
    return FunctionVector(task.name, heads, torch.as_tensor(vector), loaded.info.n_layers // 3)


def zero_shot_accuracy(loaded: LoadedModel, task: PatchTask, vector: FunctionVector | None = None) -> float:
    """Return top-1 accuracy of the answers on zero-shot prompts (each pair's query line alone),
    optionally with ``vector`` added to the residual stream at its layer, at the last position
    (through that layer's output projection: the least-squares ``δ`` with ``W_O δ = v``)."""
    from ...capture import output_projections, output_weight

    queries = tuple(type(p)(p.clean.splitlines()[-1], p.corrupt, p.answer, p.wrong) for p in task.pairs)
    zero = PatchTask(task.name, queries, task.metric, task.source)
    enc = encode_task(loaded, zero, "last")
    with torch.no_grad():
        if vector is None:
            logits = last_logits(loaded, enc.clean)
        else:
            weight = output_weight(
                output_projections(loaded)[vector.layer]
            ).float()  # [d_model, head * d_head]
            delta = torch.linalg.lstsq(weight, vector.vector.float().to(weight.device)[:, None]).solution[
                :, 0
            ]

            def add(_layer: int, z: torch.Tensor, _ctx: object) -> torch.Tensor:
                out = z.clone()  # [batch, query, head, d_head]
                out[:, -1] += delta.view(z.shape[-2], z.shape[-1]).to(out)
                return out

            with head_outputs(loaded, add, layers=[vector.layer]):
                logits = last_logits(loaded, enc.clean)
    return float((logits.argmax(-1).cpu() == enc.answer).float().mean())


def patch_effects(
    model: LoadedModel | str,
    pairs: PatchTask | str | list[PatchPair] | list[dict[str, str]],
    method: str = "attribution",
    position: str = "last",
    n: int = 24,
    seed: int = 0,
) -> pd.DataFrame:
    """Return every head's patching effect as a DataFrame (``layer, head, effect, effect_std, n,
    method``), with the run's parameters in ``.attrs["params"]`` — ``ha.patch``.

    ``model`` is a :class:`LoadedModel` or anything :func:`headatlas.load` takes; ``pairs`` a task
    name (``"ioi"``, ``"fv:antonym"``, a ``.jsonl`` path), a :class:`PatchTask`, or a list of
    :class:`PatchPair` or ``{"clean", "corrupt", "answer", "wrong"}`` dicts (Wang et al. 2022).
    """
    from ...model.load import load
    from ..common.patch_tasks import build_task

    loaded = model if isinstance(model, LoadedModel) else load(model)
    if pairs is None or not isinstance(pairs, str | PatchTask | list | tuple):
        raise HeadatlasError(
            f"{param('pairs')} must be a task name (ioi, fv:antonym, a .jsonl file), a PatchTask or a list "
            f"of {{clean, corrupt, answer, wrong}} pairs, got {type(pairs).__name__}"
        )
    if isinstance(pairs, str):
        task = build_task(loaded.tokenizer, pairs, n, seed)
    elif isinstance(pairs, PatchTask):
        task = pairs
    else:
        try:
            rows = [p if isinstance(p, PatchPair) else PatchPair(**p) for p in pairs]
        except TypeError:
            raise HeadatlasError(
                f"each of {param('pairs')} is a PatchPair or a dict with clean, corrupt, answer and wrong"
            ) from None
        if not rows:
            raise HeadatlasError("no pairs given: pass at least one {clean, corrupt, answer, wrong} pair")
        task = PatchTask("pairs", tuple(rows), params={"task": "pairs", "n": len(rows)})
    result = patch(loaded, task, method, position)
    effects = result.effects.copy()
    effects.attrs["params"] = result.params
    return effects
