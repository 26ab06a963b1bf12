"""Atlas → JSON-ready data for the report and the viewer; shared names, colours and token display.

Attention maps travel as base64 of uint8 (``round(A * 255)``): 0.004 resolution is plenty for a
picture and a 48 × 48 map costs 2.3 kB (1.2 kB when only the causal lower triangle is stored).
"""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..atlas.table import Atlas
from ..core.roles import RULES
from ..core.scores import ordered, score_spec

logger = logging.getLogger(__name__)

ROLE_COLORS: dict[str, str] = {
    "induction": "#7b2d8e",
    "duplicate": "#e377c2",
    "previous-token": "#d62728",
    "self": "#ff7f0e",
    "subword": "#2ca02c",
    "local": "#e6b800",
    "broad": "#8c8c8c",
    "sink": "#9ecae1",
    "dormant": "#d9d9d9",
    "first-token-reader": "#08519c",
    "retrieval": "#1f77b4",
    "successor": "#17becf",
    "copying": "#8c564b",
    "copy-suppression": "#393b79",
    "translation": "#bcbd22",
    "semantic-dependency": "#8c6d31",
    "semantic-capital": "#e7ba52",
    "semantic-antonym": "#ad494a",
    "alignment": "#e7298a",
    "diagonal": "#66a61e",
    "syntactic": "#637939",
    "negative-bias": "#a50f15",
    "name-mover": "#31a354",
    "negative-name-mover": "#de2d26",
    "s-inhibition": "#756bb1",
    "ioi-duplicate": "#fd8d3c",
    "ioi-previous-token": "#9e9ac8",
    "probe-upos": "#a1d99b",
    "probe-deprel": "#fdae6b",
    "probe-word-start": "#c6dbef",
    "probe-truth": "#fa9fb5",
    "memory-head": "#6a51a3",
    "context-head": "#238b45",
    "safety": "#cb181d",
}
"""One colour per role, in drawing priority: a head with several roles shows them in this order."""
NO_ROLE_COLOR = "#eeeeee"
ROLE_ORDER: tuple[str, ...] = tuple(ROLE_COLORS)

DEFAULT_MAX_EXAMPLE_BYTES = 4_000_000
"""Example maps beyond this many bytes (before base64) are left out of a report."""

_SPACES = re.compile(r" {2,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def display_token(token: str, limit: int = 16) -> str:
    """Return ``token`` made visible for a label: newlines as ↵, tabs as ⇥, space runs as ␣n, other
    control characters as ``\\xNN``, cut to ``limit`` characters.

    The result is plain text; callers still escape it for HTML.
    """
    text = token.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)
    text = _SPACES.sub(lambda m: f"␣{len(m.group(0))}", text)
    if text == "":
        text = "∅"
    elif text == " ":
        text = "␣"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def head_roles(roles: str | None) -> list[str]:
    """Return the roles in a table's comma-separated ``roles`` cell, in :data:`ROLE_ORDER`."""
    have = {r for r in (roles or "").split(",") if r}
    return [r for r in ROLE_ORDER if r in have] + sorted(have - set(ROLE_ORDER))


def scalar_scores(atlas: Atlas) -> list[str]:
    """Return the atlas's scalar scores, in the usual order (:data:`headatlas.core.scores.SCORE_ORDER`)."""
    return ordered(atlas.scores)


def _finite(values: Sequence[float] | np.ndarray, digits: int = 4) -> list[float | None]:
    return [None if not math.isfinite(float(v)) else round(float(v), digits) for v in values]


def quantize(attention: np.ndarray) -> np.ndarray:
    """Return ``attention`` (any float array of probabilities) as uint8, ``round(A * 255)`` (a new array)."""
    return np.clip(np.rint(np.asarray(attention, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def is_causal_map(attention: np.ndarray) -> bool:
    """Return whether every ``[..., query, key]`` map is zero above the diagonal."""
    n = attention.shape[-1]
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    return bool(attention.shape[-2] == n and not np.any(attention[..., upper]))


def encode_maps(attention: np.ndarray, causal: bool) -> str:
    """Base64 of ``attention [..., query, key]`` as uint8; with ``causal`` only the lower triangles.

    A causal map of T tokens stores row i's T(i)=i+1 values at offset i(i+1)/2; the browser
    side (``decodeMaps`` in ``common.js``) undoes this.
    """
    q = quantize(attention)
    if causal:
        n = q.shape[-1]
        rows, cols = np.tril_indices(n)
        q = q[..., rows, cols]
    return base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")


def _examples(atlas: Atlas, max_bytes: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    used = 0
    for ex in atlas.examples:
        att = np.asarray(ex.attention)
        causal = is_causal_map(att)
        n = att.shape[-1]
        size = att.shape[0] * att.shape[1] * (n * (n + 1) // 2 if causal else n * n)
        if used + size > max_bytes:
            logger.warning(
                "report: leaving out example %r (%d bytes of maps would pass the %d-byte budget)",
                ex.label,
                size,
                max_bytes,
            )
            continue
        used += size
        out.append(
            {
                "label": ex.label,
                "tokens": list(ex.tokens),
                "n": n,
                "causal": causal,
                "layers": att.shape[0],
                "heads": att.shape[1],
                "data": encode_maps(att, causal),
            }
        )
    return out


def score_entries(atlas: Atlas) -> list[dict[str, Any]]:
    """Return ``[{name, label, description, signed, bounded, threshold, role}]`` for each scalar score."""
    by_score = {r.score: r for r in RULES}
    entries = []
    for name in scalar_scores(atlas):
        spec = score_spec(name)
        rule = by_score.get(name)
        entries.append(
            {
                "name": name,
                "label": spec.label,
                "description": spec.meaning,
                "signed": spec.signed,
                "bounded": spec.bounded,
                "threshold": None if rule is None else rule.threshold,
                "role": None if rule is None else rule.role,
            }
        )
    return entries


def role_entries(atlas: Atlas | None) -> list[dict[str, Any]]:
    """Return ``[{role, score, threshold, meaning, color, count}]`` in :data:`ROLE_ORDER`."""
    rules = {r.role: r for r in RULES}
    counts: dict[str, int] = {}
    if atlas is not None:
        for cell in atlas.table["roles"].fillna(""):
            for role in head_roles(cell):
                counts[role] = counts.get(role, 0) + 1
    return [
        {
            "role": role,
            "score": rules[role].score if role in rules else None,
            "threshold": rules[role].threshold if role in rules else None,
            "meaning": rules[role].meaning if role in rules else "",
            "color": ROLE_COLORS[role],
            "count": counts.get(role, 0),
        }
        for role in ROLE_ORDER
    ]


def heads_payload(atlas: Atlas) -> dict[str, Any]:
    """Return the head table column-wise, sorted by (layer, head): scores rounded to 4 digits."""
    table: pd.DataFrame = atlas.table.sort_values(["layer", "head"]).reset_index(drop=True)
    names = scalar_scores(atlas)
    out: dict[str, Any] = {
        "layer": [int(v) for v in table["layer"]],
        "head": [int(v) for v in table["head"]],
        "kv_head": [int(v) for v in table["kv_head"]] if "kv_head" in table else [],
        "roles": [head_roles(r) for r in table["roles"].fillna("")] if "roles" in table else [],
        "scores": {n: _finite(table[n].to_numpy()) for n in names},
        "std": {n: _finite(table[f"{n}_std"].to_numpy()) for n in names if f"{n}_std" in table},
    }
    if "distance_profile" in table:
        out["profile"] = [_finite(np.asarray(p, dtype=float), 4) for p in table["distance_profile"]]
    return out


_HEAD_NAME = re.compile(r"L(\d+)H(\d+)")
_CIRCUIT_FIELDS = ("cpr", "cmd", "minimal_k", "stable_k", "cpr_std", "cmd_std", "ranking_seconds")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 4) if math.isfinite(number) else None


def _circuit_method(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    sizes, faith = entry.get("sizes") or [], entry.get("faithfulness") or []
    points = [
        [int(k), _number(f)]
        for k, f in zip(sizes, faith, strict=False)
        if _number(k) is not None and _number(f) is not None
    ]
    return {"name": str(name), **{k: _number(entry.get(k)) for k in _CIRCUIT_FIELDS}, "curve": points}


def circuit_entries(atlas: Atlas) -> list[dict[str, Any]]:
    """Return one entry per task in ``meta["circuits"]`` (written by ``headatlas circuit --atlas``):
    the ranking method and ablation, the model's clean accuracy, the minimal circuit's heads and
    every method's CPR / CMD / minimal k and faithfulness curve ``[[k, f], ...]`` (Mueller et al.
    2025, MIB). Strings stay plain text (the page writes them with ``textContent``); unknown or
    malformed fields are dropped."""
    circuits = atlas.meta.get("circuits")
    if not isinstance(circuits, dict):
        return []
    out = []
    for task, entry in circuits.items():
        if not isinstance(entry, dict):
            continue
        methods = entry.get("methods")
        if not isinstance(methods, dict):  # atlases written before the curves were kept
            methods = {m: e for m, e in entry.items() if isinstance(e, dict)}
        heads = []
        for name in entry.get("heads") or []:
            match = _HEAD_NAME.fullmatch(str(name))
            if match:
                heads.append({"name": str(name), "layer": int(match[1]), "head": int(match[2])})
        out.append({
            "task": str(task), "column": str(entry.get("column", "")), "method": str(entry.get("method", "")),
            "ablation": str(entry.get("ablation", "")), "minimal_k": _number(entry.get("minimal_k")),
            "threshold": _number(entry.get("threshold", 0.9)), "total_heads": _number(entry.get("total_heads")),
            "n_pairs": _number(entry.get("n_pairs")), "clean_accuracy": _number(entry.get("clean_accuracy")),
            "heads": heads,
            "methods": [_circuit_method(m, e) for m, e in methods.items() if isinstance(e, dict)],
        })  # fmt: skip
    return out


def atlas_payload(atlas: Atlas, max_example_bytes: int = DEFAULT_MAX_EXAMPLE_BYTES) -> dict[str, Any]:
    """Return everything the report shows, JSON-ready (no NaN: missing values are ``None``)."""
    model = atlas.model.to_dict()
    meta = atlas.meta
    return {
        "model": model,
        "run": {
            "tokens": meta.get("tokens"),
            "probes": meta.get("probes", list(meta.get("batteries", {}))),
            "batteries": meta.get("batteries", {}),
            "wall_seconds": meta.get("wall_seconds"),
            "seed": meta.get("seed"),
            "versions": meta.get("versions", {}),
        },
        "scores": score_entries(atlas),
        "roles": role_entries(atlas),
        "no_role_color": NO_ROLE_COLOR,
        "heads": heads_payload(atlas),
        "examples": _examples(atlas, max_example_bytes),
        "circuits": circuit_entries(atlas),
    }
