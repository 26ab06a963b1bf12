"""Pictures on disk (PNG, SVG or PDF by the file suffix), drawn with matplotlib's Agg canvas.

No pyplot and no global backend switch: every function builds its own
:class:`matplotlib.figure.Figure`, so importing this module changes nothing for the caller.
Attention colours use a square-root scale (a head that parks 90 % on the first token would
otherwise hide everything else); scores use a linear scale.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, PowerNorm
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, Rectangle

from ..atlas.table import Atlas
from ..core.errors import HeadatlasError
from ..core.heads import head_name
from ..core.roles import RULES
from ..core.scores import score_spec
from ..core.storage import atomic_path
from .data import NO_ROLE_COLOR, ROLE_COLORS, display_token, head_roles, is_causal_map, scalar_scores

logger = logging.getLogger(__name__)

FORMATS = (".png", ".svg", ".pdf")
MAX_LABELS = 64
"""Most token labels per axis of a single-head map; longer texts label every k-th token."""
EXAMPLE_SCORES = ("induction", "previous_token", "duplicate_token", "self", "local", "subword")
"""Scores whose top heads get example-map figures in ``figures/examples/``."""
TOP_PER_SCORE = 2
PROFILE_SHOWN = 32
"""Offsets shown in the distance-profile heatmap (the table keeps 64)."""
GRID_TILE = 64
"""Thumbnails of the all-heads grid are at most this many cells a side (longer texts are max-pooled)."""
SINGLE_TILE = 1024
"""A single-head map is max-pooled beyond this many tokens."""

_NORM = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)


def _attention_cmap(bad: str = "#f3f3f3") -> Colormap:
    """Blues; ``bad`` colours masked cells (the future of a causal model, gaps between tiles)."""
    return colormaps["Blues"].with_extremes(bad=bad)


def save_figure(fig: Figure, out: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``out`` (PNG, SVG or PDF by the suffix) and return the path.

    Figures are built with :class:`matplotlib.figure.Figure` and its Agg canvas, never pyplot, so
    no global backend is switched.
    """
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise HeadatlasError(f"cannot write {str(path)!r}: give a file ending in {', '.join(FORMATS)}")
    with warnings.catch_warnings(), atomic_path(path, suffix=path.suffix) as tmp:
        warnings.filterwarnings("ignore", message=r"Glyph .* missing")
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    return path


def _labels(tokens: Sequence[str], step: int, pool: int) -> tuple[list[int], list[str]]:
    """Tick positions (in map cells) and labels: every ``step``-th cell, the token at its start."""
    n_cells = math.ceil(len(tokens) / pool)
    positions = list(range(0, n_cells, step))
    return positions, [display_token(tokens[p * pool]) for p in positions]


def _draw_map(
    fig: Figure,
    ax: Axes,
    tokens: Sequence[str],
    attention: np.ndarray,
    pool: int = 1,
    max_labels: int = MAX_LABELS,
    fontsize: float | None = None,
) -> AxesImage:
    """Draw one ``[query, key]`` map with token tick labels on ``ax``; return the image."""
    att = np.asarray(attention, dtype=np.float32)
    masked = np.ma.masked_array(att, mask=np.triu(np.ones(att.shape, bool), 1)) if is_causal_map(att) else att
    image = ax.imshow(masked, cmap=_attention_cmap(), norm=_NORM, interpolation="nearest", aspect="equal")
    n = att.shape[-1]
    step = max(1, math.ceil(n / max_labels))
    positions, labels = _labels(tokens, step, pool)
    size = fontsize or (8 if len(positions) <= 40 else 6.5 if len(positions) <= 56 else 5.5)
    ax.set_xticks(positions, labels, rotation=90, fontsize=size, parse_math=False)
    ax.set_yticks(positions, labels, fontsize=size, parse_math=False)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("key (attended to)", fontsize=9)
    ax.set_ylabel("query (attending)", fontsize=9)
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    return image


def attention_figure(
    tokens: Sequence[str],
    attention: np.ndarray,
    out: str | Path,
    title: str = "",
    pool: int = 1,
) -> Path:
    """Write one head's attention ``[query, key]`` as a heatmap with tokens on both axes.

    Texts longer than :data:`MAX_LABELS` tokens label every k-th token (and the figure grows up to
    13 inches); ``pool > 1`` says the map was max-pooled by that factor. Returns the path.
    """
    n = np.asarray(attention).shape[-1]
    shown = min(n, MAX_LABELS)
    side = float(np.clip(0.16 * shown + 2.6, 5.0, 13.0))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = _draw_map(fig, ax, tokens, attention, pool)
    cbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("attention (square-root colour scale)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    note = f"{len(tokens)} tokens" + (f", max-pooled ×{pool}" if pool > 1 else "")
    note += f", every {math.ceil(n / MAX_LABELS)}th token labelled" if n > MAX_LABELS else ""
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=10, pad=12, parse_math=False)
    return save_figure(fig, out, dpi=130 if n <= 96 else 160)


def grid_figure(
    tokens: Sequence[str],
    maps: dict[int, np.ndarray],
    out: str | Path,
    title: str = "",
    pool: int = 1,
) -> Path:
    """Write every head's attention on one text as a grid of thumbnails (rows: layers, columns: heads).

    ``maps`` is ``{layer: [head, query, key]}``. The thumbnails share one square-root colour scale;
    bertviz's "model view" as a static image. Returns the path.
    """
    layers = sorted(maps)
    if not layers:
        raise HeadatlasError("no attention maps to draw")
    n_heads, m = maps[layers[0]].shape[0], maps[layers[0]].shape[-1]
    gap = max(1, m // 10)
    cell = m + gap
    mosaic = np.full((len(layers) * cell - gap, n_heads * cell - gap), np.nan, dtype=np.float32)
    for r, layer in enumerate(layers):
        for h in range(n_heads):
            mosaic[r * cell : r * cell + m, h * cell : h * cell + m] = maps[layer][h]
    tile_in = float(np.clip(11.0 / n_heads, 0.45, 1.3))
    tile_in = min(tile_in, 36.0 / len(layers)) if len(layers) > 1 else tile_in
    fig = Figure(figsize=(n_heads * tile_in + 1.6, len(layers) * tile_in + 1.4))
    ax = fig.add_subplot()
    cmap = _attention_cmap(bad="white")
    image = ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, norm=_NORM, interpolation="nearest")
    centers = [i * cell + (m - 1) / 2 for i in range(max(len(layers), n_heads))]
    ax.set_yticks(centers[: len(layers)], [f"L{layer}" for layer in layers], fontsize=8)
    ax.set_xticks(centers[:n_heads], [f"H{h}" for h in range(n_heads)], fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    text = "".join(tokens)
    preview = display_token(text, 70) if len(text) > 0 else ""
    note = f"{len(tokens)} tokens" + (f", max-pooled ×{pool}" if pool > 1 else "") + f": {preview}"
    ax.set_title(f"{title}\n{note}" if title else note, fontsize=9, pad=14, parse_math=False)
    cbar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, shrink=min(1.0, 6 / max(len(layers), 1) + 0.3))
    cbar.set_label("attention (square-root scale)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    dpi = int(np.clip(math.ceil(m / tile_in) + 10, 80, 160))
    return save_figure(fig, out, dpi=dpi)


_KIND_TICK = {"encoder": "enc", "decoder": "dec", "cross": "x"}


def _heads_axes(fig: Figure, n_layers: int, n_heads: int, kinds: Sequence[str] | None = None) -> Axes:
    """Axes for a layer × head grid; encoder–decoder ``kinds`` label each layer by its stack
    (``enc 0``, ``dec 0``, ``x 0`` for cross-attention) and draw a line between stacks."""
    ax = fig.add_subplot()
    ax.set_xlabel(
        "attention layer (enc = encoder, dec = decoder, x = cross)" if kinds else "layer", fontsize=9
    )
    ax.set_ylabel("head", fontsize=9)
    step = max(1, math.ceil(n_layers / 40))
    labels = [str(i) for i in range(n_layers)]
    if kinds and len(kinds) == n_layers:
        labels = [f"{_KIND_TICK.get(k, k)} {kinds[:i].count(k)}" for i, k in enumerate(kinds)]
        for i in range(1, n_layers):
            if kinds[i] != kinds[i - 1]:
                ax.axvline(i - 0.5, color="white", linewidth=2.5)
    ax.set_xticks(range(0, n_layers, step), labels[::step], fontsize=7)
    hstep = max(1, math.ceil(n_heads / 32))
    ax.set_yticks(range(0, n_heads, hstep), [str(i) for i in range(0, n_heads, hstep)], fontsize=7)
    return ax


def _grid_size(n_layers: int, n_heads: int) -> tuple[float, float]:
    cell = float(np.clip(14.0 / n_layers, 0.16, 0.42))
    return max(5.0, n_layers * cell + 2.2), max(2.4, n_heads * cell + 1.6)


def score_figure(atlas: Atlas, score: str, out: str | Path) -> Path:
    """Write a layer × head heatmap of ``score``; heads that earn the score's role are outlined."""
    values = atlas.matrix(score)  # [layer, head]
    n_layers, n_heads = values.shape
    fig = Figure(figsize=_grid_size(n_layers, n_heads))
    ax = _heads_axes(fig, n_layers, n_heads, atlas.model.attn_kinds)
    finite = np.isfinite(values).any()
    spec = score_spec(score)
    if spec.signed:
        span = float(np.nanmax(np.abs(values))) if finite else 1.0
        cmap, vmin, vmax = "RdBu_r", -span, span
    elif not spec.bounded:
        cmap, vmin, vmax = "viridis", 0.0, float(np.nanmax(values)) if finite else 1.0
    else:
        cmap, vmin, vmax = "viridis", 0.0, 1.0
    image = ax.imshow(values.T, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    title = f"{atlas.model.name} — {spec.label}: {spec.meaning}"
    rules = [r for r in RULES if r.score == score]
    for rule in rules:
        for layer in range(n_layers):
            for head in range(n_heads):
                if rule.holds(float(values[layer, head])):
                    ax.add_patch(
                        Rectangle(
                            (layer - 0.5, head - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.4
                        )
                    )
    if rules:
        said = ", ".join(f"{'≤' if r.below else '≥'} {r.threshold:g} (role {r.role})" for r in rules)
        title += f"\noutlined: {said}"
    ax.set_title(title, fontsize=9, parse_math=False)
    cbar = fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    cbar.ax.tick_params(labelsize=7)
    return save_figure(fig, out)


def role_figure(atlas: Atlas, out: str | Path) -> Path:
    """Write the role map: each layer × head cell coloured by its roles (several roles: stripes)."""
    roles = grid_roles(atlas)
    n_layers, n_heads = len(roles), len(roles[0]) if roles else 0
    fig = Figure(figsize=_grid_size(n_layers, n_heads))
    ax = _heads_axes(fig, n_layers, n_heads, atlas.model.attn_kinds)
    counts: dict[str, int] = {}
    for layer in range(n_layers):
        for head in range(n_heads):
            held = roles[layer][head]
            for role in held:
                counts[role] = counts.get(role, 0) + 1
            colors = [ROLE_COLORS.get(r, "#444444") for r in held] or [NO_ROLE_COLOR]
            width = 1.0 / len(colors)
            for i, color in enumerate(colors):
                ax.add_patch(
                    Rectangle((layer - 0.5 + i * width, head - 0.5), width, 1, facecolor=color, linewidth=0)
                )
            ax.add_patch(
                Rectangle((layer - 0.5, head - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=0.8)
            )
    ax.set_xlim(-0.5, n_layers - 0.5)
    ax.set_ylim(n_heads - 0.5, -0.5)
    handles = [
        Patch(facecolor=color, label=f"{role} ({counts.get(role, 0)})")
        for role, color in ROLE_COLORS.items()
        if counts.get(role, 0)
    ] + [Patch(facecolor=NO_ROLE_COLOR, label="no role")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    name = atlas.model.name
    ax.set_title(f"{name} — roles (thresholds in headatlas.core.roles)", fontsize=9, parse_math=False)
    return save_figure(fig, out)


def grid_roles(atlas: Atlas) -> list[list[list[str]]]:
    """Return ``roles[layer][head]`` as lists in drawing order."""
    n_layers, n_heads = atlas.shape
    out: list[list[list[str]]] = [[[] for _ in range(n_heads)] for _ in range(n_layers)]
    table = atlas.table
    for layer, head, roles in zip(
        table["layer"].tolist(), table["head"].tolist(), table["roles"].tolist(), strict=True
    ):
        out[int(layer)][int(head)] = head_roles(roles if isinstance(roles, str) else "")
    return out


def profile_figure(atlas: Atlas, out: str | Path) -> Path:
    """Write the distance profiles: every head × offsets 0..31 as a heatmap, and a few heads as lines."""
    table = atlas.table.sort_values(["layer", "head"]).reset_index(drop=True)
    profiles = np.array([np.asarray(p, dtype=float) for p in table["distance_profile"]])  # [head_row, offset]
    shown = min(PROFILE_SHOWN, profiles.shape[1])
    fig = Figure(figsize=(13, 6.5))
    left, right = fig.subplots(1, 2, width_ratios=[1.15, 1])
    image = left.imshow(
        profiles[:, :shown], cmap="magma_r", norm=PowerNorm(0.5, 0, 1), aspect="auto", interpolation="nearest"
    )
    n_heads = int(table["head"].max()) + 1
    layer_starts = list(range(0, len(table), n_heads))
    layer_of = [int(v) for v in table["layer"].tolist()]
    step = max(1, math.ceil(len(layer_starts) / 30))
    left.set_yticks(layer_starts[::step], [f"L{layer_of[i]}" for i in layer_starts[::step]], fontsize=7)
    left.set_xlabel("offset i − j (0 = itself, 1 = previous token)", fontsize=9)
    left.set_title(f"mean attention at offsets 0..{shown - 1}, every head (rows: layer, head)", fontsize=9)
    left.tick_params(labelsize=7)
    fig.colorbar(image, ax=left, fraction=0.04, pad=0.02).ax.tick_params(labelsize=7)
    offsets = np.arange(profiles.shape[1])
    with warnings.catch_warnings():  # offsets beyond the scanned length are NaN for every head
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(profiles, axis=0)
    right.plot(offsets, mean, color="black", linestyle="--", marker=".", label="mean of all heads")
    layers, heads = table["layer"].tolist(), table["head"].tolist()
    for score, color in (("previous_token", "#d62728"), ("self", "#ff7f0e"), ("local", "#e6b800")):
        if score in table and table[score].notna().any():
            best = int(np.nanargmax(table[score].to_numpy(dtype=float)))
            name = f"{head_name(layers[best], heads[best])} (top {score})"
            right.plot(offsets, profiles[best], color=color, marker=".", label=name)
    right.set_xlim(-0.5, min(16, profiles.shape[1] - 1) + 0.5)
    right.set_ylim(0, 1)
    right.set_xlabel("offset i − j", fontsize=9)
    right.set_ylabel("mean attention", fontsize=9)
    right.set_title("profiles of a few heads (offsets 0..16)", fontsize=9)
    right.legend(fontsize=8, frameon=False)
    right.tick_params(labelsize=7)
    return save_figure(fig, out)


def example_figure(atlas: Atlas, layer: int, head: int, out: str | Path, title: str = "") -> Path:
    """Write head ``(layer, head)``'s attention on each stored example, side by side."""
    examples = [ex for ex in atlas.examples if layer < ex.attention.shape[0] and head < ex.attention.shape[1]]
    if not examples:
        raise HeadatlasError("this atlas stores no example maps: rescan it to get them")
    side = float(np.clip(0.13 * max(len(ex.tokens) for ex in examples) + 2.4, 4.5, 9.0))
    fig = Figure(figsize=(side * len(examples) + 0.8, side + 0.6))
    axes = fig.subplots(1, len(examples), squeeze=False)[0]
    images = []
    for ax, ex in zip(axes, examples, strict=True):
        images.append(_draw_map(fig, ax, ex.tokens, ex.attention[layer, head].astype(np.float32)))
        ax.set_title(f"{ex.label} example", fontsize=9, pad=8)
    fig.colorbar(images[-1], ax=list(axes), fraction=0.02, pad=0.01).ax.tick_params(labelsize=7)
    fig.suptitle(title or head_name(layer, head), fontsize=11)
    return save_figure(fig, out)


def write_figures(atlas: Atlas, directory: str | Path) -> list[Path]:
    """Write ``scores/<score>.png``, ``roles.png``, ``distance_profiles.png`` and the top heads'
    ``examples/<score>-<rank>-L<l>H<h>.png`` into ``directory``; return the paths written."""
    out = Path(directory)
    written: list[Path] = []
    for score in scalar_scores(atlas):
        written.append(score_figure(atlas, score, out / "scores" / f"{score}.png"))
    if "roles" in atlas.table:
        written.append(role_figure(atlas, out / "roles.png"))
    if "distance_profile" in atlas.table:
        written.append(profile_figure(atlas, out / "distance_profiles.png"))
    if atlas.examples:
        for score in EXAMPLE_SCORES:
            if score not in atlas.table:
                continue
            top = atlas.table.dropna(subset=[score]).sort_values(score, ascending=False).head(TOP_PER_SCORE)
            rows = zip(
                top["layer"].tolist(),
                top["head"].tolist(),
                top[score].tolist(),
                top["roles"].tolist(),
                strict=True,
            )
            for rank, (layer, head, value, roles) in enumerate(rows, start=1):
                label = score_spec(score).label
                title = (
                    f"{head_name(layer, head)} — #{rank} by {label} ({value:.3f}); roles: {roles or 'none'}"
                )
                path = out / "examples" / f"{score}-{rank}-{head_name(layer, head)}.png"
                written.append(example_figure(atlas, layer, head, path, title))
    logger.info("wrote %d figures to %s", len(written), out)
    return written


def zoo_figure(depths: Mapping[str, pd.DataFrame], table: pd.DataFrame, out: str | Path) -> Path:
    """Write the zoo's depth chart: for each role, one line per model with a dot per head at its
    relative depth (``(layer + 0.5) / n_layers``), a bar at the median and the head count.

    ``depths`` maps a model to its :func:`headatlas.apps.zoo.scans.head_depths` rows; ``table`` is the
    comparison table (:data:`headatlas.apps.zoo.scans.COLUMNS`).
    """
    models = list(depths)
    roles = [r for r in dict.fromkeys(table["role"]) if r in ROLE_COLORS]
    lines = [(role, model) for role in roles for model in models]
    fig = Figure(figsize=(8.0, 1.2 + 0.24 * max(len(lines), 1) + 0.12 * len(roles)))
    ax = fig.add_subplot(1, 1, 1)
    rng = np.random.default_rng(0)
    labels: list[str] = []
    y = 0.0
    ticks: list[float] = []
    for r, role in enumerate(roles):
        if r:
            y += 0.6
            ax.axhline(y - 0.8, color="#dddddd", linewidth=0.6)
        for model in models:
            frame = depths[model]
            at = frame.loc[frame["role"] == role, "depth"].to_numpy()  # [heads with role]
            jitter = rng.uniform(-0.22, 0.22, size=len(at))  # [heads with role]
            color = ROLE_COLORS.get(role, "#444444")
            ax.scatter(at, y + jitter, s=10, color=color, alpha=0.75, linewidths=0)
            row = table[(table["model"] == model) & (table["role"] == role)]
            if len(at):
                ax.plot([np.median(at)] * 2, [y - 0.35, y + 0.35], color="black", linewidth=1.4)
            share = float(row["share"].iloc[0]) if len(row) else 0.0
            ax.text(
                1.01,
                y,
                f"{len(at)} ({share:.0%})",
                va="center",
                fontsize=7,
                transform=ax.get_yaxis_transform(),
            )
            labels.append(f"{role} · {model}")
            ticks.append(y)
            y += 1.0
    ax.set_yticks(ticks, labels, fontsize=7)
    ax.set_ylim(y - 0.4, -0.6)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("relative depth (layer + 0.5) / layers", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("heads of each role by relative depth (bar: median; right: heads, share)", fontsize=9)
    fig.subplots_adjust(
        left=0.3, right=0.88, top=1 - 0.5 / fig.get_figheight(), bottom=0.6 / fig.get_figheight()
    )
    return save_figure(fig, out)
