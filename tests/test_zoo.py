"""``zoo``: several models scanned alike, one atlas each, and a comparison table whose counts and
depths are those of the members' atlases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.zoo.scans import COLUMNS, compare, head_depths, member_name, zoo
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, make_tokenizer

runner = CliRunner()
CONFIG = ha.ScanConfig.of(["natural", "repeat"], n_prompts=2, seq_len=24)


@pytest.fixture(scope="module")
def two_models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    qwen = tmp_path_factory.mktemp("tiny-qwen2")
    BUILDERS["qwen2"](1).save_pretrained(qwen)
    make_tokenizer().save_pretrained(qwen)
    return [str(tiny_model_dir), str(qwen)]


def test_member_names_come_from_the_model_spec() -> None:
    assert member_name("default") == "default"
    assert member_name("/models/my model/") == "my-model"
    assert member_name("x/gemma.gguf") == "gemma"
    with pytest.raises(HeadatlasError):
        member_name("///")


def test_relative_depth_is_the_middle_of_the_layer() -> None:
    table = pd.DataFrame(
        {"layer": [0, 1, 3], "head": [0, 0, 1], "kv_head": [0, 0, 0], "roles": ["sink", "", "sink,induction"]}
    )
    atlas = ha.Atlas(table, {"model": {"n_layers": 4, "n_heads": 2}})
    rows = head_depths(atlas)
    assert rows.to_dict("list") == {
        "role": ["sink", "sink", "induction"],
        "layer": [0, 3, 3],
        "head": [0, 1, 1],
        "depth": [0.125, 0.875, 0.875],
    }
    other = ha.Atlas(table.assign(roles=["", "", "local"]), {"model": {"n_layers": 8, "n_heads": 2}})
    frame = compare({"a": atlas, "b": other})
    assert list(frame.columns) == list(COLUMNS)
    assert list(frame["role"].unique()) == ["sink", "local", "induction", "any"]  # RULES order, then any
    compared = frame.set_index(["model", "role"])
    assert compared.loc[("a", "sink"), "heads"] == 2 and compared.loc[("a", "sink"), "share"] == 0.25
    assert compared.loc[("a", "sink"), "depth_median"] == 0.5
    assert compared.loc[("b", "sink"), "heads"] == 0 and np.isnan(compared.loc[("b", "sink"), "depth_mean"])
    assert compared.loc[("b", "local"), "depth_mean"] == 3.5 / 8
    assert compared.loc[("b", "local"), "share"] == 1 / 16
    assert compared.loc[("a", "any"), "heads"] == 2  # L3H1 holds two roles but is one head
    assert compared.loc[("b", "any"), "heads"] == 1


def test_zoo_writes_one_atlas_per_model_and_a_table_that_matches_them(
    two_models: list[str], tmp_path: Path
) -> None:
    result = zoo(two_models, tmp_path, CONFIG)
    assert set(result.dirs) == {member_name(m) for m in two_models}
    for name, directory in result.dirs.items():
        saved = ha.Atlas.load(directory)
        rows = result.table[result.table["model"] == name].set_index("role")
        assert rows.loc["any", "heads"] == (saved.table["roles"].fillna("") != "").sum()
        for role in rows.index.drop("any"):
            held = saved.with_role(role)
            assert rows.loc[role, "heads"] == len(held)
            if len(held):
                depth = (held["layer"].to_numpy() + 0.5) / saved.meta["model"]["n_layers"]
                assert rows.loc[role, "depth_mean"] == pytest.approx(depth.mean())
    assert (tmp_path / "zoo.png").stat().st_size > 0
    meta = json.loads((tmp_path / "zoo.json").read_text())
    assert meta["probes"] == ["natural", "repeat"] and len(meta["rows"]) == len(result.table)
    again = zoo(two_models, tmp_path, CONFIG)
    assert sorted(again.reused) == sorted(result.dirs)
    pd.testing.assert_frame_equal(again.table, result.table)


def test_zoo_refuses_one_model_and_clashing_names(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(HeadatlasError, match="at least two"):
        zoo([str(tiny_model_dir)], tmp_path, CONFIG)
    with pytest.raises(HeadatlasError, match="share the zoo directory"):
        zoo([str(tiny_model_dir), str(tiny_model_dir) + "/"], tmp_path, CONFIG)


def test_cli_zoo_prints_the_comparison(two_models: list[str], tmp_path: Path) -> None:
    args = ["zoo", *two_models, "--probes", "repeat", "--n-prompts", "2", "--seq-len", "16"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "median relative depth" in result.output and (tmp_path / "zoo.csv").exists()
    table = pd.read_csv(tmp_path / "zoo.csv")
    assert list(table.columns) == list(COLUMNS)
    assert set(table["model"]) == {member_name(m) for m in two_models}
