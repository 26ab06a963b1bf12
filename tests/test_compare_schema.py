"""The atlas schema (version, JSON Schema, migration) and ``compare``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import validate_saved_atlas
from headatlas.apps.compare.diff import JSON_FILE, compare_atlases, spearman, write_comparison
from headatlas.atlas.schema import SCHEMA_VERSION, UNKNOWN_START, describe_table, schema_path
from headatlas.atlas.table import Atlas
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError

runner = CliRunner()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_meta(directory: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = directory / "atlas.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------- schema


def test_a_saved_atlas_records_the_version_and_matches_the_schema(tiny_atlas_dir: Path) -> None:
    meta = json.loads((tiny_atlas_dir / "atlas.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    validate_saved_atlas(tiny_atlas_dir)
    assert schema_path().name == "atlas.schema.json"


def test_the_schema_rejects_what_is_not_an_atlas(tiny_atlas_dir: Path) -> None:
    schema = json.loads(schema_path().read_text())
    meta = json.loads((tiny_atlas_dir / "atlas.json").read_text())
    bad = {**meta, "model": {k: v for k, v in meta["model"].items() if k != "n_heads"}}
    with pytest.raises(jsonschema.ValidationError, match="n_heads"):
        jsonschema.validate(bad, schema)
    table = Atlas.load(tiny_atlas_dir).table.copy()
    table["layer"] = table["layer"].astype(float)
    table["Bad Name"] = 1.0
    columns_schema = {**schema["$defs"]["table"], "$defs": schema["$defs"]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(describe_table(table), columns_schema)


def test_an_atlas_from_before_the_schema_version_is_migrated(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    old = _copy(tiny_atlas_dir, tmp_path / "old")

    def to_version_0(meta: dict) -> None:  # type: ignore[type-arg]
        for key in ("schema_version", "sequence_start", "sequence_end"):
            meta.pop(key, None)

    _edit_meta(old, to_version_0)
    atlas = Atlas.load(old)
    assert atlas.meta["schema_version"] == SCHEMA_VERSION
    assert atlas.meta["sequence_start"] == UNKNOWN_START
    atlas.save(tmp_path / "resaved")  # validated against the schema by the conftest hook
    assert json.loads((tmp_path / "resaved" / "atlas.json").read_text())["schema_version"] == SCHEMA_VERSION


def test_a_newer_or_incomplete_atlas_says_exactly_what(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    newer = _copy(tiny_atlas_dir, tmp_path / "newer")
    _edit_meta(newer, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(HeadatlasError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade headatlas"):
        Atlas.load(newer)
    partial = _copy(tiny_atlas_dir, tmp_path / "partial")
    _edit_meta(
        partial, lambda m: (m.pop("schema_version"), m["model"].pop("sha256"), m["model"].pop("head_dim"))
    )
    with pytest.raises(HeadatlasError, match=r"schema version 0\) lacks model\.sha256, model\.head_dim"):
        Atlas.load(partial)


# ---------------------------------------------------------------- compare


def test_spearman_matches_known_values() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(5)))


def test_an_atlas_against_itself_agrees_everywhere(tiny_atlas_dir: Path) -> None:
    atlas = Atlas.load(tiny_atlas_dir)
    result = compare_atlases(atlas, atlas, k=3)
    ranked = result.scores.dropna(subset=["spearman"])
    assert len(ranked) > 5
    assert np.allclose(ranked["spearman"], 1.0)
    assert (result.scores["top_k_overlap"] == 1.0).all()
    assert (result.roles["gained"] == 0).all() and (result.roles["lost"] == 0).all()
    assert result.meta["same_model"]


def test_gained_and_lost_heads_and_a_reversed_score(tiny_atlas_dir: Path) -> None:
    a = Atlas.load(tiny_atlas_dir)
    b = Atlas.load(tiny_atlas_dir)
    b.table["induction"] = -b.table["induction"]
    b.table["roles"] = ""
    b.table.loc[(b.table["layer"] == 2) & (b.table["head"] == 1), "roles"] = "induction"
    result = compare_atlases(a, b, scores=["induction"], k=2)
    assert result.scores.loc[0, "spearman"] == pytest.approx(-1.0)
    assert result.scores.loc[0, "top_k_overlap"] == 0.0
    roles = result.roles.set_index("role")
    assert roles.loc["induction", "b"] == 1
    had = set(a.with_role("induction").apply(lambda r: f"L{r.layer}H{r['head']}", axis=1))
    assert set(roles.loc["induction", "lost_heads"]) == had - {"L2H1"}
    assert roles.loc["induction", "gained_heads"] == ([] if "L2H1" in had else ["L2H1"])


def test_bad_comparisons_are_one_line_errors(tiny_atlas_dir: Path) -> None:
    a = Atlas.load(tiny_atlas_dir)
    smaller = Atlas(
        a.table[a.table["layer"] < 2].reset_index(drop=True),
        {**a.meta, "model": {**a.meta["model"], "n_layers": 2}},
    )
    with pytest.raises(HeadatlasError, match="same shape: A has 3 × 4 heads, B 2 × 4"):
        compare_atlases(a, smaller)
    with pytest.raises(HeadatlasError, match="no_such_score"):
        compare_atlases(a, a, scores=["no_such_score"])
    with pytest.raises(HeadatlasError, match="k must be at least 1"):
        compare_atlases(a, a, k=0)


def test_compare_command_writes_tables_json_and_figure(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = runner.invoke(
        app, ["compare", str(tiny_atlas_dir), str(tiny_atlas_dir), "--k", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output and "one model" in result.output
    payload = json.loads((out / JSON_FILE).read_text())
    assert payload["k"] == 3 and payload["scores"] and isinstance(payload["roles"], list)
    for name in ("compare_scores.csv", "compare_roles.csv", "compare.png"):
        assert (out / name).stat().st_size > 0
    bad = runner.invoke(app, ["compare", str(tiny_atlas_dir), str(tmp_path / "none")])
    assert bad.exit_code == 2 and "no atlas in" in bad.output
    assert write_comparison(
        compare_atlases(Atlas.load(tiny_atlas_dir), Atlas.load(tiny_atlas_dir)), tmp_path / "x", figure=False
    )


def test_compare_does_not_import_torch(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from typer.testing import CliRunner
from headatlas.cli import app
r = CliRunner().invoke(app, ["compare", {str(tiny_atlas_dir)!r}, {str(tiny_atlas_dir)!r}, "--out", {str(tmp_path / "c")!r}])
assert r.exit_code == 0, r.output
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
