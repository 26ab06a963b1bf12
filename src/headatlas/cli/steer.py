"""``headatlas steer``: inference-time intervention on the heads whose probes work best (Li et al. 2023)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    DeviceOpt,
    ForceOpt,
    ModelArg,
    app,
    console,
    example,
    fail,
    floats,
    labelled_steps,
    load_model,
    progress_bar,
    quiet_libraries,
    run,
)

steer_app = typer.Typer(
    help="Inference-time intervention: fit, evaluate, generate with and export head-output steering.",
    no_args_is_help=True,
)
app.add_typer(steer_app, name="steer")
SteerDir = Annotated[
    Path, typer.Option("--steer", help="steering directory written by `headatlas steer fit`")
]


@steer_app.command(
    "fit", epilog=example("headatlas steer fit default --task truth --k 16 --alpha 15 --out steer-truth")
)
def steer_fit(
    model: ModelArg = "default",
    task: Annotated[
        str,
        typer.Option(help='truth, a JSONL file of {"text", "label"} rows with two labels, or TruthfulQA.csv'),
    ] = "truth",
    k: Annotated[int, typer.Option(help="heads to steer (top k by validation accuracy)")] = 16,
    alpha: Annotated[float, typer.Option(help="default strength α (shift α·σ·θ̂)")] = 15.0,
    direction: Annotated[str, typer.Option(help="mass-mean or probe")] = "mass-mean",
    seed: Annotated[int, typer.Option(help="seed of the fact split and of the random control")] = 0,
    out: Annotated[Path, typer.Option(help="steering directory to write")] = Path("steer"),
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Probe every head on the task, keep the top k, and save their directions and σ."""
    quiet_libraries(False)
    from ..apps.common.probe_tasks import check_task_name
    from ..apps.steer.steering import DIRECTIONS, STEER_FOLDER, fit
    from ..core.errors import check_choice
    from ..core.outputs import check_output_folder

    run(lambda: check_task_name(task))
    run(lambda: check_choice("direction", direction, DIRECTIONS))
    run(lambda: check_output_folder(out, STEER_FOLDER, force))
    loaded = load_model(model, device)
    with console.status(f"fitting probes on every head for {task} …"):
        steering = run(lambda: fit(loaded, task, k, direction, alpha, seed))
    steering.save(out)
    heads = ", ".join(
        f"L{layer}H{head} ({acc:.2f})"
        for (layer, head), acc in zip(steering.shift.heads, steering.val_accuracy, strict=True)
    )
    console.print(f"{steering.task}: top {k} heads by validation accuracy: {heads}", highlight=False)
    console.print(f"→ {out} (steer.json, steer.safetensors)", highlight=False)


@steer_app.command(
    "eval", epilog=example("headatlas steer eval default --steer steer-truth --alphas 0,5,10,15,20")
)
def steer_eval(
    model: ModelArg = "default",
    steer: SteerDir = Path("steer"),
    alphas: Annotated[str, typer.Option(help="comma-separated strengths α to sweep")] = "0,5,10,15,20",
    n_text: Annotated[int, typer.Option(help="EWT test sentences for the CE / KL cost")] = 32,
    device: DeviceOpt = "cpu",
) -> None:
    """Multiple-choice accuracy on held-out facts and CE / KL on EWT text at each α, against random directions."""
    quiet_libraries(False)
    from ..apps.steer.evaluation import evaluate, summary_rows, sweep_figure
    from ..apps.steer.steering import load_steering
    from ..core.storage import write_json

    values = floats(alphas, "--alphas")
    if n_text < 1:
        fail(f"--n-text must be at least 1, got {n_text}")
    loaded = load_model(model, device)
    steering = run(lambda: load_steering(steer, loaded))
    with console.status(f"evaluating {len(values)} α values, steered and random …"):
        table = run(lambda: evaluate(loaded, steering, values, n_text))
    write_json(steer / "eval.json", summary_rows(table))
    figure = sweep_figure(
        table,
        f"{loaded.info.name} — ITI on {steering.task}, k = {len(steering.shift.heads)}",
        steer / "sweep.png",
    )
    shown = Table(
        title=f"α sweep ({int(table['n_facts'].max())} held-out facts, {int(table['n_tokens'].max())} EWT tokens)",
        title_justify="left",
    )
    for name in ("heads", "α", "MC accuracy", "MC margin", "CE", "KL"):
        shown.add_column(name, justify="left" if name == "heads" else "right")
    for row in table.itertuples():
        shown.add_row(
            "top-k probe" if row.kind == "probe" else "random",
            f"{row.alpha:g}", f"{row.mc_accuracy:.3f}", f"{row.mc_margin:+.3f}", f"{row.ce:.4f}", f"{row.kl:.4f}",
        )  # fmt: skip
    console.print(shown)
    console.print(f"→ {steer / 'eval.json'}, {figure}", highlight=False)


@steer_app.command(
    "generate",
    epilog=example(
        'headatlas steer generate default --steer steer-truth --prompt "The capital of Spain is" --alpha 15'
    ),
)
def steer_generate(
    model: ModelArg = "default",
    steer: SteerDir = Path("steer"),
    prompt: Annotated[str, typer.Option(help="text to continue")] = "The capital of Spain is",
    alpha: Annotated[float | None, typer.Option(help="strength α (default: the steering's)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate (greedy)")] = 40,
    device: DeviceOpt = "cpu",
) -> None:
    """Continue a prompt greedily, unsteered and steered."""
    quiet_libraries(False)
    from ..apps.steer.evaluation import generate
    from ..apps.steer.steering import load_steering

    if not prompt.strip():
        fail("--prompt is empty: give the text to continue")
    if alpha is not None:
        floats(str(alpha), "--alpha")
    if max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    loaded = load_model(model, device)
    steering = run(lambda: load_steering(steer, loaded))
    used = steering.alpha if alpha is None else alpha
    console.print(
        f"[bold]unsteered:[/] {run(lambda: generate(loaded, None, prompt, None, max_new_tokens))!r}"
    )
    console.print(
        f"[bold]α = {used:g}:[/] {run(lambda: generate(loaded, steering, prompt, used, max_new_tokens))!r}"
    )


@steer_app.command(
    "export",
    epilog=example(
        "headatlas steer export steer-truth --format bake --out baked-model",
        "headatlas steer export steer-truth --format lm-eval --out steer-truth/lm-eval",
    ),
)
def steer_export(
    steer: Annotated[Path, typer.Argument(help="steering directory written by `headatlas steer fit`")],
    format: Annotated[
        str, typer.Option("--format", help="bake (a checkpoint) or lm-eval (steer.pt)")
    ] = "bake",
    out: Annotated[Path, typer.Option(help="directory to write")] = Path("steered-model"),
    model: Annotated[
        str | None, typer.Option(help="the model (default: the one named in steer.json)")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="strength α (default: the steering's)")] = None,
    force: ForceOpt = False,
) -> None:
    """Fold the shift into the output projections' biases (bake) or write lm-evaluation-harness's steering file."""
    quiet_libraries(False)
    from ..apps.steer.export import check_export_target, export_bake, export_lm_eval
    from ..apps.steer.steering import load_steering

    saved = run(lambda: load_steering(steer))
    spec = model or saved.params.get("model_spec")
    if not spec:
        fail(f"{steer} does not say how to load its model ({saved.model_name}): give --model")
    if Path(out).resolve() == Path(steer).resolve():
        fail(f"--out {str(out)!r} is the steering directory itself: give another directory")
    run(lambda: check_export_target(format, out, force, model=spec))
    loaded = load_model(spec)
    steering = run(lambda: load_steering(steer, loaded))
    used = steering.alpha if alpha is None else alpha
    writer = export_bake if format == "bake" else export_lm_eval
    path = run(lambda: writer(loaded, steering, used, out))
    console.print(f"α = {used:g}, {len(steering.shift.heads)} heads → {path}", highlight=False)


@steer_app.command(
    "truthfulqa",
    epilog=example(
        "headatlas steer truthfulqa default --csv TruthfulQA.csv --alphas 0,5,15 --ks 16 --out tqa-default"
    ),
)
def steer_truthfulqa(
    model: ModelArg = "default",
    csv: Annotated[
        Path, typer.Option(help="TruthfulQA.csv (Lin et al. 2022; github.com/sylinrl/TruthfulQA)")
    ] = Path("TruthfulQA.csv"),
    alphas: Annotated[str, typer.Option(help="comma-separated strengths α to choose from")] = "0,5,10,15",
    ks: Annotated[str, typer.Option(help="comma-separated numbers of heads K to choose from")] = "8,16,32",
    folds: Annotated[int, typer.Option(help="folds over questions (2: ITI's two-fold validation)")] = 2,
    seeds: Annotated[int, typer.Option(help="random fold splits")] = 3,
    n_text: Annotated[int, typer.Option(help="EWT test sentences for the CE / KL cost")] = 32,
    rotate: Annotated[
        bool, typer.Option(help="score each question under ITI in one seed only (the cost of one seed)")
    ] = False,
    checkpoint: Annotated[
        Path | None, typer.Option(help="directory that keeps finished stages, to resume a stopped run")
    ] = None,
    splits: Annotated[
        str | None,
        typer.Option(help="SEED-FOLD pairs to compute, e.g. 0-0,1-1; the rest come from --checkpoint"),
    ] = None,
    out: Annotated[Path, typer.Option(help="directory to write")] = Path("truthfulqa"),
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """ITI on TruthfulQA: MC1 / MC2 of baseline, ITI (α, K chosen on training halves) and random heads."""
    quiet_libraries(False)
    from ..apps.common.truthfulqa import read_truthfulqa
    from ..apps.steer.tqa import FOLDER, parse_splits, summary_table, truthfulqa, truthfulqa_figure
    from ..core.outputs import check_output_folder, output_folder
    from ..core.storage import write_json

    values = floats(alphas, "--alphas")
    heads = [int(k) for k in floats(ks, "--ks")]
    run(lambda: read_truthfulqa(csv))
    chosen_splits = run(lambda: parse_splits(splits)) if splits is not None else None
    run(lambda: check_output_folder(out, FOLDER, force))
    loaded = load_model(model, device)
    with progress_bar() as progress:
        steps = labelled_steps(progress)
        result = run(
            lambda: truthfulqa(loaded, csv, values, heads, folds, seeds, n_text=n_text, rotate=rotate,
                               checkpoint=checkpoint, progress=steps, splits=chosen_splits)
        )  # fmt: skip
    table = summary_table(result.summary)
    with output_folder(out, FOLDER) as tmp:
        result.per_question.to_csv(tmp / "per_question.csv", index=False)
        table.to_csv(tmp / "table.csv", index=False)
        truthfulqa_figure(result.summary, f"{loaded.info.name} — ITI on TruthfulQA", tmp / "truthfulqa.png")
        write_json(tmp / FOLDER.marker, result.summary)
    shown = Table(
        title=f"TruthfulQA, {result.summary['n_questions']} held-out questions, 95 % bootstrap intervals",
        title_justify="left",
    )
    for name in ("heads", "MC1", "MC2", "CE", "KL"):
        shown.add_column(name, justify="left" if name == "heads" else "right")
    for row in table.itertuples():
        shown.add_row(
            str(row.heads),
            f"{row.mc1:.3f} {row.mc1_ci}",
            f"{row.mc2:.3f} {row.mc2_ci}",
            f"{row.ce:.4f}",
            f"{row.kl:.4f}",
        )
    console.print(shown)
    chosen = ", ".join(f"α {c['alpha']:g} K {c['k']}" for c in result.summary["chosen"])
    steered = ", ".join(f"α {c['alpha']:g} K {c['k']}" for c in result.summary["steered"])
    console.print(f"chosen per split (validation MC2): {chosen}; steered rows at: {steered}", highlight=False)
    console.print(f"→ {out} (truthfulqa.json, table.csv, per_question.csv, truthfulqa.png)", highlight=False)
