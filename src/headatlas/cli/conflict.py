"""``headatlas conflict``: memory heads, context heads and PH3 (Jin et al. 2024). The work is in
:mod:`headatlas.apps.conflict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DeviceOpt,
    ForceOpt,
    ModelArg,
    app,
    console,
    example,
    load_model,
    locked,
    progress_bar,
    quiet_libraries,
    run,
    step,
)


@app.command(
    epilog=example(
        "headatlas conflict default --prefer memory --k 10 --out memory-heads.json",
        "headatlas conflict default --prefer context --k 5 --out context.json --atlas atlas",
        "headatlas prune default --heads memory-heads.json --out pruned",
    )
)
def conflict(
    model: ModelArg = "default",
    prefer: Annotated[
        str, typer.Option(help="memory (prune context heads) or context (prune memory heads)")
    ] = "memory",
    k: Annotated[int, typer.Option(help="heads to prune")] = 10,
    seeds: Annotated[int, typer.Option(help="random draws of k heads to compare with")] = 5,
    seed: Annotated[int, typer.Option(help="seed of the context answers and of the fact split")] = 0,
    out: Annotated[Path, typer.Option(help="head-set JSON file to write")] = Path("conflict-heads.json"),
    atlas: Annotated[Path | None, typer.Option(help="atlas directory to add the conflict column to")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Score each head's direct push toward the memorised or the context answer; prune the top k (PH3)."""
    quiet_libraries(False)
    from ..apps.conflict.ph3 import PREFER, ph3, write_conflict, write_head_set
    from ..atlas.table import open_atlas
    from ..core.errors import check_at_least, check_choice
    from ..core.heads import HEAD_SET_FORMAT
    from ..core.outputs import check_output_dir, check_output_file

    run(lambda: check_choice("prefer", prefer, PREFER))
    run(lambda: check_at_least("k", k, 1))
    run(lambda: check_output_file(out, (".json",), force=force, kind=HEAD_SET_FORMAT))
    if atlas is not None:
        run(lambda: check_output_dir(atlas, "atlas"))
    loaded = load_model(model, device)
    with progress_bar() as progress:
        result = run(lambda: ph3(loaded, prefer, k, seeds, seed, step(progress, "PH3")))
    write_head_set(result, out)
    if atlas is not None:
        with locked(atlas):
            table = run(lambda: open_atlas(loaded.info, atlas))
            write_conflict(table, result)
            table.save(atlas)
    before, after = result.before, result.after
    mean, std = result.random_gain
    console.print(
        f"{result.n_score} conflict prompts scored, {result.n_test} held out; pruned {k} "
        f"{'context' if prefer == 'memory' else 'memory'} heads: {', '.join(result.heads)}\n"
        f"memory use   {before['memory']:.1%} → {after['memory']:.1%}\n"
        f"context use  {before['context']:.1%} → {after['context']:.1%}\n"
        f"{prefer} use +{result.gain:.1f} points (k random heads: {mean:+.1f} ± {std:.1f}; "
        f"paper: +{result.to_dict()['paper_gain_points']:.1f}%) → {out}",
        highlight=False,
    )
