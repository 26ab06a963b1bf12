"""``headatlas retain``: learn a new task while keeping an earlier one, with replay and SEEKR's
head-guided attention distillation (He et al. 2024). The work is in :mod:`headatlas.apps.retain`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DeviceOpt,
    ForceOpt,
    ModelArg,
    app,
    console,
    example,
    load_model,
    progress_bar,
    quiet_libraries,
    run,
    step,
)


@app.command(
    epilog=example(
        "headatlas retain default --replay capitals --train antonyms --out retained",
        "headatlas retain default --replay old.jsonl --train new.jsonl --heads seekr --k 24 "
        "--replay-fraction 0.01 --out retained",
        "headatlas retain default --replay old.jsonl --train new.jsonl --heads atlas:importance_gradient "
        "--atlas atlas --out retained --json",
    )
)
def retain(
    out: Annotated[Path, typer.Option(help="directory for the fine-tuned checkpoint (safetensors)")],
    replay: Annotated[
        str, typer.Option(help='earlier task: JSON lines {"prompt", "answer"} or a builtin task')
    ],
    train: Annotated[str, typer.Option(help='new task: JSON lines {"prompt", "answer"} or a builtin task')],
    model: ModelArg = "default",
    heads: Annotated[
        str, typer.Option(help="seekr, atlas:<score>, none (replay only) or L3H1,... to distil")
    ] = "seekr",
    k: Annotated[int, typer.Option(help="heads to distil")] = 24,
    replay_fraction: Annotated[float, typer.Option(help="share of --replay kept for replay, (0, 1]")] = 0.1,
    lam: Annotated[float, typer.Option(help="weight of the attention-distillation loss")] = 1.0,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 20,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="new-task examples per step (and replay examples)")] = 8,
    trainable: Annotated[str, typer.Option(help="attention (q, k, v, o) or all")] = "attention",
    atlas: Annotated[Path | None, typer.Option(help="atlas with the --heads atlas:<score> column")] = None,
    seed: Annotated[int, typer.Option(help="seed for the replay draw and the batches")] = 0,
    force: ForceOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Fine-tune on a new task with replay + SEEKR attention distillation; save the checkpoint."""
    quiet_libraries(False)
    from ..apps.retain import (
        RetainConfig,
        accuracy,
        check_retain_output,
        read_examples,
        replay_subset,
        save_checkpoint,
    )
    from ..apps.retain import retain as run_retain

    run(lambda: check_retain_output(out, model, force))
    old = run(lambda: read_examples(replay, "replay"))
    new = run(lambda: read_examples(train, "train"))
    kept = run(lambda: replay_subset(old, replay_fraction, seed))
    config = RetainConfig(
        heads=heads,
        k=k,
        lam=lam,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        replay_batch=batch_size,
        trainable=trainable,
        atlas=None if atlas is None else str(atlas),
        seed=seed,
    )
    loaded = load_model(model, device)
    run(lambda: check_retain_output(out, loaded.info.source, force))
    held = [x for x in old if x not in kept]
    before = {"replay_task": accuracy(loaded, held), "train_task": accuracy(loaded, new)}
    with progress_bar() as progress:
        result = run(lambda: run_retain(loaded, new, kept, config, step(progress, "fine-tuning")))
    after = {"replay_task": accuracy(loaded, held), "train_task": accuracy(loaded, new)}
    report = {
        **result.to_dict(),
        "model": loaded.info.name,
        "replay": replay,
        "train": train,
        "n_replayed": len(kept),
        "accuracy_before": before,
        "accuracy_after": after,
        "config": asdict(config),
        "out": str(out),
    }
    run(lambda: save_checkpoint(loaded, out, report))
    if as_json:
        typer.echo(json.dumps({k2: v for k2, v in report.items() if k2 != "importance"}))
        return
    console.print(
        f"{result.steps} steps in {result.seconds:.1f} s, {len(kept)} of {len(old)} earlier examples replayed, "
        f"distilled {len(result.heads)} heads ({result.selection})\n"
        f"earlier task (not replayed): {before['replay_task']:.3f} → {after['replay_task']:.3f}\n"
        f"new task:                    {before['train_task']:.3f} → {after['train_task']:.3f}\n"
        f"checkpoint → {out}",
        highlight=False,
    )
