"""Attention the fused kernel does not compute alone, on the fast path: learned sinks (gpt-oss,
Granite SWA, Flint, HY V4, MiMo V2), keys an indexer selects (DeepSeek V3.2's DSA and the families
that copy it), and the attention implementation restored per sub-model after a capture.

The sink tests feed one layer's query/key/value to the session's fast path and to its dense path
and compare every read a detector makes, and the output with a sink softmax written out here; the
family tests (``slow``: they depend on the transformers release) run the conformance checks.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import headatlas as ha
from headatlas.apps.conformance import by_name, run_family
from headatlas.apps.conformance.families import load_tiny
from headatlas.capture import capture
from headatlas.capture.backends.headatlas import with_selected_keys
from headatlas.capture.views import AttentionView, DenseView, LseView
from headatlas.core.errors import HeadatlasError
from headatlas.model.compat import attention_implementation

BATCH, QUERY, D_HEAD = 2, 11, 8
PAD = 3
"""Left padding of the second row."""


def _layer(n_heads: int, n_kv: int) -> tuple[torch.Tensor, ...]:
    """Seeded query ``[batch, head, query, d]``, key/value ``[batch, kv_head, query, d]``, sinks
    ``[head]`` (one very negative, one large) and a left-padded causal bool mask ``[batch, 1, q, k]``."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(BATCH, n_heads, QUERY, D_HEAD, generator=gen) * 2
    key = torch.randn(BATCH, n_kv, QUERY, D_HEAD, generator=gen) * 2
    value = torch.randn(BATCH, n_kv, QUERY, D_HEAD, generator=gen)
    sinks = torch.randn(n_heads, generator=gen)
    sinks[0], sinks[-1] = -30.0, 3.0
    causal = torch.ones(QUERY, QUERY, dtype=torch.bool).tril()
    mask = causal[None, None].repeat(BATCH, 1, 1, 1)  # [batch, 1, query, key]
    mask[1, :, :, :PAD] = False
    return query, key, value, sinks, mask


def _sink_softmax(query, key, value, sinks, mask):  # type: ignore[no-untyped-def]
    """The eager sink softmax written out: a sink logit per head joins each row's softmax and is
    dropped before the values are weighted. Returns ``(probs [b, h, q, k], out [b, q, h, d])``."""
    group = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = (query @ k.transpose(-1, -2)) * D_HEAD**-0.5
    logits = logits.masked_fill(~mask, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1].nan_to_num(0.0)
    return probs, (probs @ v).transpose(1, 2)


def _reads(view: AttentionView) -> dict[str, torch.Tensor]:
    return {
        "offsets": view.offsets(range(6)),
        "far offsets": view.offsets([7, 9]),
        "first token": view.at_keys(torch.tensor([0, PAD])),
        "entropy": view.entropy(),
        "last row": view.last_row(),
    }


def test_learned_sinks_on_the_fast_path_equal_the_dense_reads(tiny_loaded: ha.LoadedModel) -> None:
    info = tiny_loaded.info
    query, key, value, sinks, mask = _layer(info.n_heads, info.n_kv_heads)
    module = SimpleNamespace(layer_idx=0, is_causal=True)
    views: list[AttentionView] = []
    with capture(tiny_loaded, views.append) as session:
        out = session.attend_fast(module, query, key, value, mask, D_HEAD**-0.5, sinks)  # type: ignore[arg-type]
        session.observe(module, query, key, mask, D_HEAD**-0.5, sinks=sinks)  # type: ignore[arg-type]
    fast, dense = views
    assert isinstance(fast, LseView) and isinstance(dense, DenseView)
    probs, expected = _sink_softmax(query, key, value, sinks, mask)
    assert isinstance(out, torch.Tensor)
    real = mask[:, 0].any(-1)  # [batch, query]: rows with a key (padding queries have none)
    assert torch.allclose(out[real], expected[real], atol=1e-6)
    assert torch.allclose(dense.probs, probs, atol=1e-6)
    mass = probs.sum(-1)  # [batch, head, query]
    assert torch.allclose(mass[:, 0][real], torch.ones(1), atol=1e-6)  # a sink at -30 takes nothing
    assert float(mass[:, -1][real].mean()) < 0.8  # the sink at 3 takes a visible share
    for name, read in _reads(fast).items():
        assert torch.allclose(read, _reads(dense)[name], atol=1e-5), name


def test_indexer_keys_are_the_only_keys_allowed() -> None:
    """DSA hands the selected key positions to the attention function as ``indices``; the mask the
    backend builds from them allows those keys only, within the causal mask."""
    indices = torch.tensor([[[0, 0], [0, 1], [0, 2], [1, 3]]])  # [batch, query, top_k]
    allowed = with_selected_keys(None, indices, 4, additive=False)[0, 0]
    assert allowed.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [False, True, False, True],
    ]
    additive = with_selected_keys(None, indices, 4, additive=True)[0, 0]
    assert torch.equal(additive == 0, allowed)
    padded = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    padded[..., 0] = False
    assert not with_selected_keys(padded, indices, 4, additive=False)[0, 0, :, 0].any()


def test_the_implementation_of_every_sub_model_comes_back(tiny_loaded: ha.LoadedModel) -> None:
    """A sub-model with its own attention implementation keeps it after a capture (restoring the
    top-level name onto it broke VibeVoice, whose acoustic tokenizer refuses SDPA)."""
    loaded = ha.LoadedModel(copy.deepcopy(tiny_loaded.model), tiny_loaded.tokenizer, tiny_loaded.info)
    inner = loaded.model.model
    inner.config = copy.deepcopy(loaded.model.config)
    inner.config._attn_implementation_internal = "eager"
    top = loaded.model.config._attn_implementation
    with capture(loaded, lambda view: None):
        assert inner.config._attn_implementation != "eager"
    assert (loaded.model.config._attn_implementation, inner.config._attn_implementation) == (top, "eager")
    with pytest.raises(ValueError), attention_implementation(loaded.model, "no-such-backend"):
        pass
    assert inner.config._attn_implementation == "eager"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_oss", "granite_swa", "mimo_v2_flash"])
def test_sink_families_are_exact_on_the_fast_path(name: str) -> None:
    row = run_family(by_name([name])[0])
    capture_outcome = row.outcomes["capture"]
    assert capture_outcome.status == "ok" and capture_outcome.detail.startswith("fast"), capture_outcome
    assert all(o.status != "wrong" for o in row.outcomes.values()), row.outcomes


@pytest.mark.slow
def test_dsa_keys_reach_the_capture() -> None:
    """The tiny DeepSeek V3.2 keeps 4 keys per query; attending to every key (what the backend did
    before it read ``indices``) is off by ~1 in entropy."""
    loaded = load_tiny(by_name(["deepseek_v32"])[0])
    assert loaded.model.config.index_topk == 4
    row = run_family(by_name(["deepseek_v32"])[0])
    assert row.outcomes["capture"].status == "ok", row.outcomes["capture"]


@pytest.mark.slow
def test_block_sparse_minimax_m3_is_refused() -> None:
    loaded = load_tiny(by_name(["minimax_m3_vl_text"])[0])
    ids = loaded.tokenizer(["a b c d e f g"], return_tensors="pt")["input_ids"]
    with pytest.raises(HeadatlasError, match="block-sparse"):
        ha.attention_maps(loaded, ids)
