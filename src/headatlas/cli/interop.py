"""``headatlas compare``: two atlases side by side. The work is in :mod:`headatlas.apps.compare.diff`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import ForceOpt, app, console, example, fail, run


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
    force: ForceOpt = False,
) -> None:
    """Compare two atlases: per score, Spearman over heads and top-k overlap; heads gained and lost per role."""
    from ..apps.compare.diff import COMPARE_FOLDER, compare_atlases, write_comparison
    from ..atlas.table import Atlas
    from ..core.outputs import check_output_folder

    if out is not None:
        run(lambda: check_output_folder(out, COMPARE_FOLDER, force))
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
    for r in result.roles.to_dict("records"):
        moved = []
        for count, heads in (
            (int(r["gained"]), list(r["gained_heads"])),
            (int(r["lost"]), list(r["lost_heads"])),
        ):
            moved.append((f"{count} " + ", ".join(heads[:4]) + (" …" if count > 4 else "")).strip())
        roles.add_row(str(r["role"]), str(r["a"]), str(r["b"]), str(r["kept"]), *moved)
    console.print(roles)
    if out is not None:
        paths = run(lambda: write_comparison(result, out))
        console.print(f"→ {', '.join(str(p) for p in paths)}", highlight=False)


FormatOpt = Annotated[
    str, typer.Option("--format", help="retrieval-head, headkv, duo, attention-tracker or csv")
]


@app.command(
    "export",
    epilog=example(
        "headatlas export atlas --format retrieval-head --score retrieval --out head_score.json",
        "headatlas export atlas --format duo --score retrieval --out duo_pattern --sink 64 --recent 256",
        "headatlas export atlas --format attention-tracker --score induction --k 8 --out tracker.json",
    ),
)
def export(
    directory: Annotated[Path, typer.Argument(help="atlas directory")],
    fmt: FormatOpt,
    score: Annotated[str, typer.Option(help="the atlas score to export")],
    out: Annotated[Path, typer.Option(help="file to write (a directory for --format duo)")],
    k: Annotated[
        int | None, typer.Option(help="attention-tracker: the k highest heads [default: 10]")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="attention-tracker: heads with score ≥ this (instead of --k)")
    ] = None,
    sink: Annotated[
        int | None, typer.Option(help="duo: sink tokens of streaming heads [default: 64]")
    ] = None,
    recent: Annotated[
        int | None, typer.Option(help="duo: recent tokens of streaming heads [default: 256]")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write one atlas score in another tool's format (Retrieval_Head, HeadKV, DuoAttention, Attention Tracker, CSV)."""
    from ..apps.interop.exchange import check_export_target, export_atlas
    from ..atlas.table import Atlas

    atlas = run(lambda: Atlas.load(directory))
    run(lambda: check_export_target(fmt, out, force))
    path = run(
        lambda: export_atlas(atlas, fmt, score, out, k=k, threshold=threshold, sink=sink, recent=recent)
    )
    console.print(f"wrote {path} ({fmt}, {score})", highlight=False)


@app.command(
    "import",
    epilog=example(
        "headatlas import head_score.json --format retrieval-head --model default --out atlas",
        "headatlas import duo_pattern --format duo --model default --out atlas --name duo_full",
        "headatlas verify atlas --score imported_retrieval_head --k 10",
    ),
)
def import_(
    path: Annotated[Path, typer.Argument(help="the foreign file (a directory for --format duo)")],
    fmt: FormatOpt,
    model: Annotated[str, typer.Option(help="the model the file annotates (checked: layers × heads)")],
    out: Annotated[Path, typer.Option(help="atlas directory to add the column to (created if absent)")],
    name: Annotated[str | None, typer.Option(help="column name (default imported_<format>)")] = None,
    like: Annotated[
        str | None,
        typer.Option(help="the atlas score whose task measures it, for verify (default by format)"),
    ] = None,
) -> None:
    """Add a foreign head annotation to an atlas as a column, so show, report, compare and verify read it."""
    from ..apps.interop.exchange import import_annotation
    from ..atlas.table import open_atlas
    from ..core.outputs import check_output_dir
    from .common import load_model, locked

    if not path.exists():
        fail(f"{path} does not exist")
    run(lambda: check_output_dir(out))
    loaded = load_model(model)
    with locked(out):
        atlas = run(lambda: open_atlas(loaded.info, out))
        column = run(lambda: import_annotation(atlas, path, fmt, name, like))
        atlas.save(out)
    values = atlas.table[column]
    console.print(
        f"{column}: {int(values.notna().sum())} of {len(values)} heads from {path} ({fmt}) → {out}",
        highlight=False,
    )
