"""``headatlas doctor`` (what works on one model) and ``headatlas conformance`` (every transformers
family built tiny and checked; writes ``docs/models.md``). The work is in
:mod:`headatlas.apps.conformance`; the KV-cache check comes from :mod:`headatlas.apps.kv.check`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import (
    DeviceOpt,
    app,
    console,
    describe_model,
    example,
    load_model,
    progress_bar,
    quiet_libraries,
    run,
    step,
)


def all_checks() -> dict[str, Any]:
    """The conformance checks plus the head-wise KV cache (an app of its own, joined here)."""
    from ..apps.conformance import CHECKS, delta_check, first_prompt
    from ..apps.kv.check import cache_delta

    return {**CHECKS, "kv": delta_check(lambda loaded: cache_delta(loaded, first_prompt(loaded)))}


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}


@app.command(epilog=example("headatlas doctor default", "headatlas doctor path/to/hf-model"))
def doctor(
    model: Annotated[
        str, typer.Argument(help="packaged name, local model dir, .gguf file or hub id")
    ] = "default",
    device: DeviceOpt = "cpu",
) -> None:
    """What works on MODEL: capture, ablate, head outputs, patch, prune and the KV cache, each ✓ or the reason."""
    quiet_libraries(False)
    from ..apps.conformance import check_all

    loaded = load_model(model, device)
    describe_model(loaded)
    with console.status("checking …"):
        outcomes = check_all(loaded, all_checks())
    table = Table("check", "", "max |Δ| vs reference")
    for name, outcome in outcomes.items():
        mark = {"ok": "[green]✓[/]", "wrong": "[bold red]✗ wrong[/]"}.get(outcome.status, outcome.status)
        table.add_row(name, mark, "" if outcome.delta is None else f"{outcome.delta:.1e}")
    console.print(table)
    for name, outcome in outcomes.items():  # reasons unwrapped, one line each
        if outcome.detail:
            console.print(f"{name}: {outcome.detail}", soft_wrap=True, highlight=False, markup=False)
    if any(o.status == "wrong" for o in outcomes.values()):
        raise typer.Exit(1)


@app.command(
    epilog=example(
        "headatlas conformance --families llama,gpt_neox,deepseek_v3",
        "headatlas conformance --out docs/models.md --json bench/results/conformance.json",
    )
)
def conformance(
    families: Annotated[
        str | None,
        typer.Option(help="comma-separated model_types (default: every family of the three mappings)"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="write the supported-models page here (needs every family)")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write every row as JSON here")] = None,
    limit: Annotated[float, typer.Option(help="seconds one family may take")] = 60.0,
) -> None:
    """Build a tiny random model of every transformers causal / masked / seq2seq family and check each."""
    quiet_libraries(False)
    import torch

    from ..apps.conformance import by_name, category, render, rows_json, sweep
    from ..core.storage import write_json, write_text

    torch.set_num_threads(1)
    chosen = run(lambda: by_name(families.split(","))) if families else None
    if out is not None and chosen is not None:
        run(lambda: _refuse_partial_page())
    started = time.perf_counter()
    with progress_bar() as progress:
        rows = sweep(chosen, all_checks(), step(progress, "families"), limit=limit)
    wall = time.perf_counter() - started
    table = Table("mapping", "family", "category", "capture", "reason")
    for row in rows:
        capture = row.outcomes.get("capture")
        table.add_row(
            row.family.kind,
            row.family.name,
            category(row),
            "" if capture is None or capture.delta is None else f"{capture.delta:.0e}",
            (row.build or "; ".join(o.detail for o in row.outcomes.values() if o.status != "ok"))[:100],
        )
    console.print(table)
    versions = _versions()
    if out is not None:
        console.print(f"wrote {write_text(out, render(rows, versions))}")
    if json_out is not None:
        result = {**rows_json(rows, versions), "wall_seconds": round(wall, 1), "torch_threads": 1}
        console.print(f"wrote {write_json(json_out, result)}")


def _refuse_partial_page() -> None:
    from ..core.errors import HeadatlasError

    raise HeadatlasError("--out writes the whole page: run it without --families")
