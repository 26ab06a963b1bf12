"""Scanning: aggregation invariants, resume, the atlas table, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import headatlas as ha
from headatlas.atlas.stats import HeadStats
from headatlas.batteries.base import make_batch
from headatlas.batteries.natural import natural_battery
from headatlas.capture.views import DenseView
from headatlas.detectors.attention import DETECTORS, Context
from headatlas.scanning.config import ScanConfig
from headatlas.scanning.scan import build_batteries
from headatlas.scanning.stream import BatchDone, run_scan
from tiny_models import BUILDERS, CORPUS, eager_attentions, make_tokenizer


@pytest.fixture(scope="module")
def llama() -> ha.LoadedModel:
    return ha.load(BUILDERS["llama"](0), tokenizer=make_tokenizer())


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n".join(CORPUS))
    return path


def _batteries(loaded: ha.LoadedModel, corpus: Path, n: int = 6, seq_len: int = 24) -> list:
    return build_batteries(
        loaded, ScanConfig.of(["natural", "repeat"], text_file=corpus, n_prompts=n, seq_len=seq_len, seed=3)
    )


def _assert_same(a: HeadStats, b: HeadStats) -> None:
    assert a.names == b.names
    for name in a.names:
        np.testing.assert_allclose(a.mean(name), b.mean(name), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.std(name), b.std(name), rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(a.n(name), b.n(name))


def test_streaming_equals_one_shot_and_merge(llama: ha.LoadedModel, corpus_file: Path) -> None:
    batteries = _batteries(llama, corpus_file)
    one_shot = run_scan(llama, batteries, batch_size=6).stats
    streamed = run_scan(llama, batteries, batch_size=1).stats
    _assert_same(one_shot, streamed)
    halves = [
        run_scan(llama, [type(b)(b.name, part, b.detectors, b.params, b.period, b.repeat_start)], 2).stats
        for b in batteries
        for part in (b.sequences[:2], b.sequences[2:])
    ]
    merged = halves[0]
    for part in halves[1:]:
        merged = merged.merge(part)
    _assert_same(one_shot, merged)
    state = HeadStats.from_state(dict(one_shot.state()))
    _assert_same(one_shot, state)


def test_scores_equal_detectors_on_eager_attention(llama: ha.LoadedModel, corpus_file: Path) -> None:
    batteries = _batteries(llama, corpus_file, n=3)
    stats = run_scan(llama, batteries, batch_size=3).stats
    reference = HeadStats(llama.info.n_layers, llama.info.n_heads)
    for battery in batteries:
        batch = make_batch(battery.sequences, 2)
        attentions = eager_attentions(llama.model, batch.input_ids, batch.attention_mask)
        for layer, probs in enumerate(attentions):
            n_keys = batch.attention_mask[:, None, :].expand(-1, probs.shape[2], -1).tril().sum(-1)
            ctx = Context(
                positions=batch.positions,
                word_ids=batch.word_ids,
                period=battery.period,
                repeat_start=battery.repeat_start,
            )
            for name in battery.detectors:
                for score, result in DETECTORS[name](DenseView(layer, probs, 0, n_keys), ctx).items():
                    reference.add(score, layer, result.values, result.valid)
    for name in stats.names:
        np.testing.assert_allclose(stats.mean(name), reference.mean(name), atol=1e-5)


def test_atlas_table_and_roundtrip(llama: ha.LoadedModel, corpus_file: Path, tmp_path: Path) -> None:
    atlas = ha.scan(llama, text_file=corpus_file, n_prompts=4, seq_len=24, batch_size=2, out=tmp_path / "a")
    info = llama.info
    table = atlas.table
    assert len(table) == info.n_layers * info.n_heads
    assert table[["layer", "head"]].drop_duplicates().shape[0] == len(table)
    assert (table["kv_head"] == table["head"] // info.group_size).all()
    for score in ("previous_token", "self", "first_token", "local", "entropy", "entropy_norm", "subword"):
        for suffix in ("", "_std", "_n"):
            assert f"{score}{suffix}" in table.columns
    for score in ("previous_token", "self", "first_token", "local", "entropy_norm", "induction"):
        assert table[score].between(0, 1 + 1e-6).all(), score
    assert (table["induction_n"] > 0).all()
    assert all(len(p) == 64 for p in table["distance_profile"])
    assert "roles" in table.columns
    loaded = ha.Atlas.load(tmp_path / "a")
    pd.testing.assert_frame_equal(
        loaded.table.drop(columns="distance_profile"), table.drop(columns="distance_profile")
    )
    assert loaded.meta["model"]["n_heads"] == info.n_heads
    for key in ("batteries", "seed", "versions", "tokens", "wall_seconds"):
        assert key in loaded.meta
    assert not (tmp_path / "a" / ".partial").exists()
    assert [ex.label for ex in loaded.examples] == ["natural", "repeat"]
    for ex in loaded.examples:
        n = len(ex.tokens)
        assert ex.attention.shape == (info.n_layers, info.n_heads, n, n)
        rows = ex.attention.astype(np.float32).sum(-1)
        np.testing.assert_allclose(rows, np.ones_like(rows), atol=1e-2)
    period = (len(loaded.examples[1].tokens) - 1) // 2
    assert loaded.examples[1].tokens[1 : 1 + period] == loaded.examples[1].tokens[1 + period :]
    top = atlas.top("induction", 3)
    assert list(top["induction"]) == sorted(table["induction"], reverse=True)[:3]


def test_texts_are_scanned_one_sequence_each(llama: ha.LoadedModel) -> None:
    texts = ["the river runs", "a much longer sentence about the quiet village and its people"]
    atlas = ha.scan(llama, probes=["natural"], texts=texts, batch_size=2)
    tok = llama.tokenizer
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert atlas.meta["tokens"] == sum(lengths)
    assert int(atlas.table["self_n"].iloc[0]) == sum(n - 1 for n in lengths)


def test_resume_equals_uninterrupted(llama: ha.LoadedModel, corpus_file: Path, tmp_path: Path) -> None:
    kwargs = {"text_file": corpus_file, "n_prompts": 6, "seq_len": 24, "batch_size": 2, "seed": 1}
    whole = ha.scan(llama, out=tmp_path / "whole", **kwargs)

    class Crash(Exception):
        pass

    def crash_after_two(done: BatchDone) -> None:
        if done.battery == "natural" and done.batch == 2:
            raise Crash

    with pytest.raises(Crash):
        ha.scan(llama, out=tmp_path / "part", on_batch=crash_after_two, **kwargs)
    assert (tmp_path / "part" / ".partial" / "stats.npz").exists()
    assert not (tmp_path / "part" / "atlas.parquet").exists()
    with pytest.raises(ha.HeadatlasError, match="resume=True") as refused:
        ha.scan(llama, out=tmp_path / "part", **kwargs)
    assert "pass --resume" in refused.value.render()  # what the command line says
    seen: list[tuple[str, int]] = []
    resumed = ha.scan(
        llama,
        out=tmp_path / "part",
        resume=True,
        on_batch=lambda d: seen.append((d.battery, d.batch)),
        **kwargs,
    )
    assert ("natural", 1) not in seen and ("natural", 2) not in seen and ("natural", 3) in seen
    cols = [c for c in whole.table.columns if c != "distance_profile"]
    pd.testing.assert_frame_equal(whole.table[cols], resumed.table[cols], rtol=1e-9)
    again: list[int] = []
    finished = ha.scan(
        llama, out=tmp_path / "part", resume=True, on_batch=lambda d: again.append(d.batch), **kwargs
    )
    assert again == [], "resuming a finished atlas runs nothing"
    pd.testing.assert_frame_equal(finished.table[cols], resumed.table[cols])
    with pytest.raises(ha.HeadatlasError, match="other settings"):
        ha.scan(llama, out=tmp_path / "part", resume=True, **{**kwargs, "seed": 5})


def test_resume_refuses_other_settings(llama: ha.LoadedModel, corpus_file: Path, tmp_path: Path) -> None:
    kwargs = {"text_file": corpus_file, "n_prompts": 4, "seq_len": 24, "batch_size": 2, "seed": 1}

    def stop(_done: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ha.scan(llama, out=tmp_path, on_batch=stop, **kwargs)
    with pytest.raises(ha.HeadatlasError, match="other settings"):
        ha.scan(llama, out=tmp_path, resume=True, **{**kwargs, "seed": 2})


def test_force_keeps_old_atlas_until_new_one_is_done(
    llama: ha.LoadedModel, corpus_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "a"
    kwargs = {"text_file": corpus_file, "n_prompts": 4, "seq_len": 24, "batch_size": 2}
    ha.scan(llama, out=out, **kwargs)
    before = (out / "atlas.parquet").read_bytes()

    def crash(_done: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ha.scan(llama, out=out, force=True, on_batch=crash, **kwargs)
    assert (out / "atlas.parquet").read_bytes() == before, "a crashed --force run leaves the old atlas"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 100_000}, "beyond"),
        ({"texts": ["   "]}, "empty"),
        ({"texts": []}, "no texts"),
        ({"probes": ["bogus"]}, "unknown probe"),
        ({"n_prompts": 0}, "^n_prompts must be at least 1"),
        ({"batch_size": 0}, "^batch_size must be at least 1"),
    ],
)
def test_bad_input_is_a_clear_error(
    llama: ha.LoadedModel, corpus_file: Path, kwargs: dict, match: str
) -> None:
    args = {
        "n_prompts": 2,
        "seq_len": 16,
        **({} if "texts" in kwargs else {"text_file": corpus_file}),
        **kwargs,
    }
    with pytest.raises(ha.HeadatlasError, match=match) as info:
        ha.scan(llama, **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"texts": ["The cat sat."], "text_file": "corpus"}, "give one"),
        ({"config": ScanConfig(n_prompts=2, seq_len=16), "n_prompts": 3}, "inside it"),
        ({"config": ScanConfig(n_prompts=2, seq_len=16), "probes": ["repeat"]}, "inside it"),
        ({"seq_len": "32"}, "^seq_len must be an integer, got '32'"),
        ({"n_prompts": 2.5}, "^n_prompts must be an integer"),
        ({"workers": 2}, "^workers counts Ray workers: give ray too"),
    ],
)
def test_contradictory_or_mistyped_settings_are_refused(
    llama: ha.LoadedModel, corpus_file: Path, kwargs: dict, match: str
) -> None:
    args = {key: corpus_file if value == "corpus" else value for key, value in kwargs.items()}
    with pytest.raises(ha.HeadatlasError, match=match) as info:
        ha.scan(llama, **args)
    assert "\n" not in str(info.value)


def test_one_string_is_one_item_never_its_characters(llama: ha.LoadedModel) -> None:
    assert ScanConfig.of("natural", "The cat sat on the mat.").texts == ("The cat sat on the mat.",)
    atlas = ha.scan(llama, probes="natural", texts="The cat sat on the mat.")  # type: ignore[arg-type]
    assert atlas.meta["probes"] == ["natural"] and atlas.meta["batteries"]["texts"]["n_texts"] == 1


def test_empty_text_file(llama: ha.LoadedModel, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ha.HeadatlasError, match="empty"):
        ha.scan(llama, text_file=empty, n_prompts=2, seq_len=16)


def test_a_long_passage_fills_sequences_and_nothing_is_dropped() -> None:
    """One long line (a one-line text file) fills as many sequences as it has tokens; each sequence
    continues where the last stopped, and a word cut at a boundary is no fake continuation."""
    tok = make_tokenizer(add_bos=False)
    line = " ".join(CORPUS * 4)
    stream = tok(line)["input_ids"]
    assert len(stream) > 4 * 32
    battery = natural_battery(tok, [line], 4, 32, 0, "one line")
    assert [len(s.ids) for s in battery.sequences] == [32] * 4
    assert [t for s in battery.sequences for t in s.ids] == stream[: 4 * 32]
    assert "tokens_available" not in battery.params  # nothing was missing
    for prev, seq in zip(battery.sequences, battery.sequences[1:], strict=False):
        words = seq.word_ids or ()
        assert words[0] == -1 or words[0] != (prev.word_ids or ())[-1]


def test_corrupt_atlas_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "atlas.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ha.HeadatlasError, match="not a readable atlas"):
        ha.Atlas.load(tmp_path)
    with pytest.raises(ha.HeadatlasError, match="no atlas"):
        ha.Atlas.load(tmp_path / "missing")


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_architecture_scans(arch: str, corpus_file: Path) -> None:
    loaded = ha.load(BUILDERS[arch](0), tokenizer=make_tokenizer())
    atlas = ha.scan(loaded, text_file=corpus_file, n_prompts=2, seq_len=32, batch_size=2)
    table = atlas.table
    assert len(table) == loaded.info.n_layers * loaded.info.n_heads
    for score in (
        "previous_token",
        "self",
        "first_token",
        "local",
        "entropy_norm",
        "induction",
        "duplicate_token",
    ):
        assert table[score].between(0, 1 + 1e-6).all(), (arch, score)
        assert (table[f"{score}_n"] > 0).all(), (arch, score)
    assert (table["subword_n"] > 0).all(), "the tiny tokenizer splits words"


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_fast_path_equals_dense_path_on_left_padded_texts(arch: str) -> None:
    loaded = ha.load(BUILDERS[arch](0), tokenizer=make_tokenizer())
    texts = [*list(CORPUS[:5]), " ".join(CORPUS[5:9])]
    battery = build_batteries(
        loaded, ScanConfig.of(["natural"], texts=texts, n_prompts=1, seq_len=16, seed=0)
    )
    battery += build_batteries(loaded, ScanConfig.of(["repeat"], n_prompts=3, seq_len=40, seed=0))
    fast = run_scan(loaded, battery, batch_size=6, mode="auto").stats
    dense = run_scan(loaded, battery, batch_size=6, mode="dense").stats
    assert fast.names == dense.names
    for name in fast.names:
        np.testing.assert_allclose(fast.mean(name), dense.mean(name), atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(fast.n(name), dense.n(name))
