"""``headatlas safety``: safety heads by Ships (Zhou et al. 2024) and what ablating them does to
refusals. The work is in :mod:`headatlas.apps.safety`."""

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
        "headatlas safety default --k 5 --out safety-heads.json",
        "headatlas safety qwen2.5-coder-0.5b --k 5 --n-score 4 --seeds 2 --out qwen-safety.json --atlas atlas",
    )
)
def safety(
    model: ModelArg = "default",
    k: Annotated[int, typer.Option(help="top heads by Ships to ablate together")] = 5,
    seeds: Annotated[int, typer.Option(help="random draws of k heads to compare with")] = 3,
    n_score: Annotated[int, typer.Option(help="harmful requests Ships is scored on (one pass per head)")] = 8,
    n_harmless: Annotated[int, typer.Option(help="harmless requests the cost is measured on")] = 16,
    seed: Annotated[int, typer.Option(help="seed of the split of the harmful requests")] = 0,
    out: Annotated[Path, typer.Option(help="head-set JSON file to write")] = Path("safety-heads.json"),
    atlas: Annotated[Path | None, typer.Option(help="atlas directory to add the ships column to")] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Score each head's Ships on harmful requests; ablate the top k against random heads."""
    quiet_libraries(False)
    from ..apps.safety.ships import require_chat_frame, safety_heads, write_head_set, write_ships
    from ..atlas.table import open_atlas
    from ..core.errors import check_at_least
    from ..core.heads import HEAD_SET_FORMAT
    from ..core.outputs import check_output_dir, check_output_file

    run(lambda: check_at_least("k", k, 1))
    run(lambda: check_output_file(out, (".json",), force=force, kind=HEAD_SET_FORMAT))
    if atlas is not None:
        run(lambda: check_output_dir(atlas, "atlas"))
    loaded = load_model(model, device)
    run(lambda: require_chat_frame(loaded))  # before the progress bar: no empty bar above the error
    with progress_bar() as progress:
        result = run(
            lambda: safety_heads(loaded, k, seeds, seed, n_score, n_harmless, step(progress, "Ships"))
        )
    write_head_set(result, out)
    if atlas is not None:
        with locked(atlas):
            table = run(lambda: open_atlas(loaded.info, atlas))
            write_ships(table, result)
            table.save(atlas)
    before, after = result.before, result.after
    rand = result.to_dict()["random_mean"]
    console.print(
        f"Ships on {result.n_score} harmful requests; top {k}: {', '.join(result.heads)}\n"
        f"harmful refused   {before['harmful_refusal']:.0%} → {after['harmful_refusal']:.0%} "
        f"(k random: {rand.get('harmful_refusal', float('nan')):.0%}) on {result.n_test} held out\n"
        f"harmless refused  {before['harmless_refusal']:.0%} → {after['harmless_refusal']:.0%}; "
        f"own replies' log-prob {before['harmless_reply_logprob_per_token']:.2f} → "
        f"{after['harmless_reply_logprob_per_token']:.2f} nats/token → {out}",
        highlight=False,
    )
