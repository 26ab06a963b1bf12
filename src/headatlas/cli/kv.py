"""``headatlas kv plan|fit|eval|export``: head-wise KV-cache plans from an atlas or from DuoAttention's
gate optimisation, measured and exported."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .common import DeviceOpt, ForceOpt, ModelArg, app, console, example, fail, load_model, progress_bar, run

EVAL_FORMAT = "headatlas-kv-eval"
"""The ``format`` of the file ``kv eval --json`` writes (the rows under ``rows``)."""

kv_app = typer.Typer(
    help="Head-wise KV caches: full KV for retrieval heads, sink + recent window for the rest.",
    no_args_is_help=True,
)
app.add_typer(kv_app, name="kv")


@kv_app.command(
    "plan",
    epilog=example(
        "headatlas kv plan atlas --keep-fraction 0.25 --out plan.json",
        "headatlas kv plan atlas --budget 512 --by retrieval,induction --recent 128 --compensate --out plan.json",
    ),
)
def kv_plan(
    atlas_dir: Annotated[Path, typer.Argument(help="atlas directory (from headatlas scan)")],
    out: Annotated[Path, typer.Option(help="plan JSON to write")] = Path("plan.json"),
    keep_fraction: Annotated[
        float | None, typer.Option(help="share of the full cache's KV bytes to keep at --context, in (0, 1]")
    ] = None,
    budget: Annotated[int | None, typer.Option(help="mean tokens held per KV head at --context")] = None,
    by: Annotated[
        str, typer.Option(help="score(s) ranking KV heads: retrieval, induction, duo, razor, or score,score")
    ] = "duo",
    sink: Annotated[int, typer.Option(help="first tokens a streaming head keeps")] = 4,
    recent: Annotated[int, typer.Option(help="last tokens a streaming head keeps")] = 256,
    compensate: Annotated[
        bool, typer.Option(help="add the mean of dropped keys/values as one token")
    ] = False,
    context: Annotated[int, typer.Option(help="context length the byte budget is computed at")] = 2048,
    model: Annotated[
        str | None, typer.Option(help="the atlas's model, to leave its own sliding-window layers as they are")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Make a KV plan: the best-scoring KV heads keep every token, the rest stream."""
    from ..apps import kv
    from ..apps.kv.plan import FORMAT
    from ..atlas.table import Atlas, check_same_model
    from ..core.outputs import check_output_file

    if keep_fraction is None and budget is None:
        keep_fraction = 0.25
    run(lambda: check_output_file(out, (".json",), force=force, kind=FORMAT))
    atlas = run(lambda: Atlas.load(atlas_dir))
    types = None
    if model:
        loaded = load_model(model)
        run(lambda: check_same_model(atlas, loaded.info, str(atlas_dir)))
        types = kv.layer_types(loaded.model)
    plan = run(
        lambda: kv.plan(
            atlas,
            keep_fraction=keep_fraction,
            budget=budget,
            by=by.split(",") if "," in by else by,
            sink=sink,
            recent=recent,
            compensate=compensate,
            context=context,
            layer_types=types,
            atlas_path=str(atlas_dir),
        )
    )
    plan.save(out)
    b = plan.kv_bytes
    console.print(
        f"{b['kv_heads_full']} of {b['kv_heads_full'] + b['kv_heads_streaming']} KV heads full "
        f"(by {', '.join(plan.rule['by'])}); KV at {context} tokens: {b['plan'] / 2**20:.1f} of "
        f"{b['full'] / 2**20:.1f} MiB ({100 * b['fraction']:.1f} %) → {out}"
    )


@kv_app.command(
    "fit",
    epilog=example(
        "headatlas kv fit default --keep-fraction 0.25 --out fitted.json",
        "headatlas kv fit default --steps 80 --seq-len 1024 --recent 128 --out fitted.json",
        "headatlas kv fit default --method moa --keep-fraction 0.25 --context 1024 --out moa.json",
    ),
)
def kv_fit(
    model: ModelArg = "default",
    out: Annotated[Path, typer.Option(help="plan JSON to write")] = Path("plan.json"),
    keep_fraction: Annotated[
        float, typer.Option(help="share of the full cache's KV bytes to keep at --context, in (0, 1]")
    ] = 0.25,
    steps: Annotated[int, typer.Option(help="optimisation steps (one prompt each)")] = 48,
    seq_len: Annotated[int, typer.Option(help="tokens per prompt")] = 512,
    n_prompts: Annotated[int, typer.Option(help="prompts, used in turn")] = 16,
    sink: Annotated[int, typer.Option(help="first tokens a streaming head keeps")] = 4,
    recent: Annotated[int, typer.Option(help="last tokens a streaming head keeps")] = 64,
    lam: Annotated[float, typer.Option("--lambda", help="weight of the mean |gate| penalty")] = 0.05,
    context: Annotated[int, typer.Option(help="context length the byte budget is computed at")] = 2048,
    seed: Annotated[int, typer.Option(help="seed of the prompts (a stream kv eval never draws)")] = 0,
    tasks: Annotated[
        str, typer.Option(help="tasks the prompts come from, in turn (comma-separated)")
    ] = "niah,multikey",
    loss_on: Annotated[
        str,
        typer.Option(help="answer: the MSE on the answer's positions (DuoAttention's); all: every position"),
    ] = "answer",
    method: Annotated[
        str, typer.Option(help="duo: DuoAttention gates (full or streaming); moa: a window per KV head (MoA)")
    ] = "duo",
    sensitivity: Annotated[
        str, typer.Option(help="moa: grad (MoA's loss gradient) or mass (attention outside the window)")
    ] = "grad",
    alphas: Annotated[
        str, typer.Option(help="moa: window rules' alpha values (tokens)")
    ] = "16,32,64,128,256,512",
    betas: Annotated[str, typer.Option(help="moa: window rules' beta values (share of the input length)")] = (
        "0,0.0625,0.125,0.25,0.5"
    ),
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Fit DuoAttention gates (one per KV head; only the gates train) and write the plan they give;
    with --method moa, profile each KV head's loss sensitivity to a set of elastic windows
    (alpha + beta · length, MoA) and write the plan with one window per KV head within the budget."""
    from ..apps import kv
    from ..apps.kv.fit import check_fit_settings, fit_gates, fitted_plan
    from ..apps.kv.plan import FORMAT, check_plan_settings
    from ..core.outputs import check_output_file

    run(lambda: check_output_file(out, (".json",), force=force, kind=FORMAT))
    task_names = [t for t in tasks.split(",") if t]
    if method == "moa":
        _fit_moa(model, out, keep_fraction, seq_len, n_prompts, sink, context, seed, task_names,
                 sensitivity, alphas, betas, device)  # fmt: skip
        return
    if method != "duo":
        fail(f"--method must be duo or moa, got {method!r}")
    run(
        lambda: check_fit_settings(steps, seq_len, n_prompts, sink, recent, lam, task_names, loss_on),
        flags={"lam": "--lambda"},
    )
    loaded = load_model(model, device)
    run(
        lambda: check_plan_settings(loaded.info, keep_fraction, None, context, sink, recent)
    )  # before the work
    with progress_bar() as progress:
        bar = progress.add_task("fitting gates", total=steps)

        def on_step(done: int, loss: float) -> None:
            progress.update(bar, completed=done, description=f"fitting gates (loss {loss:.4f})")

        result = run(
            lambda: fit_gates(
                loaded, steps=steps, seq_len=seq_len, n_prompts=n_prompts, sink=sink, recent=recent,
                lam=lam, seed=seed, tasks=[t for t in tasks.split(",") if t], loss_on=loss_on, on_step=on_step,
            ),
            flags={"lam": "--lambda"},
        )  # fmt: skip
    types = kv.layer_types(loaded.model)
    plan = run(lambda: fitted_plan(loaded, result, keep_fraction, context, layer_types=types))
    plan.save(out)
    b = plan.kv_bytes
    console.print(
        f"{steps} steps × {seq_len} tokens in {result.seconds / 60:.1f} min, loss {result.losses[0]:.4f} → "
        f"{result.losses[-1]:.4f}; gates mean {result.alpha.mean():.3f}. {b['kv_heads_full']} of "
        f"{b['kv_heads_full'] + b['kv_heads_streaming']} KV heads full, KV at {context} tokens "
        f"{100 * b['fraction']:.1f} % → {out}"
    )


def _numbers(flag: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} must be comma-separated numbers, got {text!r}")
        raise


def _fit_moa(
    model: str, out: Path, keep_fraction: float, seq_len: int, n_prompts: int, sink: int, context: int,
    seed: int, tasks: list[str], sensitivity: str, alphas: str, betas: str, device: str,
) -> None:  # fmt: skip
    """``kv fit --method moa``: profile, solve the knapsack, write the plan."""
    from ..apps import kv
    from ..apps.kv import moa
    from ..apps.kv.plan import check_plan_settings

    a, b = _numbers("--alphas", alphas), _numbers("--betas", betas)
    run(lambda: moa.check_moa_settings(seq_len, n_prompts, sink, a, b, tasks, sensitivity))
    loaded = load_model(model, device)
    run(lambda: check_plan_settings(loaded.info, keep_fraction, None, context, sink, 1))
    with progress_bar() as progress:
        bar = progress.add_task("profiling spans", total=n_prompts)
        profile = run(
            lambda: moa.profile_heads(
                loaded, seq_len=seq_len, n_prompts=n_prompts, sink=sink, alphas=a, betas=b, seed=seed,
                tasks=tasks, on_prompt=lambda done: progress.update(bar, completed=done),
            )
        )  # fmt: skip
    types = kv.layer_types(loaded.model)
    plan = run(
        lambda: moa.profiled_plan(
            loaded.info, profile, keep_fraction, context, sensitivity, layer_types=types
        )
    )
    plan.save(out)
    b_ = plan.kv_bytes
    windows = sorted({w for row in plan.windows(context) for w in row if w is not None})
    console.print(
        f"{n_prompts} prompts × {profile.length} tokens profiled in {profile.seconds / 60:.1f} min; "
        f"{b_['kv_heads_full']} of {b_['kv_heads_full'] + b_['kv_heads_streaming']} KV heads full, windows "
        f"{', '.join(map(str, windows)) or 'none'} at {context} tokens; KV {100 * b_['fraction']:.1f} % → {out}"
    )


def _advance(progress: Any, bar: Any, done: int, _total: int) -> None:
    progress.update(bar, completed=done)


@kv_app.command(
    "eval",
    epilog=example(
        "headatlas kv eval default --plan plan.json --tasks niah,vt --lengths 512,1024 --n 10",
        "headatlas kv eval default --plan plan.json --streaming-prefill --chunk 256",
    ),
)
def kv_eval(
    model: ModelArg = "default",
    plan: Annotated[Path, typer.Option(help="plan JSON from headatlas kv plan")] = Path("plan.json"),
    tasks: Annotated[str, typer.Option(help="comma-separated: niah, multikey, multivalue, vt")] = "niah,vt",
    lengths: Annotated[str, typer.Option(help="comma-separated prompt lengths in tokens")] = "1024",
    n: Annotated[int, typer.Option(help="samples per task and length")] = 10,
    seed: Annotated[int, typer.Option(help="seed of the generated samples")] = 0,
    streaming_prefill: Annotated[
        bool, typer.Option(help="streaming heads see only sink + window during the prompt too")
    ] = False,
    chunk: Annotated[
        int | None, typer.Option(help="prefill chunk length (default: the whole prompt)")
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help='also write the rows as JSON ({"format", "model", "plan", "rows"})'),
    ] = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
) -> None:
    """Compare a KV plan with the plain cache on RULER-style tasks (same prompts, one run)."""
    from ..apps import kv
    from ..apps.kv import evaluate
    from ..apps.kv.tasks import make_samples
    from ..core.errors import check_at_least
    from ..core.outputs import check_output_file
    from ..core.storage import atomic_path

    if json_out is not None:
        run(lambda: check_output_file(json_out, (".json",), name="json", force=force, kind=EVAL_FORMAT))
    kv_plan = run(lambda: kv.Plan.load(plan))
    sizes = [int(x) for x in lengths.split(",") if x.strip().isdigit()]
    if not sizes or len(sizes) != len([x for x in lengths.split(",") if x.strip()]):
        fail(f"--lengths must be comma-separated whole numbers of tokens, got {lengths!r}")
    run(lambda: check_at_least("n", n, 1))
    if chunk is not None:
        run(lambda: check_at_least("chunk", chunk, 1))
    loaded = load_model(model, device=device)
    run(lambda: kv_plan.check_model(loaded.info))
    longest = loaded.info.context_length
    if longest is not None and max(sizes) > longest:
        fail(f"--lengths {max(sizes):,} is beyond {loaded.info.name}'s context of {longest:,} tokens")
    if not kv_plan.spans and max(sizes) <= kv_plan.sink + kv_plan.recent + 1:  # span plans resolve per length
        fail(
            f"the window (--sink + --recent + 1 = {kv_plan.sink + kv_plan.recent + 1}) is not smaller than --lengths"
        )
    table = Table(
        "task", "length", "cache", "accuracy %", "KV MiB after prefill", "prefill s", "decode ms/tok"
    )
    rows = []
    with progress_bar() as progress:
        for task in tasks.split(","):
            for length in sizes:
                samples = run(partial(make_samples, loaded.tokenizer, task, length, n, seed=seed))
                for label, p in (("full", None), ("plan", kv_plan)):
                    bar = progress.add_task(f"{task} {length} {label}", total=n)
                    row = evaluate.evaluate(
                        loaded,
                        samples,
                        p,
                        label,
                        streaming_prefill=streaming_prefill,
                        chunk=chunk,
                        progress=partial(_advance, progress, bar),
                    )
                    rows.append({"task": task, "length": length, **row.to_dict()})
                    table.add_row(
                        task,
                        str(length),
                        label,
                        f"{row.accuracy:.1f}",
                        f"{row.kv_bytes / 2**20:.2f}",
                        f"{row.prefill_s:.2f}",
                        f"{row.decode_ms:.1f}",
                    )
    console.print(table)
    if json_out is not None:
        record = {"format": EVAL_FORMAT, "model": loaded.info.name, "plan": str(plan), "rows": rows}
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(record, indent=1))


@kv_app.command(
    "export",
    epilog=example(
        "headatlas kv export plan.json --format duo --out duo_pattern",
        "headatlas kv export plan.json --format headkv --out headkv",
    ),
)
def kv_export(
    plan: Annotated[Path, typer.Argument(help="plan JSON from headatlas kv plan")],
    format: Annotated[str, typer.Option("--format", help="duo (DuoAttention / kvpress) or headkv")] = "duo",
    out: Annotated[Path, typer.Option(help="directory to write into")] = Path("kv_export"),
    force: ForceOpt = False,
) -> None:
    """Write a KV plan in the files DuoAttention, kvpress's DuoAttentionPress or HeadKV read."""
    from ..apps import kv

    run(lambda: kv.check_export_target(format, out, force))
    kv_plan = run(lambda: kv.Plan.load(plan))
    for path in run(lambda: kv.export(kv_plan, format, out)):
        console.print(f"wrote {path}")
