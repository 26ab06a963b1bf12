"""Head-wise KV caches: plans from an atlas, a cache that really holds less, its attention backend."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import headatlas as ha
from headatlas.apps import kv
from headatlas.atlas.table import Atlas
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, GEMMA3_SLIDING_WINDOW, SAMPLE_TEXTS, left_padded_batch, make_tokenizer

N_NEW = 20


def _loaded(name: str) -> ha.LoadedModel:
    return ha.load(BUILDERS[name](0), tokenizer=make_tokenizer())


def _generate(model, ids, mask, cache):  # type: ignore[no-untyped-def]
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=N_NEW,
        min_new_tokens=N_NEW,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kv.cache_kwargs(model, cache),
    )


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_all_full_plan_equals_plain_cache(name: str) -> None:
    loaded = _loaded(name)
    tok = loaded.tokenizer
    ids, mask = left_padded_batch(tok, list(SAMPLE_TEXTS))
    ref = _generate(loaded.model, ids, mask, DynamicCache(config=loaded.model.config))
    with kv.compressed(loaded, kv.all_full(loaded.info)) as cache:
        out = _generate(loaded.model, ids, mask, cache)
        held = cache.nbytes()
    assert len(out.logits) == N_NEW
    for a, b in zip(ref.logits, out.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.equal(ref.sequences, out.sequences)
    plain = DynamicCache(config=loaded.model.config)
    with torch.no_grad():
        loaded.model(
            input_ids=out.sequences[:, :-1],
            attention_mask=torch.ones_like(out.sequences[:, :-1]),
            **kv.cache_kwargs(loaded.model, plain),
        )
    assert held == sum(layer.keys.nbytes + layer.values.nbytes for layer in plain.layers) + sum(
        layer.nbytes() - layer.keys.nbytes - layer.values.nbytes
        for layer in cache.layers
        if isinstance(layer, kv.HeadwiseLayer)
    )
    assert loaded.model.config._attn_implementation != "headatlas_kv"  # restored on exit


def _window_mask(n_heads, stream_heads, real, sink, recent, full_rows):  # type: ignore[no-untyped-def]
    """Reference ``[batch, head, query, key]`` additive mask: a streaming head's query ``i`` sees key
    ``j`` iff ``j <= i``, ``j`` is real, and ``j`` is one of the row's first ``sink`` real tokens or
    ``i - j < recent``; query rows below ``full_rows`` (a prompt compressed afterwards) see all."""
    batch, seq = real.shape
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    causal = (j <= i)[None] & real[:, None, :]  # [batch, query, key]
    rank = real.long().cumsum(-1) - 1  # [batch, key] index among real tokens
    is_sink = real & (rank < sink)
    window = (i - j < recent)[None] | is_sink[:, None, :] | (i < full_rows)[None]
    allowed = causal[:, None].expand(batch, n_heads, seq, seq).clone()
    for h in stream_heads:
        allowed[:, h] &= window
    allowed |= ~allowed.any(-1, keepdim=True)  # padding rows: anything finite
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _assert_decode_equals_eager(loaded, out, prompt_len, real, attention_mask):  # type: ignore[no-untyped-def]
    """Every decoded step's logits equal an eager forward of the whole sequence under the
    reference ``attention_mask`` (a 4-D additive mask, or a dict of them per layer type)."""
    loaded.model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = loaded.model(
            input_ids=out.sequences[:, :-1],
            attention_mask=attention_mask,
            position_ids=(real.long().cumsum(-1) - 1).clamp_min(0),
        ).logits  # [batch, seq, vocab]
    loaded.model.set_attn_implementation("sdpa")
    for step, logits in enumerate(out.logits):
        assert torch.allclose(logits, ref[:, prompt_len - 1 + step], atol=1e-4, rtol=0), step


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("streaming_prefill", [False, True])
def test_streaming_head_equals_eager_over_sink_and_window(name: str, streaming_prefill: bool) -> None:
    loaded = _loaded(name)
    info = loaded.info
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    sink, recent = 2, 5
    kv_plan = kv.from_heads(info, [[0]] * info.n_layers, sink=sink, recent=recent)  # KV head 1 streams
    with kv.compressed(loaded, kv_plan, streaming_prefill=streaming_prefill) as cache:
        out = _generate(loaded.model, ids, mask, cache)
        lengths = cache.streaming_lengths()
    seqs = out.sequences  # [batch, prompt + new]
    real = torch.cat([mask.bool(), torch.ones(seqs.shape[0], N_NEW, dtype=torch.bool)], 1)[:, :-1]
    stream_q = [h for h in range(info.n_heads) if info.kv_head(h) == 1]
    full_rows = 0 if streaming_prefill else ids.shape[1]
    ref_mask = _window_mask(info.n_heads, stream_q, real, sink, recent, full_rows)
    _assert_decode_equals_eager(loaded, out, ids.shape[1], real, ref_mask)
    assert set(lengths) == {sink + recent + 1}
    # a full-attention run differs, so the window was really applied
    full = _generate(loaded.model, ids, mask, DynamicCache(config=loaded.model.config))
    assert max((a - b).abs().max().item() for a, b in zip(full.logits, out.logits, strict=True)) > 1e-3


@pytest.mark.parametrize("streaming_prefill", [False, True])
def test_gemma3_streaming_global_layer_equals_eager_with_its_own_sliding_layers(
    streaming_prefill: bool,
) -> None:
    """Gemma 3: the global layer's only KV head streams, the sliding layers keep their window; the
    logits equal an eager forward given both masks by hand (transformers takes a dict of masks per
    layer type): the global layer sink + window, the sliding layers causal within the window."""
    loaded = _loaded("gemma3")
    info = loaded.info
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    sink, recent = 2, 5
    types = kv.layer_types(loaded.model)
    heads = [list(range(info.n_kv_heads)) if t == "sliding" else [] for t in types]
    kv_plan = kv.from_heads(info, heads, sink=sink, recent=recent, layer_types=types)
    with kv.compressed(loaded, kv_plan, streaming_prefill=streaming_prefill) as cache:
        out = _generate(loaded.model, ids, mask, cache)
    seqs = out.sequences
    real = torch.cat([mask.bool(), torch.ones(seqs.shape[0], N_NEW, dtype=torch.bool)], 1)[:, :-1]
    full_rows = 0 if streaming_prefill else ids.shape[1]
    global_mask = _window_mask(info.n_heads, range(info.n_heads), real, sink, recent, full_rows)
    seq = real.shape[1]
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    local = ((j <= i) & (i - j < GEMMA3_SLIDING_WINDOW))[None] & real[:, None, :]  # [batch, query, key]
    local |= ~local.any(-1, keepdim=True)
    local_mask = torch.zeros(local.shape).masked_fill(~local, torch.finfo(torch.float32).min)[:, None]
    masks = {"full_attention": global_mask, "sliding_attention": local_mask}
    _assert_decode_equals_eager(loaded, out, ids.shape[1], real, masks)
    full = _generate(loaded.model, ids, mask, DynamicCache(config=loaded.model.config))
    assert max((a - b).abs().max().item() for a, b in zip(full.logits, out.logits, strict=True)) > 1e-3


def test_long_decode_never_grows_streaming_heads_and_bytes_follow_the_plan() -> None:
    loaded = _loaded("llama")
    info = loaded.info
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    sink, recent, steps = 2, 6, 60
    sizes = {}
    for label, heads in (
        ("all", [[0, 1]] * info.n_layers),
        ("one", [[0]] * info.n_layers),
        ("none", [[]] * 3),
    ):
        kv_plan = kv.from_heads(info, heads, sink=sink, recent=recent, compensate=True)
        seq_mask = mask
        with kv.compressed(loaded, kv_plan) as cache, torch.no_grad():
            pos = (seq_mask.cumsum(-1) - 1).clamp_min(0)
            out = loaded.model(
                input_ids=ids,
                attention_mask=seq_mask,
                position_ids=pos,
                **kv.cache_kwargs(loaded.model, cache),
            )
            streaming_bytes = set()
            for _ in range(steps):
                token = out.logits[:, -1:].argmax(-1)  # [batch, 1]
                seq_mask = torch.cat([seq_mask, torch.ones_like(token)], 1)
                pos = seq_mask.sum(-1, keepdim=True) - 1
                out = loaded.model(
                    input_ids=token,
                    attention_mask=seq_mask,
                    position_ids=pos,
                    **kv.cache_kwargs(loaded.model, cache),
                )
                for layer in cache.layers:
                    held = (layer.s_pos >= 0).sum(1) + (layer.comp_n > 0).long()  # [batch]
                    assert int(held.max()) <= sink + recent + 1
                    assert layer.keys.shape[-2] == cache.get_seq_length()
                streaming_bytes.add(
                    sum(layer.s_keys.nbytes + layer.s_values.nbytes for layer in cache.layers)
                )
            assert len(streaming_bytes) == 1  # constant while decoding
            held_tensors = [
                (layer.keys, layer.values, layer.s_keys, layer.s_values, layer.s_pos, layer.comp_n)
                for layer in cache.layers
            ]
            assert cache.nbytes() == sum(
                t.numel() * t.element_size() for group in held_tensors for t in group
            )
            assert cache.nbytes(per_layer=True) == [sum(t.nbytes for t in group) for group in held_tensors]
            sizes[label] = cache.nbytes()
    assert sizes["all"] > sizes["one"] > sizes["none"]
    tokens = ids.shape[1] + steps
    per_kv_head = (
        ids.shape[0] * info.head_dim * 4 * 2 * info.n_layers
    )  # keys + values, float32, one head per layer
    stream_slots = ids.shape[0] * (sink + recent + 1) * info.head_dim * 4 * 2 * info.n_layers
    assert sizes["all"] - sizes["one"] == per_kv_head * tokens - stream_slots
    assert sizes["one"] - sizes["none"] == per_kv_head * tokens - stream_slots


def test_compensation_token_is_the_mean_of_dropped_tokens() -> None:
    layer = kv.HeadwiseLayer(0, n_kv_heads=1, group_size=1, full_heads=[], sink=1, recent=2, compensate=True)
    torch.manual_seed(0)
    keys = torch.randn(1, 1, 7, 3)  # [batch, kv_head, key, d_head]
    values = torch.randn(1, 1, 7, 3)
    real = torch.ones(1, 4, dtype=torch.bool)
    layer.update(keys[:, :, :4], values[:, :, :4])
    layer.streaming_keys(real)
    layer.commit(real)
    for t in range(4, 7):
        layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
        layer.streaming_keys(real[:, :1])
        layer.commit(real[:, :1])
    # kept: sink token 0, ring tokens 5, 6; dropped: 1..4
    assert torch.allclose(layer.s_keys[0, 0, -1], keys[0, 0, 1:5].mean(0), atol=1e-6)
    assert torch.allclose(layer.s_values[0, 0, -1], values[0, 0, 1:5].mean(0), atol=1e-6)
    assert sorted(layer.s_pos[0].tolist()) == [0, 5, 6]
    assert layer.comp_n.tolist() == [4.0]


def _atlas(info: ha.ModelInfo, retrieval: np.ndarray) -> Atlas:
    """An atlas of ``info``'s model recorded with a 4096-token context (plans are made at 2048)."""
    atlas = Atlas.minimal(dataclasses.replace(info, context_length=4096))
    atlas.set_matrix("retrieval", retrieval)
    return atlas


def test_plan_from_atlas_ranks_kv_groups_by_their_best_query_head(tmp_path) -> None:  # type: ignore[no-untyped-def]
    info = _loaded("llama").info  # 3 layers × 4 heads, 2 KV heads
    retrieval = np.zeros((3, 4))
    retrieval[1, 3] = 0.9  # KV head 1 of layer 1
    retrieval[2, 0] = 0.5  # KV head 0 of layer 2
    retrieval[0, 1] = 0.1
    atlas = _atlas(info, retrieval)
    context, sink, recent = 1000, 4, 95  # 100 slots per streaming head
    p = kv.plan(atlas, keep_fraction=0.42, by="retrieval", sink=sink, recent=recent, context=context)
    # 6 KV heads; all streaming = 600 of 6000 slots; each promotion adds 900: 0.42 → 2 promoted
    assert p.full_heads == [[], [1], [0]]
    assert p.kv_bytes["fraction"] == pytest.approx((600 + 2 * 900) / 6000)
    assert p.kv_bytes["fraction"] <= 0.42
    assert (
        kv.plan(atlas, budget=420, by="retrieval", sink=sink, recent=recent, context=context).full_heads
        == p.full_heads
    )
    path = p.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["format"] == "headatlas-kv-plan"
    again = kv.Plan.load(path)
    assert again.full_heads == p.full_heads and again.rule["by"] == ["retrieval"]
    scores, _ = kv.kv_scores(atlas, "retrieval")
    assert scores[1, 1] == pytest.approx(1.0) and scores[2, 0] == pytest.approx(0.5 / 0.9)


def test_plan_bad_input_is_refused_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = _loaded("llama")
    atlas = _atlas(loaded.info, np.zeros((3, 4)))
    cases = {
        "keep_fraction must be in (0, 1]": {"keep_fraction": 1.5},
        "keep_fraction must be in (0, 1], got 0": {"keep_fraction": 0.0},
        "not smaller than the context": {"keep_fraction": 0.5, "recent": 4000, "context": 2048},
        "scan with --probes repeat --add": {"keep_fraction": 0.5, "by": "induction"},
        "below what streaming every head keeps": {"keep_fraction": 0.01, "context": 512},
        "give one of": {},
        "^budget must be at least 1, got 0": {"budget": 0},
        "^context 100,000,000 is beyond": {"keep_fraction": 0.5, "context": 10**8},
        "^sink must be at least 0": {"keep_fraction": 0.5, "sink": -3},
    }
    for message, options in cases.items():
        with pytest.raises(
            HeadatlasError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
        ) as err:
            kv.plan(atlas, **{"by": "retrieval", **options})
        assert "\n" not in str(err.value)
    other = ha.load(BUILDERS["llama"](1), tokenizer=make_tokenizer())
    p = kv.all_full(loaded.info)
    p.model["sha256"] = "0" * 64
    with pytest.raises(HeadatlasError, match="another model"):
        kv.build_cache(other, p)
    qwen = _loaded("qwen2")
    with pytest.raises(HeadatlasError, match="make a plan from this model"):
        kv.build_cache(qwen, kv.all_full(loaded.info))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(HeadatlasError, match="not a headatlas KV plan"):
        kv.Plan.load(tmp_path / "bad.json")
    assert not (tmp_path / "plan.json").exists()


def test_model_whose_cache_cannot_be_replaced_falls_back_only_when_asked() -> None:
    bert = ha.load(BUILDERS["bert"](0), tokenizer=make_tokenizer())
    with pytest.raises(HeadatlasError, match="not a causal decoder"), kv.compressed(bert, None):
        pass
    loaded = _loaded("llama")
    loaded.model._supports_attention_backend = False
    try:
        with pytest.raises(HeadatlasError, match="cannot be replaced"), kv.compressed(loaded, None):
            pass
        with kv.compressed(loaded, None, fallback=True) as cache:
            assert all(not isinstance(layer, kv.HeadwiseLayer) for layer in cache.layers)
    finally:
        loaded.model._supports_attention_backend = True


def test_compressing_a_prefilled_plain_cache_equals_full_then_compress() -> None:
    loaded = _loaded("qwen2")
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    kv_plan = kv.from_heads(loaded.info, [[1], [0]], sink=2, recent=4, compensate=True)
    with kv.compressed(loaded, kv_plan) as cache:
        kv.prefill(loaded, cache, ids, mask)
        direct = _generate(loaded.model, ids, mask, cache)
    plain = DynamicCache(config=loaded.model.config)
    kv.prefill(loaded, plain, ids, mask)
    with kv.compressed(loaded, kv_plan, source=plain, attention_mask=mask[:, :-1]) as cache:
        assert cache.get_seq_length() == ids.shape[1] - 1
        filled = _generate(loaded.model, ids, mask, cache)
    for a, b in zip(direct.logits, filled.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.equal(direct.sequences, filled.sequences)


def test_a_plan_streaming_a_sliding_layer_is_refused() -> None:
    """A Gemma 3 plan made without the model's layer types would stream heads of its own sliding
    layers, which the cache leaves as they are: it is refused instead of silently holding more."""
    loaded = _loaded("gemma3")
    types = kv.layer_types(loaded.model)
    sliding = types.index("sliding")
    heads = [list(range(loaded.info.n_kv_heads)) for _ in types]
    heads[sliding] = []
    blind = kv.from_heads(loaded.info, heads, sink=2, recent=4)
    with pytest.raises(HeadatlasError, match=f"streams heads of layer {sliding}, a sliding-window layer"):
        kv.build_cache(loaded, blind)
    aware = kv.from_heads(loaded.info, heads, sink=2, recent=4, layer_types=types)
    aware.full_heads[sliding] = list(range(loaded.info.n_kv_heads))  # what kv.plan does with the types
    assert len(kv.build_cache(loaded, aware).layers) == len(types)


def test_prefill_returns_the_last_positions_logits_only() -> None:
    """``kv.prefill`` runs the LM head on the last prefilled position only (all of them would be
    ``[batch, seq, vocab]``: 4 GiB for Gemma 3 at 4096 tokens), and they equal the plain forward's."""
    loaded = _loaded("llama")
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    cache = DynamicCache(config=loaded.model.config)
    logits = kv.prefill(loaded, cache, ids, mask, chunk=3)
    assert logits.shape == (ids.shape[0], 1, loaded.model.config.vocab_size)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = loaded.model(
            input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1]
        ).logits
    assert torch.allclose(logits[:, 0], ref[:, -1], atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1] - 1
