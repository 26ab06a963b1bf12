"""``headatlas circuit``: head-level circuits by faithfulness curves (CPR, CMD, minimal circuit),
``circuit compare`` of result folders, and the IOI circuit's classes by path patching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..core.heads import head_name
from .common import (
    DeviceOpt,
    ModelArg,
    app,
    console,
    example,
    fail,
    load_model,
    locked,
    progress_bar,
    quiet_libraries,
    run,
    step,
)

TASK_HELP = (
    "ioi, greater-than, arithmetic[:+|-|*|/], acronym, mcqa, icl[:antonym|country-capital], sequence, or a "
    'JSONL file of {"clean", "corrupt", "answer", "wrong"} rows (answers exactly as they follow the prompt)'
)


@app.command(
    epilog=example(
        "headatlas circuit default --task ioi --method eap-ig,attribution,random --out circuits/ioi",
        "headatlas circuit default --task arithmetic --method activation,eap-ig --ablation mean --sizes 1,2,4,8,16",
        "headatlas circuit default --task icl --method atlas:induction,random --atlas atlas --out circuits/icl",
        "headatlas circuit compare circuits/ioi circuits/icl --out circuits/compare",
        "headatlas circuit default --task ioi --method path --n 8 --out atlas   # IOI classes by path patching",
    )
)
def circuit(
    model: ModelArg = "default",
    folders: Annotated[list[Path] | None, typer.Argument(help="with compare: result folders")] = None,
    task: Annotated[str, typer.Option(help=TASK_HELP)] = "ioi",
    method: Annotated[
        str,
        typer.Option(
            help="comma list of activation, attribution, eap-ig, atlas:<score>, random; or path (IOI classes)"
        ),
    ] = "eap-ig,attribution,random",
    ablation: Annotated[
        str, typer.Option(help="how heads outside the circuit are silenced: mean, counterfactual or zero")
    ] = "counterfactual",
    sizes: Annotated[
        str | None,
        typer.Option(help="circuit sizes, e.g. 1,2,4,8 (default: MIB's fractions and powers of two)"),
    ] = None,
    n: Annotated[int, typer.Option(help="pairs drawn for a built-in task")] = 16,
    seed: Annotated[int, typer.Option(help="seed of a built-in task's pairs")] = 0,
    steps: Annotated[int, typer.Option(help="EAP-IG integration steps")] = 8,
    seeds: Annotated[str, typer.Option(help="seeds of the random rankings")] = "0,1,2",
    atlas: Annotated[
        Path | None, typer.Option(help="atlas to read atlas:<score> from and add circuit_<task> to")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="results folder (default circuit/; the atlas for --method path)")
    ] = None,
    only_correct: Annotated[
        bool, typer.Option(help="keep only the pairs the model answers right (as circuit papers do)")
    ] = False,
    rows_per_pass: Annotated[int, typer.Option(help="rows per forward pass")] = 64,
    edges: Annotated[
        int, typer.Option(help="head → head edges among the first method's top K heads, by path patching")
    ] = 0,
    device: DeviceOpt = "cpu",
) -> None:
    """Find the heads that carry a task and measure how faithfully they carry it (Mueller et al. 2025)."""
    quiet_libraries(False)
    from ..core.errors import check_at_least
    from ..core.outputs import check_output_dir

    if model == "compare":
        _compare(folders or [], out or Path("circuit-compare"))
        return
    if folders:
        fail(f"unexpected arguments {' '.join(map(str, folders))}: only circuit compare takes folders")
    run(lambda: check_at_least("rows_per_pass", rows_per_pass, 1))
    run(lambda: check_at_least("edges", edges, 0))
    if method == "path":
        _path_classes(model, task, n, seed, out or Path("atlas"), rows_per_pass, device)
        return
    target = out or Path("circuit")
    run(lambda: check_output_dir(target))
    size_list = _ints(sizes, "--sizes") if sizes else None
    seed_list = _ints(seeds, "--seeds")
    from ..apps.common.circuit_tasks import circuit_task
    from ..apps.patch.circuits import measure_circuits, write_results
    from ..atlas.table import Atlas

    book = run(lambda: Atlas.load(atlas)) if atlas is not None and (atlas / "atlas.json").exists() else None
    loaded = load_model(model, device)
    pairs = run(lambda: circuit_task(loaded.tokenizer, task, n, seed))
    methods = [m.strip() for m in method.split(",") if m.strip()]
    if edges and all(m == "random" for m in methods):
        fail("--edges follows a method's ranking: add one besides random (e.g. --method eap-ig,random)")
    with progress_bar() as progress:
        result = run(
            lambda: measure_circuits(
                loaded, pairs, methods, ablation, size_list, steps, seed_list, book, rows_per_pass,
                step(progress, "methods"), only_correct=only_correct,
            ),
            {"methods": "--method", "ablation": "--ablation", "steps": "--steps"},
        )  # fmt: skip
    paths = write_results(result, target)
    if atlas is not None:
        _write_atlas(atlas, loaded, result)
    _print(result.as_dict())
    if edges:
        paths.append(_edges(loaded, result, edges, rows_per_pass, target))
    console.print(f"→ {', '.join(str(p) for p in paths)}", highlight=False)


def _edges(loaded: Any, result: Any, k: int, rows_per_pass: int, target: Path) -> Path:
    """Measure and print the head → head edges among the top ``k`` heads of the first ranked method."""
    from ..apps.common.circuit_tasks import encode_exact
    from ..apps.patch.edges import circuit_edges, write_edges
    from ..apps.patch.rankings import order_by

    method = next(iter(result.scores))
    heads = order_by(result.scores[method])[:k]
    enc = encode_exact(loaded, result.task)
    with progress_bar() as progress:
        found = run(
            lambda: circuit_edges(
                loaded, enc, heads, rows_per_pass=rows_per_pass, progress=step(progress, "edges")
            )
        )
    table = Table(
        title=f"strongest edges among the top {len(found.heads)} heads by {method}", title_justify="left"
    )
    for col in ("sender", "receiver", "channel", "effect", "± std"):
        table.add_column(col, justify="right" if col in ("effect", "± std") else "left")
    for row in found.strongest(10).itertuples():
        table.add_row(
            str(row.sender),
            str(row.receiver),
            str(row.channel),
            f"{row.effect:+.3f}",
            f"{row.effect_std:.3f}",
        )
    console.print(table)
    console.print(
        f"edges: {len(found.table)} rows, {found.passes} forward passes, {found.seconds:.1f} s",
        highlight=False,
    )
    return write_edges(found, target)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{flag} {text!r}: give whole numbers separated by commas")


def _write_atlas(directory: Path, loaded: Any, result: Any) -> None:
    from ..apps.patch.circuits import write_circuit_columns
    from ..atlas.table import open_atlas
    from ..core.outputs import check_output_dir

    run(lambda: check_output_dir(directory, "atlas"))
    with locked(directory):
        book = run(lambda: open_atlas(loaded.info, directory))
        columns = write_circuit_columns(book, result)
        book.save(directory)
    console.print(f"→ {directory / 'atlas.parquet'} ({', '.join(columns)})", highlight=False)


def _print(data: dict[str, Any]) -> None:
    base = data["baseline"]
    console.print(
        f"{data['task']}: {base['n_pairs']} pairs, clean accuracy {base['clean_accuracy']:.2f}, logit difference "
        f"clean {base['clean_metric']:.3f}, counterfactual {base['counterfactual_metric']:.3f}; "
        f"{data['ablation']} ablation of {data['total_heads']} heads",
        highlight=False,
    )
    if base.get("only_correct"):
        console.print(
            f"  kept the {base['n_pairs']} of {base['drawn_pairs']} pairs the model gets right "
            f"(accuracy on all {base['drawn_accuracy']:.2f})",
            highlight=False,
        )
    if base.get("drawn_accuracy", base["clean_accuracy"]) < 0.7:
        console.print(
            "  the model does not do this task (accuracy < 0.70): its circuit means little", style="yellow"
        )
    table = Table(title_justify="left")
    for col in (
        "method",
        "CPR ↑",
        "CMD ↓",
        "min k (f≥0.9)",
        "stable k",
        "ranking s",
        "curves s",
        "top heads",
    ):
        table.add_column(col, justify="left" if col in ("method", "top heads") else "right")
    for name, entry in data["methods"].items():
        table.add_row(
            name, f"{entry['cpr']:.3f}", f"{entry['cmd']:.3f}", str(entry["minimal_k"]), str(entry.get("stable_k")),
            f"{entry.get('ranking_seconds', 0.0):.1f}", f"{entry['curve_seconds']:.1f}", ", ".join(entry.get("top", [])[:5]),
        )  # fmt: skip
    console.print(table)


def _compare(folders: list[Path], out: Path) -> None:
    from ..apps.patch.circuit_figures import compare_figure
    from ..apps.patch.circuits import compare_results, figure_curve, read_results
    from ..core.outputs import check_output_dir
    from ..core.storage import atomic_path

    if not folders:
        fail("circuit compare needs result folders: headatlas circuit compare DIR DIR ...")
    run(lambda: check_output_dir(out))
    table = run(lambda: compare_results(folders))
    runs = {}
    for folder in folders:
        data = read_results(folder)
        for name, entry in data["methods"].items():
            runs[f"{data['model']} {data['task']} {name}"] = (figure_curve(entry), data["total_heads"])
    out.mkdir(parents=True, exist_ok=True)
    figure = compare_figure(runs, "faithfulness curves", out / "compare.png")
    with atomic_path(out / "compare.csv", suffix=".csv") as tmp:
        table.to_csv(tmp, index=False)
    shown = Table(title_justify="left")
    for col in ("model", "task", "ablation", "method", "accuracy", "cpr", "cmd", "minimal_k", "ranking_s"):
        shown.add_column(col)
    for row in table.itertuples():
        shown.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in (
            row.model, row.task, row.ablation, row.method, row.accuracy, row.cpr, row.cmd, row.minimal_k, row.ranking_s)))  # fmt: skip
    console.print(shown)
    console.print(f"→ {figure}, {out / 'compare.csv'}", highlight=False)


def _path_classes(
    model: str, task: str, n: int, seed: int, out: Path, rows_per_pass: int, device: str
) -> None:
    """Sort heads into the IOI circuit's classes by path patching (Wang et al. 2022)."""
    from ..apps.common.patch_tasks import build_task
    from ..apps.patch.circuit import circuit_figure, ioi_circuit, write_circuit
    from ..atlas.table import open_atlas
    from ..core.outputs import check_output_dir

    if task != "ioi":
        fail(
            f"--task {task!r}: --method path knows the ioi task only (its classes need the IOI name structure)"
        )
    run(lambda: check_output_dir(out))
    loaded = load_model(model, device)
    ioi = run(lambda: build_task(loaded.tokenizer, "ioi", n, seed))
    with locked(out):
        book = run(lambda: open_atlas(loaded.info, out))
        with progress_bar() as progress:
            found = run(lambda: ioi_circuit(loaded, ioi, rows_per_pass, step(progress, "senders")))
        columns = write_circuit(book, found)
        book.save(out)
        figure = circuit_figure(
            found, f"{loaded.info.name} — IOI circuit by path patching", out / "figures" / "circuit-ioi.png"
        )
    for role, heads in found.classes.items():
        console.print(f"  {role:<20} {', '.join(head_name(*h) for h in heads) or '—'}", highlight=False)
    console.print(f"→ {out / 'atlas.parquet'} ({', '.join(columns)}), {figure}", highlight=False)
