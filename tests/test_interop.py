"""Foreign head-annotation formats on atlases: hand-written fixtures, export → import round trips,
KV expansion, ``verify`` of an imported column, and the ``export`` / ``import`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from headatlas.apps import kv
from headatlas.apps.common import formats
from headatlas.apps.interop.exchange import FORMAT_NAMES, export_atlas, import_annotation, kv_gates
from headatlas.apps.verify.causal import metric_for
from headatlas.atlas.table import Atlas
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
runner = CliRunner()


@pytest.fixture
def atlas(tiny_atlas_dir: Path) -> Atlas:
    """The tiny Llama's atlas (3 layers × 4 query heads, 2 KV heads)."""
    return Atlas.load(tiny_atlas_dir)


def test_hand_written_fixtures_read_as_their_tools_lay_them_out() -> None:
    scores = formats.read_headkv(FIXTURES / "retrieval_head.json")
    assert scores.shape == (3, 4)
    assert scores[2, 1] == pytest.approx(0.9) and scores[1, 0] == pytest.approx(0.3)  # means of the trials
    assert formats.read_attention_tracker(FIXTURES / "attention_tracker.json") == [(2, 1), (1, 0), (2, 3)]
    maps = formats.read_scores_csv(FIXTURES / "maps_scores.csv", 3, 4)
    assert maps[2, 3] == pytest.approx(-0.25) and np.isnan(maps[1, 1])


@pytest.mark.parametrize("fmt", ["retrieval-head", "headkv", "csv"])
def test_per_head_formats_round_trip(atlas: Atlas, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / ("scores.csv" if fmt == "csv" else "scores.json")
    export_atlas(atlas, fmt, "induction", out)
    column = import_annotation(atlas, out, fmt)
    assert column == "imported_" + fmt.replace("-", "_")
    assert np.allclose(atlas.matrix(column), atlas.matrix("induction"), atol=1e-6)
    record = atlas.meta["imported"][column]
    assert record["format"] == fmt and len(record["sha256"]) == 64 and not record["expanded_from_kv_heads"]


def test_duo_exports_kv_gates_and_imports_them_expanded_to_query_heads(atlas: Atlas, tmp_path: Path) -> None:
    export_atlas(atlas, "duo", "first_token", tmp_path / "duo", sink=4, recent=32)
    pattern = formats.read_duo(tmp_path / "duo")
    assert (pattern.sink, pattern.recent) == (4, 32)
    values = atlas.matrix("first_token")  # [3, 4]; KV head g serves query heads 2g, 2g+1
    relative = values / values.max()  # [3, 4]: each head against the model's strongest
    assert np.allclose(pattern.gates, np.maximum(relative[:, 0::2], relative[:, 1::2]), atol=1e-6)
    assert np.allclose(kv_gates(atlas, "first_token"), pattern.gates, atol=1e-6)
    column = import_annotation(atlas, tmp_path / "duo", "duo", name="duo_gate")
    assert np.allclose(atlas.matrix(column), np.repeat(pattern.gates, 2, axis=1))
    assert atlas.meta["imported"][column]["expanded_from_kv_heads"]


def test_a_signed_score_counts_relative_to_its_largest_magnitude(atlas: Atlas) -> None:
    atlas.set_matrix("copying", np.arange(12, dtype=float).reshape(3, 4) - 6)  # -6 .. 5
    gates = kv_gates(atlas, "copying")
    assert gates.shape == (3, 2) and gates.min() == 0.0  # suppression counts as no need
    assert gates[2, 1] == pytest.approx(5 / 6) and gates[0, 0] == 0.0


def test_an_exported_pattern_and_a_plan_follow_one_rule(atlas: Atlas) -> None:
    """``export --format duo`` writes the KV-head scores ``kv plan`` ranks by: the plan keeps exactly
    the KV heads with the highest exported gates."""
    atlas.set_matrix(
        "retrieval", np.array([[0.1, 0.0, 0.2, 0.4], [0.8, 0.3, 0.0, 0.05], [0.6, 0.1, 0.9, 0.7]])
    )
    gates = kv_gates(atlas, "retrieval")
    scores, names = kv.kv_scores(atlas, "retrieval")
    assert names == ["retrieval"] and np.array_equal(gates, scores)
    plan = kv.plan(atlas, budget=200, by="retrieval", sink=4, recent=32, context=512)
    kept = {(layer, k) for layer, heads in enumerate(plan.full_heads) for k in heads}
    ranked = sorted(np.ndindex(gates.shape), key=lambda lk: -gates[lk])
    assert kept == set(ranked[: len(kept)]) and 0 < len(kept) < gates.size


def test_attention_tracker_export_keeps_the_top_heads_and_imports_a_0_1_column(
    atlas: Atlas, tmp_path: Path
) -> None:
    export_atlas(atlas, "attention-tracker", "induction", tmp_path / "t.json", k=3)
    config = json.loads((tmp_path / "t.json").read_text())
    top = [[int(r.layer), int(r.head)] for r in atlas.top("induction", 3).itertuples()]
    assert config["params"]["important_heads"] == top
    column = import_annotation(atlas, FIXTURES / "attention_tracker.json", "attention-tracker")
    assert sorted(zip(*np.nonzero(atlas.matrix(column)), strict=True)) == [(1, 0), (2, 1), (2, 3)]
    atlas.set_matrix("induction", np.zeros((3, 4)))
    with pytest.raises(HeadatlasError, match="k must be at least 1"):
        export_atlas(atlas, "attention-tracker", "induction", tmp_path / "u.json", k=0)


def test_imports_that_do_not_fit_the_model_are_refused(atlas: Atlas, tmp_path: Path) -> None:
    with pytest.raises(HeadatlasError, match=r"outside|has heads up to"):
        import_annotation(atlas, FIXTURES / "outside.json", "headkv")
    formats.write_duo(tmp_path / "duo3", np.zeros((3, 3)), 4, 8)
    with pytest.raises(HeadatlasError, match="3 layers × 3 KV heads; the model has 3 × 2"):
        import_annotation(atlas, tmp_path / "duo3", "duo")
    with pytest.raises(HeadatlasError, match="unknown format"):
        import_annotation(atlas, FIXTURES / "retrieval_head.json", "maps")
    with pytest.raises(HeadatlasError, match="already a column of this atlas"):
        import_annotation(atlas, FIXTURES / "retrieval_head.json", "headkv", name="layer")
    with pytest.raises(HeadatlasError, match="new lower-case column name"):
        import_annotation(atlas, FIXTURES / "retrieval_head.json", "headkv", name="Mixed")
    (tmp_path / "bad.json").write_text('{"params": {}}')
    with pytest.raises(HeadatlasError, match="important_heads"):
        import_annotation(atlas, tmp_path / "bad.json", "attention-tracker")


def test_verify_measures_an_imported_column_by_the_task_of_its_kind(atlas: Atlas) -> None:
    column = import_annotation(atlas, FIXTURES / "retrieval_head.json", "retrieval-head")
    assert metric_for(column, atlas)[1] == metric_for("retrieval", atlas)[1]
    tracker = import_annotation(atlas, FIXTURES / "attention_tracker.json", "attention-tracker")
    with pytest.raises(HeadatlasError, match="no task metric"):
        metric_for(tracker, atlas)


def test_export_and_import_commands(tiny_atlas_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    exported = tmp_path / "head_score.json"
    result = runner.invoke(
        app,
        [
            "export",
            str(tiny_atlas_dir),
            "--format",
            "retrieval-head",
            "--score",
            "induction",
            "--out",
            str(exported),
        ],
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "imported"
    result = runner.invoke(
        app,
        [
            "import",
            str(exported),
            "--format",
            "retrieval-head",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "12 of 12 heads" in result.output
    shown = runner.invoke(app, ["show", str(out), "--by", "imported_retrieval_head", "--top", "3"])
    assert shown.exit_code == 0, shown.output
    bad = runner.invoke(
        app,
        [
            "export",
            str(tiny_atlas_dir),
            "--format",
            "csv",
            "--score",
            "induction",
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert bad.exit_code == 2 and "--out" in bad.output and ".csv" in bad.output
    missing = runner.invoke(
        app,
        [
            "import",
            str(tmp_path / "none.json"),
            "--format",
            "csv",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
        ],
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert set(FORMAT_NAMES) <= set(formats.FORMATS)
