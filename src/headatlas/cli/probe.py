"""``headatlas probe``: what each head's output carries, by a linear probe with controls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..core.heads import head_name
from .common import (
    DeviceOpt,
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
        "headatlas probe default --task upos --n-sentences 200 --seeds 3 --out atlas",
        "headatlas probe default --task truth --out atlas",
        "headatlas probe minilm --task my_labels.jsonl --out atlas-minilm",
    )
)
def probe(
    model: ModelArg = "default",
    task: Annotated[
        str,
        typer.Option(
            help='upos, deprel, word-start, truth, or a JSONL file of {"text", "label"} or {"tokens", "labels"} rows'
        ),
    ] = "upos",
    out: Annotated[Path, typer.Option(help="atlas directory to add probe_<task> to (created if new)")] = Path(
        "atlas"
    ),
    n_sentences: Annotated[
        int, typer.Option(help="EWT training sentences per seed (dev and test: half as many)")
    ] = 200,
    seeds: Annotated[
        int, typer.Option(help="seeds (training sample, control labels, random copy): mean ± std")
    ] = 3,
    random_init: Annotated[
        bool, typer.Option(help="also probe a randomly initialised copy of the model (the baseline)")
    ] = True,
    top: Annotated[int, typer.Option(help="heads to list")] = 10,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a linear probe on every head's output at once, with control task, random-init copy and majority baselines."""
    quiet_libraries(False)
    from ..apps.common.probe_tasks import build_probe_task, check_task_name
    from ..apps.probe.probing import probe_figures, run_probes, write_probes
    from ..atlas.table import open_atlas
    from ..core.errors import check_at_least
    from ..core.outputs import check_output_dir

    run(lambda: check_task_name(task))
    run(lambda: check_at_least("seeds", seeds, 1))
    run(lambda: check_at_least("n_sentences", n_sentences, 2))
    run(lambda: check_output_dir(out))
    loaded = load_model(model, device)
    run(lambda: build_probe_task(loaded.tokenizer, task, n_sentences, 0))
    with locked(out):
        atlas = run(lambda: open_atlas(loaded.info, out))
        with progress_bar() as progress:
            result = run(
                lambda: run_probes(
                    loaded, task, n_sentences, seeds, random_init, progress=step(progress, "seeds")
                )
            )
        columns = write_probes(atlas, result)
        atlas.save(out)
        figures = probe_figures(atlas, result, out / "figures" / "scores")
    params = result.params
    console.print(
        f"{result.task}: {len(params['classes'])} classes, train {params['n_train']}, test {params['n_test']} "
        f"labels per seed ({params['position']}); majority {params['majority']:.3f}; L2 {params['l2']}",
        highlight=False,
    )
    table = Table(
        title=f"top {top} heads by test accuracy (mean ± std over {seeds} seeds)", title_justify="left"
    )
    for name in ("head", "accuracy", "control", "selectivity", "random init"):
        table.add_column(name, justify="left" if name == "head" else "right")
    rows = result.table.sort_values("accuracy", ascending=False).head(top)
    for row in rows.itertuples():
        table.add_row(
            head_name(int(row.layer), int(row.head)),  # type: ignore[arg-type]
            f"{row.accuracy:.3f} ± {row.accuracy_std:.3f}",
            f"{row.control_accuracy:.3f}",
            f"{row.selectivity:+.3f} ± {row.selectivity_std:.3f}",
            f"{row.random_init_accuracy:.3f}",
        )
    console.print(table)
    console.print(
        f"→ {out / 'atlas.parquet'} ({', '.join(columns)}), {out / 'probes.parquet'}, "
        f"{', '.join(str(f) for f in figures)}; {params['seconds']:.0f} s",
        highlight=False,
    )
