"""``headatlas importance``, ``redundancy``, ``prune`` and ``prune-curve``: which heads the model
needs, and removing the others. The work is in :mod:`headatlas.apps.prune`."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..core.heads import head_name
from .common import (
    DeviceMapOpt,
    DeviceOpt,
    ForceOpt,
    ModelArg,
    OffloadOpt,
    RayOpt,
    WorkersOpt,
    app,
    console,
    example,
    fail,
    floats,
    load_model,
    locked,
    progress_bar,
    quiet_libraries,
    ray_workers,
    run,
    step,
)

NSeqsOpt = Annotated[int, typer.Option(help="held-out EWT sequences")]
SeqLenOpt = Annotated[int, typer.Option(help="tokens per sequence")]
AllowEmptyOpt = Annotated[
    bool, typer.Option("--allow-empty-layers", help="allow removing every head of a layer")
]


@app.command(
    epilog=example(
        "headatlas importance default --out atlas",
        "headatlas importance default --method ablation-zero --n-seqs 4 --seq-len 128 --out atlas",
    )
)
def importance(
    model: ModelArg = "default",
    method: Annotated[str, typer.Option(help="gradient, ablation-zero or ablation-mean")] = "gradient",
    data: Annotated[str, typer.Option(help="'natural' (UD EWT dev, held out) or a text file")] = "natural",
    out: Annotated[Path, typer.Option(help="atlas directory to add the columns to (created if new)")] = Path(
        "atlas"
    ),
    n_seqs: NSeqsOpt = 16,
    seq_len: SeqLenOpt = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 4,
    device: DeviceOpt = "cpu",
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    device_map: DeviceMapOpt = None,
    offload_folder: OffloadOpt = None,
) -> None:
    """Score how much each head matters (Michel et al. 2019) and write it into the atlas."""
    quiet_libraries(False)
    from ..apps.common.evaluation import heldout_data
    from ..apps.prune.importance import METHODS, compute_importance, write_importance
    from ..atlas.table import open_atlas
    from ..core.errors import check_choice
    from ..core.outputs import check_output_dir
    from ..model.load import reload_spec

    run(lambda: check_choice("method", method, METHODS))
    run(lambda: check_output_dir(out))
    if device_map is not None and ray is not None:
        fail("--device-map splits one model over this node's devices; --ray runs whole copies: pick one")
    loaded = load_model(model, device, device_map=device_map, offload_folder=offload_folder)
    with locked(out):
        atlas = run(lambda: open_atlas(loaded.info, out))
        heldout = run(lambda: heldout_data(loaded, data, "dev", n_seqs, seq_len, batch_size))
        spec = reload_spec(loaded.info) or model
        with ray_workers(spec, ray, workers, device) as pool, progress_bar() as progress:
            result = run(lambda: compute_importance(loaded, heldout, method, step(progress, method), pool))
        write_importance(atlas, result)
        atlas.save(out)
    column = "importance_gradient" if method == "gradient" else "importance_ablation"
    top = atlas.top(column, 5)
    names = ", ".join(head_name(layer, head) for layer, head in zip(top["layer"], top["head"], strict=True))
    console.print(
        f"{method}: {result.forwards} passes over {heldout.n_tokens:,} tokens in {result.seconds:.1f} s "
        f"→ {out / 'atlas.parquet'} ({column}); most important: {names}",
        highlight=False,
    )


@app.command(epilog=example("headatlas redundancy default --out atlas --n-seqs 4 --seq-len 64"))
def redundancy(
    model: ModelArg = "default",
    out: Annotated[Path, typer.Option(help="atlas directory (created if new)")] = Path("atlas"),
    n_seqs: Annotated[int, typer.Option(help="short EWT dev sequences")] = 4,
    seq_len: SeqLenOpt = 64,
    device: DeviceOpt = "cpu",
) -> None:
    """Pairwise JS distance of attention, output cosine, and near-duplicate head clusters."""
    quiet_libraries(False)
    from ..apps.common.evaluation import heldout_data
    from ..apps.prune.redundancy import measure, plot_redundancy, write_redundancy
    from ..atlas.table import open_atlas
    from ..core.outputs import check_output_dir

    run(lambda: check_output_dir(out))
    loaded = load_model(model, device)
    with locked(out):
        atlas = run(lambda: open_atlas(loaded.info, out))
        heldout = run(lambda: heldout_data(loaded, "natural", "dev", n_seqs, seq_len, n_seqs))
        with progress_bar() as progress:
            result = run(lambda: measure(loaded, heldout, step(progress, "layers")))
        write_redundancy(atlas, result, heldout, out)
        atlas.save(out)
        figure = plot_redundancy(
            result, loaded.info.n_heads, loaded.info.name, out / "figures" / "redundancy.png"
        )
    n_clusters = int(result.cluster.max()) + 1 if result.cluster.size else 0
    in_clusters = int((result.cluster >= 0).sum())
    console.print(
        f"{n_clusters} clusters of near-duplicate heads ({in_clusters} heads) → {out}; figure {figure}",
        highlight=False,
    )


@app.command(
    epilog=example(
        "headatlas prune default --fraction 0.2 --out pruned",
        "headatlas prune default --heads L17H3,L18H6 --out pruned --json",
        "headatlas prune default --heads conflict-heads.json --out pruned",
    )
)
def prune(
    out: Annotated[Path, typer.Option(help="directory for the pruned checkpoint")],
    model: ModelArg = "default",
    fraction: Annotated[float | None, typer.Option(help="fraction of heads to remove, in [0, 1)")] = None,
    heads: Annotated[
        str | None,
        typer.Option(help="exact heads to remove: L3H1,L17H4 (or 3.1,17.4), or a head-set .json file"),
    ] = None,
    by: Annotated[
        str, typer.Option(help="importance, random or an atlas score (lowest go first)")
    ] = "importance",
    atlas: Annotated[Path | None, typer.Option(help="atlas with the --by column")] = None,
    seed: Annotated[int, typer.Option(help="seed for --by random")] = 0,
    allow_empty_layers: AllowEmptyOpt = False,
    force: ForceOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    n_seqs: Annotated[int, typer.Option(help="held-out EWT test sequences for perplexity")] = 16,
    seq_len: SeqLenOpt = 256,
    device: DeviceOpt = "cpu",
) -> None:
    """Physically remove heads, save the checkpoint, and report params, perplexity and speed."""
    quiet_libraries(False)
    from ..apps.common.evaluation import heldout_data
    from ..apps.prune.pruning import (
        check_fraction,
        check_prune_output,
        head_orders,
        random_order,
        run_prune,
        select,
    )
    from ..core.heads import parse_heads, read_head_set

    if (fraction is None) == (heads is None):
        fail("give exactly one of --fraction F or --heads L3H1,...")
    if fraction is not None:
        run(lambda: check_fraction(fraction, allow_zero=False))
    run(lambda: check_prune_output(out, model, force))
    loaded = load_model(model, device)
    run(lambda: check_prune_output(out, loaded.info.source, force))
    info = loaded.info
    with progress_bar() as progress:
        if heads is not None and heads.endswith(".json"):  # a head set (headatlas conflict / safety)
            chosen = run(lambda: read_head_set(heads, info.n_layers, info.n_heads))
        elif heads is not None:
            chosen = run(lambda: parse_heads(heads, info.n_layers, info.n_heads))
        else:
            count = round((fraction or 0.0) * info.n_layers * info.n_heads)
            if by == "random":
                order = random_order(info.n_layers, info.n_heads, seed)
            else:
                order = run(lambda: head_orders(loaded, by, atlas, 1, step(progress, "importance")))[by][0]
            chosen = run(lambda: select(order, count, info.n_layers, info.n_heads, allow_empty_layers))
        data = run(lambda: heldout_data(loaded, "natural", "test", n_seqs, seq_len, 4))
        report = run(
            lambda: run_prune(loaded, chosen, data, out, allow_empty_layers, step(progress, "perplexity"))
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    console.print(
        f"removed {report.n_heads_removed}/{report.n_heads_total} heads → {out}\n"
        f"params      {report.params_before:,} → {report.params_after:,} "
        f"({100 * (1 - report.params_after / report.params_before):.1f}% fewer)\n"
        f"perplexity  {report.perplexity_before:.3f} → {report.perplexity_after:.3f} "
        f"({data.source}, {data.n_seqs} × {data.seq_len} tokens)\n"
        f"forward     {report.seconds_before * 1e3:.0f} ms → {report.seconds_after * 1e3:.0f} ms "
        f"(speedup {report.speedup:.2f}×)\n"
        + (
            "reload: headatlas.load and plain transformers"
            if report.plain_transformers_reload
            else "reload: headatlas.load (layers have different head counts)"
        ),
        highlight=False,
    )


@app.command(
    "prune-curve",
    epilog=example("headatlas prune-curve default --fractions 0,0.1,0.3,0.5 --seeds 3 --out prune-curve"),
)
def prune_curve(
    model: ModelArg = "default",
    by: Annotated[
        str, typer.Option(help="orderings: importance, random, atlas scores")
    ] = "importance,random",
    fractions: Annotated[str, typer.Option(help="fractions of heads removed")] = "0,0.1,0.2,0.3,0.4,0.5",
    atlas: Annotated[Path | None, typer.Option(help="atlas holding importance/scores")] = None,
    out: Annotated[Path, typer.Option(help="directory for prune-curve.png and prune-curve.json")] = Path(
        "prune-curve"
    ),
    seeds: Annotated[int, typer.Option(help="random orders to average")] = 3,
    allow_empty_layers: AllowEmptyOpt = False,
    n_seqs: NSeqsOpt = 16,
    seq_len: SeqLenOpt = 256,
    device: DeviceOpt = "cpu",
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    force: ForceOpt = False,
) -> None:
    """Perplexity as heads are removed, by importance against random (Michel et al. 2019, Fig. 3)."""
    quiet_libraries(False)
    from ..apps.common.evaluation import heldout_data
    from ..apps.prune.pruning import CURVE_FOLDER, check_fraction, head_orders, plot_curve
    from ..apps.prune.pruning import prune_curve as run_curve
    from ..core.outputs import check_output_folder
    from ..core.storage import write_json
    from ..model.load import reload_spec

    run(lambda: check_output_folder(out, CURVE_FOLDER, force))
    values = floats(fractions, "--fractions")
    for value in values:
        run(partial(check_fraction, value, "fractions"))
    if not values or seeds < 1:
        fail("give at least one fraction and --seeds ≥ 1")
    loaded = load_model(model, device)
    with progress_bar() as progress:
        orders = run(lambda: head_orders(loaded, by, atlas, seeds, step(progress, "importance")))
        data = run(lambda: heldout_data(loaded, "natural", "test", n_seqs, seq_len, 4))
        with ray_workers(reload_spec(loaded.info) or model, ray, workers, device) as pool:
            result = run(
                lambda: run_curve(
                    loaded, orders, values, data, allow_empty_layers, step(progress, "perplexity"), pool
                )
            )
    write_json(out / CURVE_FOLDER.marker, result)
    figure = plot_curve(result, out / "prune-curve.png")
    curves: dict[str, dict[str, list[float]]] = result["curves"]  # type: ignore[assignment]
    for name, curve in curves.items():
        cells = "  ".join(
            f"{f:.0%}: {m:.2f}" + (f"±{s:.2f}" if len(curve["runs"]) > 1 else "")
            for f, m, s in zip(values, curve["mean"], curve["std"], strict=True)
        )
        console.print(f"{name:<11} {cells}", highlight=False)
    console.print(f"→ {out / 'prune-curve.json'}, {figure}", highlight=False)
