"""Battery ``semantic`` (Ren et al. 2024, semantic induction heads): per relation type, a head that
attends to the head word and raises the logit of its tail.

The answer is known by construction: in a one-layer Llama wired by hand (tied embeddings, a
word-level tokenizer), head 0 attends to country tokens (a constant query bias meets a key only
countries have) and its OV circuit maps each country's embedding onto its capital's (a least-squares
fit). It must top ``semantic_capital`` and not score on antonyms; head 1 stays random and weak.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import headatlas as ha
from headatlas.core.roles import assign_roles
from headatlas.data.words import ANTONYMS, COUNTRY_CAPITALS
from headatlas.functional import FunctionalConfig, battery_spec, semantic
from tiny_models import blank_llama, one_layer_llama_config, word_tokenizer

D_MODEL, D_HEAD = 128, 64


def _words() -> list[str]:
    text = " ".join(
        [*semantic.TEMPLATES["capital"], *semantic.TEMPLATES["antonym"]]
        + [f"{a} {b}" for a, b in (*COUNTRY_CAPITALS, *ANTONYMS)]
    )
    words = re.findall(r"\w+|[^\w\s]", text.replace("{head}", " ").replace("{tail}", " "))
    return ["<bos>", "<eos>", "<pad>", "<unk>", *words, *(a.capitalize() for a, _ in ANTONYMS)]


def capital_head_llama(tok) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    cfg = one_layer_llama_config(
        len(tok),
        hidden_size=D_MODEL,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=D_HEAD,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9},
    )
    model = blank_llama(cfg)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    countries = {t for c, _ in COUNTRY_CAPITALS for t in tok(c, add_special_tokens=False)["input_ids"]}
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # [vocab, d_model]
        emb.copy_(torch.randn(emb.shape, generator=gen))
        emb[:, 0] = 0.0
        emb[sorted(countries), 0] = 3.0  # coordinate 0: "is a country"
        last = D_HEAD - 1  # the slowest rotary pair of head 0: no rotation at rope_theta 1e9
        attn.q_proj.bias[last] = 6.0
        attn.k_proj.weight[last, 0] = 6.0
        normed = model.model.layers[0].input_layernorm(emb)  # [vocab, d_model]: what the values read
        ids = [
            (
                tok(c, add_special_tokens=False)["input_ids"][-1],
                tok(k, add_special_tokens=False)["input_ids"][0],
            )
            for c, k in COUNTRY_CAPITALS
        ]
        src = torch.stack([normed[a] for a, _ in ids], dim=1)  # [d_model, pair]
        dst = torch.stack([emb[b] for _, b in ids], dim=1)  # [d_model, pair]
        u, s, vh = torch.linalg.svd(dst @ torch.linalg.pinv(src))
        attn.v_proj.weight[:D_HEAD] = vh[:D_HEAD]
        attn.o_proj.weight[:, :D_HEAD] = u[:, :D_HEAD] * s[:D_HEAD]
        attn.v_proj.weight[D_HEAD:] = 0.05 * torch.randn(D_HEAD, D_MODEL, generator=gen)
        attn.o_proj.weight[:, D_HEAD:] = 0.05 * torch.randn(D_MODEL, D_HEAD, generator=gen)
        attn.q_proj.weight[D_HEAD:] = 0.05 * torch.randn(D_HEAD, D_MODEL, generator=gen)
    return model


@pytest.fixture()
def no_treebank(monkeypatch: pytest.MonkeyPatch) -> None:
    """No UD data in tests, and one template per relation (fast)."""
    monkeypatch.setattr(semantic, "dependency_prompts", lambda *args: [])
    monkeypatch.setattr(semantic, "TEMPLATES", {k: v[:1] for k, v in semantic.TEMPLATES.items()})


def test_example_scores_by_hand() -> None:
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]])  # [example, head, key]
    keys = torch.tensor([[True, True, False]])  # the head word is keys 0 and 1
    rows = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # [example, head, d_head]
    z = torch.tensor([[[2.0, 5.0], [2.0, 5.0]]])
    std = torch.ones(1, 2)
    out = semantic.example_scores(probs, keys, rows, z, std)
    assert torch.allclose(out, torch.tensor([[1.5, 0.0]]))  # head 1 never attends to the head word


def test_template_prompts_end_before_the_tail() -> None:
    tok = word_tokenizer(_words())
    prompts = semantic.template_prompts(tok, "capital")
    copied = [c for c, k in COUNTRY_CAPITALS if k.split()[0] == c]  # Mexico → Mexico City is copying
    assert copied == ["Mexico"]
    assert len(prompts) == (len(COUNTRY_CAPITALS) - 1) * len(semantic.TEMPLATES["capital"])
    first = prompts[0]
    example = first.examples[0]
    assert tok.decode(first.ids) == "The capital of France is"
    assert example.query == len(first.ids) - 1
    assert tok.decode([first.ids[k] for k in example.keys]) == "France"
    assert tok.decode([example.tail]) == "Paris"


def test_wired_capital_head_tops_semantic_capital(no_treebank: None) -> None:
    tok = word_tokenizer(_words())
    loaded = ha.load(capital_head_llama(tok), tokenizer=tok)
    result = battery_spec("semantic").run(loaded, FunctionalConfig(batch_size=40), lambda d, t: None)
    cap, ant = result.stats.mean("semantic_capital"), result.stats.mean("semantic_antonym")
    assert cap[0, 0] > 2.0, cap
    assert abs(cap[0, 1]) < 0.5 and abs(ant[0, 0]) < 0.5, (cap, ant)
    assert result.stats.n("semantic_capital")[0, 0] == len(COUNTRY_CAPITALS) - 1
    roles = assign_roles({"semantic_capital": cap.reshape(-1)})
    assert roles == ["semantic-capital", ""]
    config = FunctionalConfig(batch_size=40)
    before = semantic.tail_logprobs(loaded, config)["capital"]
    with ha.ablate(loaded, ["L0H0"]):
        after = semantic.tail_logprobs(loaded, config)["capital"]
    assert before > after + 1.0, (before, after)
    assert np.isfinite(semantic.tail_logprob(loaded, config))


def test_semantic_on_the_tiny_bpe_model(tiny_loaded, no_treebank) -> None:  # type: ignore[no-untyped-def]
    atlas = ha.scan(tiny_loaded, probes=["semantic"], n_functional=1, batch_size=32)
    for relation in ("capital", "antonym"):
        assert np.isfinite(atlas.table[f"semantic_{relation}"]).all()
