"""Foreign head-annotation formats (DuoAttention TSV, HeadKV JSON) and the ``kv`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps import kv
from headatlas.apps.common import formats
from headatlas.atlas.table import Atlas
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, make_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "duo_pattern"


@pytest.fixture(scope="module")
def loaded() -> ha.LoadedModel:
    return ha.load(BUILDERS["llama"](0), tokenizer=make_tokenizer())


def _plan(info: ha.ModelInfo) -> kv.Plan:
    atlas = Atlas.minimal(info)
    retrieval = np.arange(12, dtype=float).reshape(3, 4) / 11  # later heads score higher
    atlas.set_matrix("retrieval", retrieval)
    return kv.plan(atlas, keep_fraction=0.5, by="retrieval", sink=2, recent=30, context=200)


def test_hand_written_duo_fixture_reads_as_duoattention_lays_it_out(loaded) -> None:  # type: ignore[no-untyped-def]
    pattern = formats.read_duo(FIXTURE)
    assert pattern.gates.shape == (3, 2)  # layers × KV heads
    assert pattern.gates[1].tolist() == [0.25, 0.75]
    assert (pattern.sink, pattern.recent) == (4, 256)
    plan = kv.plan_from_duo(loaded.info, FIXTURE)
    assert plan.full_heads == [[0], [1], [1]]
    assert (plan.sink, plan.recent) == (4, 256)


def test_duo_export_writes_the_fixture_layout_and_round_trips(loaded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = kv.from_heads(loaded.info, [[0], [1], [1]], sink=4, recent=256)
    files = kv.export(plan, "duo", tmp_path / "duo")
    assert [f.name for f in files] == ["full_attention_heads.tsv", "config.json"]
    lines = (tmp_path / "duo" / "full_attention_heads.tsv").read_text().splitlines()
    assert lines == ["1.000000\t0.000000", "0.000000\t1.000000", "0.000000\t1.000000"]
    assert json.loads((tmp_path / "duo" / "config.json").read_text()) == {"sink_size": 4, "recent_size": 256}
    again = kv.plan_from_duo(loaded.info, tmp_path / "duo")
    assert again.full_heads == plan.full_heads and (again.sink, again.recent) == (4, 256)
    # numpy's loadtxt (what duo-attention and kvpress call) reads the same matrix
    assert np.loadtxt(tmp_path / "duo" / "full_attention_heads.tsv", delimiter="\t").tolist() == [
        [1.0, 0.0],
        [0.0, 1.0],
        [0.0, 1.0],
    ]


def test_headkv_round_trip(loaded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    plan = _plan(loaded.info)
    (path,) = kv.export(plan, "headkv", tmp_path / "hk")
    data = json.loads(path.read_text())
    assert set(data) == {f"{layer}-{head}" for layer in range(3) for head in range(4)}
    assert data["2-3"] == [1.0]
    back = formats.read_headkv(path)
    assert np.allclose(back, np.asarray(plan.head_scores))
    samples = np.stack([np.zeros((2, 3)), np.ones((2, 3))], -1)  # [layer, head, n]
    formats.write_headkv(tmp_path / "s.json", samples.mean(-1), samples)
    assert json.loads((tmp_path / "s.json").read_text())["1-2"] == [0.0, 1.0]
    assert np.allclose(formats.read_headkv(tmp_path / "s.json"), 0.5)


def test_bad_foreign_files_are_one_line_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "full_attention_heads.tsv").write_text("1\t0\n1\n")
    (tmp_path / "bad" / "config.json").write_text('{"sink_size": 1, "recent_size": 2}')
    bad = [
        lambda: formats.read_duo(tmp_path / "missing"),
        lambda: formats.read_duo(tmp_path / "bad"),
        lambda: formats.read_headkv(tmp_path / "missing.json"),
        lambda: formats.check_format("maps"),
        lambda: formats.write_duo(tmp_path / "out", np.array([[2.0]]), 1, 2),
    ]
    (tmp_path / "h.json").write_text('{"layer0": [1]}')
    bad.append(lambda: formats.read_headkv(tmp_path / "h.json"))
    for call in bad:
        with pytest.raises(HeadatlasError) as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_plan_and_export(loaded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    atlas = Atlas.minimal(loaded.info)
    atlas.set_matrix("retrieval", np.arange(12, dtype=float).reshape(3, 4))
    atlas.save(tmp_path / "atlas")
    runner = CliRunner()
    plan_path = tmp_path / "plan.json"
    args = ["kv", "plan", str(tmp_path / "atlas"), "--by", "retrieval", "--recent", "30", "--context", "200"]
    result = runner.invoke(app, [*args, "--keep-fraction", "0.5", "--out", str(plan_path)])
    assert result.exit_code == 0, result.output
    assert kv.Plan.load(plan_path).full_heads == _plan(loaded.info).full_heads
    result = runner.invoke(
        app, ["kv", "export", str(plan_path), "--format", "duo", "--out", str(tmp_path / "d")]
    )
    assert result.exit_code == 0 and (tmp_path / "d" / "full_attention_heads.tsv").exists()
    for extra, message in (
        (["--keep-fraction", "0"], "--keep-fraction must be in (0, 1]"),
        (["--keep-fraction", "0.5", "--by", "induction"], "scan with --probes repeat --add"),
        (["--keep-fraction", "0.5", "--recent", "400"], "lower --recent"),
    ):
        out = tmp_path / "no.json"
        result = runner.invoke(app, [*args, *extra, "--out", str(out)], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()
    for command in ("kv plan", "kv eval", "kv export"):
        result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
        assert (
            result.exit_code == 0 and "Example" in result.output and f"headatlas {command}" in result.output
        )
