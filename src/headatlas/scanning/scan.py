"""Scan: run probe batteries through capture, aggregate detector scores, and make an atlas.

:func:`scan` is the whole job: build the batteries a :class:`ScanConfig` names, stream them through
capture into :class:`~headatlas.atlas.stats.HeadStats`, run the functional batteries, and return an
:class:`~headatlas.atlas.table.Atlas`. Aggregation is ``partial_fit``-style: each batch adds its rows to
the running statistics, and with an output dir the statistics and the number of finished batches
are saved after every batch (atomically), so Ctrl-C or a crash loses at most the batch in flight
and ``resume=True`` continues exactly where it stopped. Every :class:`ScanConfig` field is part of
the resume fingerprint, so no setting can silently differ between the two halves of a scan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..atlas.stats import HeadStats
from ..atlas.table import Atlas, Example, check_out_dir, check_same_model, discard_atlas, merge_atlases
from ..batteries import ATTENTION_BATTERIES, attention_battery
from ..batteries.base import Battery, ProbeSequence, make_batch, pad_id, reads_audio
from ..capture import attention_maps
from ..core.errors import HeadatlasError, param
from ..core.storage import TABLE_FILE, directory_lock, discard_partial, has_partial
from ..data.sequences import sequence_frame, token_strings
from ..model.hub import cached_snapshot
from ..model.info import LoadedModel
from ..model.load import load, reload_spec
from .config import ScanConfig
from .functional import run_functional
from .stream import BatchDone, ScanResult, battery_fingerprint, run_scan

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .parallel import WorkerPool

logger = logging.getLogger(__name__)

_FORCE = param("force", "force=True")


def build_batteries(loaded: LoadedModel, config: ScanConfig) -> list[Battery]:
    """Return the attention batteries ``config.probes`` names, in order (each built by its
    :class:`~headatlas.batteries.base.AttentionBatterySpec`), after checking the model can take them.

    Names of functional batteries (:data:`headatlas.functional.FUNCTIONAL_BATTERIES`) are accepted
    and skipped here: they do not stream through detectors (see :func:`scan`).
    """
    info = loaded.info
    specs = [attention_battery(p) for p in dict.fromkeys(config.probes) if p in ATTENTION_BATTERIES]
    cross = [s.name for s in specs if s.cross]
    if cross and not info.encoder_decoder:
        raise HeadatlasError(
            f"the {' and '.join(cross)} {'battery scores' if len(cross) == 1 else 'batteries score'} "
            f"cross-attention, which {info.name} ({info.arch}) has not: give an encoder–decoder model "
            "(T5, BART, Marian, Whisper, ...)"
        )
    reads = "audio" if reads_audio(loaded.model) else "text"
    wrong = [s.name for s in specs if s.reads != reads]
    if wrong:
        fits = [name for name in ATTENTION_BATTERIES if attention_battery(name).reads == reads]
        raise HeadatlasError(
            f"{info.name} reads {reads}: the {', '.join(wrong)} {'battery feeds' if len(wrong) == 1 else 'batteries feed'} "
            f"its encoder {'audio' if reads == 'text' else 'text'}; use {' or '.join(fits)}"
        )
    return [spec.build(loaded, config) for spec in specs]


def fingerprint(loaded: LoadedModel, config: ScanConfig, batteries: list[Battery]) -> str:
    """Return the sha256 identifying a scan: :func:`battery_fingerprint` plus every :class:`ScanConfig` field."""
    settings = json.dumps(asdict(config), sort_keys=True, default=str)
    base = battery_fingerprint(loaded, batteries, config.batch_size)
    return hashlib.sha256((base + settings).encode()).hexdigest()


EXAMPLE_TOKENS = 48
"""Longest example sequence kept with an atlas (per battery), for pictures and the report."""
EXAMPLE_PERIOD = 12
"""Repeated-segment length of the ``repeat`` example: [frame start, x(12), x(12)]."""


def collect_examples(loaded: LoadedModel, batteries: list[Battery]) -> list[Example]:
    """Return one short :class:`Example` per battery (its first sequence, cut to EXAMPLE_TOKENS tokens).

    Encoder–decoder models get none: an example holds one token axis, their cross-attention two."""
    if loaded.info.encoder_decoder:
        return []
    examples = []
    for battery in batteries:
        ids = list(battery.sequences[0].ids)
        if battery.period is not None:
            start = battery.repeat_start
            segment = ids[start : start + EXAMPLE_PERIOD]
            ids = ids[:start] + segment + segment
        ids = ids[:EXAMPLE_TOKENS]
        batch = make_batch([ProbeSequence(tuple(ids))], pad_id(loaded.tokenizer))
        maps = attention_maps(loaded, batch.input_ids, batch.attention_mask)
        attention = torch.stack([maps[layer][0] for layer in sorted(maps)])  # [layer, head, query, key]
        tokens = token_strings(loaded.tokenizer, ids)
        examples.append(Example(battery.name, tokens, attention.to(torch.float16).numpy()))
    return examples


def scan(
    model: str | LoadedModel | PreTrainedModel = "default",
    probes: Sequence[str] = ("natural", "repeat"),
    texts: Sequence[str] | None = None,
    text_file: str | Path | None = None,
    n_prompts: int = 64,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    on_batch: Callable[[BatchDone], None] | None = None,
    n_functional: int | None = None,
    max_len: int | None = None,
    add: bool = False,
    config: ScanConfig | None = None,
    ray: str | None = None,
    workers: int | None = None,
    align_file: str | Path | None = None,
) -> Atlas:
    """Scan every head of ``model`` with the chosen probe batteries and return an :class:`Atlas`.

    ``model`` is anything :func:`headatlas.load` takes, or a :class:`LoadedModel`. The settings
    (``probes`` … ``max_len``, ``align_file``) make a :class:`ScanConfig`; pass ``config`` instead
    to give them as one object (a setting passed beside it as well is refused). ``texts`` scans exactly those texts (one
    sequence each) in place of the natural battery; ``text_file`` packs its lines into
    ``seq_len``-token sequences instead of UD English EWT. Scores and their papers:
    :mod:`headatlas.core.scores`.

    ``probes`` may also name functional batteries (``needle``, ``ordinal``, ``copy``,
    ``translate``, ``syntax``; :mod:`headatlas.functional`), which run after the attention
    batteries with ``n_functional`` prompts each (``None``: each battery's default) and, for
    ``needle``, prompts of at most ``max_len`` tokens.

    With ``out``, partial statistics are saved after every batch and after every functional
    battery (``resume=True`` continues them) and the atlas is written there at the end.
    ``add=True`` adds the chosen batteries' columns to the atlas already in ``out`` (made from the
    same model): its other columns, tables and examples stay, roles are reassigned from every score.

    An encoder–decoder model (T5, BART, Marian, ...) is scanned through its encoder's and
    decoder's self-attention and its cross-attention (the atlas's ``attn_kind`` column); the
    ``natural`` and ``repeat`` batteries copy the source as the decoder's target, ``align``
    scores cross-attention against the gold word alignments of ``align_file``
    (:mod:`headatlas.batteries.align`, :mod:`headatlas.detectors.cross`), and ``speech`` scores a Whisper-style
    model's cross-attention against word timings known by construction (:mod:`headatlas.batteries.speech`).

    ``ray="auto"`` (or a cluster address) shards the batches and functional batteries over
    ``workers`` Ray actors (:mod:`headatlas.scanning.parallel`) that load the model themselves; the driver
    merges them and writes the checkpoint, and the atlas equals an in-process one up to the order
    of float64 sums. ``atlas.json`` records the workers.
    """
    given = ScanConfig.of(
        probes,
        texts,
        text_file,
        align_file,
        n_prompts=n_prompts,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        n_functional=n_functional,
        max_len=max_len,
    )
    if workers is not None and ray is None:
        raise HeadatlasError(
            f"{param('workers')} counts Ray workers: give {param('ray')} too, or leave it out"
        )
    if config is not None:
        differ = [f.name for f in fields(ScanConfig) if getattr(given, f.name) != f.default]
        if differ:
            raise HeadatlasError(
                f"{param('config')} holds every scan setting: pass {', '.join(param(n) for n in differ)} "
                f"inside it, not beside it"
            )
    config = config or given
    out_dir = Path(out) if out is not None else None
    if add and (out_dir is None or not (out_dir / TABLE_FILE).exists()):
        raise HeadatlasError(
            f"{param('add', 'add=True')} needs an existing atlas in {param('out')}: scan it first, "
            f"or drop {param('add', 'add=True')}"
        )
    if out_dir is not None:
        check_out_dir(out_dir, force, resume or add)
    loaded = model if isinstance(model, LoadedModel) else load(model, device=device, dtype=dtype)
    with _maybe_pool(model, loaded, ray, workers, device, dtype) as pool:
        if out_dir is None:
            return _scan(loaded, config, None, resume, force, None, on_batch, pool)
        with directory_lock(out_dir):  # a second scan into the same directory gets a one-line error
            base = None
            if add:
                base = Atlas.load(out_dir)
                check_same_model(base, loaded.info, str(out_dir))
            return _scan(loaded, config, out_dir, resume, force, base, on_batch, pool)


@contextmanager
def _maybe_pool(
    model: Any, loaded: LoadedModel, ray: str | None, workers: int | None, device: str, dtype: str
) -> Iterator[WorkerPool | None]:
    """Yield Ray workers holding the scanned model when ``ray`` is given, else ``None``."""
    if ray is None:
        yield None
        return
    spec = model if isinstance(model, str) else reload_spec(loaded.info)
    if loaded.info.revision is not None:  # a hub id: workers read the driver's cached snapshot
        spec = str(cached_snapshot(loaded.info.source, loaded.info.revision) or spec)
    if spec is None:
        raise HeadatlasError(
            f"{param('ray')} workers load the model themselves: give a packaged name, a model directory "
            "or a .gguf file, not an in-memory model"
        )
    from .parallel import worker_pool

    with worker_pool(spec, ray, workers, device, dtype) as pool:
        yield pool


def _scan(
    loaded: LoadedModel,
    config: ScanConfig,
    out_dir: Path | None,
    resume: bool,
    force: bool,
    base: Atlas | None,
    on_batch: Callable[[BatchDone], None] | None,
    pool: WorkerPool | None = None,
) -> Atlas:
    started = time.perf_counter()
    batteries = build_batteries(loaded, config)
    scan_key = fingerprint(loaded, config, batteries)
    if out_dir is not None and force and not resume and has_partial(out_dir):
        discard_partial(out_dir)
    if base is None and out_dir is not None and resume and not has_partial(out_dir):
        finished = Atlas.load(out_dir) if (out_dir / TABLE_FILE).exists() else None
        if finished is not None:
            if finished.meta.get("fingerprint") != scan_key:
                raise HeadatlasError(
                    f"{str(out_dir)!r} holds a finished atlas made with other settings: pass {_FORCE} to rescan"
                )
            logger.info("%s already holds this atlas: nothing to resume", out_dir)
            finished.reused = True
            return finished
    if batteries:
        result = run_scan(
            loaded, batteries, config.batch_size, out_dir, resume, on_batch, scan_key=scan_key, pool=pool
        )
    else:
        info = loaded.info
        result = ScanResult(HeadStats(info.n_layers, info.n_heads), loaded, {"batteries": {}, "tokens": 0})
    tables = {}
    if config.functional:

        def progress(battery: str, done: int, total: int) -> None:
            if on_batch is not None:
                on_batch(BatchDone(battery, done, total, 0, 0))

        ran = run_functional(
            loaded, config.functional, config.functional_config(), out_dir, resume, scan_key, progress, pool
        )
        result.stats = result.stats.merge(ran.stats)
        result.meta["batteries"] = {**result.meta.get("batteries", {}), **ran.params}
        tables = ran.tables
    meta = {
        **result.meta,
        "fingerprint": scan_key,
        **sequence_frame(loaded.tokenizer).describe(),
        "seed": config.seed,
        "probes": list(dict.fromkeys(config.probes)),
        "wall_seconds": round(time.perf_counter() - started, 3),
        **({"parallel": pool.describe()} if pool is not None else {}),
    }
    atlas = Atlas.from_stats(result.stats, loaded.info, meta)
    atlas.tables = tables
    if batteries:
        atlas.examples = collect_examples(loaded, batteries)
    if base is not None:
        atlas = merge_atlases(base, atlas)
    if out_dir is not None:
        if base is None:  # a new atlas replaces everything an old one owned (examples, tables, figures)
            discard_atlas(out_dir)
        atlas.save(out_dir)
        discard_partial(out_dir)
    return atlas
