"""Knowledge-conflict heads (Jin et al. 2024) and safety heads (Ships, Zhou et al. 2024) on tiny models
with heads wired by hand, the invariants of their scores, the head-set file, and the default model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.conflict.items import ConflictItem, answer_token, conflict_items, split_items
from headatlas.apps.conflict.ph3 import direct_contributions, random_heads, top_heads, usage
from headatlas.apps.safety.prompts import is_refusal
from headatlas.apps.safety.ships import behaviour, refusal_logprob, ships_scores
from headatlas.capture import output_projections
from headatlas.capture.residual import final_norm, final_residual
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from headatlas.core.heads import HEAD_SET_FORMAT, read_head_set
from headatlas.core.roles import assign_roles
from headatlas.core.storage import write_json
from tiny_models import BUILDERS, make_tokenizer

PROMPTS = (
    ("Context: the cat sat on the mat. the cat sat on the", "mat", "park"),
    ("Context: the dog ran to the park. the dog ran to the", "park", "mat"),
    ("Context: she read a book about the city. she read a book about the", "city", "river"),
)


def _loaded(name: str = "llama") -> ha.LoadedModel:
    return ha.load(BUILDERS[name](0), tokenizer=make_tokenizer())


def _items(loaded: ha.LoadedModel) -> list[ConflictItem]:
    tok = loaded.tokenizer
    out = []
    for text, context, memory in PROMPTS:
        ids = tuple(tok(text)["input_ids"])
        prompt = text.rsplit(".", 1)[1].strip()
        out.append(
            ConflictItem(
                prompt,
                "test",
                ids,
                memory,
                context,
                answer_token(tok, prompt, memory),
                answer_token(tok, prompt, context),
            )
        )
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2", "gemma3"])
def test_head_contributions_sum_to_each_layers_direct_attention_contribution(name: str) -> None:
    """Σ over a layer's heads = the direct logit-difference contribution of that layer's attention
    output (minus the projection's bias), computed here independently from the norm's own formula.
    Gemma 3 normalises the attention output before the residual (sandwich norm, gain ``1 + w``) and
    its final norm's gain is ``1 + w`` too; its norm weights are randomised so a missed gain fails."""
    loaded = _loaded(name)
    if name == "gemma3":
        torch.manual_seed(1)
        with torch.no_grad():
            for module in loaded.model.modules():
                if type(module).__name__ == "Gemma3RMSNorm" and module.weight.numel() > 16:
                    module.weight.uniform_(-0.5, 1.5)
    items = _items(loaded)
    contrib = direct_contributions(loaded, items)  # [item, layer, head]
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        proj.register_forward_hook(lambda m, a, o, layer=layer: outputs.__setitem__(layer, o.detach()))
        for layer, proj in output_projections(loaded).items()
    ]
    norm = final_norm(loaded)
    unembed = loaded.model.get_output_embeddings().weight.detach()
    try:
        from headatlas.batteries.base import ProbeSequence, make_batch

        batch = make_batch([ProbeSequence(i.ids) for i in items], loaded.tokenizer.pad_token_id)
        with final_residual(loaded) as residual, torch.no_grad():
            from headatlas.capture import padded_positions

            loaded.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                **padded_positions(loaded.model, batch.attention_mask),
            )  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    x = residual.value[:, -1]  # [item, d_model]
    if isinstance(norm, torch.nn.LayerNorm):
        scale = (x.var(-1, unbiased=False) + norm.eps).sqrt()
        linear = lambda c: norm.weight * (c - c.mean(-1, keepdim=True)) / scale[:, None]  # noqa: E731
    elif name == "gemma3":
        scale = (x.pow(2).mean(-1) + norm.eps).sqrt()
        linear = lambda c: (1 + norm.weight) * c / scale[:, None]  # noqa: E731
    else:
        scale = (x.pow(2).mean(-1) + norm.variance_epsilon).sqrt()
        linear = lambda c: norm.weight * c / scale[:, None]  # noqa: E731
    diff = unembed[[i.memory_token for i in items]] - unembed[[i.context_token for i in items]]
    projections = output_projections(loaded)
    for layer, out in outputs.items():
        bias = getattr(projections[layer], "bias", None)
        c = out[:, -1] - (bias if bias is not None else 0.0)
        if name == "gemma3":  # the sandwich norm, on the whole attention output of the layer
            c = loaded.model.model.layers[layer].post_attention_layernorm(out)[:, -1]
        expected = (linear(c) * diff).sum(-1)  # [item]
        assert torch.allclose(contrib[:, layer].sum(-1), expected, atol=1e-4, rtol=1e-4), (name, layer)
    # and the whole residual read the same way is the real logit difference
    logits = loaded.model.get_output_embeddings()(norm(residual.value))[:, -1]
    rows = torch.arange(len(items))
    real = logits[rows, [i.memory_token for i in items]] - logits[rows, [i.context_token for i in items]]
    assert torch.allclose((linear(x) * diff).sum(-1), real, atol=1e-4)


def _wire_context_reader(
    loaded: ha.LoadedModel, layer: int, head: int, tokens: list[int], strength: float
) -> None:
    """Make ``(layer, head)`` read the given tokens wherever it attends and write their unembedding:
    its value's first dimension measures the token's embedding, its output writes W_U[token]."""
    model = loaded.model
    attn = model.model.layers[layer].self_attn
    d = loaded.info.head_dim
    kv = head // (loaded.info.n_heads // loaded.info.n_kv_heads)
    embed = model.get_input_embeddings().weight.detach()
    unembed = model.get_output_embeddings().weight.detach()
    with torch.no_grad():
        direction = sum(embed[t] / embed[t].norm() for t in tokens)
        attn.v_proj.weight[kv * d] = direction * strength
        attn.q_proj.weight[head * d : (head + 1) * d] = 0.0  # uniform attention over the prompt
        attn.o_proj.weight[:, head * d : (head + 1) * d] = 0.0
        attn.o_proj.weight[:, head * d] = sum(unembed[t] / unembed[t].norm() for t in tokens)


def test_a_head_wired_to_read_the_context_answer_tops_the_context_side() -> None:
    loaded = _loaded()
    items = _items(loaded)
    _wire_context_reader(loaded, 2, 1, sorted({i.context_token for i in items}), 40.0)
    scores = direct_contributions(loaded, items).mean(0).numpy()
    assert top_heads(scores, "memory", 1) == [(2, 1)]  # PH3 prunes it to favour memory
    assert scores[2, 1] < 0 and abs(scores[2, 1]) > 3 * np.abs(np.delete(scores.ravel(), 2 * 4 + 1)).max()
    assert top_heads(scores, "context", 1) != [(2, 1)]
    roles = assign_roles({"conflict": scores.ravel()})
    assert "context-head" in roles[2 * 4 + 1]
    before, after = usage(loaded, items), usage(loaded, items, [(2, 1)])
    assert after.logit_diff > before.logit_diff  # silencing it moves the model toward memory


def test_ablating_no_heads_or_a_dead_head_changes_nothing() -> None:
    loaded = _loaded()
    items = _items(loaded)
    with torch.no_grad():
        output_projections(loaded)[1].weight[:, 2 * 16 : 3 * 16] = 0.0  # L1H2 writes nothing
    base = usage(loaded, items)
    assert usage(loaded, items, []) == base
    assert usage(loaded, items, [(1, 2)]) == base
    prompts = [i.ids for i in items]
    ships, std = ships_scores(loaded, prompts)
    assert ships.shape == (3, 4) and (ships >= -1e-7).all() and (std >= 0).all()
    assert abs(ships[1, 2]) < 1e-6
    assert ships.max() > 1e-4


def test_ships_ranks_a_head_that_decides_the_first_token_first() -> None:
    loaded = _loaded()
    items = _items(loaded)
    _wire_context_reader(loaded, 1, 3, sorted({i.context_token for i in items}), 40.0)
    ships, _ = ships_scores(loaded, [i.ids for i in items])
    assert np.unravel_index(ships.argmax(), ships.shape) == (1, 3)


def test_refusal_detection_and_behaviour_without_ablation_is_the_models() -> None:
    assert is_refusal("I’m sorry, but I can't assist with that.") and is_refusal("Sorry, but no.")
    assert not is_refusal("Here is a simple recipe for pancakes.")
    loaded = _loaded()
    prompts = [i.ids for i in _items(loaded)]
    logp = refusal_logprob(loaded, prompts)
    assert logp.shape == (3,) and (logp < 0).all()
    replies = [(5, 6), (7,), (8, 9, 10)]
    first, again = (
        behaviour(loaded, prompts, prompts, replies),
        behaviour(loaded, prompts, prompts, replies, []),
    )
    assert first == again
    assert behaviour(loaded, prompts, prompts, replies, [(0, 0), (2, 3)]) != first


def test_a_model_that_knows_no_facts_gets_a_one_line_error() -> None:
    loaded = _loaded()
    with pytest.raises(HeadatlasError, match="knows 0 of"):
        conflict_items(loaded)


def test_split_random_heads_and_top_heads() -> None:
    items = [ConflictItem(f"f{i % 5}", "c", (1,), "a", "b", 1, 2) for i in range(10)]
    first, second = split_items(items, 0)
    assert {i.fact for i in first}.isdisjoint({i.fact for i in second}) and len(first) + len(second) == 10
    heads = random_heads(3, 4, 5, 1)
    assert len(set(heads)) == 5 and heads == random_heads(3, 4, 5, 1)
    scores = np.array([[0.5, -1.0], [2.0, -0.1]])
    assert top_heads(scores, "memory", 2) == [(0, 1), (1, 1)]
    assert top_heads(scores, "context", 1) == [(1, 0)]
    with pytest.raises(HeadatlasError, match="prefer"):
        top_heads(scores, "both", 1)


def test_a_head_set_file_is_read_back_and_pruned(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = write_json(tmp_path / "heads.json", {"format": HEAD_SET_FORMAT, "heads": ["L2H1", "L0H3"]})
    assert read_head_set(path, 3, 4) == [(2, 1), (0, 3)]
    with pytest.raises(HeadatlasError, match="no head L7H1"):
        read_head_set(write_json(tmp_path / "bad.json", {"heads": ["L7H1"]}), 3, 4)
    with pytest.raises(HeadatlasError, match="no 'heads' list"):
        read_head_set(write_json(tmp_path / "empty.json", {"heads": []}))
    out = tmp_path / "pruned"
    res = CliRunner().invoke(
        app,
        [
            "prune",
            str(tiny_model_dir),
            "--heads",
            str(path),
            "--out",
            str(out),
            "--n-seqs",
            "2",
            "--seq-len",
            "16",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["n_heads_removed"] == 2


@pytest.mark.slow
def test_default_model_conflict_set_and_direct_contributions() -> None:
    loaded = ha.load("default")
    items = conflict_items(loaded)
    assert len(items) >= 40 and all(i.memory_token != i.context_token for i in items)
    assert "Context:" in loaded.tokenizer.decode(list(items[0].ids))
    contrib = direct_contributions(loaded, items[:8])
    assert contrib.shape == (8, 30, 9) and torch.isfinite(contrib).all()


def test_conflict_and_safety_commands_say_in_one_line_why_a_tiny_model_cannot_be_used(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["conflict", str(tiny_model_dir), "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and "knows 0 of" in res.output and "Traceback" not in res.output
    res = runner.invoke(
        app, ["conflict", str(tiny_model_dir), "--prefer", "both", "--out", str(tmp_path / "c.json")]
    )
    assert res.exit_code == 2 and "--prefer" in res.output
    res = runner.invoke(app, ["safety", str(tiny_model_dir), "--out", str(tmp_path / "s.json")])
    assert res.exit_code == 2 and "no chat template" in res.output and not (tmp_path / "s.json").exists()
    assert "Ships" not in res.output  # the check runs before the progress bar starts
