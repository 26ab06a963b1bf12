"""``headatlas zoo``: scan several models with the same batteries and compare their roles by count
and relative depth. The work is in :mod:`headatlas.apps.zoo.scans`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .atlas import _scan_progress
from .common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    RayOpt,
    SeqLenOpt,
    WorkersOpt,
    app,
    console,
    err_console,
    example,
    quiet_libraries,
    run,
    scan_config,
)


@app.command(
    epilog=example(
        "headatlas zoo default gemma3-270m qwen2.5-coder-0.5b --probes natural,repeat --out zoo",
        "headatlas zoo default ./my-model --out zoo --ray auto --workers 2",
    )
)
def zoo(
    models: Annotated[
        list[str], typer.Argument(help="two or more models (packaged names, model dirs, .gguf files)")
    ],
    out: Annotated[Path, typer.Option(help="zoo directory: one atlas per model, zoo.csv/json/png")],
    probes: Annotated[
        str, typer.Option(help="comma-separated batteries, the same for every model (see scan)")
    ] = "natural,repeat",
    n_prompts: Annotated[int, typer.Option(help="sequences per attention battery")] = 32,
    n_functional: Annotated[
        int | None, typer.Option(help="prompts per functional battery (default: each battery's own)")
    ] = None,
    max_len: Annotated[int | None, typer.Option(help="longest needle prompt in tokens")] = None,
    seq_len: SeqLenOpt = 256,
    batch_size: BatchSizeOpt = 8,
    seed: Annotated[int, typer.Option(help="seed for text order and random tokens")] = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    force: Annotated[
        bool, typer.Option("--force", help="rescan members already in --out (default: reuse or resume)")
    ] = False,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Scan each model into OUT/<model>/ and compare them: role counts and relative depth of each role."""
    quiet_libraries(False)
    from ..apps.zoo.scans import FIGURE_NAME, TABLE_NAME
    from ..apps.zoo.scans import zoo as run_zoo

    config = scan_config(
        probes,
        n_prompts=n_prompts,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        n_functional=n_functional,
        max_len=max_len,
    )
    shown: dict[str, Any] = {}

    def on_model(spec: str, index: int, total: int) -> None:
        if "progress" in shown:
            shown["progress"].stop()
        err_console.print(f"[bold]model {index + 1}/{total}[/]: {spec}")
        shown["progress"], shown["on_batch"] = _scan_progress()
        shown["progress"].start()

    try:
        result = run(
            lambda: run_zoo(
                models,
                out,
                config,
                force=force,
                ray=ray,
                workers=workers,
                device=device,
                dtype=dtype,
                on_model=on_model,
                on_batch=lambda done: shown["on_batch"](done),
            )
        )
    except KeyboardInterrupt:
        err_console.print(f"interrupted: finished and partial atlases stay in {out} — rerun to continue")
        raise typer.Exit(130) from None
    finally:
        if "progress" in shown:
            shown["progress"].stop()
    if result.reused:
        console.print(f"reused finished atlases: {', '.join(result.reused)}")
    table = Table(title="heads per role: count (share) · median relative depth", title_justify="left")
    table.add_column("role")
    for name in result.atlases:
        table.add_column(name, justify="right")
    for role, rows in result.table.groupby("role", sort=False):
        cells = []
        for name in result.atlases:
            row = rows[rows["model"] == name].iloc[0]
            depth = "" if row["heads"] == 0 else f" · {row['depth_median']:.2f}"
            cells.append(f"{int(row['heads'])} ({row['share']:.0%}){depth}")
        table.add_row(str(role), *cells)
    console.print(table)
    console.print(f"→ {out / TABLE_NAME}, {out / FIGURE_NAME}; atlases in {out}/<model>/")
