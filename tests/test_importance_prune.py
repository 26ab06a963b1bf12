"""Head importance, redundancy and physical head pruning (issue 7), on tiny seeded models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from conftest import requires_default_model
from headatlas.apps.common.evaluation import EvalData, count_params, perplexity
from headatlas.apps.prune.importance import (
    ablation_importance,
    gradient_importance,
    michel_normalise,
    write_importance,
)
from headatlas.apps.prune.pruning import check_fraction, prune_model, save_pruned, select
from headatlas.apps.prune.redundancy import measure
from headatlas.atlas.table import open_atlas
from headatlas.batteries.base import ProbeSequence, make_batch
from headatlas.capture import output_projections
from headatlas.cli import app
from headatlas.core.heads import parse_heads
from headatlas.model.surgery import plan_layouts
from tiny_models import BUILDERS, CORPUS, SAMPLE_TEXTS, left_padded_batch, make_tokenizer

runner = CliRunner()


def _loaded(arch: str = "llama") -> ha.LoadedModel:
    return ha.load(BUILDERS[arch](0), tokenizer=make_tokenizer())


def _data(loaded: ha.LoadedModel, n: int = 4, batch_size: int = 2) -> EvalData:
    tok = loaded.tokenizer
    bos = [tok.bos_token_id] if loaded.info.causal else [tok.cls_token_id]
    seqs = [
        ProbeSequence(tuple(bos + tok(" ".join(CORPUS[i * 3 : i * 3 + 3]))["input_ids"])) for i in range(n)
    ]
    batches = [make_batch(seqs[i : i + batch_size], tok.pad_token_id) for i in range(0, n, batch_size)]
    return EvalData(batches, "tiny corpus", n, max(len(s.ids) for s in seqs))


def _zero_head(loaded: ha.LoadedModel, layer: int, head: int) -> None:
    d = loaded.info.head_dim
    with torch.no_grad():
        output_projections(loaded)[layer].weight[:, head * d : (head + 1) * d] = 0.0


def _logits(loaded: ha.LoadedModel) -> torch.Tensor:
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    with torch.no_grad():
        return loaded.model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_gradient_importance_of_a_zeroed_head_is_zero(arch: str) -> None:
    loaded = _loaded(arch)
    _zero_head(loaded, 1, 2)
    result = gradient_importance(loaded, _data(loaded))
    assert result.raw is not None
    assert result.raw[1, 2] == 0.0
    assert (np.delete(result.raw.ravel(), 1 * loaded.info.n_heads + 2) > 0).all()
    assert result.scores.min() >= 0.0 and result.scores.max() == pytest.approx(1.0)
    assert not any(p.grad is not None for p in loaded.model.parameters()), "model grads untouched"


def test_michel_normalisation_is_the_same_rule_for_every_layer() -> None:
    raw = np.array([[3.0, 4.0], [0.6, 0.8], [1.0, 0.0]])
    norm = michel_normalise(raw)
    assert np.allclose(norm[0], norm[1])  # layers differing by a factor normalise alike, last one included
    assert norm.min() == 0.0 and norm.max() == 1.0


def test_ablation_importance_zeroed_head_and_columns(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    loaded = _loaded()
    _zero_head(loaded, 0, 1)
    result = ablation_importance(loaded, _data(loaded), "zero")
    assert result.scores[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert result.std is not None and result.forwards == 2 * (3 * 4 + 1)
    atlas = open_atlas(loaded.info, tmp_path)
    write_importance(atlas, result)
    atlas.save(tmp_path)
    back = ha.Atlas.load(tmp_path)
    assert {"importance_ablation", "importance_ablation_std"} <= set(back.table.columns)
    assert "importance_ablation" in back.scores
    assert back.meta["importance"]["ablation"]["method"] == "ablation-zero"


def test_encoder_without_lm_head_is_refused() -> None:
    from transformers import BertModel

    tok = make_tokenizer()
    loaded = ha.load(BertModel(BUILDERS["bert"](0).config), tokenizer=tok)
    with pytest.raises(ha.HeadatlasError, match="no masked-LM head"):
        gradient_importance(loaded, _data(loaded))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_pruning_a_zero_output_head_leaves_logits_unchanged(arch: str) -> None:
    loaded = _loaded(arch)
    _zero_head(loaded, 0, 0)
    _zero_head(loaded, 1, 3)
    before = _logits(loaded)
    pruned, _plain = prune_model(loaded, [(0, 0), (1, 3)])
    assert torch.allclose(_logits(pruned), before, atol=1e-5)
    assert torch.equal(_logits(loaded), before), "the original model is untouched"


def test_pruning_equals_zero_ablation_and_keeps_gqa_groups_consistent() -> None:
    loaded = _loaded()  # 4 query heads, 2 KV heads (group 2)
    heads = [(0, 1), (1, 0), (1, 1), (2, 3), (2, 2), (2, 0)]
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS))
    with torch.no_grad(), ha.ablate(loaded, heads):
        ablated = loaded.model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    pruned, plain = prune_model(loaded, heads)
    assert not plain
    assert torch.allclose(_logits(pruned), ablated, atol=1e-5)
    layouts = plan_layouts(heads, 3, 4, 2)
    # layer 0: groups {0}, {2,3} -> group 0 padded with dead head 1; no KV head removed
    assert layouts[0].slots == (0, 1, 2, 3) and layouts[0].live == (True, False, True, True)
    # layer 1: group 0 gone entirely -> its k/v rows go too
    assert layouts[1].kv_heads == (1,) and layouts[1].slots == (2, 3)
    # layer 2: only head 1 left -> one slot, one KV head
    assert layouts[2].slots == (1,) and layouts[2].kv_heads == (0,)
    attn = pruned.model.model.layers
    for layer, layout in layouts.items():
        a = attn[layer].self_attn
        d = loaded.info.head_dim
        assert a.q_proj.out_features == len(layout.slots) * d == a.o_proj.in_features
        assert a.k_proj.out_features == len(layout.kv_heads) * d == a.v_proj.out_features
        assert len(layout.slots) % len(layout.kv_heads) == 0
        assert a.num_key_value_groups == len(layout.slots) // len(layout.kv_heads)
    assert count_params(pruned.model) < count_params(loaded.model)


def test_pruned_checkpoint_round_trips(tmp_path: Path) -> None:
    loaded = _loaded()
    heads = [(0, 1), (1, 0), (1, 1), (2, 3)]
    pruned, _plain = prune_model(loaded, heads)
    save_pruned(pruned, tmp_path / "p")
    back = ha.load(str(tmp_path / "p"))
    assert torch.allclose(_logits(back), _logits(pruned), atol=1e-6)
    assert count_params(back.model) == count_params(pruned.model)


def test_uniform_pruning_reloads_in_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = _loaded()
    heads = [(layer, h) for layer in range(3) for h in (0, 1)]  # KV group 0 of every layer
    pruned, plain = prune_model(loaded, heads)
    assert plain
    save_pruned(pruned, tmp_path / "p")
    plain_model = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()
    assert plain_model.config.num_attention_heads == 2 and plain_model.config.num_key_value_heads == 1
    wrapped = ha.load(plain_model, tokenizer=loaded.tokenizer)
    assert torch.allclose(_logits(wrapped), _logits(pruned), atol=1e-6)
    assert ha.load(str(tmp_path / "p")).info.n_heads == 2


def test_bad_pruning_input() -> None:
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ha.HeadatlasError, match=r"outside \[0, 1\)"):
            check_fraction(bad)
    with pytest.raises(ha.HeadatlasError, match="no head L9H0"):
        parse_heads("0.1,9.0", 3, 4)
    with pytest.raises(ha.HeadatlasError, match="cannot read head"):
        parse_heads("x.y", 3, 4)
    assert parse_heads("L1H2, 0.3", 3, 4) == [(1, 2), (0, 3)]
    every = [(0, h) for h in range(4)]
    with pytest.raises(ha.HeadatlasError, match="every head of layer 0"):
        prune_model(_loaded(), every)
    pruned, _ = prune_model(_loaded(), every, allow_empty_layers=True)
    assert pruned.model.model.layers[0].self_attn.q_proj.out_features == 16  # one dead slot
    order = [(0, h) for h in range(4)] + [(1, 0)]
    assert select(order, 4, 3, 4, allow_empty_layers=False) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    with pytest.raises(ha.HeadatlasError, match="at most 9"):
        select(order, 10, 3, 4, allow_empty_layers=False)
    with pytest.raises(ha.HeadatlasError, match="does not support 'gpt2'"):
        prune_model(_loaded("gpt2"), [(0, 0)])


def test_redundancy_matrices_and_clusters() -> None:
    loaded = _loaded()
    result = measure(loaded, _data(loaded))
    n = 3 * 4
    assert result.js.shape == (n, n) == result.cosine.shape
    assert np.allclose(result.js, result.js.T) and np.allclose(np.diag(result.js), 0)
    assert (result.js >= 0).all() and (result.js <= 1).all()
    assert np.allclose(np.diag(result.cosine), 1, atol=1e-5)
    assert result.cluster.shape == (3, 4)


def test_cli_importance_prune_and_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    small = ["--n-seqs", "2", "--seq-len", "32"]
    res = runner.invoke(app, ["importance", str(tiny_model_dir), "--out", str(out), *small])
    assert res.exit_code == 0, res.output
    atlas = ha.Atlas.load(out)
    assert {"layer", "head", "kv_head", "importance_gradient", "importance_gradient_raw"} <= set(
        atlas.table.columns
    )
    res = runner.invoke(app, ["redundancy", str(tiny_model_dir), "--out", str(out), "--seq-len", "16"])
    assert res.exit_code == 0, res.output
    assert "cluster" in ha.Atlas.load(out).table.columns and (out / "figures" / "redundancy.png").exists()
    assert np.load(out / "redundancy_js.npy", allow_pickle=False).shape == (12, 12)
    pruned = tmp_path / "pruned"
    args = ["prune", str(tiny_model_dir), "--fraction", "0.25", "--atlas", str(out), "--out", str(pruned)]
    res = runner.invoke(app, [*args, "--json", *small])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    for key in (
        "heads_removed",
        "params_before",
        "params_after",
        "perplexity_before",
        "perplexity_after",
        "speedup",
    ):
        assert key in report
    assert len(report["heads_removed"]) == 3 and report["params_after"] <= report["params_before"]
    assert ha.load(str(pruned)).model is not None
    curve = tmp_path / "curve"
    res = runner.invoke(
        app,
        [
            "prune-curve",
            str(tiny_model_dir),
            "--atlas",
            str(out),
            "--fractions",
            "0,0.25",
            "--seeds",
            "2",
            "--out",
            str(curve),
            *small,
        ],
    )
    assert res.exit_code == 0, res.output
    table = json.loads((curve / "prune-curve.json").read_text())
    assert set(table["curves"]) == {"importance", "random"} and (curve / "prune-curve.png").exists()
    assert table["curves"]["importance"]["mean"][0] == table["curves"]["random"]["mean"][0]
    for bad, match in (
        (["--fraction", "1.0"], "outside"),
        (["--heads", "0.9"], "no head L0H9"),
        (["--heads", "0.0,0.1,0.2,0.3"], "every head of layer 0"),
    ):
        res = runner.invoke(app, ["prune", str(tiny_model_dir), *bad, "--out", str(tmp_path / "x"), *small])
        assert res.exit_code == 2 and match in res.output, res.output
    other = tmp_path / "other-model"
    model = BUILDERS["llama"](1)
    model.save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    res = runner.invoke(app, ["importance", str(other), "--out", str(out), *small])
    assert res.exit_code == 2 and "another model" in res.output


def test_perplexity_of_tiny_model_is_finite() -> None:
    loaded = _loaded()
    value = perplexity(loaded, _data(loaded))
    assert np.isfinite(value) and value > 1


@pytest.mark.slow
@requires_default_model
def test_default_model_importance_and_pruning(tmp_path: Path) -> None:
    from headatlas.apps.common.evaluation import heldout_data
    from headatlas.apps.prune.pruning import order_heads, run_prune

    loaded = ha.load("default")
    dev = heldout_data(loaded, "natural", "dev", 2, 64, 2)
    imp = gradient_importance(loaded, dev)
    assert imp.scores.shape == (30, 9) and imp.scores.max() == pytest.approx(1.0)
    heads = select(order_heads(imp.scores), 27, 30, 9, False)
    test = heldout_data(loaded, "natural", "test", 2, 64, 2)
    report = run_prune(loaded, heads, test, tmp_path / "p")
    # The 27 least important heads may all sit in different KV groups: GQA then keeps every group's
    # rows (dead slots), so parameters need not shrink; removing a whole group must shrink them.
    assert report.params_after <= report.params_before
    assert report.perplexity_after < 3 * report.perplexity_before
    back = ha.load(str(tmp_path / "p"))
    assert abs(perplexity(back, test) - report.perplexity_after) < 1e-3 * report.perplexity_after
    group = run_prune(loaded, [(5, 0), (5, 1), (5, 2)], test, tmp_path / "group")
    assert group.params_after < group.params_before
