"""Scan: run probe batteries through capture, aggregate detector scores, and make an atlas.

:func:`scan` is the whole job: build the batteries a :class:`ScanConfig` names, stream them through
capture into :class:`~headatlas.stats.HeadStats`, run the functional batteries, and return an
:class:`~headatlas.atlas.Atlas`. Aggregation is ``partial_fit``-style: each batch adds its rows to
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atlas import (
    TABLE_FILE,
    Atlas,
    Example,
    check_out_dir,
    check_same_model,
    discard_atlas,
    merge_atlases,
)
from .capture import attention_maps
from .datasets import ewt_sentences
from .errors import HeadatlasError, check_at_least, param
from .functional import FUNCTIONAL_BATTERIES, FunctionalConfig
from .functional.runner import run_functional
from .loading import LoadedModel, load, reload_spec
from .pairs import align_battery
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
from .sequences import sequence_frame, token_strings
from .speech import speech_battery, speech_model
from .stats import HeadStats
from .storage import directory_lock, discard_partial, has_partial
from .streaming import BatchDone, ScanResult, battery_fingerprint, run_scan

__all__ = ["BatchDone", "ScanConfig", "ScanResult", "build_batteries", "fingerprint", "run_scan", "scan"]

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .parallel import WorkerPool

logger = logging.getLogger(__name__)

_FORCE = param("force", "force=True")
MAX_PROMPTS = 100_000
"""Most sequences one attention battery builds (they are all held in memory)."""


@dataclass(frozen=True)
class ScanConfig:
    """What a scan computes. Every field is part of the resume fingerprint (:func:`fingerprint`).

    Attributes:
        probes: batteries: ``natural``, ``repeat`` (attention) and the functional ones
            (``needle``, ``ordinal``, ``copy``, ``translate``, ``syntax``).
        texts: exactly these texts, one sequence each, in place of the natural battery's corpus.
        text_file: a UTF-8 file whose lines replace UD English EWT in the natural battery.
        n_prompts: sequences per attention battery.
        seq_len: tokens per attention-battery sequence.
        batch_size: sequences per forward pass.
        seed: seed of every random choice (text order, random tokens, functional prompts).
        n_functional: prompts / trials / sentences per functional battery (``None``: each one's default).
        max_len: longest needle prompt in tokens (``None``: the battery's default).
        align_file: the ``align`` battery's pairs with gold word alignments (:mod:`headatlas.pairs`).
    """

    probes: tuple[str, ...] = ("natural", "repeat")
    texts: tuple[str, ...] | None = None
    text_file: str | None = None
    n_prompts: int = 64
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    n_functional: int | None = None
    max_len: int | None = None
    align_file: str | None = None

    def __post_init__(self) -> None:
        check_at_least("n_prompts", self.n_prompts, 1)
        check_at_least("seq_len", self.seq_len, 8)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("seed", self.seed, 0)
        if self.n_functional is not None:
            check_at_least("n_functional", self.n_functional, 1)
        if self.max_len is not None:
            check_at_least("max_len", self.max_len, 8)
        known = (*BATTERIES, *FUNCTIONAL_BATTERIES)
        if not self.probes:
            raise HeadatlasError(
                f"no probe battery chosen in {param('probes')}: choose from {', '.join(known)}"
            )
        unknown = [p for p in self.probes if p not in known]
        if unknown:
            raise HeadatlasError(f"unknown probe battery {unknown[0]!r}: choose from {', '.join(known)}")
        if self.n_prompts > MAX_PROMPTS:
            raise HeadatlasError(
                f"{param('n_prompts')} {self.n_prompts:,} is over {MAX_PROMPTS:,} sequences per battery: "
                "scan in parts into separate atlases, or lower it"
            )
        if ("align" in self.probes) != (self.align_file is not None):
            raise HeadatlasError(
                f"the align battery and {param('align_file')} go together: give both or neither"
            )
        for given, name in ((self.text_file, "text_file"), (self.texts, "texts")):
            if given is not None and "natural" not in self.probes:
                raise HeadatlasError(
                    f"{param(name)} feeds the natural battery, which {param('probes')} leaves out: add natural"
                )

    @classmethod
    def of(
        cls,
        probes: Sequence[str],
        texts: Sequence[str] | None = None,
        text_file: str | Path | None = None,
        align_file: str | Path | None = None,
        **settings: Any,
    ) -> ScanConfig:
        """Build a config from lists and paths as callers hold them (tuples and strings inside)."""
        return cls(
            probes=tuple(probes),
            texts=None if texts is None else tuple(texts),
            text_file=None if text_file is None else str(text_file),
            align_file=None if align_file is None else str(align_file),
            **settings,
        )

    @property
    def functional(self) -> list[str]:
        """The functional batteries asked for, in order, without repeats."""
        return [p for p in dict.fromkeys(self.probes) if p in FUNCTIONAL_BATTERIES]

    def functional_config(self) -> FunctionalConfig:
        """The settings the functional batteries read."""
        return FunctionalConfig(self.n_functional, self.max_len, self.seed, self.batch_size)


def build_batteries(
    loaded: LoadedModel,
    probes: Sequence[str],
    texts: Sequence[str] | None,
    text_file: str | Path | None,
    n_prompts: int,
    seq_len: int,
    seed: int,
    align_file: str | Path | None = None,
) -> list[Battery]:
    """Return the attention batteries to run. ``texts`` replaces ``natural`` by exactly those texts;
    ``align`` (encoder–decoder models) reads the pairs of ``align_file``.

    Names of functional batteries (:data:`headatlas.functional.FUNCTIONAL_BATTERIES`) are accepted
    and skipped here: they do not stream through detectors (see :func:`scan`).
    """
    info = loaded.info
    align = None if align_file is None else str(align_file)
    ScanConfig(tuple(probes), n_prompts=n_prompts, seq_len=seq_len, align_file=align)  # a scan's checks
    if ("align" in probes or "speech" in probes) and not info.encoder_decoder:
        raise HeadatlasError(
            f"the align and speech batteries score cross-attention, which {info.name} ({info.arch}) has "
            "not: give an encoder–decoder model (T5, BART, Marian, Whisper, ...)"
        )
    speech = speech_model(loaded.model)
    text_only = [p for p in probes if p in ("natural", "repeat", "align")]
    if speech and text_only:
        raise HeadatlasError(
            f"{info.name} reads audio: the {', '.join(text_only)} batteries feed its encoder text; "
            "use the speech battery"
        )
    if "speech" in probes and not speech:
        raise HeadatlasError(f"the speech battery feeds audio, and {info.name} reads text: use align")
    packed = "repeat" in probes or ("natural" in probes and texts is None)
    if packed and info.context_length is not None and seq_len > info.context_length:
        raise HeadatlasError(
            f"{param('seq_len')} {seq_len} is beyond {info.name}'s context of {info.context_length} tokens: "
            "use a smaller one"
        )
    probes = [p for p in probes if p in BATTERIES]  # functional batteries run after, in scan()
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
        elif name == "align" and align is not None:
            out.append(align_battery(tok, align, info.context_length))
        elif name == "speech":
            out.append(speech_battery(loaded))
    return out


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
    (``probes`` … ``max_len``) make a :class:`ScanConfig`; pass ``config`` instead to give them as
    one object (the settings arguments are then ignored). ``texts`` scans exactly those texts (one
    sequence each) in place of the natural battery; ``text_file`` packs its lines into
    ``seq_len``-token sequences instead of UD English EWT. Scores and their papers:
    :mod:`headatlas.scores`.

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
    (:mod:`headatlas.pairs`, :mod:`headatlas.alignment`), and ``speech`` scores a Whisper-style
    model's cross-attention against word timings known by construction (:mod:`headatlas.speech`).

    ``ray="auto"`` (or a cluster address) shards the batches and functional batteries over
    ``workers`` Ray actors (:mod:`headatlas.parallel`) that load the model themselves; the driver
    merges them and writes the checkpoint, and the atlas equals an in-process one up to the order
    of float64 sums. ``atlas.json`` records the workers.
    """
    if config is None:
        config = ScanConfig.of(
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
    batteries = build_batteries(
        loaded,
        config.probes,
        config.texts,
        config.text_file,
        config.n_prompts,
        config.seq_len,
        config.seed,
        config.align_file,
    )
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
