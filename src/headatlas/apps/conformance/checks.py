"""What works on a model, each checked against a reference computed another way.

- ``capture``: every natural-battery score (positional, entropy, subword, distance) on a left-padded
  batch, computed by the capture path a scan takes (the fused log-sum-exp path where it applies),
  against the same detectors fed transformers' own eager ``output_attentions``; encoder–decoder
  models compare the captured probabilities of every layer (encoder, decoder, cross) with eager's.
- ``ablate``: :func:`headatlas.ablate` of one head (the hook on the output projection's input)
  against a forward whose attention function itself zeroes that head's output (the reference
  never looks for the projection, so a wrong projection, a wrong head slice, or a module that
  mixes heads after attention all show).
- ``head_outputs``: replacing every head output by itself leaves the logits unchanged.
- ``patch``: one head's output taken from another input, written through :func:`head_outputs`
  (activation patching) against the attention function writing the same values.
- ``prune``: the head physically removed (:mod:`headatlas.model.surgery`) against its ablation.

Each check returns a :class:`Outcome`: ``ok`` (with the measured max |Δ|), ``refused`` (headatlas
raised :class:`HeadatlasError`: the one-line reason), ``wrong`` (a number off the reference) or
``error`` (anything else raised).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ...atlas.stats import HeadStats
from ...batteries.base import make_batch, pad_id
from ...batteries.natural import text_battery
from ...capture import AttentionView, capture
from ...capture.ablate import ablate
from ...capture.hook import head_outputs
from ...capture.session import eager_layer_numbers, padded_positions
from ...capture.views import DenseView, LseView
from ...core.errors import HeadatlasError
from ...detectors.attention import DETECTORS, Context
from ...model.compat import attention_implementation
from ...model.info import LoadedModel
from .families import TEXTS

TOLERANCE = 1e-5
"""Largest |Δ| of a score or a probability that counts as exact (fp32)."""
LOGIT_TOLERANCE = 1e-4
"""Largest |Δ| of a logit between two routes to the same computation (fp32 sums in another order)."""


@dataclass(frozen=True)
class Outcome:
    """One check on one model: ``status`` is ``ok``, ``refused``, ``wrong``, ``error`` or ``n/a``;
    ``delta`` the measured max |Δ| against the reference; ``detail`` the reason or the path taken."""

    status: str
    delta: float | None = None
    detail: str = ""


Check = Callable[[LoadedModel], Outcome]


def _batch(loaded: LoadedModel) -> tuple[Any, Context]:
    battery = text_battery(loaded.tokenizer, TEXTS, None)
    batch = make_batch(battery.sequences, pad_id(loaded.tokenizer))
    ctx = Context(batch.positions, batch.word_ids)
    return batch, ctx


def _accumulate(stats: HeadStats, view: AttentionView, ctx: Context) -> None:
    for name in ("positional", "entropy", "subword", "distance"):
        for score, result in DETECTORS[name](view, ctx).items():
            stats.add(score, view.layer, result.values, result.valid)


def _eager(loaded: LoadedModel, **inputs: Any) -> Any:
    model = loaded.model
    with attention_implementation(model, "eager"), torch.no_grad():
        return model(**inputs, output_attentions=True)


def _max_delta(a: HeadStats, b: HeadStats) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name in a.names:
        if name not in b.names:
            return math.inf, f"{name} missing from the reference"
        x, y = torch.as_tensor(a.mean(name)), torch.as_tensor(b.mean(name))
        if not torch.equal(torch.as_tensor(a.n(name)), torch.as_tensor(b.n(name))):
            return math.inf, f"{name}: counts differ"
        both = torch.isnan(x) & torch.isnan(y)
        diff = torch.where(both, torch.zeros_like(x), (x - y).abs())
        value = float(diff.nan_to_num(math.inf).max()) if diff.numel() else 0.0
        if value > worst:
            worst, where = value, name
    return worst, where


def check_capture(loaded: LoadedModel) -> Outcome:
    """Natural-battery scores on the capture path against eager ``output_attentions`` (see module)."""
    if loaded.info.encoder_decoder:
        return _capture_seq2seq(loaded)
    info = loaded.info
    batch, ctx = _batch(loaded)
    fast = HeadStats(info.n_layers, info.n_heads)
    kinds: set[str] = set()

    def on_view(view: AttentionView) -> None:
        kinds.add("fast" if isinstance(view, LseView) else "dense")
        _accumulate(fast, view, ctx)

    with capture(loaded, on_view) as session:
        session.run(batch.input_ids, batch.attention_mask, with_head=False, context=ctx)
        path = "eager fallback" if session.fallback else "+".join(sorted(kinds)) or "none"
    extra = padded_positions(loaded.model, batch.attention_mask)
    out = _eager(loaded, input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra)
    changed = _eager_changes_forward(loaded, batch.input_ids, batch.attention_mask, out)
    if changed is not None:
        return Outcome("wrong", changed, f"{path}: eager output_attentions changes the model's forward")
    attentions = [a for a in (getattr(out, "attentions", None) or ()) if a is not None]
    if not session.layers_seen:
        raise HeadatlasError(f"{info.name} ran without calling any attention layer: nothing to scan")
    seen = sorted(session.layers_seen)
    if len(attentions) == info.n_layers > len(seen):
        # one entry per layer, the linear-attention layers' being their own state (MiniMax's
        # lightning attention): the softmax layers' maps sit at their layer's index
        attentions = [attentions[layer] for layer in seen]
        numbers = seen
    elif len(attentions) != len(seen) or not attentions:
        return Outcome("n/a", None, f"eager gives {len(attentions)} attention maps for {len(seen)} layers")
    else:
        numbers = eager_layer_numbers(loaded, len(attentions))
    reference = HeadStats(info.n_layers, info.n_heads)
    if len(numbers) < info.n_layers:
        path += f"; hybrid: attention in layers {numbers} of {info.n_layers}, the others have no heads"
    if set(numbers) != session.layers_seen:
        return Outcome("wrong", math.inf, f"{path}: capture saw layers {sorted(session.layers_seen)}")
    for layer, probs in zip(numbers, attentions, strict=True):
        probs = probs.float()  # [batch, head, query, key]
        n_keys = (probs > 0).any(dim=1).sum(-1)  # [batch, query]: keys the eager mask allowed
        _accumulate(reference, DenseView(layer, probs, 0, n_keys), ctx)
    delta, where = _max_delta(fast, reference)
    if delta > TOLERANCE and _has_sinks(loaded):
        return _capture_sinks(loaded, batch.input_ids, batch.attention_mask, attentions, numbers, path)
    status = "ok" if delta <= TOLERANCE else "wrong"
    return Outcome(status, delta, path if status == "ok" else f"{path}: {where}")


def _has_sinks(loaded: LoadedModel) -> bool:
    from ...capture.backends.headatlas import has_sinks

    return any(has_sinks(m) for m in loaded.model.modules())


def _capture_sinks(
    loaded: LoadedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    eager: list[Any],
    numbers: list[int],
    path: str,
) -> Outcome:
    """Learned sinks: headatlas's probabilities of the real keys exclude the sink's share (rows sum
    to 1 − the sink's mass: what weights the values, gpt-oss's convention); a family whose eager
    ``output_attentions`` returns the softmax before its sink scaling (Granite SWA) is compared with
    headatlas's rows renormalised to 1, which checks everything but the sink's share itself."""
    from ...capture.session import attention_maps

    maps = attention_maps(loaded, ids, mask)
    delta = 0.0
    for layer, probs in zip(numbers, eager, strict=True):
        ours = maps[layer]  # [batch, head, query, key]
        ours = ours / ours.sum(-1, keepdim=True).clamp_min(1e-30)
        diff = (ours - probs.float()).abs() * mask.bool()[:, None, :, None]
        delta = max(delta, float(diff.max()))
    detail = f"{path}; sinks: rows exclude the sink's share; eager returns the pre-sink softmax (compared renormalised)"
    return Outcome("ok" if delta <= TOLERANCE else "wrong", delta, detail)


def _eager_changes_forward(
    loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, out: Any
) -> float | None:
    """The max |Δ| of the last hidden states between the eager forward that returned attentions and
    the model's own forward, when it exceeds :data:`LOGIT_TOLERANCE` (then eager's maps are not the
    model's attention), else ``None``."""
    logits = getattr(out, "logits", None)
    if logits is None:
        return None
    delta = float(((_logits(loaded, ids, mask) - logits.float()).abs() * mask.bool()[..., None]).max())
    return delta if delta > LOGIT_TOLERANCE else None


def _capture_seq2seq(loaded: LoadedModel) -> Outcome:
    from ...capture.session import attention_maps

    batch, _ = _batch(loaded)
    ids, mask = batch.input_ids, batch.attention_mask
    target = ids[:, -6:]
    maps = attention_maps(loaded, ids, mask, decoder_input_ids=target)
    out = _eager(loaded, input_ids=ids, attention_mask=mask, decoder_input_ids=target)
    eager = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
    if len(eager) != len(maps):
        return Outcome("n/a", None, f"eager gives {len(eager)} attention maps for {len(maps)} layers")
    delta = 0.0
    for layer, probs in maps.items():
        rows = mask.bool() if probs.shape[2] == ids.shape[1] else torch.ones(target.shape, dtype=torch.bool)
        diff = (probs - eager[layer].float()).abs() * rows[:, None, :, None]  # [batch, head, query, key]
        delta = max(delta, float(diff.max()))
    return Outcome("ok" if delta <= TOLERANCE else "wrong", delta, "dense (encoder–decoder)")


# --- head outputs: the hook against the attention function itself --------------------------------


@contextmanager
def _attention_writes(
    loaded: LoadedModel, write: Callable[[int, torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, every attention layer's output ``[batch, query, head, d_head]`` passes through
    ``write(layer, out)`` inside the attention function (the reference route for head writes)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    from ...capture.backends import headatlas as backend

    model = loaded.model
    if not getattr(type(model), "_supports_attention_backend", False):
        raise _NoReference(f"{type(model).__name__} cannot swap attention backends")
    use_eager = backend.needs_eager(model)
    delegate = backend.headatlas_eager_attention if use_eager else backend.headatlas_attention
    order: dict[int, int] = {}

    def fn(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out, _ = delegate(module, *args, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            layer = order.setdefault(id(module), len(order))
        return write(layer, out), None

    AttentionInterface.register("headatlas_conformance", fn)
    AttentionMaskInterface.register("headatlas_conformance", eager_mask if use_eager else sdpa_mask)
    with attention_implementation(model, "headatlas_conformance"):
        yield


class _NoReference(Exception):
    """No independent reference route exists for this model."""


def _logits(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(input_ids=ids, attention_mask=mask, **padded_positions(loaded.model, mask))
    return getattr(out, "logits", out[0]).float()  # [batch, seq, vocab]


def _target(loaded: LoadedModel) -> tuple[int, int]:
    """The head the write checks use: the last head of the last layer with attention."""
    from ...capture.hook import output_projections

    return max(output_projections(loaded)), loaded.info.n_heads - 1


def _compare(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, effect_of: torch.Tensor | None) -> Outcome:
    rows = mask.bool()[..., None]  # [batch, seq, 1]
    delta = float(((a - b).abs() * rows).max())
    if effect_of is not None and float(((a - effect_of).abs() * rows).max()) <= LOGIT_TOLERANCE:
        return Outcome("wrong", delta, "the write changed nothing: the hook misses the head")
    return Outcome("ok" if delta <= LOGIT_TOLERANCE else "wrong", delta)


def _weight_zeroed(loaded: LoadedModel, layer: int, head: int) -> Iterator[None]:
    """The weaker reference for models that cannot swap attention functions: the head's input
    columns of the output projection set to 0 (restored on exit)."""
    from ...capture.hook import output_projections, output_weight

    module = output_projections(loaded)[layer]
    d = loaded.info.head_dim
    weight = output_weight(module)  # [d_model, head * d_head], a view of the parameter
    saved = weight[:, head * d : (head + 1) * d].clone()
    with torch.no_grad():
        weight[:, head * d : (head + 1) * d] = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            weight[:, head * d : (head + 1) * d] = saved


def check_ablate(loaded: LoadedModel) -> Outcome:
    """One head zeroed by :func:`headatlas.ablate` against the attention function zeroing it (or,
    where the model cannot swap attention functions, against its projection's columns zeroed)."""
    loaded.info.require_one_stack("ablation")
    batch, _ = _batch(loaded)
    ids, mask = batch.input_ids, batch.attention_mask
    layer, head = _target(loaded)
    plain = _logits(loaded, ids, mask)
    with ablate(loaded, [(layer, head)]):
        hooked = _logits(loaded, ids, mask)

    def zero(at: int, out: torch.Tensor) -> torch.Tensor:
        if at != layer:
            return out
        out = out.clone()
        out[:, :, head] = 0.0  # [batch, query, head, d_head]
        return out

    try:
        with _attention_writes(loaded, zero):
            reference = _logits(loaded, ids, mask)
    except _NoReference:
        reference = None
    outcome = None if reference is None else _compare(hooked, reference, mask, plain)
    if outcome is not None and outcome.status == "ok":
        return outcome
    # the issue's own definition: the head's slice of the projection's input zeroed (here: its columns)
    with contextmanager(_weight_zeroed)(loaded, layer, head):
        by_columns = _compare(hooked, _logits(loaded, ids, mask), mask, plain)
    if by_columns.status != "ok":
        return by_columns
    if outcome is None:
        return Outcome("ok", by_columns.delta, "reference: the projection's columns zeroed")
    return Outcome(
        "ok",
        by_columns.delta,
        "gated: a norm or gate sits between attention and the output projection; ablation zeroes the "
        "projection's input (its columns), not the attention output",
    )


def check_head_outputs(loaded: LoadedModel) -> Outcome:
    """Writing every head's own output back through :func:`head_outputs` is the identity."""
    loaded.info.require_one_stack("head outputs")
    batch, _ = _batch(loaded)
    ids, mask = batch.input_ids, batch.attention_mask
    plain = _logits(loaded, ids, mask)
    with head_outputs(loaded, lambda _layer, z, _ctx: z.clone()):
        same = _logits(loaded, ids, mask)
    return _compare(same, plain, mask, None)


def check_patch(loaded: LoadedModel) -> Outcome:
    """One head's output from a corrupted input written into the clean run (activation patching)
    through :func:`head_outputs`, against the attention function reading and writing the same head.

    Where the two differ while ablation matches (a per-head gate between attention and the output
    projection, which depends on the input: Qwen3-Next-style gated attention), patching writes the
    head's gated output; the outcome is ``ok`` with that said in its detail."""
    loaded.info.require_one_stack("activation patching")
    batch, _ = _batch(loaded)
    ids, mask = batch.input_ids, batch.attention_mask
    corrupted = torch.roll(ids, 1, dims=0), torch.roll(mask, 1, dims=0)
    layer, head = _target(loaded)
    saved: dict[str, torch.Tensor] = {}

    def read(_layer: int, z: torch.Tensor, _ctx: Any) -> None:
        saved["z"] = z[:, :, head].clone()  # [batch, query, d_head]

    def write(_layer: int, z: torch.Tensor, _ctx: Any) -> torch.Tensor:
        if saved["z"].shape != z[:, :, head].shape:
            raise _NoReference("the head's output has another shape on the other input")
        out = z.clone()
        out[:, :, head] = saved["z"]
        return out

    with head_outputs(loaded, read, layers=[layer]):
        _logits(loaded, *corrupted)
    plain = _logits(loaded, ids, mask)
    with head_outputs(loaded, write, layers=[layer]):
        hooked = _logits(loaded, ids, mask)

    def source_read(at: int, out: torch.Tensor) -> torch.Tensor:
        if at == layer:
            saved["a"] = out[:, :, head].clone()  # [batch, query, d_head]
        return out

    def source_write(at: int, out: torch.Tensor) -> torch.Tensor:
        if at != layer:
            return out
        if saved["a"].shape != out[:, :, head].shape:
            raise _NoReference("the head's output has another shape on the other input")
        out = out.clone()
        out[:, :, head] = saved["a"].to(out)
        return out

    with _attention_writes(loaded, source_read):
        _logits(loaded, *corrupted)
    with _attention_writes(loaded, source_write):
        reference = _logits(loaded, ids, mask)
    outcome = _compare(hooked, reference, mask, plain)
    if outcome.status == "wrong" and check_ablate(loaded).status == "ok":
        return Outcome("ok", outcome.delta, "gated: patches the head's gated output (ablation exact)")
    return outcome


def check_prune(loaded: LoadedModel) -> Outcome:
    """The last head of the last layer removed from the weights against its zero ablation."""
    import copy

    from ...model.surgery import apply_layouts, attention_modules, plan_layouts

    info = loaded.info
    info.require_one_stack("head pruning")
    attention_modules(loaded.model)  # a clear refusal for families pruning does not cover
    layer, head = _target(loaded)
    layouts = plan_layouts([(layer, head)], info.n_layers, info.n_heads, info.n_kv_heads)
    pruned = copy.deepcopy(loaded.model)
    apply_layouts(pruned, layouts, info.head_dim)
    batch, _ = _batch(loaded)
    ids, mask = batch.input_ids, batch.attention_mask
    with ablate(loaded, [(layer, head)]):
        reference = _logits(loaded, ids, mask)
    other = LoadedModel(pruned.eval(), loaded.tokenizer, info)
    return _compare(_logits(other, ids, mask), reference, mask, None)


CHECKS: dict[str, Check] = {
    "capture": check_capture,
    "ablate": check_ablate,
    "head_outputs": check_head_outputs,
    "patch": check_patch,
    "prune": check_prune,
}
"""The checks every model gets, in page order; the CLI adds ``kv`` from the KV app's own check (an app imports no other app)."""


def run_check(check: Check, loaded: LoadedModel) -> Outcome:
    """Return ``check(loaded)``, with a refusal, a missing reference or a crash as its outcome."""
    try:
        return check(loaded)
    except HeadatlasError as error:
        return Outcome("refused", None, " ".join(str(error).split()))
    except _NoReference as error:
        return Outcome("n/a", None, f"no reference: {error}")
    except Exception as error:
        return Outcome("error", None, f"{type(error).__name__}: {' '.join(str(error).split())[:160]}")


def first_prompt(loaded: LoadedModel) -> torch.Tensor:
    """The first sweep text as the model's tokenizer frames it, ``[1, seq]`` (for decode checks)."""
    battery = text_battery(loaded.tokenizer, TEXTS[:1], None)
    return torch.tensor([battery.sequences[0].ids], dtype=torch.long, device=loaded.device)


def delta_check(measure: Callable[[LoadedModel], float], tolerance: float = LOGIT_TOLERANCE) -> Check:
    """A :data:`Check` from ``measure(loaded) -> max |Δ|`` against its reference: ``ok`` within
    ``tolerance``, else ``wrong`` (refusals and crashes as :func:`run_check` reports them)."""

    def check(loaded: LoadedModel) -> Outcome:
        delta = measure(loaded)
        return Outcome("ok" if delta <= tolerance else "wrong", delta)

    return check
