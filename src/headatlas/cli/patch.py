"""``headatlas patch``: which heads carry a behaviour, from contrastive prompt pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..core.heads import head_name
from .common import (
    DeviceMapOpt,
    DeviceOpt,
    ModelArg,
    OffloadOpt,
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
        "headatlas patch default --task ioi --method both --out atlas",
        "headatlas patch default --task fv:antonym --out atlas",
        "headatlas patch default --task pairs.jsonl --method activation --position all",
    )
)
def patch(
    model: ModelArg = "default",
    task: Annotated[
        str,
        typer.Option(
            help="ioi, fv:antonym, fv:capitalize, fv:country-capital, fv:translate, or a JSONL file of "
            '{"clean", "corrupt", "answer", "wrong"} rows'
        ),
    ] = "ioi",
    method: Annotated[
        str, typer.Option(help="attribution (one backward), activation (exact) or both")
    ] = "attribution",
    position: Annotated[str, typer.Option(help="patch the last position or all positions")] = "last",
    n: Annotated[int, typer.Option(help="pairs drawn for a built-in task")] = 24,
    seed: Annotated[int, typer.Option(help="seed of a built-in task's pairs")] = 0,
    out: Annotated[Path, typer.Option(help="atlas directory to add patch_<task> to (created if new)")] = Path(
        "atlas"
    ),
    rows_per_pass: Annotated[
        int, typer.Option(help="(pair, head) patches per forward pass (exact method)")
    ] = 64,
    fv_heads: Annotated[int, typer.Option(help="heads in a function vector (fv tasks)")] = 10,
    top: Annotated[int, typer.Option(help="heads to list")] = 10,
    device: DeviceOpt = "cpu",
    device_map: DeviceMapOpt = None,
    offload_folder: OffloadOpt = None,
) -> None:
    """Patch each head from clean into corrupted prompts: how much of the behaviour it restores."""
    quiet_libraries(False)
    from ..apps.common.patch_tasks import build_task
    from ..apps.patch.patching import function_vector, write_patch, zero_shot_accuracy
    from ..apps.patch.patching import patch as run_patch
    from ..atlas.table import open_atlas
    from ..core.errors import check_at_least
    from ..core.outputs import check_output_dir
    from ..report.figures import score_figure

    run(lambda: check_at_least("rows_per_pass", rows_per_pass, 1))
    run(lambda: check_output_dir(out))
    loaded = load_model(model, device, device_map=device_map, offload_folder=offload_folder)
    patch_task = run(lambda: build_task(loaded.tokenizer, task, n, seed))
    with locked(out):
        atlas = run(lambda: open_atlas(loaded.info, out))
        with progress_bar() as progress:
            result = run(
                lambda: run_patch(
                    loaded, patch_task, method, position, rows_per_pass, step(progress, "heads")
                )
            )
        columns = write_patch(atlas, result)
        params = result.params
        if patch_task.name.startswith("fv:"):
            vector = function_vector(loaded, patch_task, result, fv_heads)
            path = vector.save(out / f"fv-{patch_task.column.removeprefix('patch_')}.npz")
            params["zero_shot_accuracy"] = zero_shot_accuracy(loaded, patch_task)
            params["zero_shot_accuracy_with_fv"] = zero_shot_accuracy(loaded, patch_task, vector)
            params["function_vector"] = {
                "file": path.name,
                "layer": vector.layer,
                "heads": [head_name(*h) for h in vector.heads],
            }
        atlas.save(out)
        figure = score_figure(atlas, columns[0], out / "figures" / "scores" / f"{columns[0]}.png")
    what = "answer probability" if params["metric"] == "prob" else "logit difference"
    console.print(
        f"{patch_task.name}: {params['n_pairs']} pairs, clean accuracy {params['clean_accuracy']:.2f}; "
        f"{what} clean {params['clean_metric']:.3f}, corrupted {params['corrupt_metric']:.3f}",
        highlight=False,
    )
    table = Table(title=f"top {top} heads by {columns[0]}", title_justify="left")
    table.add_column("head")
    for name in result.matrices:
        table.add_column(name, justify="right")
    first = next(iter(result.matrices))
    mean = result.matrices[first][0]
    for index in mean.ravel().argsort()[::-1][:top]:
        layer, head = divmod(int(index), mean.shape[1])
        cells = [f"{m[0][layer, head]:+.3f} ± {m[1][layer, head]:.3f}" for m in result.matrices.values()]
        table.add_row(head_name(layer, head), *cells)
    console.print(table)
    if "spearman_attribution_vs_activation" in params:
        console.print(
            f"attribution vs exact: Spearman {params['spearman_attribution_vs_activation']:.3f} over heads"
        )
    if "zero_shot_accuracy" in params:
        console.print(
            f"zero-shot accuracy {params['zero_shot_accuracy']:.3f} → {params['zero_shot_accuracy_with_fv']:.3f} "
            f"with the function vector of {fv_heads} heads added at layer {params['function_vector']['layer']} "
            f"({params['function_vector']['file']})"
        )
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in params["seconds"].items())
    console.print(f"→ {out / 'atlas.parquet'} ({', '.join(columns)}), {figure}; {timing}", highlight=False)
