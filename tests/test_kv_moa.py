"""MoA span plans: one window per KV head (``kv fit --method moa``), the cache holding them, the
profile's gradient estimate, the knapsack, and old binary plans unchanged."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import headatlas as ha
from headatlas.apps import kv
from headatlas.apps.kv import moa
from headatlas.apps.kv.backends import moa as backend_moa
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, SAMPLE_TEXTS, left_padded_batch, make_tokenizer

N_NEW = 12


def _loaded() -> ha.LoadedModel:
    return ha.load(BUILDERS["llama"](0), tokenizer=make_tokenizer())


def _span_plan(info: ha.ModelInfo, spans: list[list[list[float] | None]], sink: int, context: int) -> kv.Plan:
    full = [[k for k, r in enumerate(row) if r is None] for row in spans]
    plan = kv.from_heads(info, full, sink=sink, recent=1, context=context)
    plan.spans = spans
    return plan


def _per_head_mask(info, windows, real, sink, full_rows):  # type: ignore[no-untyped-def]
    """Reference ``[batch, head, query, key]`` additive mask for one layer type: query head ``h`` of
    a streaming KV head with window ``w`` sees key ``j ≤ i`` iff ``j`` is real and one of the row's
    first ``sink`` real tokens or ``i - j < w``; rows below ``full_rows`` see every earlier key."""
    batch, seq = real.shape
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    causal = (j <= i)[None] & real[:, None, :]  # [batch, query, key]
    rank = real.long().cumsum(-1) - 1
    is_sink = real & (rank < sink)  # [batch, key]
    allowed = causal[:, None].expand(batch, info.n_heads, seq, seq).clone()
    for h in range(info.n_heads):
        w = windows[info.kv_head(h)]
        if w is not None:
            allowed[:, h] &= (i - j < w)[None] | is_sink[:, None, :] | (i < full_rows)[None]
    allowed |= ~allowed.any(-1, keepdim=True)
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("streaming_prefill", [False, True])
def test_each_kv_head_attends_over_sink_and_its_own_window(streaming_prefill: bool) -> None:
    """Per layer different windows (one elastic, one layer with a full head, one with two heads
    sharing a ring); every decoded step's logits equal an eager forward whose mask, built by hand
    per layer, restricts each head to the sink + its own last W tokens."""
    loaded = _loaded()
    info = loaded.info
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    sink, n = 2, ids.shape[1]
    spans = [[[3.0, 0.0], [6.0, 0.0]], [None, [2.0, 0.25]], [[4.0, 0.0], [4.0, 0.0]]]
    plan = _span_plan(info, spans, sink, n)
    windows = plan.windows(n)
    assert windows == [[3, 6], [None, 2 + round(0.25 * n)], [4, 4]]
    with kv.compressed(loaded, plan, streaming_prefill=streaming_prefill, length=n) as cache:
        out = loaded.model.generate(
            ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
            output_logits=True, return_dict_in_generate=True, **kv.cache_kwargs(loaded.model, cache),
        )  # fmt: skip
        slots = [layer.slots() for layer in cache.layers]
    assert slots == [[sink + w + 1 if w else 0 for w in row] for row in windows]
    real = torch.cat([mask.bool(), torch.ones(ids.shape[0], N_NEW, dtype=torch.bool)], 1)[:, :-1]
    full_rows = 0 if streaming_prefill else n
    masks = [_per_head_mask(info, row, real, sink, full_rows) for row in windows]
    captured: dict[int, torch.Tensor] = {}

    def eager_per_layer(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        from transformers.models.llama.modeling_llama import eager_attention_forward

        layer_mask = masks[module.layer_idx]
        captured[module.layer_idx] = layer_mask
        return eager_attention_forward(module, query, key, value, layer_mask, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register("test_moa_per_layer", eager_per_layer)
    loaded.model.set_attn_implementation("test_moa_per_layer")
    try:
        with torch.no_grad():
            ref = loaded.model(
                input_ids=out.sequences[:, :-1], position_ids=(real.long().cumsum(-1) - 1).clamp_min(0)
            ).logits  # [batch, seq, vocab]
    finally:
        loaded.model.set_attn_implementation("sdpa")
    assert sorted(captured) == [0, 1, 2]
    for step, logits in enumerate(out.logits):
        assert torch.allclose(logits, ref[:, n - 1 + step], atol=1e-4, rtol=0), step
    plain = loaded.model.generate(
        ids, attention_mask=mask, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert max((a - b).abs().max().item() for a, b in zip(plain.logits, out.logits, strict=True)) > 1e-3


def _profile(loaded: ha.LoadedModel) -> moa.MoaProfile:
    return moa.profile_heads(loaded, seq_len=64, n_prompts=2, sink=2, alphas=(4, 16, 48), betas=(0.0, 0.125))


@pytest.fixture(scope="module")
def profiled() -> tuple[ha.LoadedModel, moa.MoaProfile]:
    loaded = _loaded()
    return loaded, _profile(loaded)


@pytest.mark.parametrize(("fraction", "sensitivity"), [(0.5, "grad"), (0.3, "mass")])
def test_moa_plan_never_holds_more_bytes_than_its_budget(profiled, fraction: float, sensitivity: str) -> None:  # type: ignore[no-untyped-def]
    loaded, profile = profiled
    torch.manual_seed(0)
    n = 120
    ids = torch.randint(3, loaded.tokenizer.vocab_size, (1, n))
    if True:
        plan = moa.profiled_plan(loaded.info, profile, fraction, n, sensitivity)
        assert plan.kv_bytes["fraction"] <= fraction
        windows = [w for row in plan.windows(n) for w in row]
        assert any(w is not None for w in windows) and len(set(windows)) > 1  # really per-head spans
        plain = DynamicCache(config=loaded.model.config)
        with kv.compressed(loaded, plan, length=n) as cache, torch.no_grad():
            out = loaded.model(input_ids=ids, **kv.cache_kwargs(loaded.model, cache))
            loaded.model.set_attn_implementation("sdpa")
            loaded.model(input_ids=ids, **kv.cache_kwargs(loaded.model, plain))
            loaded.model.set_attn_implementation(kv.backends.headwise.NAME)
            for step in range(N_NEW + 1):
                full = sum(layer.keys.nbytes + layer.values.nbytes for layer in plain.layers)
                assert cache.nbytes() <= fraction * full, (sensitivity, step)
                token = out.logits[:, -1:].argmax(-1)  # [1, 1]
                out = loaded.model(input_ids=token, **kv.cache_kwargs(loaded.model, cache))
                loaded.model.set_attn_implementation("sdpa")
                loaded.model(input_ids=token, **kv.cache_kwargs(loaded.model, plain))
                loaded.model.set_attn_implementation(kv.backends.headwise.NAME)
    with pytest.raises(HeadatlasError, match="below what the shortest rules keep"):
        moa.profiled_plan(loaded.info, profile, 0.01, n)


def test_profile_gradient_is_the_loss_change_of_a_relaxed_mask() -> None:
    """MoA's estimate, summed over layers and heads, equals the finite-difference loss change when
    every layer's attention entries outside a rule are scaled by ``1 - eps`` (an additive
    ``log(1 - eps)`` in an eager mask), divided by ``eps``."""
    loaded = _loaded()
    model = loaded.model.double()  # float64: the loss changes measured are ~1e-7 of the loss
    torch.manual_seed(1)
    ids = torch.randint(3, loaded.tokenizer.vocab_size, (1, 40))
    target = ids[0, 21:]  # [19] next tokens of the last 19 positions
    rule_windows, sink = [3, 9], 2

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[0, 20:-1], target)

    backend_moa.register()
    model.set_attn_implementation(backend_moa.NAME)
    profile = backend_moa.Profile(rule_windows, sink, slice(20, 39))
    token = backend_moa.ACTIVE_PROFILE.set(profile)
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss_of(model(inputs_embeds=embeds).logits).backward()
    finally:
        backend_moa.ACTIVE_PROFILE.reset(token)
    estimate = sum(g for g in profile.grad.values()).sum(0)  # [rule]
    model.set_attn_implementation("eager")
    eps = 1e-2  # central differences: O(eps²); smaller eps meets the float32 parts of the forward
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]

    def scaled(w: int, factor: float) -> torch.Tensor:
        dropped = (j <= i) & (j >= sink) & (i - j >= w)
        additive = torch.zeros(40, 40, dtype=torch.float64).masked_fill(j > i, torch.finfo(torch.float64).min)
        return loss_of(
            model(
                input_ids=ids, attention_mask=additive.masked_fill(dropped, np.log(factor))[None, None]
            ).logits
        )

    with torch.no_grad():
        for r, w in enumerate(rule_windows):
            change = (scaled(w, 1 - eps) - scaled(w, 1 + eps)) / (2 * eps)  # m: 1 → 0 direction
            assert abs(change.item() - estimate[r].item()) <= 2e-3 * abs(change.item()), r
    model.set_attn_implementation("sdpa")
    assert estimate.abs().min() > 1e-4  # not a trivial zero


def test_knapsack_is_exact_on_small_instances() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        costs = rng.normal(size=(4, 3))
        weights = rng.integers(1, 6, size=(4, 3))
        capacity = int(rng.integers(4, 16))
        chosen = moa.solve(costs, weights, capacity)
        fits = [
            c
            for c in itertools.product(range(3), repeat=4)
            if sum(weights[k, v] for k, v in enumerate(c)) <= capacity
        ]
        if not fits:
            assert (chosen < 0).all()
            continue
        best = min(sum(costs[k, v] for k, v in enumerate(c)) for c in fits)
        assert sum(weights[k, v] for k, v in enumerate(chosen)) <= capacity
        assert np.isclose(sum(costs[k, v] for k, v in enumerate(chosen)), best)


def test_binary_plans_are_unchanged_and_span_plans_round_trip(tmp_path, profiled) -> None:  # type: ignore[no-untyped-def]
    loaded, profile = profiled
    info = loaded.info
    binary = kv.from_heads(info, [[0], [], [1]], sink=2, recent=5)
    path = binary.save(tmp_path / "binary.json")
    data = json.loads(path.read_text())
    assert "spans" not in data  # a binary plan's file has the fields it always had
    back = kv.Plan.load(path)
    assert back == binary and back.spans == []
    assert back.windows(1000) == [[None, 5], [5, 5], [5, None]]
    cache = kv.build_cache(loaded, back)
    assert all(type(layer) is kv.HeadwiseLayer for layer in cache.layers)
    span = moa.profiled_plan(info, profile, 0.5, 100)
    again = kv.Plan.load(span.save(tmp_path / "moa.json"))
    assert again.spans == span.spans and again.windows(300) == span.windows(300)
    assert all(type(layer) is kv.SpanLayer for layer in kv.build_cache(loaded, again).layers)
    solved = moa.replan(info, again, 0.5, 100)
    assert solved.spans == span.spans
    assert moa.replan(info, again, 0.5, 400).kv_bytes["fraction"] <= 0.5
    with pytest.raises(HeadatlasError, match="no DuoAttention pattern"):
        kv.export(again, "duo", tmp_path / "duo")
    with pytest.raises(HeadatlasError, match="has no MoA profile"):
        moa.replan(info, back, 0.5, 100)
    bad = json.loads((tmp_path / "moa.json").read_text())
    bad["spans"][0] = bad["spans"][0][:1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(HeadatlasError, match="field 'spans'"):
        kv.Plan.load(tmp_path / "bad.json")


def test_the_command_line_writes_a_span_plan(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from headatlas.cli import app

    out = tmp_path / "moa.json"
    args = ["kv", "fit", str(tiny_model_dir), "--method", "moa", "--seq-len", "64", "--n-prompts", "1"]
    args += ["--keep-fraction", "0.5", "--context", "512", "--alphas", "4,16", "--out", str(out)]
    refused = CliRunner().invoke(app, [*args, "--betas", "0,1.5"])
    assert refused.exit_code == 2 and "--betas in [0, 1)" in refused.output and not out.exists()
    assert CliRunner().invoke(app, [*args, "--method", "mixture"]).exit_code == 2
    result = CliRunner().invoke(app, [*args, "--betas", "0,0.25", "--sensitivity", "mass"])
    assert result.exit_code == 0, result.output
    assert "1 prompts × " in result.output and "KV heads full" in result.output
    plan = ha.kv.Plan.load(out)
    assert plan.rule["moa"]["sensitivity"] == "mass" and plan.kv_bytes["fraction"] <= 0.5
    assert len(plan.rule["moa"]["rules"]) == 4 and len(plan.spans) == plan.model["n_layers"]
