"""Head-wise KV-cache plans from an atlas: which KV heads keep every token, which stream.

A KV group's score is the max over its query heads (RazorAttention, Tang et al. 2024); the
highest-scoring KV heads keep full KV, every other one keeps ``sink`` first tokens plus the
``recent`` last (DuoAttention, Xiao et al. 2024), sized so that the KV bytes at ``context``
tokens are at most ``keep_fraction`` of the full cache's (or ``budget`` tokens per KV head).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...atlas.table import Atlas
from ...core.errors import HeadatlasError, check_at_least, check_number, param
from ...core.records import check_record, is_bool, is_dict, is_int, is_number, list_of, one_of, optional
from ...core.storage import atomic_path
from ..common.kv_heads import kv_head_scores, relative_scores

FORMAT = "headatlas-kv-plan"
PRESETS: dict[str, tuple[str, ...]] = {
    "duo": ("retrieval", "induction"),
    "razor": ("duplicate_token", "induction"),
}
"""Named score combinations for ``by``: ``duo`` keeps heads that retrieve or copy from far back
(DuoAttention's retrieval heads), ``razor`` RazorAttention's echo + induction heads."""


PLAN_FIELDS = {
    "model": is_dict,
    "full_heads": list_of(list_of(is_int(0))),
    "sink": is_int(0),
    "recent": is_int(1),
    "compensate": is_bool,
    "context": is_int(1),
    "rule": is_dict,
    "atlas": is_dict,
    "layer_types": list_of(one_of("global", "sliding")),
    "scores": list_of(list_of(is_number)),
    "head_scores": list_of(list_of(is_number)),
    "kv_bytes": is_dict,
    "spans": list_of(list_of(optional(list_of(is_number)))),
}
"""The fields of a plan file (:meth:`Plan.load` checks them)."""
PLAN_OPTIONAL = frozenset(
    {"rule", "atlas", "layer_types", "scores", "head_scores", "kv_bytes", "compensate", "spans"}
)


def span_window(alpha: float, beta: float, n_tokens: int) -> int:
    """Return the window (last tokens kept) of the elastic rule ``alpha + beta · n_tokens`` (MoA,
    Fu et al. 2024), at least 1."""
    return max(1, round(alpha + beta * n_tokens))


@dataclass
class Plan:
    """A head-wise KV plan: per layer, the KV heads that keep every token (see module docstring)."""

    model: dict[str, Any]
    full_heads: list[list[int]]
    sink: int = 4
    recent: int = 256
    compensate: bool = False
    context: int = 2048
    rule: dict[str, Any] = field(default_factory=dict)
    atlas: dict[str, Any] = field(default_factory=dict)
    layer_types: list[str] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    head_scores: list[list[float]] = field(default_factory=list)
    kv_bytes: dict[str, Any] = field(default_factory=dict)
    spans: list[list[list[float] | None]] = field(default_factory=list)
    """Per layer and KV head, the streaming window's elastic rule ``[alpha, beta]`` (window
    ``alpha + beta · N`` at ``N`` prompt tokens, MoA) or ``None`` for a full head; empty in a
    binary plan, whose streaming heads all keep ``recent``."""

    @property
    def n_kv_heads(self) -> int:
        """KV heads per layer."""
        return int(self.model["n_kv_heads"])

    def n_full(self) -> int:
        """KV heads kept full over all global layers."""
        return sum(len(h) for t, h in zip(self.layer_types, self.full_heads, strict=True) if t != "sliding")

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (with ``format`` and ``version``; a binary plan has no ``spans``)."""
        data = asdict(self)
        if not self.spans:
            data.pop("spans")
        return {"format": FORMAT, "version": 1, **data}

    def windows(self, n_tokens: int) -> list[list[int | None]]:
        """Return, per layer and KV head, the window a streaming head keeps at ``n_tokens`` prompt
        tokens (``None``: the head keeps every token). A span plan's window is ``alpha + beta · n``;
        one whose ``sink + window + 1`` slots would not be fewer than ``n_tokens`` is kept full."""
        full = [set(h) for h in self.full_heads]
        out: list[list[int | None]] = []
        for layer in range(len(self.full_heads)):
            row: list[int | None] = []
            for k in range(self.n_kv_heads):
                rule = self.spans[layer][k] if self.spans else [self.recent, 0.0]
                if k in full[layer] or rule is None:
                    row.append(None)
                    continue
                window = span_window(rule[0], rule[1], n_tokens) if self.spans else self.recent
                row.append(None if self.spans and self.sink + window + 1 >= n_tokens else window)
            out.append(row)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON through ``atomic_path``; return the path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan written by :meth:`save`; a one-line error for anything else."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise HeadatlasError(f"cannot read the KV plan {str(path)!r}: {error}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise HeadatlasError(
                f"{str(path)!r} is not a headatlas KV plan: make one with `headatlas kv plan`"
            )
        data.pop("format")
        data.pop("version", None)
        check_record(data, PLAN_FIELDS, repr(str(path)), "KV plan", PLAN_OPTIONAL)
        plan = cls(**data)
        plan.check_heads(str(path))
        return plan

    def check_heads(self, where: str) -> None:
        """Raise :class:`HeadatlasError` unless the plan's full heads and layer types fit its model."""
        n_layers, n_kv = self.model.get("n_layers"), self.model.get("n_kv_heads")
        if not isinstance(n_layers, int) or not isinstance(n_kv, int) or n_layers < 1 or n_kv < 1:
            raise HeadatlasError(f"{where}: field 'model' needs positive n_layers and n_kv_heads")
        if len(self.full_heads) != n_layers or (self.layer_types and len(self.layer_types) != n_layers):
            raise HeadatlasError(f"{where}: field 'full_heads' needs one list per layer ({n_layers})")
        bad = [k for heads in self.full_heads for k in heads if not 0 <= k < n_kv]
        if bad:
            raise HeadatlasError(f"{where}: KV head {bad[0]} does not exist (the model has {n_kv} per layer)")
        if self.spans and (
            len(self.spans) != n_layers
            or any(len(row) != n_kv for row in self.spans)
            or any(r is not None and (len(r) != 2 or min(r) < 0) for row in self.spans for r in row)
        ):
            raise HeadatlasError(
                f"{where}: field 'spans' needs, per layer ({n_layers}) and KV head ({n_kv}), "
                "[alpha, beta] (both ≥ 0) or null"
            )

    def check_model(self, info: Any) -> None:
        """Refuse a model other than the plan's (weights sha256, then layer/KV-head shape)."""
        theirs, ours = self.model.get("sha256"), info.sha256
        if theirs != ours and (theirs or ours):
            raise HeadatlasError(
                f"the KV plan was made for another model (sha256 {str(theirs)[:12]}… ≠ {str(ours)[:12]}…): "
                "make a plan from this model's atlas"
            )
        if (self.model.get("n_layers"), self.n_kv_heads) != (info.n_layers, info.n_kv_heads):
            raise HeadatlasError(
                f"the KV plan has {self.model.get('n_layers')} layers × {self.n_kv_heads} KV heads, the model "
                f"{info.n_layers} × {info.n_kv_heads}: make a plan from this model's atlas"
            )


def score_names(by: str | list[str]) -> list[str]:
    """Return the score names ``by`` stands for: a preset (:data:`PRESETS`), a comma-separated
    string or a list."""
    names = PRESETS.get(by, (by,)) if isinstance(by, str) else tuple(by)
    return [n for part in names for n in str(part).split(",") if n]


def kv_scores(atlas: Atlas, by: str | list[str]) -> tuple[np.ndarray, list[str]]:
    """Return ``([layer, kv_head] scores, score names)`` by the one atlas → KV-head rule
    (:func:`~headatlas.apps.common.kv_heads.kv_head_scores`)."""
    names = score_names(by)
    return kv_head_scores(atlas, names), names


def head_scores(atlas: Atlas, by: str | list[str]) -> tuple[np.ndarray, list[str]]:
    """Return ``([layer, head] scores, score names)``: each score relative to the model's strongest
    head, combined by their max (:func:`~headatlas.apps.common.kv_heads.relative_scores`)."""
    names = score_names(by)
    return relative_scores(atlas, names), names


def _slots(sink: int, recent: int, compensate: bool) -> int:
    return sink + recent + 1  # the buffer always has the compensation slot


def check_plan_settings(
    model: Any,
    keep_fraction: float | None,
    budget: int | None,
    context: int,
    sink: int,
    recent: int,
    compensate: bool = False,
) -> float:
    """Return the share of the KV bytes a plan keeps, after checking its settings for ``model`` (a
    :class:`~headatlas.model.info.ModelInfo`) before any work; raise :class:`HeadatlasError`
    naming the first bad parameter (``context`` beyond the model's own context is refused)."""
    if (keep_fraction is None) == (budget is None):
        raise HeadatlasError(f"give one of {param('keep_fraction')} or {param('budget')}")
    check_at_least("context", context, 1)
    longest = model.context_length
    if longest is not None and context > longest:
        raise HeadatlasError(
            f"{param('context')} {context:,} is beyond {model.name}'s context of {longest:,} tokens"
        )
    if budget is not None:
        check_at_least("budget", budget, 1)
        if budget > context:
            raise HeadatlasError(f"{param('budget')} {budget} is more than the {param('context')} {context}")
        keep_fraction = budget / context
    check_number("keep_fraction", keep_fraction)
    if not 0 < keep_fraction <= 1:  # type: ignore[operator]
        raise HeadatlasError(f"{param('keep_fraction')} must be in (0, 1], got {keep_fraction:g}")
    check_at_least("sink", sink, 0)
    check_at_least("recent", recent, 1)
    slots = _slots(sink, recent, compensate)
    if slots >= context:
        raise HeadatlasError(
            f"the window ({param('sink')} + {param('recent')} + 1 = {slots} tokens) is not smaller than the "
            f"context ({param('context')} {context}): lower {param('recent')}"
        )
    return float(keep_fraction)  # type: ignore[arg-type]


def plan(
    atlas: Atlas,
    *,
    keep_fraction: float | None = None,
    budget: int | None = None,
    by: str | list[str] = "duo",
    sink: int = 4,
    recent: int = 256,
    compensate: bool = False,
    context: int = 2048,
    layer_types: list[str] | None = None,
    atlas_path: str | None = None,
) -> Plan:
    """Return the :class:`Plan` keeping the best-scoring KV heads full within the byte budget.

    ``keep_fraction`` (0, 1] is the share of the full cache's KV bytes at ``context`` tokens;
    ``budget`` the mean tokens held per KV head (the same thing as ``budget / context``).
    ``layer_types`` (``"global"``/``"sliding"`` per layer) marks the model's own sliding layers,
    which are left as they are. Heads are ranked by :func:`kv_scores`.
    """
    keep_fraction = check_plan_settings(atlas.model, keep_fraction, budget, context, sink, recent, compensate)
    slots = _slots(sink, recent, compensate)
    scores, names = kv_scores(atlas, by)
    per_head, _ = head_scores(atlas, by)
    n_layers, n_kv = scores.shape
    model = atlas.model
    window = model.sliding_window or 0
    types = list(layer_types or ["global"] * n_layers)
    sliding = [t == "sliding" for t in types]
    per_sliding = min(context, window) if window else context
    total = n_kv * sum(per_sliding if s else context for s in sliding)
    fixed = n_kv * sum(per_sliding if s else slots for s in sliding)  # all global heads streaming
    extra = context - slots  # a streaming head promoted to full
    n_global = n_kv * sum(not s for s in sliding)
    n_promote = min(n_global, math.floor((keep_fraction * total - fixed) / extra + 1e-9))
    if n_promote < 0:
        raise HeadatlasError(
            f"{param('keep_fraction')} {keep_fraction:g} is below what streaming every head keeps "
            f"({fixed / total:.3f} at {context} tokens): lower {param('recent')} or raise {param('keep_fraction')}"
        )
    ranked = [
        (float(scores[lyr, k]), lyr, k) for lyr in range(n_layers) for k in range(n_kv) if not sliding[lyr]
    ]
    ranked.sort(key=lambda t: (-t[0], t[1], t[2]))
    full: list[list[int]] = [[] for _ in range(n_layers)]
    for _, lyr, k in ranked[:n_promote]:
        full[lyr].append(k)
    for lyr in range(n_layers):
        full[lyr] = list(range(n_kv)) if sliding[lyr] else sorted(full[lyr])
    held = fixed + n_promote * extra
    per_token = 2 * model.head_dim * 4  # float32 keys + values per KV head
    rule = {"by": names, "keep_fraction": keep_fraction, "budget": budget}
    return Plan(
        model=model.to_dict(),
        full_heads=full,
        sink=sink,
        recent=recent,
        compensate=compensate,
        context=context,
        rule=rule,
        atlas={"path": atlas_path, "weights_sha256": model.sha256},
        layer_types=types,
        scores=np.round(scores, 6).tolist(),
        head_scores=np.round(per_head, 6).tolist(),
        kv_bytes={
            "context": context,
            "full": total * per_token,
            "plan": held * per_token,
            "fraction": held / total,
            "dtype": "float32",
            "kv_heads_full": n_promote,
            "kv_heads_streaming": n_global - n_promote,
        },
    )


def all_full(info: Any, sink: int = 4, recent: int = 256) -> Plan:
    """A plan that keeps every KV head full (the plain cache's content, for tests and baselines)."""
    return Plan(
        model=info.to_dict(),
        full_heads=[list(range(info.n_kv_heads)) for _ in range(info.n_layers)],
        sink=sink,
        recent=recent,
        layer_types=["global"] * info.n_layers,
        rule={"by": ["all-full"]},
    )


def from_heads(info: Any, full_heads: list[list[int]], **options: Any) -> Plan:
    """A plan with the given full KV heads per layer (random baselines, hand-made plans, imports)."""
    if len(full_heads) != info.n_layers:
        raise HeadatlasError(f"{param('full_heads')} needs {info.n_layers} layers, got {len(full_heads)}")
    for heads in full_heads:
        bad = [h for h in heads if not 0 <= h < info.n_kv_heads]
        if bad:
            raise HeadatlasError(
                f"KV head {bad[0]} does not exist (the model has {info.n_kv_heads} per layer)"
            )
    return Plan(
        model=info.to_dict(),
        full_heads=[sorted(set(h)) for h in full_heads],
        layer_types=options.pop("layer_types", ["global"] * info.n_layers),
        rule=options.pop("rule", {"by": ["given"]}),
        **options,
    )
