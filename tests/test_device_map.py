"""A model split by an explicit device map (one layer offloaded to disk, the rest on CPU): the scan,
ablation importance and activation patching give the same numbers as the model in one piece, and
``--device-map`` on the command line takes a strategy, a JSON object or a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.common.patch_tasks import PatchPair, PatchTask
from headatlas.apps.patch.patching import patch
from headatlas.apps.prune.importance import ablation_importance
from headatlas.cli import app
from tiny_models import SAMPLE_TEXTS

runner = CliRunner()

SPLIT = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def split_and_whole(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    offload = tmp_path_factory.mktemp("offload")
    split = ha.load(str(tiny_model_dir), device_map=SPLIT, offload_folder=offload)
    whole = ha.load(str(tiny_model_dir))
    return split, whole


def test_the_split_model_really_is_split(split_and_whole) -> None:  # type: ignore[no-untyped-def]
    split, _ = split_and_whole
    placement = getattr(split.model, "hf_device_map", {})
    assert placement.get("model.layers.1") == "disk"
    # accelerate leaves an offloaded layer's weights on the meta device until its forward
    weight = split.model.model.layers[1].self_attn.q_proj.weight
    assert weight.device.type == "meta"


def test_scan_of_a_split_model_equals_the_whole_one(split_and_whole) -> None:  # type: ignore[no-untyped-def]
    split, whole = split_and_whole
    settings = {"probes": ["natural", "repeat"], "texts": SAMPLE_TEXTS[:3], "n_prompts": 2, "seq_len": 24}
    a = ha.scan(split, **settings).table
    b = ha.scan(whole, **settings).table
    numeric = [c for c in b.columns if pd.api.types.is_float_dtype(b[c])]
    assert numeric
    np.testing.assert_allclose(a[numeric].to_numpy(), b[numeric].to_numpy(), rtol=1e-6, atol=1e-7)
    assert list(a["roles"]) == list(b["roles"])


def test_ablation_and_patching_of_a_split_model_equal_the_whole_one(split_and_whole) -> None:  # type: ignore[no-untyped-def]
    from test_importance_prune import _data

    split, whole = split_and_whole
    a = ablation_importance(split, _data(split, n=2))
    b = ablation_importance(whole, _data(whole, n=2))
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert np.abs(b.scores).max() > 0
    task = PatchTask(
        "t",
        tuple(
            PatchPair(f"The {x} sat on the", f"The {y} sat on the", " mat", " and")
            for x, y in (("cat", "dog"), ("cat", "mat"))
        ),
    )
    pa, _ = patch(split, task, method="activation").matrices["activation"]
    pb, _ = patch(whole, task, method="activation").matrices["activation"]
    np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-6)
    assert np.abs(pb).max() > 0


def test_cli_scan_takes_a_device_map_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(SPLIT), encoding="utf-8")
    out = tmp_path / "atlas"
    args = ["scan", str(tiny_model_dir), "--probes", "repeat", "--n-prompts", "2", "--seq-len", "16"]
    common = [*args, "--no-figures", "--device-map", str(mapping), "--offload-folder", str(tmp_path / "off")]
    result = runner.invoke(app, [*common, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "atlas.parquet").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [("nowhere.json", "give one of auto"), ("{not json", "not valid JSON"), ("[1, 2]", "give one of")],
)
def test_cli_rejects_a_bad_device_map_in_one_line(
    tiny_model_dir: Path, tmp_path: Path, value: str, message: str
) -> None:
    result = runner.invoke(
        app, ["scan", str(tiny_model_dir), "--device-map", value, "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_device_map_and_ray_together_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["scan", str(tiny_model_dir), "--device-map", "auto", "--ray", "auto", "--out", str(tmp_path / "a")],
    )
    assert result.exit_code == 2 and "pick one" in result.output
