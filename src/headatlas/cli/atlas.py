"""``headatlas scan``, ``show`` and ``map``: make an atlas, read it, and draw a text's attention."""

from __future__ import annotations

import math
import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..core.heads import head_name
from .common import (
    BatchSizeOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    OffloadOpt,
    RayOpt,
    RevisionOpt,
    SeqLenOpt,
    TrustRemoteCodeOpt,
    WorkersOpt,
    app,
    console,
    describe_model,
    err_console,
    example,
    fail,
    load_model,
    quiet_libraries,
    run,
    scan_config,
)


@app.command(
    epilog=example(
        "headatlas scan default --out atlas",
        "headatlas scan default --out atlas --add --probes needle,copy --n-functional 12",
        "headatlas scan ./opus-mt-en-de --probes natural,align --align-file gold.txt --out mt",
        "headatlas scan whisper-tiny-en --probes speech --out whisper",
        "headatlas scan HuggingFaceTB/SmolLM2-360M --revision main --out smol360",
    )
)
def scan(
    model: ModelArg = "default",
    probes: Annotated[
        str,
        typer.Option(
            help="comma-separated batteries: natural, repeat (attention), align (text encoder–decoders), "
            "speech (Whisper), needle, ordinal, copy, translate, syntax, negative, semantic, dormant (functional)"
        ),
    ] = "natural,repeat",
    out: Annotated[Path, typer.Option(help="directory for atlas.parquet + atlas.json")] = Path("atlas"),
    n_prompts: Annotated[int, typer.Option(help="sequences per attention battery")] = 64,
    n_functional: Annotated[
        int | None,
        typer.Option(
            help="prompts / trials / sentences per functional battery (default: each battery's own)"
        ),
    ] = None,
    max_len: Annotated[
        int | None, typer.Option(help="longest needle-in-a-haystack prompt in tokens (default 1024)")
    ] = None,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchSizeOpt = 8,
    seed: Annotated[int, typer.Option(help="seed for text order and random tokens")] = 0,
    text_file: Annotated[
        Path | None, typer.Option(help="your own text (one passage per line) instead of EWT")
    ] = None,
    align_file: Annotated[
        Path | None,
        typer.Option(
            help="pairs 'source ||| target ||| i-j links' with gold word alignments, for the align battery"
        ),
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    resume: Annotated[bool, typer.Option("--resume", help="continue a partial scan in --out")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing atlas in --out")] = False,
    add: Annotated[
        bool,
        typer.Option(
            "--add", help="add these batteries' columns to the atlas in --out (same model), keep the rest"
        ),
    ] = False,
    figures: Annotated[
        bool, typer.Option("--figures/--no-figures", help="draw DIR/figures/ after the scan")
    ] = True,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    device_map: DeviceMapOpt = None,
    offload_folder: OffloadOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    """Scan every head of MODEL and write an atlas (and its figures) to --out."""
    quiet_libraries(verbose)
    from ..atlas.table import check_out_dir
    from ..scanning.scan import scan as run_scan

    config = scan_config(
        probes,
        text_file=text_file,
        align_file=align_file,
        n_prompts=n_prompts,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        n_functional=n_functional,
        max_len=max_len,
    )
    run(lambda: check_out_dir(out, force, resume or add))
    if device_map is not None and ray is not None:
        fail("--device-map splits one model over this node's devices; --ray runs whole copies: pick one")
    if workers is not None and ray is None:
        fail("--workers counts Ray workers: give --ray too, or leave it out")
    loaded = load_model(model, device, dtype, device_map, offload_folder, revision, trust_remote_code)
    describe_model(loaded)
    progress, on_batch = _scan_progress()
    try:
        with progress:
            atlas = run(
                lambda: run_scan(
                    loaded,
                    out=out,
                    resume=resume,
                    force=force,
                    on_batch=on_batch,
                    add=add,
                    config=config,
                    ray=ray,
                    workers=workers,
                    device=device,
                    dtype=dtype,
                )
            )
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: partial statistics are saved in {out}/.partial — rerun with --resume"
        )
        raise typer.Exit(130) from None
    meta = atlas.meta
    if add:
        last = meta["added"][-1]
        done = f"added {', '.join(last['probes'])} in {last['wall_seconds']:.1f} s"
    else:
        batteries = ", ".join(meta.get("batteries", {}))
        tokens = f"{meta['tokens']:,} tokens" if meta.get("tokens") else batteries or "0 tokens"
        done = f"scanned {tokens} in {meta['wall_seconds']:.1f} s"
    console.print(f"{done} → {out / 'atlas.parquet'} ({len(atlas.table)} heads)")
    _print_summary(atlas)
    if figures:
        with console.status("drawing figures …"):
            from ..report.figures import write_figures

            drawn = write_figures(atlas, out / "figures")
        console.print(
            f"figures → {out / 'figures'} ({len(drawn)} files); `headatlas report {shlex.quote(str(out))}` for HTML"
        )


def _scan_progress() -> tuple[Any, Any]:
    """A progress display with tokens/s, and the ``on_batch`` callback that drives it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..scanning.stream import BatchDone

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
        console=err_console,
    )
    tasks: dict[str, Any] = {}
    clock = {"start": time.perf_counter(), "tokens": 0}

    def on_batch(done: BatchDone) -> None:
        if done.battery not in tasks:
            tasks[done.battery] = progress.add_task(done.battery, total=done.n_batches, rate="-")
        clock["tokens"] += done.tokens
        rate = clock["tokens"] / max(time.perf_counter() - clock["start"], 1e-9)
        shown = f"{rate:,.0f}" if done.tokens else "-"
        progress.update(tasks[done.battery], completed=done.batch, total=done.n_batches, rate=shown)

    return progress, on_batch


def _print_summary(atlas: Any) -> None:
    from ..core.roles import RULES

    counts = []
    for rule in RULES:
        heads = atlas.with_role(rule.role)
        if len(heads):
            names = ", ".join(head_name(r.layer, r.head) for r in heads.head(4).itertuples())
            more = f" +{len(heads) - 4}" if len(heads) > 4 else ""
            counts.append(f"  {rule.role:<15} {len(heads):>4}  {names}{more}")
    console.print("roles:" if counts else "no head passed a role threshold")
    for line in counts:
        console.print(line, highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _show_help() -> tuple[str, str]:
    from ..core.roles import RULES
    from ..core.scores import SCORES

    return (
        "sort by this score, highest first: " + ", ".join(SCORES),
        "only heads holding this role: " + ", ".join(dict.fromkeys(r.role for r in RULES)),
    )


@app.command(
    epilog=example("headatlas show atlas --top 10 --by induction", "headatlas show atlas --role sink")
)
def show(
    directory: Annotated[Path, typer.Argument(help="atlas directory written by `headatlas scan`")],
    top: Annotated[int, typer.Option(help="number of heads to show")] = 20,
    by: Annotated[str | None, typer.Option(help=_show_help()[0])] = None,
    role: Annotated[str | None, typer.Option(help=_show_help()[1])] = None,
) -> None:
    """Print the atlas as a readable table (as many score columns as the terminal fits)."""
    from ..atlas.table import Atlas
    from ..core.roles import RULES
    from ..core.scores import SCORES, score_spec

    if top < 1:
        fail("--top must be at least 1")
    atlas = run(lambda: Atlas.load(directory))
    table = atlas.table
    if role is not None:
        table = run(lambda: atlas.with_role(role))
        rule = next(r for r in RULES if r.role == role)
        if rule.score not in atlas.table.columns:
            battery = score_spec(rule.score).battery
            fail(
                f"no head can hold role {role!r}: this atlas has no {rule.score} column (scan with --probes {battery})"
            )
    if by is not None:
        run(lambda: atlas.check_score(by))
        table = table.sort_values(by, ascending=False, na_position="last")
    if by is None and role is None:
        table = table.sort_values(["layer", "head"])
    table = table.head(top)
    shown = [
        (name, spec.short or name) for name, spec in SCORES.items() if spec.short and name in table.columns
    ]
    if by is not None and by not in dict(shown):
        shown.insert(0, (by, score_spec(by).short or by[:8]))
    width = console.width
    fits = max(1, (width - 50) // 9)  # layer, head, kv and roles take ~50 characters; a score ~9
    dropped = max(0, len(shown) - fits)
    if dropped:
        shown = [c for c in shown if c[0] == by] + [c for c in shown if c[0] != by]
        shown = shown[:fits]
    out = Table(
        title=f"{atlas.model.name} — {len(atlas.table)} heads"
        + (f", role {role}" if role else "")
        + (f", by {by}" if by else ""),
        title_justify="left",
    )
    kinds = "attn_kind" in table.columns  # encoder–decoder: say which stack a layer is in, not its KV head
    third = ("kind", "kind (layer)") if kinds else ("kv", "kv")
    for col, label in (("layer", "layer"), ("head", "head"), third, *shown, ("roles", "roles")):
        out.add_column(
            label,
            justify="left" if col == "roles" else "right",
            style="bold" if col == by else None,
            no_wrap=col != "roles",
        )
    for row in table.itertuples(index=False):
        out.add_row(
            str(row.layer),
            str(row.head),
            f"{row.attn_kind} {row.stack_layer}" if kinds else str(row.kv_head),
            *[_fmt(float(getattr(row, name))) for name, _ in shown],
            str(row.roles),
        )
    console.print(out)
    if dropped:
        console.print(
            f"({dropped} more score columns do not fit {width} columns: widen the terminal or use --by)"
        )


@app.command(
    "map",
    epilog=example(
        'headatlas map default --text "The cat sat. The cat sat." --layer 18 --head 6 --out map.png',
        "headatlas map default --text-file story.txt --out grid.png",
    ),
)
def map_(
    model: ModelArg = "default",
    text: Annotated[str | None, typer.Option(help="the text to run")] = None,
    text_file: Annotated[Path | None, typer.Option(help="read the text from this UTF-8 file")] = None,
    layer: Annotated[int | None, typer.Option(help="layer (alone: every head of that layer)")] = None,
    head: Annotated[int | None, typer.Option(help="head (needs --layer): one heatmap with tokens")] = None,
    out: Annotated[Path, typer.Option(help="image file: .png, .svg or .pdf")] = Path("map.png"),
    max_tokens: Annotated[int, typer.Option(help="refuse longer texts")] = 4096,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
) -> None:
    """Draw a text's attention: one head with tokens on both axes, or a grid of every head."""
    quiet_libraries(False)
    from ..core.outputs import check_output_file
    from ..report.figures import FORMATS, GRID_TILE, SINGLE_TILE, attention_figure, grid_figure
    from ..report.maps import check_head, read_text, text_attention

    run(lambda: check_output_file(out, FORMATS))
    if max_tokens < 2:
        fail("--max-tokens must be at least 2")
    body = run(lambda: read_text(text, text_file))
    if head is not None and layer is None:
        fail("--head needs --layer too")
    loaded = load_model(model, device, dtype)
    run(lambda: check_head(loaded, layer, head))
    name = loaded.info.name
    if head is not None and layer is not None:
        maps = run(lambda: text_attention(loaded, body, {layer}, max_tokens, tile=SINGLE_TILE))
        title = f"{name} — {head_name(layer, head)}"
        path = attention_figure(maps.tokens, maps.maps[layer][head], out, title, maps.pool)
    else:
        layers = None if layer is None else {layer}
        maps = run(lambda: text_attention(loaded, body, layers, max_tokens, tile=GRID_TILE))
        what = "every head" if layer is None else f"layer {layer}"
        path = grid_figure(maps.tokens, maps.maps, out, f"{name} — {what}", maps.pool)
    pooled = f", max-pooled ×{maps.pool}" if maps.pool > 1 else ""
    console.print(f"wrote {path} ({len(maps.tokens)} tokens{pooled})", highlight=False)
