"""``headatlas verify``: whether a score's top heads really carry its task (ablate them against random
heads). The work is in :mod:`headatlas.apps.verify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    DeviceOpt,
    RayOpt,
    WorkersOpt,
    app,
    console,
    example,
    fail,
    labelled_steps,
    load_model,
    locked,
    progress_bar,
    quiet_libraries,
    ray_workers,
    run,
)


@app.command(
    epilog=example(
        "headatlas verify atlas --score induction --k 10 --seeds 5",
        "headatlas verify atlas --score retrieval --mode mean --n-prompts 9",
    )
)
def verify(
    directory: Annotated[Path, typer.Argument(help="atlas directory holding the score")],
    score: Annotated[str, typer.Option(help="retrieval, retrieval_tf, induction, successor or translation")],
    k: Annotated[int, typer.Option(help="heads to ablate")] = 10,
    seeds: Annotated[int, typer.Option(help="random draws of k heads")] = 5,
    mode: Annotated[str, typer.Option(help="zero or mean ablation")] = "zero",
    n_prompts: Annotated[
        int | None, typer.Option(help="prompts / trials for the metric (default: the battery's own)")
    ] = None,
    max_len: Annotated[int | None, typer.Option(help="longest needle prompt in tokens")] = None,
    model: Annotated[
        str | None, typer.Option(help="model to load (default: the one the atlas was scanned from)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the metric's prompts")] = 0,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    device: DeviceOpt = "cpu",
    ray: RayOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Ablate the top-k heads by SCORE, k random heads, and none; compare the task metric."""
    quiet_libraries(False)
    from ..apps.verify.causal import check_verifiable, save_verification
    from ..apps.verify.causal import verify as run_verify
    from ..atlas.table import Atlas, check_same_model
    from ..capture import check_mode
    from ..core.outputs import check_output_dir
    from ..functional import FunctionalConfig
    from ..serve import atlas_model

    atlas = run(lambda: Atlas.load(directory))
    run(lambda: check_mode(mode))
    run(lambda: check_verifiable(atlas, score))
    run(lambda: check_output_dir(directory, "directory"))
    config = run(
        lambda: FunctionalConfig(n_prompts=n_prompts, max_len=max_len, seed=seed, batch_size=batch_size)
    )
    spec = model or atlas_model(atlas)
    if spec is None:
        fail("the atlas does not name a model it can reload: pass --model")
    loaded = load_model(str(spec), device)
    run(lambda: check_same_model(atlas, loaded.info, str(directory)))
    with locked(directory), ray_workers(str(spec), ray, workers, device) as pool, progress_bar() as progress:
        steps = labelled_steps(progress)
        result = run(lambda: run_verify(loaded, atlas, score, k, seeds, mode, config, steps, pool))
        path = save_verification(result, directory)
    better = "higher" if result.higher_is_better else "lower"
    out = Table(
        title=f"{result.metric} ({better} is better), {mode} ablation of {k} heads", title_justify="left"
    )
    out.add_column("ablated")
    out.add_column(result.metric, justify="right")
    out.add_row("nothing", f"{result.baseline:.4f}")
    out.add_row(f"top {k} by {score}", f"{result.top_k:.4f}")
    out.add_row(f"{k} random ({seeds} seeds)", f"{result.random_mean:.4f} ± {result.random_std:.4f}")
    console.print(out)
    console.print(f"top heads: {', '.join(result.top_heads)}", highlight=False)
    console.print(f"→ {path} ({result.seconds:.0f} s)", highlight=False)
