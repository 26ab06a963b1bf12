"""Pictures on disk: figures of an atlas, attention maps of a text, and the `map` command."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headatlas as ha
from conftest import XSS
from headatlas.cli import app
from headatlas.report.data import display_token
from headatlas.report.figures import (
    EXAMPLE_SCORES,
    MAX_LABELS,
    TOP_PER_SCORE,
    _labels,
    attention_figure,
    grid_figure,
    write_figures,
)
from headatlas.report.maps import max_pool, text_attention
from tiny_models import eager_attentions

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 2000 and path.read_bytes()[:8] == PNG


def test_write_figures(tiny_atlas_dir: Path, tmp_path: Path) -> None:
    atlas = ha.Atlas.load(tiny_atlas_dir)
    written = write_figures(atlas, tmp_path / "figures")
    names = {p.relative_to(tmp_path / "figures").as_posix() for p in written}
    for score in atlas.scores:
        assert f"scores/{score}.png" in names
    assert {"roles.png", "distance_profiles.png"} <= names
    examples = [n for n in names if n.startswith("examples/")]
    assert len(examples) == len(EXAMPLE_SCORES) * TOP_PER_SCORE
    assert all(_is_png(p) for p in written)


def test_labels_are_thinned_for_long_texts() -> None:
    tokens = [f"t{i}" for i in range(500)]
    step = math.ceil(500 / MAX_LABELS)
    positions, labels = _labels(tokens, step, pool=1)
    assert len(positions) <= MAX_LABELS and labels[1] == f"t{step}"
    positions, labels = _labels(tokens, 1, pool=4)  # pooled map: one label per 4-token cell
    assert len(positions) == 125 and labels[1] == "t4"


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_attention_figure_long_text_and_odd_tokens(tmp_path: Path, suffix: str) -> None:
    n = 300
    rng = np.random.default_rng(0)
    att = np.tril(rng.random((n, n))).astype(np.float32)
    att /= att.sum(-1, keepdims=True)
    tokens = ["$x$", XSS, "\n", "   ", "\x10", *[f"w{i}" for i in range(n - 5)]]
    path = attention_figure(tokens, att, tmp_path / f"long{suffix}", title="L0 H0 $not math$")
    assert path.stat().st_size > 5000
    before = att.copy()
    grid = grid_figure(tokens, {0: np.stack([att, att]), 1: np.stack([att, att])}, tmp_path / f"grid{suffix}")
    assert grid.stat().st_size > 5000
    np.testing.assert_array_equal(att, before)


def test_bad_figure_suffix(tmp_path: Path) -> None:
    with pytest.raises(ha.HeadatlasError, match=r"\.png"):
        attention_figure(["a"], np.ones((1, 1)), tmp_path / "map.jpg")


def test_max_pool_keeps_peaks() -> None:
    maps = np.zeros((2, 10, 10), dtype=np.float32)
    maps[1, 9, 3] = 0.7
    pooled = max_pool(max_pool(maps, 4, axis=1), 4, axis=2)
    assert pooled.shape == (2, 3, 3)
    assert pooled[1, 2, 0] == pytest.approx(0.7) and pooled.sum() == pytest.approx(0.7)


def test_display_token() -> None:
    assert display_token("\n") == "↵"
    assert display_token("    x") == "␣4x"
    assert display_token(" ") == "␣"
    assert display_token("") == "∅"
    assert display_token("\x10") == "\\x10"
    assert display_token("a" * 40, 10) == "a" * 9 + "…"


def test_text_attention_equals_eager(tiny_loaded: ha.LoadedModel) -> None:
    text = "The cat sat on the mat and looked at the dog."
    maps = text_attention(tiny_loaded, text, layers={1})
    assert set(maps.maps) == {1} and maps.pool == 1
    ids = np.asarray(maps.ids)[None]
    import torch

    ids_t = torch.tensor(ids)
    reference = eager_attentions(tiny_loaded.model, ids_t, torch.ones_like(ids_t))[1][0].numpy()
    np.testing.assert_allclose(maps.maps[1], reference, atol=1e-5)
    pooled = text_attention(tiny_loaded, text, layers={1}, tile=4)
    assert pooled.pool == math.ceil(len(maps.ids) / 4)
    assert pooled.maps[1].shape[-1] == 4
    with pytest.raises(ha.HeadatlasError, match="over the limit"):
        text_attention(tiny_loaded, text, max_tokens=3)
    with pytest.raises(ha.HeadatlasError, match="no layer 7"):
        text_attention(tiny_loaded, text, layers={7})


runner = CliRunner()


def _invoke(args: list[str], cache: Path) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"HEADATLAS_CACHE": str(cache), "COLUMNS": "200"})
    return result.exit_code, result.output


def test_map_cli_one_head_and_grid(tiny_model_dir: Path, tmp_path: Path) -> None:
    text = "The cat sat on the mat. The cat sat on the mat."
    one = tmp_path / "one.png"
    code, out = _invoke(
        ["map", str(tiny_model_dir), "--text", text, "--layer", "1", "--head", "2", "--out", str(one)],
        tmp_path,
    )
    assert code == 0, out
    assert _is_png(one)
    grid = tmp_path / "grid.svg"
    (tmp_path / "text.txt").write_text(text * 20)
    code, out = _invoke(
        ["map", str(tiny_model_dir), "--text-file", str(tmp_path / "text.txt"), "--out", str(grid)], tmp_path
    )
    assert code == 0, out
    assert "max-pooled" in out and grid.stat().st_size > 5000
    layer = tmp_path / "layer.png"
    code, out = _invoke(
        ["map", str(tiny_model_dir), "--text", text, "--layer", "2", "--out", str(layer)], tmp_path
    )
    assert code == 0 and _is_png(layer), out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--text", "hi", "--out", "x.jpg"], ".png"),
        (["--text", "hi", "--head", "1"], "--head needs --layer"),
        (["--text", "hi", "--layer", "9", "--head", "0"], "no layer 9"),
        (["--text", "hi", "--layer", "0", "--head", "9"], "no head L0H9"),
        (["--text", "   "], "empty"),
        ([], "--text or --text-file"),
        (["--text", "a b c d e f g h", "--max-tokens", "3"], "over the limit"),
    ],
)
def test_map_cli_errors(tiny_model_dir: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    code, out = _invoke(["map", str(tiny_model_dir), *args], tmp_path)
    assert code == 2, out
    assert needle in out and "Traceback" not in out
