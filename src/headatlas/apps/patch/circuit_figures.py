"""Faithfulness-curve figures: one run's methods, or several runs side by side (matplotlib's Agg
canvas through :func:`headatlas.report.figures.save_figure`, as every figure of the report)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ...report.figures import save_figure
from .faithfulness import THRESHOLD


def curves_figure(curves: Mapping[str, Mapping[str, Any]], total: int, title: str, out: str | Path) -> Path:
    """Draw f(k) against k / total for each labelled curve (``{"sizes", "faithfulness", "cpr", "cmd"}``)
    on a symmetric-log size axis, with f = 1 and the 0.9 threshold marked; return the path."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        x = [k / total for k in curve["sizes"]]
        style = "--" if label.startswith("random") else "-"
        ax.plot(x, curve["faithfulness"], style, marker="o", markersize=3,
                label=f"{label}  CPR {curve['cpr']:.3f}  CMD {curve['cmd']:.3f}")  # fmt: skip
    ax.axhline(1.0, color="#888888", linewidth=0.8)
    ax.axhline(THRESHOLD, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_xscale("symlog", linthresh=1.0 / total)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"circuit size: share of the {total} heads kept (others ablated)")
    ax.set_ylabel("faithfulness f (top-k by signed score)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def compare_figure(runs: Mapping[str, tuple[Mapping[str, Any], int]], title: str, out: str | Path) -> Path:
    """Draw several runs' curves (``label -> (curve, total heads)``) in one figure; return the path."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot()
    smallest = min(total for _, total in runs.values())
    for label, (curve, total) in runs.items():
        x = [k / total for k in curve["sizes"]]
        style = "--" if "random" in label else "-"
        ax.plot(x, curve["faithfulness"], style, marker="o", markersize=3,
                label=f"{label}  CPR {curve['cpr']:.3f}  CMD {curve['cmd']:.3f}")  # fmt: skip
    ax.axhline(1.0, color="#888888", linewidth=0.8)
    ax.axhline(THRESHOLD, color="#bbbbbb", linewidth=0.8, linestyle=":")
    ax.set_xscale("symlog", linthresh=1.0 / smallest)
    ax.set_xlim(0, 1)
    ax.set_xlabel("circuit size: share of heads kept")
    ax.set_ylabel("faithfulness")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, out)
