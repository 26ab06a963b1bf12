"""Slow tests on the real packaged default model (SmolLM2-135M-Instruct). CI runs them: setup installs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import headatlas as ha
from conftest import requires_default_model

pytestmark = [pytest.mark.slow, requires_default_model]


@pytest.fixture(scope="module")
def smollm() -> ha.LoadedModel:
    return ha.load("default")


def test_default_model_facts(smollm: ha.LoadedModel) -> None:
    info = smollm.info
    assert (info.arch, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == ("llama", 30, 9, 3, 64)
    assert info.sha256 is not None and len(info.sha256) == 64


def test_capture_equals_eager_on_the_real_model(smollm: ha.LoadedModel) -> None:
    tok = smollm.tokenizer
    texts = ["The quick brown fox jumps over the lazy dog.", "Hi!"]
    encoded = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, encoded))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    layers = {0, 15, 29}
    maps = ha.attention_maps(smollm, ids, mask, layers=layers)
    smollm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            reference = smollm.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    finally:
        smollm.model.set_attn_implementation("sdpa")
    valid = mask.bool()[:, None, :, None]
    for layer in layers:
        assert ((maps[layer] - reference[layer]).abs() * valid).max() <= 1e-5


def test_scan_of_the_default_model(smollm: ha.LoadedModel, tmp_path: Path) -> None:
    atlas = ha.scan(smollm, n_prompts=4, seq_len=128, batch_size=4, out=tmp_path)
    table = atlas.table
    assert len(table) == 270
    assert table["previous_token"].between(0, 1).all()
    assert table["entropy_norm"].between(0, 1 + 1e-6).all()
    # Induction heads are a known property of trained LMs (Olsson et al. 2022): some head must
    # put most of its attention on the induction target of a repeated random sequence.
    assert table["induction"].max() > 0.5
    assert len(atlas.with_role("previous-token")) >= 1
    assert ha.Atlas.load(tmp_path).table.shape == table.shape
