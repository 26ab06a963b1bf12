"""Scan: run probe batteries through capture and aggregate detector scores into :class:`HeadStats`.

Aggregation is ``partial_fit``-style: each batch adds its rows to the running statistics, and
when a checkpoint dir is given the statistics and the number of finished batches are saved
after every batch (atomically), so Ctrl-C or a crash loses at most the batch in flight and
``resume=True`` continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import AttentionView, attention_maps, capture
from .datasets import ewt_sentences
from .detectors import DETECTORS, Context
from .errors import HeadatlasError
from .functional import FUNCTIONAL_BATTERIES
from .loading import LoadedModel
from .probes import (
    BATTERIES,
    Battery,
    ProbeSequence,
    make_batch,
    natural_battery,
    pad_id,
    read_text_file,
    repeat_battery,
    text_battery,
)
from .stats import HeadStats

logger = logging.getLogger(__name__)

PARTIAL_DIR = ".partial"


@dataclass(frozen=True)
class BatchDone:
    """Progress report passed to ``on_batch`` after each batch."""

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


def build_batteries(
    loaded: LoadedModel,
    probes: Sequence[str],
    texts: Sequence[str] | None,
    text_file: str | Path | None,
    n_prompts: int,
    seq_len: int,
    seed: int,
) -> list[Battery]:
    """Return the attention batteries to run. ``texts`` replaces ``natural`` by exactly those texts.

    Names of functional batteries (:data:`headatlas.functional.FUNCTIONAL_BATTERIES`) are accepted
    and skipped here: they do not stream through detectors (see :func:`headatlas.atlas.scan`).
    """
    info = loaded.info
    if n_prompts < 1:
        raise HeadatlasError(f"--n-prompts must be at least 1, got {n_prompts}")
    if seq_len < 8:
        raise HeadatlasError(f"--seq-len must be at least 8, got {seq_len}")
    if info.context_length is not None and seq_len > info.context_length:
        raise HeadatlasError(
            f"--seq-len {seq_len} is beyond {info.name}'s context of {info.context_length} tokens: use a smaller one"
        )
    known = (*BATTERIES, *FUNCTIONAL_BATTERIES)
    unknown = [p for p in probes if p not in known]
    if unknown:
        raise HeadatlasError(f"unknown probe battery {unknown[0]!r}: choose from {', '.join(known)}")
    if not probes:
        raise HeadatlasError(f"no probe battery chosen: choose from {', '.join(known)}")
    probes = [p for p in probes if p in BATTERIES]  # functional batteries run in atlas.scan
    tok = loaded.tokenizer
    out: list[Battery] = []
    for name in dict.fromkeys(probes):
        if name == "natural":
            if texts is not None:
                out.append(text_battery(tok, texts, info.context_length))
                continue
            if text_file is not None:
                corpus, source = read_text_file(text_file), str(text_file)
            else:
                corpus, source = ewt_sentences("train"), "UD English EWT train"
            out.append(natural_battery(tok, corpus, n_prompts, seq_len, seed, source))
        elif name == "repeat":
            vocab = int(loaded.model.get_input_embeddings().weight.shape[0])  # type: ignore[index]
            out.append(repeat_battery(tok, vocab, n_prompts, seq_len, seed))
    return out


def fingerprint(loaded: LoadedModel, batteries: list[Battery], batch_size: int) -> str:
    """Return a sha256 identifying a scan: model facts, batch size, battery parameters and token ids."""
    digest = hashlib.sha256()
    digest.update(json.dumps([loaded.info.to_dict(), batch_size], sort_keys=True, default=str).encode())
    for battery in batteries:
        digest.update(battery.name.encode())
        digest.update(json.dumps(battery.params, sort_keys=True, default=str).encode())
        for s in battery.sequences:
            digest.update(np.asarray(s.ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


class _Checkpoint:
    """Partial statistics under ``DIR/.partial``: ``stats.npz`` + ``progress.json``, written atomically."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = directory / PARTIAL_DIR
        self.fingerprint = fingerprint

    def load(self) -> tuple[HeadStats, dict[str, int], dict[str, float]] | None:
        progress_file = self.dir / "progress.json"
        if not progress_file.exists():
            return None
        try:
            progress = json.loads(progress_file.read_text())
            with np.load(self.dir / "stats.npz", allow_pickle=False) as data:
                stats = HeadStats.from_state({k: data[k] for k in data.files})
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise HeadatlasError(
                f"partial scan in {self.dir} is unreadable ({exc}): rerun with --force"
            ) from exc
        if progress.get("fingerprint") != self.fingerprint:
            raise HeadatlasError(
                f"the partial scan in {self.dir.parent} used another model or other settings: "
                "rerun with the same settings, or with --force to start over"
            )
        return stats, dict(progress["done"]), dict(progress.get("counters", {}))

    def save(self, stats: HeadStats, done: dict[str, int], counters: dict[str, float]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "stats.tmp.npz"
        np.savez(tmp, **stats.state())  # type: ignore[arg-type]
        os.replace(tmp, self.dir / "stats.npz")
        progress = {"fingerprint": self.fingerprint, "done": done, "counters": counters}
        tmp_json = self.dir / "progress.tmp.json"
        tmp_json.write_text(json.dumps(progress))
        os.replace(tmp_json, self.dir / "progress.json")


def _accumulator(stats: HeadStats, detectors: tuple[str, ...], context: Callable[[], Context]) -> Any:
    def on_view(view: AttentionView) -> None:
        ctx = context()
        for name in detectors:
            for score, result in DETECTORS[name](view, ctx).items():
                stats.add(score, view.layer, result.values, result.valid)

    return on_view


def run_scan(
    loaded: LoadedModel,
    batteries: list[Battery],
    batch_size: int = 8,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_batch: Callable[[BatchDone], None] | None = None,
    mode: str = "auto",
) -> ScanResult:
    """Run ``batteries`` through capture and return the aggregated :class:`ScanResult`.

    With ``checkpoint_dir``, statistics are saved after every batch under ``DIR/.partial`` and,
    with ``resume=True``, a previous partial run with the same fingerprint is continued.
    ``mode`` picks the capture path (``"auto"``: fast log-sum-exp path where it applies).
    """
    if batch_size < 1:
        raise HeadatlasError(f"--batch-size must be at least 1, got {batch_size}")
    info = loaded.info
    scan_key = fingerprint(loaded, batteries, batch_size)
    checkpoint = _Checkpoint(checkpoint_dir, scan_key) if checkpoint_dir is not None else None
    stats = HeadStats(info.n_layers, info.n_heads)
    done: dict[str, int] = {}
    counters = {"tokens": 0.0, "seconds": 0.0}
    if checkpoint is not None and resume:
        previous = checkpoint.load()
        if previous is not None:
            stats, done, counters = previous
            logger.info("resuming: %s batches already done", done)
    total_tokens = sum(b.n_tokens for b in batteries)
    pad = pad_id(loaded.tokenizer)
    device = loaded.device
    current: dict[str, Context] = {}

    for battery in batteries:
        batches = [
            battery.sequences[i : i + batch_size] for i in range(0, len(battery.sequences), batch_size)
        ]
        if battery.name == "texts":  # group similar lengths to limit padding
            ordered = sorted(battery.sequences, key=lambda s: len(s.ids))
            batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        on_view = _accumulator(stats, battery.detectors, lambda: current["ctx"])
        with capture(loaded, on_view, mode=mode) as session:
            for index, seqs in enumerate(batches):
                if index < done.get(battery.name, 0):
                    continue
                batch = make_batch(seqs, pad)
                current["ctx"] = Context(
                    positions=batch.positions.to(device),
                    word_ids=None if batch.word_ids is None else batch.word_ids.to(device),
                    period=battery.period,
                    repeat_start=battery.repeat_start,
                )
                started = time.perf_counter()
                session.run(batch.input_ids, batch.attention_mask, with_head=False)
                if not session.layers_seen:
                    raise HeadatlasError(
                        f"{info.name} ran without calling any attention layer: nothing to scan"
                    )
                tokens = int(batch.attention_mask.sum())
                counters["tokens"] += tokens
                counters["seconds"] += time.perf_counter() - started
                done[battery.name] = index + 1
                if checkpoint is not None:
                    checkpoint.save(stats, done, counters)
                if on_batch is not None:
                    on_batch(BatchDone(battery.name, index + 1, len(batches), tokens, total_tokens))
    meta = {
        "batteries": {b.name: b.params for b in batteries},
        "batch_size": batch_size,
        "tokens": int(counters["tokens"]),
        "forward_seconds": round(counters["seconds"], 3),
        "fingerprint": scan_key,
    }
    return ScanResult(stats, loaded, meta)


def discard_partial(directory: Path) -> None:
    """Remove ``DIR/.partial`` (only the plain files headatlas writes there) after the final atlas is written."""
    partial = directory / PARTIAL_DIR
    if not partial.is_dir():
        return
    for file in partial.iterdir():
        if file.is_file() and file.suffix in (".npz", ".json", ".parquet"):
            file.unlink()
    if not any(partial.iterdir()):
        partial.rmdir()


def has_partial(directory: Path) -> bool:
    """Return whether ``directory`` holds a partial scan (attention statistics or a finished functional battery)."""
    partial = directory / PARTIAL_DIR
    return (partial / "progress.json").exists() or any(partial.glob("functional-*.json"))


EXAMPLE_TOKENS = 48
"""Longest example sequence kept with an atlas (per battery), for pictures and the report."""
EXAMPLE_PERIOD = 12
"""Repeated-segment length of the ``repeat`` example: [BOS, x(12), x(12)]."""


@dataclass
class Example:
    """One short sequence and the attention of every head on it.

    ``tokens`` are the decoded token strings; ``attention`` is ``[layer, head, query, key]`` fp16.
    """

    label: str
    tokens: list[str]
    attention: np.ndarray


def collect_examples(loaded: LoadedModel, batteries: list[Battery]) -> list[Example]:
    """Return one short :class:`Example` per battery (its first sequence, cut to EXAMPLE_TOKENS tokens)."""
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
        tokens = [str(loaded.tokenizer.decode([i])) for i in ids]
        examples.append(Example(battery.name, tokens, attention.to(torch.float16).numpy()))
    return examples
