"""``headatlas guard fit|score|eval``: the attention-head injection guard (:mod:`headatlas.apps.guard`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..core.errors import check_at_least, check_number
from .common import (
    BatchSizeOpt,
    ForceOpt,
    ModelArg,
    app,
    console,
    err_console,
    example,
    fail,
    load_model,
    progress_bar,
    quiet_libraries,
    run,
    step,
)

guard_app = typer.Typer(
    help="Detect prompt injection from attention heads (Attention Tracker, spans found automatically).",
    no_args_is_help=True,
)
app.add_typer(guard_app, name="guard")

GuardOpt = Annotated[
    Path | None,
    typer.Option(
        "--guard",
        help="guard directory written by guard fit (default: the guard shipped for a packaged model)",
    ),
]


@guard_app.command(
    "fit",
    epilog=example(
        "headatlas guard fit default --out guard",
        "headatlas guard fit default --heads-from labelled.jsonl --n-sigma 0.5 --out guard",
    ),
)
def guard_fit(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="guard directory (guard.json, attention_tracker.json)")],
    heads_from: Annotated[
        str, typer.Option(help="'synthetic' (headatlas' own set) or a labelled JSONL file")
    ] = "synthetic",
    n_sigma: Annotated[
        float | None,
        typer.Option(
            help="n of the head rule (mean_b − mean_a) − n·(std_b + std_a) > 0 "
            "[default: 1, lowered to 0.5 and then 0 while no head passes]"
        ),
    ] = None,
    k_sigma: Annotated[float, typer.Option(help="k of the benign threshold mean − k·std")] = 2.0,
    batch_size: BatchSizeOpt = 8,
    force: ForceOpt = False,
) -> None:
    """Pick the important heads, calibrate the threshold and fit the learned variants."""
    quiet_libraries(False)
    from ..apps.guard import GUARD_FOLDER, Guard, load_rows
    from ..core.outputs import check_output_folder

    run(lambda: check_output_folder(out, GUARD_FOLDER, force))
    if n_sigma is not None:
        run(lambda: check_number("n_sigma", n_sigma))
    run(lambda: check_number("k_sigma", k_sigma))
    run(lambda: check_at_least("batch_size", batch_size, 1))

    rows = None if heads_from == "synthetic" else run(lambda: load_rows(heads_from, need_label=True))
    loaded = load_model(model)
    with progress_bar() as bar:
        guard = run(lambda: Guard.fit(loaded, rows, n_sigma, k_sigma, batch_size, step(bar, "fitting")))
    guard.save(out)
    names = guard.config["important_head_names"]
    console.print(
        f"{len(names)} important heads at n = {guard.config['n_sigma']:g} "
        f"({', '.join(names[:12])}{' …' if len(names) > 12 else ''}); "
        f"threshold {guard.threshold:.4f}; residual probe at layer {guard.probe_layer}; wrote {out}/guard.json"
    )


@guard_app.command(
    "score",
    epilog=example(
        'headatlas guard score default --instruction "Summarise this review." --data "Great phone."',
        'headatlas guard score default --guard guard --instruction "Summarise." --data-file page.txt',
        'headatlas guard score default --guard guard --instruction "Summarise." --jsonl rows.jsonl > scores.jsonl',
    ),
)
def guard_score(
    model: ModelArg,
    guard: GuardOpt = None,
    instruction: Annotated[str | None, typer.Option(help="the trusted instruction")] = None,
    data: Annotated[str | None, typer.Option(help="the untrusted data")] = None,
    data_file: Annotated[Path | None, typer.Option(help="read the data from this UTF-8 file")] = None,
    jsonl: Annotated[
        Path | None, typer.Option(help="score every {instruction, data} row, one JSON line each")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    batch_size: BatchSizeOpt = 8,
) -> None:
    """Score one (instruction, data) pair, or stream a JSONL file of them to stdout."""
    quiet_libraries(False)
    from ..apps.guard import Guard
    from ..data.sequences import read_utf8

    run(lambda: check_at_least("batch_size", batch_size, 1))
    given = [x for x in (data, data_file, jsonl) if x is not None]
    if len(given) != 1:
        fail("give exactly one of --data, --data-file, --jsonl")
    if jsonl is None and instruction is None:
        fail("--instruction is needed with --data or --data-file")
    loaded = load_model(model)
    g = run(lambda: Guard.packaged(loaded) if guard is None else Guard.load(guard, loaded))
    if jsonl is not None:
        _stream(g, jsonl, batch_size)
        return
    text = data if data is not None else run(lambda: read_utf8(data_file))  # type: ignore[arg-type]
    result = run(lambda: g.score(str(instruction), text))
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    verdict = "[bold red]INJECTION[/]" if result.flagged else "[green]ok[/]"
    console.print(
        f"{verdict}  focus {result.focus:.4f} (threshold {result.threshold:.4f}); head regression "
        f"P={result.learned:.3f}" + ("" if result.probe is None else f"; residual probe P={result.probe:.3f}")
    )


def _stream(guard: Any, path: Path, batch_size: int) -> None:
    """Write one JSON line per row to stdout as its batch is scored; a bad row is a one-line error
    after every result before it."""
    from ..apps.guard import stream_scores

    def write(result: Any) -> None:
        sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        sys.stdout.flush()

    with progress_bar() as bar:
        run(lambda: stream_scores(guard, path, write, batch_size, step(bar, "scoring")))


@guard_app.command(
    "eval",
    epilog=example("headatlas guard eval default --guard guard --jsonl labelled.jsonl --out guard-eval"),
)
def guard_eval(
    model: ModelArg,
    jsonl: Annotated[Path, typer.Option(help="labelled rows {instruction, data, label 0/1}")],
    guard: GuardOpt = None,
    out: Annotated[Path | None, typer.Option(help="write eval.json and scores.jsonl here")] = None,
    batch_size: BatchSizeOpt = 8,
    force: ForceOpt = False,
) -> None:
    """Print AUROC, AUPRC and FPR@95 %TPR of every detector and the length-only baseline."""
    quiet_libraries(False)
    import numpy as np

    from ..apps.guard import DETECTORS, EVAL_FOLDER, Guard, load_rows, write_evaluation
    from ..core.outputs import check_output_folder

    if out is not None:
        run(lambda: check_output_folder(out, EVAL_FOLDER, force))
    run(lambda: check_at_least("batch_size", batch_size, 1))

    rows = run(lambda: load_rows(jsonl, need_label=True))
    loaded = load_model(model)
    g = run(lambda: Guard.packaged(loaded) if guard is None else Guard.load(guard, loaded))
    labels = np.array([int(r["label"]) for r in rows])
    with progress_bar() as bar:
        feats = run(lambda: g.features(rows, batch_size, step(bar, "scoring")))
    report = run(lambda: g.evaluate(feats, labels))
    table = Table(title=f"{jsonl.name}: {len(rows)} rows, {int(labels.sum())} injected")
    for column in ("detector", "AUROC", "AUPRC", "FPR@95%TPR"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for name in DETECTORS:
        if name in report:
            m = report[name]
            table.add_row(name, f"{m['auroc']:.3f}", f"{m['auprc']:.3f}", f"{m['fpr_at_95_tpr']:.3f}")
    console.print(table)
    t = report["threshold"]
    console.print(
        f"threshold {t['tau']:.4f}: flags {t['tpr']:.1%} of injected, {t['fpr']:.1%} of benign rows"
    )
    best = report["best_single_head"]
    console.print(
        f"best single head on these rows: L{best['head'][0]} H{best['head'][1]}, AUROC {best['auroc']:.3f} "
        "(chosen on the rows themselves: a bound on any one head's focus score, not a result)"
    )
    if out is not None:
        run(lambda: write_evaluation(out, report, g.detector_scores(feats), labels))
        err_console.print(f"wrote {out}/eval.json and scores.jsonl")
