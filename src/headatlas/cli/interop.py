"""``headatlas compare``: two atlases side by side. The work is in :mod:`headatlas.apps.compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import app, console, example, run


@app.command(
    epilog=example(
        "headatlas compare atlas atlas-seed1",
        "headatlas compare atlas pruned-atlas --scores induction,previous_token --k 5 --out cmp",
    )
)
def compare(
    atlas_a: Annotated[Path, typer.Argument(help="atlas directory A")],
    atlas_b: Annotated[Path, typer.Argument(help="atlas directory B (the same layers × heads)")],
    scores: Annotated[
        str | None, typer.Option(help="comma-separated scores (default: every score both atlases have)")
    ] = None,
    k: Annotated[int, typer.Option(help="size of the top-k sets whose overlap is reported")] = 10,
    out: Annotated[
        Path | None,
        typer.Option(help="directory for compare_scores.csv, compare_roles.csv, compare.json, compare.png"),
    ] = None,
) -> None:
    """Compare two atlases: per score, Spearman over heads and top-k overlap; heads gained and lost per role."""
    from ..apps.compare import compare_atlases, write_comparison
    from ..atlas import Atlas

    a = run(lambda: Atlas.load(atlas_a))
    b = run(lambda: Atlas.load(atlas_b))
    names = [s.strip() for s in scores.split(",") if s.strip()] if scores else None
    result = run(lambda: compare_atlases(a, b, names, k=k))
    kind = "one model" if result.meta["same_model"] else "two models of the same shape"
    console.print(f"A: {atlas_a} ({result.meta['a']})  B: {atlas_b} ({result.meta['b']}) — {kind}")
    table = Table(title=f"scores (top-{result.meta['k']} overlap)", title_justify="left")
    for column in ("score", "Spearman", "overlap", "mean A", "mean B"):
        table.add_column(column, justify="left" if column == "score" else "right")
    for row in result.scores.itertuples():
        table.add_row(
            str(row.score),
            f"{row.spearman:.3f}",
            f"{row.top_k_overlap:.2f}",
            f"{row.mean_a:.3f}",
            f"{row.mean_b:.3f}",
        )
    console.print(table)
    roles = Table(title="heads per role", title_justify="left")
    for column in ("role", "A", "B", "both", "gained", "lost"):
        roles.add_column(column, justify="left" if column == "role" else "right")
    for r in result.roles.itertuples():
        gained = f"{r.gained} " + ", ".join(r.gained_heads[:4]) + (" …" if r.gained > 4 else "")
        lost = f"{r.lost} " + ", ".join(r.lost_heads[:4]) + (" …" if r.lost > 4 else "")
        roles.add_row(str(r.role), str(r.a), str(r.b), str(r.kept), gained.strip(), lost.strip())
    console.print(roles)
    if out is not None:
        paths = run(lambda: write_comparison(result, out))
        console.print(f"→ {', '.join(str(p) for p in paths)}", highlight=False)
