"""Capture must reproduce eager attention exactly and leave model outputs unchanged."""

from __future__ import annotations

import pytest
import torch

import headatlas as ha
from headatlas.capture import capture, session
from tiny_models import BUILDERS, SAMPLE_TEXTS, eager_attentions, left_padded_batch, make_tokenizer

ARCHS = sorted(BUILDERS)


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request: pytest.FixtureRequest) -> ha.LoadedModel:
    return ha.load(BUILDERS[request.param](0), tokenizer=make_tokenizer())


def _batch(loaded: ha.LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS), add_bos=loaded.info.causal)


def test_batch_is_left_padded(loaded: ha.LoadedModel) -> None:
    _, mask = _batch(loaded)
    assert (mask[:, 0] == 0).any(), "the test batch must contain left padding"
    assert (mask[:, -1] == 1).all()


def test_probabilities_equal_eager_on_left_padded_batch(loaded: ha.LoadedModel) -> None:
    ids, mask = _batch(loaded)
    reference = eager_attentions(loaded.model, ids, mask)
    maps = ha.attention_maps(loaded, ids, mask)
    assert sorted(maps) == list(range(loaded.info.n_layers))
    valid = mask.bool()[:, None, :, None]  # [batch, 1, query, 1]
    for layer, probs in maps.items():
        assert probs.shape == reference[layer].shape
        err = ((probs - reference[layer]).abs() * valid).max().item()
        assert err <= 1e-5, f"layer {layer}: max |capture - eager| = {err}"
        rows = probs.sum(-1)[mask.bool()[:, None, :].expand_as(probs[..., 0])]
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
        assert (probs[..., : mask.shape[1]] * (1 - mask[:, None, None, :])).abs().max() == 0, "pad keys get 0"


def test_logits_unchanged_versus_sdpa(loaded: ha.LoadedModel) -> None:
    ids, mask = _batch(loaded)
    model = loaded.model
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, **session.padded_positions(model, mask)).logits
    with capture(loaded, lambda block: None) as run:
        captured = run.run(ids, mask)
    valid = mask.bool()
    assert torch.equal(plain[valid], captured[valid])
    assert model.config._attn_implementation == "sdpa", "capture restores the backend"


def test_blocks_stream_one_layer_at_a_time(loaded: ha.LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, mask = _batch(loaded)
    full = ha.attention_maps(loaded, ids, mask)
    monkeypatch.setattr("headatlas.capture.probs.MAX_BLOCK_ELEMENTS", 64)  # force several row blocks
    blocks: list[tuple[int, int]] = []
    with capture(loaded, lambda v: blocks.append((v.layer, int(v.q_index[0]))), mode="dense") as run:
        run.run(ids, mask)
    layers = [b[0] for b in blocks]
    assert layers == sorted(layers), "layers arrive in order, each fully before the next"
    assert len(blocks) > loaded.info.n_layers
    chunked = ha.attention_maps(loaded, ids, mask)
    for layer in full:
        assert torch.allclose(full[layer], chunked[layer], atol=1e-6)


def test_eager_fallback_matches(loaded: ha.LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    ids, mask = _batch(loaded)
    fast = ha.attention_maps(loaded, ids, mask)
    monkeypatch.setattr(session, "supports_backend", lambda _loaded: False)
    slow = ha.attention_maps(loaded, ids, mask)
    valid = mask.bool()[:, None, :, None]
    for layer in fast:
        assert ((fast[layer] - slow[layer]).abs() * valid).max() <= 1e-5


def test_gemma3_sliding_window_is_respected() -> None:
    loaded = ha.load(BUILDERS["gemma3"](0), tokenizer=make_tokenizer())
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    window = loaded.info.sliding_window
    assert window is not None and window < ids.shape[1]
    maps = ha.attention_maps(loaded, ids, mask)
    types = loaded.model.config.layer_types
    q = torch.arange(ids.shape[1])[:, None]
    k = torch.arange(ids.shape[1])[None, :]
    outside = k <= q - window  # [query, key]
    for layer, kind in enumerate(types):
        mass = maps[layer][..., outside].abs().sum().item()
        if kind == "sliding_attention":
            assert mass == 0
        else:
            assert mass > 0


def test_padded_row_equals_the_sequence_alone(loaded: ha.LoadedModel) -> None:
    """Left padding must not shift positions: BERT and GPT-2 add absolute position embeddings, so a
    short text in a padded batch must get exactly the attention it gets alone."""
    ids, mask = _batch(loaded)
    short = int(mask.sum(-1).argmin())
    n = int(mask[short].sum())
    padded = ha.attention_maps(loaded, ids, mask)
    alone = ha.attention_maps(loaded, ids[short : short + 1, -n:], mask[short : short + 1, -n:])
    for layer in padded:
        err = (padded[layer][short, :, -n:, -n:] - alone[layer][0]).abs().max().item()
        assert err <= 1e-5, f"layer {layer}: padded vs alone differ by {err}"
