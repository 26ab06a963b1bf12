"""Nothing lost, no tracebacks (issue 12): each class of bad input a sweep found, one test each.

Tiny models only; every test fails on the code before the fix (a traceback, a silent wrong
result, or lost work)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.prune.pruning import check_prune_output, head_orders, prune_model, save_pruned
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from headatlas.core.outputs import check_output_dir, check_output_file
from headatlas.core.storage import directory_lock, write_json, write_text
from headatlas.data.sequences import token_strings
from headatlas.functional import FunctionalConfig
from tiny_models import BUILDERS, make_tokenizer

runner = CliRunner()
CLI = [sys.executable, "-m", "headatlas.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}  # a pipe: rich would wrap at 80 columns
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env)


def _one_line(result: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]


class _Crash(Exception):
    pass


def _stop(_done: object) -> None:
    raise _Crash


def _partial_scan(loaded: ha.LoadedModel, out: Path) -> Path:
    """A natural-battery scan into ``out`` stopped after its first batch (``.partial`` kept)."""
    with pytest.raises(_Crash):
        ha.scan(loaded, probes=["natural"], n_prompts=4, seq_len=24, batch_size=2, out=out, on_batch=_stop)
    return out


@pytest.fixture(scope="module")
def scanned_atlas(tiny_loaded: ha.LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's natural + repeat atlas, scanned once for the module: never use it directly."""
    out = tmp_path_factory.mktemp("robustness") / "atlas"
    ha.scan(tiny_loaded, probes=["natural", "repeat"], n_prompts=2, seq_len=24, out=out)
    return out


@pytest.fixture
def atlas_dir(scanned_atlas: Path, tmp_path: Path) -> Path:
    """A fresh copy of :func:`scanned_atlas` per test (tests damage, change or write next to it)."""
    return Path(shutil.copytree(scanned_atlas, tmp_path / "atlas"))


# ---------------------------------------------------------------- silently wrong results, lost work


@pytest.mark.parametrize(
    "column", ["roles", "distance_profile", "layer", "kv_head", "cluster", "previous_token_n"]
)
def test_only_score_columns_rank_heads(tiny_loaded: ha.LoadedModel, atlas_dir: Path, column: str) -> None:
    atlas = ha.Atlas.load(atlas_dir)
    atlas.table["cluster"] = -1
    atlas.save(atlas_dir)
    with pytest.raises(HeadatlasError, match="not a score"):
        head_orders(tiny_loaded, column, atlas_dir)
    with pytest.raises(HeadatlasError, match="not a score"):
        ha.Atlas.load(atlas_dir).matrix(column)
    assert head_orders(tiny_loaded, "induction", atlas_dir)["induction"][0]  # a real score still ranks


def test_no_output_overwrites_an_atlas_file(atlas_dir: Path) -> None:
    before = (atlas_dir / "atlas.parquet").read_bytes()
    res = runner.invoke(
        app, ["report", str(atlas_dir), "--out", str(atlas_dir / "atlas.parquet"), "--no-figures"]
    )
    assert res.exit_code == 2 and "report.html" not in res.output
    assert (atlas_dir / "atlas.parquet").read_bytes() == before
    for name in ("atlas.json", "examples.npz"):
        with pytest.raises(HeadatlasError, match=r"atlas file|give a file ending"):
            check_output_file(atlas_dir / name, (".html", ".json", ".npz"))
    notes = atlas_dir / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(HeadatlasError, match="give a file ending"):
        check_output_file(notes, (".html",))
    with pytest.raises(HeadatlasError, match="is a directory"):
        check_output_file(atlas_dir, (".html",))


def test_force_replaces_everything_the_old_atlas_owned(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    ha.scan(tiny_loaded, probes=["natural", "copy"], n_prompts=2, seq_len=24, n_functional=2, out=out)
    write_json(out / "verify-induction.json", {})  # written by headatlas: the atlas's
    write_text(out / "report.html", "<html></html>")
    (out / "figures").mkdir()
    (out / "figures" / "roles.png").write_bytes(b"the user's")  # written by hand: the user's
    (out / "mine.txt").write_text("keep me")
    other = ha.load(BUILDERS["gpt2"](0), tokenizer=make_tokenizer())
    new = ha.scan(other, probes=["repeat"], n_prompts=2, seq_len=24, out=out, force=True)
    assert not (out / "verify-induction.json").exists() and not (out / "report.html").exists()
    assert (out / "mine.txt").read_text() == "keep me"  # not the atlas's: left alone
    assert (out / "figures" / "roles.png").read_bytes() == b"the user's"
    loaded = ha.Atlas.load(out)
    assert loaded.examples[0].attention.shape[:2] == (other.info.n_layers, other.info.n_heads)
    assert "copying" not in loaded.table.columns and new.meta["model"]["arch"] == "gpt2"


def test_examples_of_another_model_are_refused(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=24, out=a)
    ha.scan(
        ha.load(BUILDERS["gpt2"](0), tokenizer=make_tokenizer()),
        probes=["repeat"],
        n_prompts=2,
        seq_len=24,
        out=b,
    )
    (a / "examples.npz").write_bytes((b / "examples.npz").read_bytes())
    with pytest.raises(HeadatlasError, match="another model"):
        ha.Atlas.load(a)


def test_a_second_writer_gets_a_one_line_error(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    with directory_lock(out):
        with pytest.raises(HeadatlasError, match=r"another headatlas process .* is writing"):
            ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=24, out=out)
        code = f"""
from headatlas.core.storage import directory_lock
with directory_lock({str(out)!r}):
    pass
"""
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and f"pid {os.getpid()}" in other.stderr
    ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=24, out=out)  # released on exit


def test_outputs_are_checked_before_any_work(tmp_path: Path, tiny_model_dir: Path, atlas_dir: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for command in (
        ["importance", str(tiny_model_dir), "--out", str(a_file)],
        ["redundancy", str(tiny_model_dir), "--out", str(a_file)],
        ["prune-curve", str(tiny_model_dir), "--out", str(a_file)],
        ["scan", str(tiny_model_dir), "--out", str(a_file)],
    ):
        res = runner.invoke(app, command)
        assert res.exit_code == 2 and "is a file" in res.output, (command, res.output)
    with pytest.raises(HeadatlasError, match="holds an atlas"):
        check_prune_output(atlas_dir)
    with pytest.raises(HeadatlasError, match="where the model's files live"):
        check_prune_output(tiny_model_dir, str(tiny_model_dir), force=True)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(HeadatlasError, match="not empty"):
        check_prune_output(foreign)
    check_prune_output(foreign, force=True)  # then written beside cat.jpg (tests/test_outputs.py)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        if not os.access(readonly, os.W_OK):  # root can write anywhere
            with pytest.raises(HeadatlasError, match="not writable"):
                check_output_dir(readonly / "atlas")
    finally:
        readonly.chmod(0o700)


def test_an_interrupted_prune_save_leaves_the_old_checkpoint(
    tiny_loaded: ha.LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pruned, _ = prune_model(tiny_loaded, [(0, 0)])
    out = save_pruned(pruned, tmp_path / "p", {"heads_removed": ["L0H0"]})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(type(pruned.tokenizer), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(pruned, out, {"heads_removed": ["L0H1"]})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary left behind


def test_short_text_is_scanned_once_not_repeated(
    tiny_loaded: ha.LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = tmp_path / "short.txt"
    text.write_text("The cat sat on the mat.\nThe dog ran to the park.\n")
    with caplog.at_level(logging.WARNING):
        atlas = ha.scan(tiny_loaded, probes=["natural"], text_file=text, n_prompts=4, seq_len=64)
    params = atlas.meta["batteries"]["natural"]
    assert params["n_sequences"] == 1 and params["tokens_available"] < 64
    assert "fewer than" in caplog.text and "nothing is repeated" in caplog.text
    tokens = atlas.examples[0].tokens
    assert "".join(tokens).count("cat") == 1


def test_zero_or_negative_counts_are_refused(tiny_loaded: ha.LoadedModel, atlas_dir: Path) -> None:
    for bad in ({"n_functional": 0}, {"n_functional": -3}, {"seed": -1}, {"batch_size": 0}):
        with pytest.raises(HeadatlasError, match="must be at least"):
            ha.scan(tiny_loaded, probes=["copy"], **bad)
    for bad in ({"n_prompts": 0}, {"n_prompts": -1}, {"batch_size": 0}):
        with pytest.raises(HeadatlasError, match="must be at least"):
            FunctionalConfig(**bad)  # type: ignore[arg-type]
    res = runner.invoke(app, ["verify", str(atlas_dir), "--score", "induction", "--n-prompts", "0"])
    assert res.exit_code == 2 and "--n-prompts must be at least 1" in res.output


def test_a_battery_without_valid_rows_warns(
    tiny_loaded: ha.LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        atlas = ha.scan(tiny_loaded, probes=["syntax"], n_functional=2)
    assert atlas.table["syntactic"].isna().all()
    assert "no valid rows for syntactic" in caplog.text


# ---------------------------------------------------------------- one-line errors, not tracebacks


def test_devices_seeds_and_caches_are_checked(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(HeadatlasError, match="unknown device 'bogus'"):
        ha.load(str(tiny_model_dir), device="bogus")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(HeadatlasError, match="no CUDA"):
            ha.load(str(tiny_model_dir), device="cuda")
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    monkeypatch.setenv("HEADATLAS_CACHE", str(blocker / "sub"))
    with pytest.raises(HeadatlasError, match="HEADATLAS_CACHE"):
        ha.load(str(tiny_model_dir))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("json-list", "not a JSON object"),
        ("no-roles", "no roles column"),
        ("no-rows", "no rows"),
        ("no-json", "is missing"),
        ("other-save", "different saves"),
    ],
)
def test_a_damaged_atlas_is_refused_on_load(atlas_dir: Path, damage: str, needle: str) -> None:
    atlas = ha.Atlas.load(atlas_dir)
    meta_file = atlas_dir / "atlas.json"
    if damage == "json-list":
        meta_file.write_text("[1, 2]")
    elif damage == "no-roles":
        atlas.table = atlas.table.drop(columns=["roles"])
        atlas.save(atlas_dir)
    elif damage == "no-rows":
        atlas.table = atlas.table.iloc[:0]
        atlas.save(atlas_dir)
    elif damage == "no-json":
        meta_file.unlink()
    else:
        meta = json.loads(meta_file.read_text())
        meta["table"]["rows"] += 1
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(HeadatlasError, match=needle):
        ha.Atlas.load(atlas_dir)
    res = runner.invoke(app, ["serve", str(atlas_dir), "--no-live", "--port", "1"])
    assert res.exit_code == 2 and needle in res.output  # refused at start, not a 500 later


def test_damaged_weights_and_checkpoints_are_one_line(
    tiny_loaded: ha.LoadedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(HeadatlasError, match="could not load model"):
        ha.load(str(broken))

    out = _partial_scan(tiny_loaded, tmp_path / "partial")
    stats = out / ".partial" / "stats.npz"
    stats.write_bytes(stats.read_bytes()[:100])
    with pytest.raises(HeadatlasError, match=r"damaged .* force=True"):
        ha.scan(tiny_loaded, probes=["natural"], n_prompts=4, seq_len=24, batch_size=2, out=out, resume=True)


def test_files_and_directories_in_the_wrong_place(atlas_dir: Path, tiny_model_dir: Path) -> None:
    res = runner.invoke(app, ["map", str(tiny_model_dir), "--text", "The cat sat.", "--out", str(atlas_dir)])
    assert res.exit_code == 2 and "is a directory" in res.output
    res = runner.invoke(app, ["report", str(atlas_dir), "--out", str(atlas_dir)])
    assert res.exit_code == 2 and "is a directory" in res.output


# ---------------------------------------------------------------- newcomer friction


def test_show_names_what_it_cannot_show(atlas_dir: Path) -> None:
    res = runner.invoke(
        app, ["show", str(atlas_dir), "--by", "entropy", "--top", "3"], env={"COLUMNS": "200"}
    )
    assert res.exit_code == 0 and "entropy" in res.output  # the sorting column is shown
    res = runner.invoke(app, ["show", str(atlas_dir), "--role", "retrieval"])
    assert res.exit_code == 2 and "no retrieval column" in res.output and "--probes needle" in res.output
    narrow = runner.invoke(app, ["show", str(atlas_dir), "--top", "2"], env={"COLUMNS": "80"})
    assert narrow.exit_code == 0 and "do not fit 80 columns" in narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80


def test_errors_stay_one_line_in_a_pipe(tmp_path: Path) -> None:
    deep = tmp_path / ("a-very-long-directory-name-" * 6)
    _one_line(_cli("show", str(deep)), "no atlas in")
    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("headatlas ")


def test_messages_say_what_to_do(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(HeadatlasError, match="save it as UTF-8"):
        ha.scan(tiny_loaded, probes=["natural"], text_file=latin)
    with pytest.raises(HeadatlasError, match="natural"):
        ha.scan(tiny_loaded, probes=["repeat"], text_file=latin)

    out = _partial_scan(tiny_loaded, tmp_path / "partial")
    with pytest.raises(HeadatlasError, match=r"unfinished scan.*resume"):
        ha.Atlas.load(out)
    res = runner.invoke(app, ["show", str(out)])
    assert res.exit_code == 2 and "--resume" in res.output
    done = tmp_path / "done"
    kwargs = {"probes": ["repeat"], "n_prompts": 2, "seq_len": 24}
    ha.scan(tiny_loaded, out=done, **kwargs)  # type: ignore[arg-type]
    assert ha.scan(tiny_loaded, out=done, resume=True, **kwargs).reused  # type: ignore[arg-type]


def test_pieces_of_a_character_show_their_bytes() -> None:
    tok = make_tokenizer(add_bos=False)
    ids = tok("🐍 日本", add_special_tokens=False)["input_ids"]
    shown = token_strings(tok, ids)
    assert "\ufffd" not in "".join(shown)
    assert any(s.startswith("⟨") for s in shown)
    plain = tok("The cat sat.")["input_ids"]
    assert token_strings(tok, plain) == [tok.decode([i]) for i in plain]  # whole characters: as decoded
