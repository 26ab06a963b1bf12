"""Streaming batteries through capture into mergeable statistics, batch by batch, in one process
or on Ray workers.

A battery is cut into batches (:func:`batch_plan`); each batch becomes its own
:class:`~headatlas.atlas.stats.HeadStats` (:func:`scan_batch`) and the driver merges them. Aggregation is
``partial_fit``-style, so the same merge serves an in-process run, a resumed one and a sharded one
(:mod:`headatlas.scanning.parallel`): with a checkpoint dir the merged statistics and the finished batches
are saved after every batch (atomically), Ctrl-C or a crash loses at most the batches in flight,
and ``resume=True`` continues exactly where it stopped. Batches finish in any order on Ray, so the
checkpoint records *which* batches are done, not how many.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..atlas.stats import HeadStats
from ..batteries.align import decoder_start, make_target_batch
from ..batteries.base import Battery, ProbeSequence, make_batch, pad_id
from ..batteries.speech import speech_source
from ..capture import AttentionView, capture
from ..core.errors import HeadatlasError, check_at_least, param
from ..core.storage import PARTIAL_DIR, PROGRESS_FILE, STATS_FILE, write_json
from ..detectors.attention import DETECTORS, Context
from ..detectors.cross import CROSS_DETECTORS, CrossContext
from ..model.info import LoadedModel

if TYPE_CHECKING:
    from .parallel import WorkerPool

logger = logging.getLogger(__name__)

_FORCE = param("force", "force=True")


@dataclass(frozen=True)
class BatchDone:
    """Progress report passed to ``on_batch`` after each batch (``batch``: batches finished so far)."""

    battery: str
    batch: int
    n_batches: int
    tokens: int
    total_tokens: int


@dataclass
class ScanResult:
    """What a scan produced: the statistics, the model facts and the run's metadata."""

    stats: HeadStats
    loaded: LoadedModel
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchStats:
    """One batch's statistics and cost, as a worker returns them."""

    battery: str
    index: int
    stats: HeadStats
    tokens: int
    seconds: float


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far in MiB (``ru_maxrss``), or None where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def cost(seconds: float, tokens: int | None = None) -> dict[str, Any]:
    """What ``atlas.json`` records of one battery's cost: wall seconds, tokens and tokens/s where
    known, and the process's peak RSS when it finished (a high-water mark over the whole scan)."""
    out: dict[str, Any] = {"seconds": round(seconds, 3), "peak_rss_mib": peak_rss_mib()}
    if tokens:
        out.update(tokens=int(tokens), tokens_per_second=round(tokens / max(seconds, 1e-9), 1))
    return out


def battery_fingerprint(loaded: LoadedModel, batteries: list[Battery], batch_size: int) -> str:
    """Return a sha256 of what the attention batteries compute on: model facts (and parameter
    dtype), batch size, each battery's parameters and token ids."""
    digest = hashlib.sha256()
    dtype = str(next(loaded.model.parameters()).dtype)
    digest.update(
        json.dumps([loaded.info.to_dict(), dtype, batch_size], sort_keys=True, default=str).encode()
    )
    for battery in batteries:
        digest.update(battery.name.encode())
        digest.update(json.dumps(battery.params, sort_keys=True, default=str).encode())
        for s in battery.sequences:
            digest.update(np.asarray(s.ids, dtype=np.int64).tobytes())
            if s.target is not None:
                digest.update(np.asarray(s.target, dtype=np.int64).tobytes())
            if s.features is not None:
                digest.update(np.ascontiguousarray(s.features).tobytes())
    return digest.hexdigest()


def batch_plan(battery: Battery, batch_size: int) -> list[list[ProbeSequence]]:
    """Return the battery's batches: in order, or grouped by length for ``texts`` (less padding)."""
    seqs = battery.sequences
    if battery.name == "texts":
        seqs = sorted(seqs, key=lambda s: len(s.ids))
    return [seqs[i : i + batch_size] for i in range(0, len(seqs), batch_size)]


def _accumulate(stats: HeadStats, detectors: tuple[str, ...], view: AttentionView, ctx: Context) -> None:
    """Add every detector's per-row scores on ``view`` to ``stats``."""
    for name in detectors:
        for score, result in DETECTORS[name](view, ctx).items():
            stats.add(score, view.layer, result.values, result.valid)


def _encoder_decoder_batch(
    loaded: LoadedModel, battery: Battery, index: int, seqs: list[ProbeSequence], mode: str
) -> BatchStats:
    """One batch of an encoder–decoder model: the source through the encoder, the target (or a
    copy of the source) through the decoder by teacher forcing (:mod:`headatlas.batteries.align`); encoder
    and decoder self-attention layers get the battery's detectors, cross-attention layers its
    :attr:`~headatlas.batteries.base.Battery.cross_detectors`."""
    info = loaded.info
    stats = HeadStats(info.n_layers, info.n_heads)
    pad = pad_id(loaded.tokenizer)
    target = make_target_batch(seqs, pad, decoder_start(loaded.model))
    words: torch.Tensor | None
    if seqs[0].features is not None:  # a speech encoder: features in, frames as positions
        n_frames = int(loaded.model.config.max_source_positions)
        source_input, positions, words = speech_source(seqs, n_frames)
        source_mask = torch.ones(positions.shape, dtype=torch.long)  # [batch, frame]: unused by Whisper
        tokens = int((positions >= 0).sum())
    else:
        source = make_batch(seqs, pad)
        source_input, source_mask, positions, words = (
            source.input_ids,
            source.attention_mask,
            source.positions,
            source.word_ids,
        )
        tokens = int(source.attention_mask.sum())
    device = loaded.device
    shift = 1 if battery.period is not None else 0  # the decoder reads the copy one step later
    contexts = {
        "encoder": Context(
            positions.to(device),
            None if words is None else words.to(device),
            battery.period,
            battery.repeat_start,
        ),
        "decoder": Context(
            target.positions.to(device),
            target.input_words.to(device),
            battery.period,
            battery.repeat_start + shift,
        ),
    }
    cross = CrossContext(
        positions.to(device),
        target.positions.to(device),
        None if words is None else words.to(device),
        target.predicted_words.to(device),
        None if target.sure is None else target.sure.to(device),
        None if target.possible is None else target.possible.to(device),
    )

    def on_view(view: AttentionView) -> None:
        kind = info.kind(view.layer)
        if kind != "cross":
            _accumulate(stats, battery.detectors, view, contexts[kind])
            return
        for name in battery.cross_detectors:
            for score, result in CROSS_DETECTORS[name](view, cross).items():
                stats.add(score, view.layer, result.values, result.valid)

    started = time.perf_counter()
    with capture(loaded, on_view, mode=mode) as session:
        session.run(
            source_input,
            source_mask,
            with_head=False,
            decoder_input_ids=target.input_ids,
            decoder_attention_mask=target.attention_mask,
        )
    tokens += int(target.attention_mask.sum())
    return BatchStats(battery.name, index, stats, tokens, time.perf_counter() - started)


def scan_batch(
    loaded: LoadedModel, battery: Battery, index: int, seqs: list[ProbeSequence], mode: str = "auto"
) -> BatchStats:
    """Return the statistics of one batch of ``battery`` (its detectors over ``seqs``)."""
    if loaded.info.encoder_decoder:
        return _encoder_decoder_batch(loaded, battery, index, seqs, mode)
    info = loaded.info
    stats = HeadStats(info.n_layers, info.n_heads)
    batch = make_batch(seqs, pad_id(loaded.tokenizer))
    device = loaded.device

    def on_view(view: AttentionView) -> None:
        _accumulate(stats, battery.detectors, view, session.context)

    ctx = Context(
        positions=batch.positions.to(device),
        word_ids=None if batch.word_ids is None else batch.word_ids.to(device),
        period=battery.period,
        repeat_start=battery.repeat_start,
    )
    started = time.perf_counter()
    with capture(loaded, on_view, mode=mode) as session:
        session.run(batch.input_ids, batch.attention_mask, with_head=False, context=ctx)
    if not session.layers_seen:
        raise HeadatlasError(f"{info.name} ran without calling any attention layer: nothing to scan")
    return BatchStats(
        battery.name, index, stats, int(batch.attention_mask.sum()), time.perf_counter() - started
    )


@dataclass(frozen=True)
class _Shard:
    """One batch for a Ray worker: the battery without its other sequences, and the batch."""

    battery: Battery
    index: int
    seqs: list[ProbeSequence]
    mode: str


def _run_shard(loaded: LoadedModel, shard: _Shard) -> BatchStats:
    return scan_batch(loaded, shard.battery, shard.index, shard.seqs, shard.mode)


class _Checkpoint:
    """Partial statistics under ``DIR/.partial``: ``stats.npz`` + ``progress.json``, written atomically."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = directory / PARTIAL_DIR
        self.fingerprint = fingerprint

    def load(self) -> tuple[HeadStats, dict[str, list[int]], dict[str, float]] | None:
        progress_file = self.dir / PROGRESS_FILE
        if not progress_file.exists():
            return None
        try:
            progress = json.loads(progress_file.read_text())
        except (OSError, ValueError) as exc:
            raise HeadatlasError(
                f"partial scan in {self.dir} is unreadable ({exc}): rerun with {_FORCE}"
            ) from exc
        if progress.get("fingerprint") != self.fingerprint:
            raise HeadatlasError(
                f"the partial scan in {self.dir.parent} used another model or other settings: "
                f"rerun with the same settings, or with {_FORCE} to start over"
            )
        stats = HeadStats.load(self.dir / STATS_FILE)
        done = {
            name: list(range(v)) if isinstance(v, int) else list(v) for name, v in progress["done"].items()
        }
        return stats, done, dict(progress.get("counters", {}))

    def save(self, stats: HeadStats, done: dict[str, list[int]], counters: dict[str, float]) -> None:
        stats.save(self.dir / STATS_FILE)
        progress = {
            "fingerprint": self.fingerprint,
            "done": {k: sorted(v) for k, v in done.items()},
            "counters": counters,
        }
        write_json(self.dir / PROGRESS_FILE, progress)


def run_scan(
    loaded: LoadedModel,
    batteries: list[Battery],
    batch_size: int = 8,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_batch: Callable[[BatchDone], None] | None = None,
    mode: str = "auto",
    scan_key: str | None = None,
    pool: WorkerPool | None = None,
) -> ScanResult:
    """Run ``batteries`` through capture and return the aggregated :class:`ScanResult`.

    With ``checkpoint_dir``, statistics are saved after every batch under ``DIR/.partial`` and,
    with ``resume=True``, a previous partial run with the same fingerprint (``scan_key``, default
    :func:`battery_fingerprint`) is continued. ``mode`` picks the capture path (``"auto"``: fast
    log-sum-exp path where it applies). With ``pool`` the batches run on its Ray workers and are
    merged here as they finish: the statistics equal an in-process run's up to the order of
    float64 sums (relative differences ~1e-15).
    """
    check_at_least("batch_size", batch_size, 1)
    info = loaded.info
    scan_key = scan_key or battery_fingerprint(loaded, batteries, batch_size)
    checkpoint = _Checkpoint(checkpoint_dir, scan_key) if checkpoint_dir is not None else None
    stats = HeadStats(info.n_layers, info.n_heads)
    done: dict[str, list[int]] = {}
    counters = {"tokens": 0.0, "seconds": 0.0}
    if checkpoint is not None and resume:
        previous = checkpoint.load()
        if previous is not None:
            stats, done, counters = previous
            logger.info("resuming: %s batches already done", {k: len(v) for k, v in done.items()})
    total_tokens = sum(b.n_tokens for b in batteries)
    plans = {b.name: batch_plan(b, batch_size) for b in batteries}
    todo = [
        (battery, index, seqs)
        for battery in batteries
        for index, seqs in enumerate(plans[battery.name])
        if index not in set(done.get(battery.name, []))
    ]
    results: Iterator[BatchStats]
    if pool is None:
        results = (scan_batch(loaded, b, i, seqs, mode) for b, i, seqs in todo)
    else:
        shards = [_Shard(replace(b, sequences=[]), i, list(seqs), mode) for b, i, seqs in todo]
        results = pool.map_unordered(_run_shard, shards)
    spent: dict[str, list[float]] = {b.name: [0.0, 0.0] for b in batteries}  # seconds, tokens this run
    for part in results:
        spent[part.battery][0] += part.seconds
        spent[part.battery][1] += part.tokens
        stats = stats.merge(part.stats)
        done.setdefault(part.battery, []).append(part.index)
        counters["tokens"] += part.tokens
        counters["seconds"] += part.seconds
        if checkpoint is not None:
            checkpoint.save(stats, done, counters)
        if on_batch is not None:
            n_batches = len(plans[part.battery])
            on_batch(BatchDone(part.battery, len(done[part.battery]), n_batches, part.tokens, total_tokens))
    meta = {
        "batteries": {
            b.name: {**b.params, **cost(spent[b.name][0], int(spent[b.name][1]))} for b in batteries
        },
        "batch_size": batch_size,
        "tokens": int(counters["tokens"]),
        "forward_seconds": round(counters["seconds"], 3),
        "fingerprint": scan_key,
    }
    return ScanResult(stats, loaded, meta)
