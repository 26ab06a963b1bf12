"""Battery ``dormant`` (Guo et al. 2024, active–dormant heads): value norm at the sink, output norm,
first-token read-out and the dormancy rate.

The answer is known by construction: in a one-layer Llama wired by hand, both heads put almost all
of their attention on ``<bos>`` (a constant query bias meets a key only ``<bos>`` has); head 0's
value reads coordinates ``<bos>`` does not have (its value there is 0: a dormant sink), head 1's
value reads the coordinate only ``<bos>`` has (it really reads the first token).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import headatlas as ha
from headatlas.core.roles import assign_roles
from headatlas.functional import FunctionalConfig, battery_spec, dormant
from tiny_models import CORPUS, blank_llama, make_tokenizer, one_layer_llama_config

D_HEAD = 16


def sink_llama(vocab: int) -> torch.nn.Module:
    """Two heads (2 KV heads) that both attend to ``<bos>``; head 0's value is 0 there, head 1's large."""
    cfg = one_layer_llama_config(
        vocab,
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9},
    )
    model = blank_llama(cfg)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # [vocab, d_model]
        emb.copy_(torch.randn(emb.shape, generator=gen))
        emb[:, 0] = 0.0  # coordinate 0 belongs to <bos> alone
        emb[0] = 0.0
        emb[0, 0] = 1.0
        for head in (0, 1):
            rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
            last = head * D_HEAD + D_HEAD - 1  # the slowest rotary pair: no rotation at rope_theta 1e9
            attn.q_proj.bias[last] = 4.0
            attn.k_proj.weight[last, 0] = 4.0
            attn.v_proj.weight[rows] = torch.eye(D_HEAD, 64).roll(
                1 - head, dims=1
            )  # head 0 skips coordinate 0
    return model


@pytest.fixture()
def tiny_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dormant, "ewt_sentences", lambda split="train": list(CORPUS))


def test_dormant_rows_by_hand() -> None:
    first = torch.tensor([[0.9, 0.9, 0.1]])  # [batch, head]
    norms = torch.tensor([[[0.0, 2.0, 2.0], [4.0, 2.0, 2.0], [2.0, 2.0, 2.0]]])  # [batch, head, key]
    keys = torch.tensor([[False, True, True]])  # key 0 is the first token
    out = torch.tensor([[0.2, 3.6, 0.2]])  # [batch, head]
    rows = dormant.dormant_rows(first, norms, out, keys)
    assert rows["dormancy"].tolist() == [[1.0, 0.0, 0.0]]  # the third head does not park on the sink
    assert torch.allclose(rows["sink_value_norm"], torch.tensor([[0.0, 2.0, 1.0]]))
    assert torch.allclose(rows["sink_output_norm"], torch.tensor([[0.1, 1.8, 0.1]]))
    assert torch.allclose(rows["sink_read"], torch.tensor([[0.0, 1.8, 0.1]]))


def test_zero_value_sink_is_dormant_and_reader_is_not(tiny_corpus: None) -> None:
    tok = make_tokenizer()
    loaded = ha.load(sink_llama(len(tok)), tokenizer=tok)
    result = battery_spec("dormant").run(loaded, FunctionalConfig(n_prompts=2, max_len=32), lambda d, t: None)
    s = result.stats
    assert s.mean("sink_value_norm")[0, 0] < 0.01 < 1.0 < s.mean("sink_value_norm")[0, 1]
    assert s.mean("dormancy")[0].tolist() == [1.0, 0.0]
    assert s.mean("sink_output_norm")[0, 0] < 0.05 < 1.0 < s.mean("sink_output_norm")[0, 1]
    assert s.mean("sink_read")[0, 1] > 1.0
    assert s.n("dormancy")[0, 0] == 6  # one row per sequence: 2 per domain × 3 domains
    roles = assign_roles({name: s.mean(name).reshape(-1) for name in dormant.DORMANT_SCORES})
    assert roles == ["dormant", "first-token-reader"]
    table = result.tables["dormant_domains"]
    assert sorted(set(table["domain"])) == sorted(dormant.DOMAINS)
    assert len(table) == 3 * 2


def test_scan_writes_dormant_columns(tiny_loaded, tiny_corpus) -> None:  # type: ignore[no-untyped-def]
    atlas = ha.scan(tiny_loaded, probes=["dormant"], n_functional=1, max_len=24)
    for column in dormant.DORMANT_SCORES:
        values = atlas.table[column].to_numpy()
        assert np.isfinite(values).all()
    assert ((atlas.table["dormancy"] >= 0) & (atlas.table["dormancy"] <= 1)).all()
    assert (atlas.table["sink_value_norm"] >= 0).all()
    loss = dormant.domain_loss(tiny_loaded, FunctionalConfig(n_prompts=1, max_len=24), lambda d, t: None)
    assert np.isfinite(loss) and loss > 0
