"""Checks on the in-code test fixtures of :mod:`tiny_models` (tokenizer, models, batches)."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tiny_models import (
    BUILDERS,
    GEMMA3_LAYER_TYPES,
    GEMMA3_SLIDING_WINDOW,
    SAMPLE_TEXTS,
    SPECIAL_TOKENS,
    eager_attentions,
    left_padded_batch,
    make_tokenizer,
)

CAUSAL = ("llama", "gpt2", "gemma3", "qwen2")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    """The shared tokenizer."""
    return make_tokenizer()


@pytest.fixture(scope="module")
def batch(tok: PreTrainedTokenizerFast) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of :data:`SAMPLE_TEXTS` with ``<bos>``."""
    return left_padded_batch(tok, list(SAMPLE_TEXTS))


def _n_heads(model: PreTrainedModel) -> int:
    """Number of query heads in ``model``'s config."""
    return int(model.config.num_attention_heads)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_special_ids_and_cache(tok: PreTrainedTokenizerFast) -> None:
    assert make_tokenizer() is tok
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert tok.padding_side == "left"
    assert 350 <= len(tok) <= 450


def test_tokenizer_is_deterministic(tok: PreTrainedTokenizerFast) -> None:
    fresh = make_tokenizer.__wrapped__()  # bypass the cache: train again
    assert fresh is not tok
    assert fresh.get_vocab() == tok.get_vocab()
    text = " ".join(SAMPLE_TEXTS)
    assert fresh(text)["input_ids"] == tok(text)["input_ids"]


def test_tokenizer_word_ids_and_offsets(tok: PreTrainedTokenizerFast) -> None:
    text = SAMPLE_TEXTS[-1]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    word_ids = enc.word_ids()
    assert len(word_ids) == len(enc["input_ids"])
    assert all(w is not None for w in word_ids)
    counts: dict[int, int] = {}
    for w in word_ids:
        counts[w] = counts.get(w, 0) + 1
    assert max(counts.values()) > 1, "some rare word should split into several tokens"
    assert min(counts.values()) == 1, "some common word should be a single token"
    assert len(counts) == len(text.split()) + 1  # words, plus the final "." as its own word
    for (start, end), token_id in zip(enc["offset_mapping"], enc["input_ids"], strict=True):
        assert str(tok.decode([token_id])).strip() == text[start:end].strip()
    assert tok.decode(enc["input_ids"]) == text


def test_left_padded_batch(tok: PreTrainedTokenizerFast, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    assert ids.shape == mask.shape and ids.dtype == mask.dtype == torch.long
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(SAMPLE_TEXTS), "texts should have clearly different lengths"
    assert max(lengths) == ids.shape[1] > GEMMA3_SLIDING_WINDOW + 2
    for row, n in zip(range(ids.shape[0]), lengths, strict=True):
        pad = ids.shape[1] - n
        assert mask[row, :pad].sum() == 0 and mask[row, pad:].all()
        assert (ids[row, :pad] == tok.pad_token_id).all()
        assert ids[row, pad] == tok.bos_token_id
    no_bos, no_bos_mask = left_padded_batch(tok, list(SAMPLE_TEXTS), add_bos=False)
    assert no_bos.shape[1] == ids.shape[1] - 1
    assert (no_bos_mask.sum(1) == mask.sum(1) - 1).all()


# --- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_basics(name: str, tok: PreTrainedTokenizerFast) -> None:
    model = BUILDERS[name](0)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    embeddings = model.get_input_embeddings()
    assert isinstance(embeddings, torch.nn.Embedding)
    assert embeddings.num_embeddings == model.config.vocab_size == len(tok)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_forward_sdpa_and_eager(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    model = BUILDERS[name](0)
    logits = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
        assert logits[impl].shape == (*ids.shape, model.config.vocab_size)
        assert torch.isfinite(logits[impl]).all()
    valid = mask.bool()  # padding positions differ between implementations (fully masked rows)
    torch.testing.assert_close(logits["sdpa"][valid], logits["eager"][valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_eager_attentions(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    model = BUILDERS[name](0)
    attns = eager_attentions(model, ids, mask)
    assert model.config._attn_implementation == "sdpa", "previous implementation is restored"
    assert len(attns) == model.config.num_hidden_layers
    b, t = ids.shape
    valid = mask.bool()
    upper = torch.ones(t, t, dtype=torch.bool).triu(1)
    for attn in attns:
        assert attn.shape == (b, _n_heads(model), t, t)
        assert torch.isfinite(attn).all()
        rows = attn.permute(0, 2, 1, 3)[valid]  # [valid query, head, key]
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-5, rtol=0)
        # Valid queries never look at padding keys.
        pad_keys = (~valid)[:, None, None, :].expand_as(attn) & valid[:, None, :, None]
        assert attn[pad_keys].abs().max() == 0
        above = attn[:, :, upper][valid[:, None, :, None].expand_as(attn)[:, :, upper]]
        if name in CAUSAL:
            assert above.abs().max() == 0, "decoder attention must be causal"
        else:
            assert above.sum() > 0.1 * b, "encoder attention must put mass above the diagonal"
        # Sharpened: late queries are far from uniform (uniform max would be about 1/t).
        late = attn[-1, :, t // 2 :, :]
        assert late.max(-1).values.mean() > 5.0 / t


def test_gemma3_sliding_window(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``sliding_window_overlay``: query ``i`` sees key ``j`` iff ``i - W < j <= i`` (``W`` keys)."""
    ids, mask = batch
    model = BUILDERS["gemma3"](0)
    assert model.config.sliding_window == GEMMA3_SLIDING_WINDOW
    assert list(model.config.layer_types) == list(GEMMA3_LAYER_TYPES)
    w, t = GEMMA3_SLIDING_WINDOW, ids.shape[1]
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    outside = j <= i - w
    edge = j == i - w + 1
    full_row = int(mask.sum(1).argmax())  # the unpadded row
    attns = eager_attentions(model, ids, mask)
    for layer, (kind, attn) in enumerate(zip(GEMMA3_LAYER_TYPES, attns, strict=True)):
        if kind == "sliding_attention":
            # Padding queries are fully masked, so eager spreads them uniformly: check valid ones.
            leak = attn * (outside[None, None] & mask.bool()[:, None, :, None])
            assert leak.abs().max() == 0, f"layer {layer} leaks past the window"
            assert (attn[full_row][:, edge] > 0).all(), f"layer {layer} must see key i - W + 1"
        else:
            assert attn[full_row][:, outside].sum() > 0, f"layer {layer} is global"


@pytest.mark.parametrize("name", list(BUILDERS))
def test_seeded_determinism(name: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    ids, mask = batch
    a, b, c = BUILDERS[name](0), BUILDERS[name](0), BUILDERS[name](1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits
        lb = b(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(la, lb)
