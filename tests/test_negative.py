"""Battery ``negative`` (Yu et al. 2024, negative attention score): heads that attend to the "No" of
a yes/no instruction and push the answer to "No".

The answer is known by construction: in a one-layer Llama wired by hand (tied embeddings, a
word-level tokenizer, plain prompts ending in "Answer:"), head 0 attends only to the instruction's
"No" and writes "No" strongly; head 1 attends only to "Yes" and writes "Yes" weakly. Head 0 must
top NAS, head 1 must score below 0, the model must answer "No" to everything, and silencing head 0
(ablation, or scaling by 0) must turn every answer into "Yes".
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import headatlas as ha
from headatlas.core.roles import assign_roles
from headatlas.functional import FunctionalConfig, battery_spec, negative
from tiny_models import blank_llama, one_layer_llama_config, word_tokenizer

D_HEAD = 16
CONFIG = FunctionalConfig(n_prompts=24, batch_size=24)


def _tokenizer():  # type: ignore[no-untyped-def]
    text = " ".join([negative.INSTRUCTION, "Answer:", *(q.text for q in negative.yes_no_questions())])
    return word_tokenizer(["<bos>", "<eos>", "<pad>", "<unk>", *re.findall(r"\w+|[^\w\s]", text)])


def no_head_llama(tok) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    cfg = one_layer_llama_config(
        len(tok),
        num_attention_heads=2,
        num_key_value_heads=2,
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e9},
    )
    model = blank_llama(cfg)
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # [vocab, d_model]
        emb.copy_(torch.randn(emb.shape, generator=gen))
        emb[:, :2] = 0.0
        emb[no, 0] = 3.0  # coordinate 0: "No"; coordinate 1: "Yes"
        emb[yes, 1] = 3.0
        for head, coord, word, gain in ((0, 0, no, 3.0), (1, 1, yes, 1.0)):
            last = head * D_HEAD + D_HEAD - 1  # the slowest rotary pair: no rotation at rope_theta 1e9
            attn.q_proj.bias[last] = 6.0
            attn.k_proj.weight[last, coord] = 6.0
            attn.v_proj.weight[head * D_HEAD, coord] = 1.0
            attn.o_proj.weight[:, head * D_HEAD] = gain * emb[word]
    return model


def test_nas_rows_by_hand() -> None:
    a_yes = torch.tensor([[[0.1, 0.1], [0.5, 0.5]]])  # [batch, head, query]
    a_no = torch.tensor([[[0.5, 0.5], [0.1, 0.1]]])
    rows = torch.tensor([[False, True]])  # only the second row is after the instruction
    nas = negative.nas_rows(a_yes, a_no, rows)
    expected = 0.6 * np.log(5.0)
    assert torch.allclose(nas, torch.tensor([[expected, -expected]]).float())
    assert negative.nas_rows(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), rows).item() == 0.0


def test_questions_are_balanced_and_seeded() -> None:
    questions = negative.yes_no_questions(seed=3)
    assert sum(q.gold for q in questions) * 2 == len(questions)
    assert {q.relation for q in questions} == {"capital", "antonym", "symbol", "translation"}
    assert questions == negative.yes_no_questions(seed=3)
    assert [q.text for q in negative.yes_no_questions(seed=3, limit=10)] == [q.text for q in questions[:10]]
    assert "Is Paris the capital of France?" in {q.text for q in questions if q.gold}


def test_yes_no_report_by_hand() -> None:
    gold = [True, True, True, True, False, False, False, False]
    margins = np.array([1.0, -1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0])  # says "No" 6 times out of 8
    r = negative.yes_no_report(gold, margins)
    assert r["accuracy"] == 0.5 and r["no_rate"] == 0.75
    assert r["yes_precision"] == 0.5 and r["yes_recall"] == 0.25 and r["yes_gap"] == 0.25
    assert r["no_precision"] == 0.5 and r["no_recall"] == 0.75


@pytest.fixture(scope="module")
def wired() -> ha.LoadedModel:
    tok = _tokenizer()
    return ha.load(no_head_llama(tok), tokenizer=tok)


def test_wired_no_head_tops_nas_and_carries_the_bias(wired: ha.LoadedModel) -> None:
    prompt = negative.encode_question(wired.tokenizer, negative.yes_no_questions()[0])
    assert wired.tokenizer.decode([prompt.ids[prompt.yes], prompt.ids[prompt.no]]) == "Yes No"
    result = battery_spec("negative").run(wired, CONFIG, lambda d, t: None)
    nas = result.stats.mean("negative_attention")[0]
    assert nas[0] > 5.0 and nas[1] < -2.0, nas
    assert result.params["answers"]["no_rate"] == 1.0
    assert assign_roles({"negative_attention": nas}) == ["negative-bias", ""]
    _, margins = negative.answer_margins(wired, CONFIG)
    assert (margins < 0).all()
    assert negative.no_rate(wired, CONFIG, lambda d, t: None) == 1.0
    with ha.ablate(wired, ["L0H0"]):
        assert negative.no_rate(wired, CONFIG, lambda d, t: None) == 0.0
    with negative.scaled_heads(wired, ["L0H0"], 0.0):
        assert negative.no_rate(wired, CONFIG, lambda d, t: None) == 0.0
    with negative.scaled_heads(wired, ["L0H1"], 10.0):  # a louder "Yes" head outvotes the "No" head
        assert negative.no_rate(wired, CONFIG, lambda d, t: None) == 0.0


def test_scan_writes_nas(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    atlas = ha.scan(tiny_loaded, probes=["negative"], n_functional=8)
    assert np.isfinite(atlas.table["negative_attention"]).all()
    answers = atlas.meta["batteries"]["negative"]["answers"]
    assert answers["n"] == 8 and 0.0 <= answers["no_rate"] <= 1.0
