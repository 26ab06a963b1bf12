"""The self-contained HTML report, its data, the `report`/`scan` commands and the Jupyter summary."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headatlas as ha
from conftest import XSS, XSS_TEXT
from headatlas.atlas.table import Example
from headatlas.cli import app
from headatlas.report.data import atlas_payload, encode_maps, is_causal_map, quantize
from headatlas.report.html import render_report, script_json, write_report
from tiny_models import CORPUS

runner = CliRunner()


def _embedded(page: str) -> dict:
    block = re.search(r'<script type="application/json" id="ha-data">(.*?)</script>', page, re.S)
    assert block is not None
    return json.loads(block.group(1))


def test_report_is_one_offline_file(tiny_atlas_dir: Path) -> None:
    page = render_report(ha.Atlas.load(tiny_atlas_dir))
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script src" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert "url(" not in lowered
    assert lowered.count("<script") == 2  # the JSON data block and the inlined code
    assert "default-src 'none'" in page and "script-src 'sha256-" in page


def test_tokens_are_data_never_markup(tiny_atlas_dir: Path) -> None:
    page = render_report(ha.Atlas.load(tiny_atlas_dir))
    assert XSS not in page
    assert "<img" not in page.lower()
    assert page.lower().count("</script") == 2  # the ends of the two script elements only
    data = _embedded(page)
    joined = "".join(data["examples"][0]["tokens"])
    assert joined == "<bos>" + XSS_TEXT  # the tiny tokenizer starts every text with <bos>


def test_script_json_escapes_everything_dangerous() -> None:
    text = script_json({"t": "</script><!-- http://x & y \u2028"})
    for bad in ("<", ">", "&", "http://", "\u2028"):
        assert bad not in text
    assert json.loads(text) == {"t": "</script><!-- http://x & y \u2028"}


def test_payload_maps_round_trip(tiny_atlas_dir: Path) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    data = atlas_payload(atlas)
    info = atlas.meta["model"]
    assert len(data["heads"]["layer"]) == info["n_layers"] * info["n_heads"]
    assert len(data["heads"]["profile"][0]) == 64
    for ex, stored in zip(data["examples"], atlas.examples, strict=True):
        att = stored.attention
        assert ex["causal"] == is_causal_map(att) and ex["causal"]
        n = ex["n"]
        raw = np.frombuffer(base64.b64decode(ex["data"]), dtype=np.uint8)
        rows, cols = np.tril_indices(n)
        expected = quantize(att)[..., rows, cols].reshape(-1)
        np.testing.assert_array_equal(raw, expected)
        assert (
            np.abs(raw.reshape(att.shape[0], att.shape[1], -1) / 255 - att[..., rows, cols]).max()
            <= 0.5 / 255 + 1e-3
        )


def test_encode_full_maps_for_encoders() -> None:
    att = np.full((1, 1, 3, 3), 1 / 3, dtype=np.float16)
    assert not is_causal_map(att)
    raw = np.frombuffer(base64.b64decode(encode_maps(att, causal=False)), dtype=np.uint8)
    assert raw.tolist() == [85] * 9


def test_examples_over_budget_are_left_out(tiny_atlas_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    with caplog.at_level(logging.WARNING):
        data = atlas_payload(atlas, max_example_bytes=3000)
    assert len(data["examples"]) < len(atlas.examples)
    assert "leaving out example" in caplog.text


def test_report_size_is_bounded_by_the_example_budget() -> None:
    # a big model's worth of example maps (40 layers × 32 heads × 48²) stays under the 5 MB budget
    n_layers, n_heads, n = 40, 32, 48
    table = {
        "layer": np.repeat(np.arange(n_layers), n_heads),
        "head": np.tile(np.arange(n_heads), n_layers),
        "kv_head": np.tile(np.arange(n_heads), n_layers) // 4,
        "induction": np.linspace(0, 1, n_layers * n_heads),
        "induction_std": np.zeros(n_layers * n_heads),
        "induction_n": np.ones(n_layers * n_heads),
        "roles": [""] * (n_layers * n_heads),
    }
    att = np.tril(np.ones((n, n), np.float16))
    att = np.broadcast_to(att / att.sum(-1, keepdims=True), (n_layers, n_heads, n, n)).astype(np.float16)
    examples = [Example("natural", ["a"] * n, att), Example("repeat", ["b"] * n, att)]
    import pandas as pd

    meta = {"model": {"name": "big", "n_layers": n_layers, "n_heads": n_heads}}
    page = render_report(ha.Atlas(pd.DataFrame(table), meta, examples))
    assert len(page.encode()) <= 5_000_000


def test_report_cli_writes_report_and_figures(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tiny_atlas_dir)])
    assert result.exit_code == 0, result.output
    assert (tiny_atlas_dir / "report.html").stat().st_size > 10_000
    assert (tiny_atlas_dir / "figures" / "roles.png").exists()
    out = tmp_path / "elsewhere.html"
    result = runner.invoke(app, ["report", str(tiny_atlas_dir), "--out", str(out), "--no-figures"])
    assert result.exit_code == 0 and out.exists(), result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no atlas" in result.output


def test_write_report_is_atomic(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    path = write_report(ha.Atlas.load(tiny_atlas_dir), tmp_path, figures=False)
    assert path == tmp_path / "report.html"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_scan_cli_writes_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    out = tmp_path / "atlas"
    args = ["scan", str(tiny_model_dir), "--out", str(out), "--n-prompts", "2", "--seq-len", "24"]
    result = runner.invoke(app, [*args, "--text-file", str(corpus)], env={"HEADATLAS_CACHE": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert (out / "atlas.parquet").exists()
    assert (out / "figures" / "scores" / "induction.png").stat().st_size > 2000
    assert (out / "figures" / "distance_profiles.png").exists()
    assert len(list((out / "figures" / "examples").glob("*.png"))) >= 6


def test_repr_html_escapes(tiny_atlas_dir: Path) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    atlas.meta["model"]["name"] = XSS
    text = atlas._repr_html_()
    assert XSS not in text and "&lt;img src=x" in text
    assert "<table>" in text and "induction" in text


def test_circuits_section_shows_stored_curves_as_text(tiny_atlas_dir: Path) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    assert atlas_payload(atlas)["circuits"] == []
    atlas.meta["circuits"] = {
        XSS: {
            "column": "circuit_x", "method": "eap-ig", "ablation": "counterfactual", "minimal_k": 2,
            "threshold": 0.9, "total_heads": 8, "n_pairs": 4, "clean_accuracy": 1.0,
            "heads": ["L1H0", "L0H1", XSS],
            "methods": {
                "eap-ig": {"cpr": 0.8, "cmd": 0.1, "minimal_k": 2, "sizes": [0, 1, 2, 8],
                           "faithfulness": [0.0, 0.5, float("nan"), 1.0]},
                "random": {"cpr": 0.4, "cmd": 0.6, "cpr_std": 0.1, "sizes": [0, 8], "faithfulness": [0, 1]},
                "broken": "not a dict",
            },
        },
        "old": {"method": "attribution", "minimal_k": None, "attribution": {"cpr": 0.5, "cmd": 0.5}},
        "junk": [1, 2],
    }  # fmt: skip
    shown = atlas_payload(atlas)["circuits"]
    assert [c["task"] for c in shown] == [XSS, "old"]
    first = shown[0]
    assert [h["name"] for h in first["heads"]] == ["L1H0", "L0H1"] and first["heads"][0]["layer"] == 1
    assert [m["name"] for m in first["methods"]] == ["eap-ig", "random"]
    assert first["methods"][0]["curve"] == [[0, 0.0], [1, 0.5], [8, 1.0]]  # NaN point dropped
    assert first["methods"][1]["cpr_std"] == 0.1 and shown[1]["methods"][0]["cpr"] == 0.5
    page = render_report(atlas)
    assert XSS not in page and "renderCircuit" in page  # the script shows it, data only as text
    assert _embedded(page)["circuits"][0]["task"] == XSS
