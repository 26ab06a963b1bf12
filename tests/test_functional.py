"""Functional batteries ``copy`` and ``ordinal``, their scan integration, resume, roles and ``verify``.

The models are tiny, seeded and built in code. For the scores that read head outputs, one head's
weights are set by hand so the answer is known by construction:

- a *copy* head whose OV circuit is the identity on a 32-dimensional subspace (with tied
  embeddings, its output at a token points back at that token's unembedding) must score as a
  copying head, and the same head with its output negated as a copy-suppression head;
- a *successor* head whose OV circuit maps each item's embedding onto the next item's (a
  least-squares fit, rank ≤ 32) must be found by ``successor``; heads left random must not.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import headatlas as ha
from headatlas.apps.verify.causal import induction_loss, save_verification, verify
from headatlas.core.errors import HeadatlasError
from headatlas.core.roles import RULES, assign_roles
from headatlas.functional import FunctionalConfig, battery_spec, copying, ordinal
from headatlas.scanning.functional import run_functional
from tiny_models import BUILDERS, CORPUS, make_tokenizer, one_layer_llama_config, word_tokenizer

NUMBERS = ordinal.ORDINAL_SETS["number words"]
DAYS = ordinal.ORDINAL_SETS["days"]
FILLER = ("the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "park", "a", "red", "car")
HEAD_DIM = 32


def number_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer in which every number word, weekday and filler word is one token."""
    return word_tokenizer(["<bos>", "<eos>", "<pad>", "<unk>", ",", ".", *NUMBERS, *DAYS, *FILLER])


def one_layer_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """One layer, 2 heads of 32 dims (1 KV head), tied embeddings: the residual at a token before
    the output projection is its embedding, which makes OV circuits easy to set by hand."""
    cfg = one_layer_llama_config(
        vocab,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()  # no MLP: the residual is embeddings + heads
    return model


def set_ov(model: LlamaForCausalLM, ov: torch.Tensor) -> None:
    """Make head 0's OV circuit ``W_O,0 W_V`` equal the rank-≤32 matrix ``ov [d_model, d_model]``."""
    u, s, vh = torch.linalg.svd(ov)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight.copy_(vh[:HEAD_DIM])  # [d_head, d_model]
        attn.o_proj.weight[:, :HEAD_DIM] = u[:, :HEAD_DIM] * s[:HEAD_DIM]  # [d_model, d_head]
        attn.o_proj.weight[:, HEAD_DIM:] *= 0.05  # head 1 stays random but weak


def attend_to_self(model: LlamaForCausalLM, strength: float = 3.0) -> None:
    """Make head 0 attend (almost only) to its own token: q = k = strength × the first 32 dims, so the
    logit of key j is large only where the rotary angle vanishes (j = i) and the vectors agree."""
    attn = model.model.layers[0].self_attn
    eye = torch.eye(HEAD_DIM, 64) * strength  # [d_head, d_model]
    with torch.no_grad():
        attn.q_proj.weight[:HEAD_DIM] = eye
        attn.k_proj.weight.copy_(eye)


def loaded_with(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> ha.LoadedModel:
    return ha.load(model, tokenizer=tok)


@pytest.fixture()
def ewt_is_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy battery reads UD EWT; tests give it the tiny corpus instead (no packaged data)."""
    monkeypatch.setattr(copying, "ewt_sentences", lambda split="train": list(CORPUS))


# ---------------------------------------------------------------- pure functions


def test_copy_scores_sign_follows_the_output_direction() -> None:
    probs = torch.zeros(1, 2, 3, 3)  # [batch, head, query, key]
    probs[0, :, :, 1] = 1.0  # every row attends to key 1
    rows = torch.zeros(1, 3, 2, 4)  # [batch, key, head, d_head]
    rows[0, 1, :, 0] = 1.0
    z = torch.zeros(1, 2, 3, 4)  # [batch, head, query, d_head]
    z[0, 0, :, 0] = 2.0  # head 0 writes along key 1's row: copying
    z[0, 1, :, 0] = -2.0  # head 1 writes against it: suppression
    std = torch.ones(1, 2, 3)
    before = probs.clone()
    scores = copying.copy_scores(probs, rows, z, std)
    assert torch.equal(probs, before)
    assert torch.allclose(scores[0, 0], torch.full((3,), 2.0))
    assert torch.allclose(scores[0, 1], torch.full((3,), -2.0))


def test_successor_scores_hit_and_margin() -> None:
    logits = torch.tensor([[[0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 1.0, 4.0]], [[3.0, 0.0, 0.0, 0.0], [0.0] * 4]])
    hit, margin = ordinal.successor_scores(logits, torch.tensor([0, 2]))  # [head, item]
    assert hit.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert margin.tolist() == [[5.0, 3.0], [-3.0, 0.0]]


def test_usable_sets_keep_single_token_runs() -> None:
    sets = ordinal.usable_sets(number_tokenizer())
    assert {s.name for s in sets} == {"number words", "days"}
    with pytest.raises(HeadatlasError, match="ordinal"):
        ordinal.usable_sets(make_tokenizer())  # the tiny BPE has no run of 4 single-token items


def test_copy_suppression_role_is_below_its_threshold() -> None:
    roles = assign_roles({"copying": np.array([3.0, -3.0, 0.5, np.nan])})
    assert roles == ["copying", "copy-suppression", "", ""]
    assert any(r.below for r in RULES)


# ---------------------------------------------------------------- hand-set heads


def test_hand_set_copy_head_is_found(ewt_is_corpus: None) -> None:
    tok = make_tokenizer()
    model = one_layer_llama(len(tok))
    projector = torch.zeros(64, 64)
    projector[:HEAD_DIM, :HEAD_DIM] = torch.eye(HEAD_DIM)
    set_ov(model, projector)
    attend_to_self(model)
    config = FunctionalConfig(n_prompts=4, batch_size=4)
    result = battery_spec("copy").run(loaded_with(model, tok), config, lambda d, t: None)
    scores = result.stats.mean("copying")  # [layer, head]
    assert scores[0, 0] > 2.0, scores
    assert abs(scores[0, 1]) < scores[0, 0]
    assert result.stats.n("copying")[0, 0] > 50

    set_ov(model, -projector)
    result = battery_spec("copy").run(loaded_with(model, tok), config, lambda d, t: None)
    assert result.stats.mean("copying")[0, 0] < -2.0


def test_hand_set_successor_head_is_found() -> None:
    tok = number_tokenizer()
    model = one_layer_llama(len(tok))
    emb = model.model.embed_tokens.weight.detach()
    pairs = [(a, b) for items in (NUMBERS, DAYS) for a, b in itertools.pairwise(items)]
    src = torch.stack([emb[tok.convert_tokens_to_ids(a)] for a, _ in pairs], dim=1)  # [d_model, pair]
    dst = torch.stack([emb[tok.convert_tokens_to_ids(b)] for _, b in pairs], dim=1)  # [d_model, pair]
    set_ov(model, dst @ torch.linalg.pinv(src))
    loaded = loaded_with(model, tok)
    result = battery_spec("ordinal").run(
        loaded, FunctionalConfig(n_prompts=12, batch_size=6), lambda d, t: None
    )
    hit = result.stats.mean("successor")
    assert hit[0, 0] > 0.9, hit
    assert hit[0, 1] < 0.5, hit  # the random head is not a successor head
    assert result.stats.mean("successor_logit")[0, 0] > 1.0
    accuracy = ordinal.next_item_accuracy(loaded, FunctionalConfig(n_prompts=12), lambda d, t: None)
    assert 0.0 <= accuracy <= 1.0


def test_ordinal_refuses_encoders() -> None:
    tok = make_tokenizer()
    bert = ha.load(BUILDERS["bert"](0), tokenizer=tok)
    with pytest.raises(HeadatlasError, match="decoder"):
        battery_spec("ordinal").run(bert, FunctionalConfig(), lambda d, t: None)
    with pytest.raises(HeadatlasError, match="causal LM head"):
        battery_spec("copy").run(bert, FunctionalConfig(), lambda d, t: None)


# ---------------------------------------------------------------- scan, resume, verify


def test_scan_writes_functional_columns_and_roles(tmp_path, tiny_loaded, ewt_is_corpus) -> None:  # type: ignore[no-untyped-def]
    atlas = ha.scan(
        tiny_loaded, probes=["repeat", "copy"], n_prompts=2, seq_len=32, n_functional=2, out=tmp_path
    )
    for column in ("copying", "copying_std", "copying_n", "induction"):
        assert column in atlas.table.columns
    assert atlas.meta["batteries"]["copy"]["paper"].startswith("Elhage")
    again = ha.Atlas.load(tmp_path)
    assert np.allclose(again.table["copying"], atlas.table["copying"])
    only = ha.scan(tiny_loaded, probes=["copy"], n_functional=2)
    assert np.allclose(only.table["copying"], atlas.table["copying"])
    assert only.examples == []


def test_functional_resume_reuses_a_finished_battery(
    tmp_path, tiny_loaded, ewt_is_corpus, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    config = FunctionalConfig(n_prompts=2)
    first = run_functional(tiny_loaded, ["copy"], config, tmp_path, fingerprint="abc")
    assert (tmp_path / ".partial" / "functional-copy.npz").exists()

    def boom(*_args: object) -> None:
        raise AssertionError("a finished battery must not run again on resume")

    monkeypatch.setattr("headatlas.scanning.functional.battery_spec", lambda name: _Spec(boom))
    again = run_functional(tiny_loaded, ["copy"], config, tmp_path, resume=True, fingerprint="abc")
    assert np.allclose(again.stats.mean("copying"), first.stats.mean("copying"))
    with pytest.raises(HeadatlasError, match="other settings"):
        run_functional(tiny_loaded, ["copy"], config, tmp_path, resume=True, fingerprint="other")


class _Spec:
    def __init__(self, run: object) -> None:
        self.run = run
        self.paper = "test"
        self.scores = ("copying",)


def test_verify_induction_writes_the_comparison(tmp_path, tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    atlas = ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=32)
    config = FunctionalConfig(n_prompts=4, batch_size=4)
    base = induction_loss(tiny_loaded, config)
    with ha.ablate(tiny_loaded, [(layer, head) for layer in range(3) for head in range(4)]):
        silenced = induction_loss(tiny_loaded, config)
    assert base != pytest.approx(silenced)
    result = verify(tiny_loaded, atlas, "induction", k=2, seeds=2, config=config)
    assert result.baseline == pytest.approx(base)
    assert len(result.top_heads) == 2 and len(result.random_values) == 2
    path = save_verification(result, tmp_path)
    saved = json.loads(path.read_text())
    for key in (
        "score",
        "k",
        "metric",
        "higher_is_better",
        "baseline",
        "top_k",
        "random_mean",
        "random_std",
        "random_seeds",
    ):
        assert key in saved
    assert saved["higher_is_better"] is False
    with pytest.raises(HeadatlasError, match="no task metric"):
        verify(tiny_loaded, atlas, "previous_token", k=2)
    with pytest.raises(HeadatlasError, match=r"^k 0: give a number of heads") as raised:
        verify(tiny_loaded, atlas, "induction", k=0)
    assert raised.value.render().startswith("--k 0")  # the command line names the flag


def test_unknown_battery_lists_the_functional_ones(tiny_loaded) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(HeadatlasError, match="needle"):
        ha.scan(tiny_loaded, probes=["nonsense"])


def test_verify_mean_ablation_uses_held_out_means(tiny_loaded, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from headatlas.apps.verify.causal import head_means

    monkeypatch.setattr("headatlas.data.ud.ewt_sentences", lambda split="train": list(CORPUS))
    means = head_means(tiny_loaded)
    assert len(means) == 3 * 4 and means[(0, 0)].shape == (16,)
    atlas = ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=32)
    config = FunctionalConfig(n_prompts=4, batch_size=4)
    result = verify(tiny_loaded, atlas, "induction", k=2, seeds=1, mode="mean", config=config)
    assert result.mode == "mean" and np.isfinite(result.top_k)


def test_add_functional_columns_to_an_existing_atlas(tmp_path, tiny_loaded, ewt_is_corpus) -> None:  # type: ignore[no-untyped-def]
    first = ha.scan(tiny_loaded, probes=["repeat"], n_prompts=2, seq_len=32, out=tmp_path)
    with pytest.raises(HeadatlasError, match="already holds"):
        ha.scan(tiny_loaded, probes=["copy"], n_functional=2, out=tmp_path)
    merged = ha.scan(tiny_loaded, probes=["copy"], n_functional=2, out=tmp_path, add=True)
    assert np.allclose(merged.table["induction"], first.table["induction"])  # kept
    assert "copying" in merged.table.columns and merged.examples  # added; examples kept
    assert set(merged.meta["batteries"]) == {"repeat", "copy"}
    again = ha.Atlas.load(tmp_path)
    assert np.allclose(again.table["copying"], merged.table["copying"])
    assert merged.meta["tokens"] == first.meta["tokens"] + merged.meta["added"][-1]["tokens"]
    reseeded = ha.scan(
        tiny_loaded, probes=["natural"], n_prompts=2, seq_len=32, seed=7, out=tmp_path, add=True
    )
    assert reseeded.meta["seed"] is None and reseeded.meta["seeds"] == [0, 7]  # never one stale seed
    assert [a["seed"] for a in reseeded.meta["added"]] == [0, 7]
    with pytest.raises(HeadatlasError, match="add=True needs"):
        ha.scan(tiny_loaded, probes=["copy"], out=tmp_path / "new", add=True)
    other = ha.load(BUILDERS["gpt2"](0), tokenizer=make_tokenizer())
    with pytest.raises(HeadatlasError, match="layers"):
        ha.scan(other, probes=["copy"], n_functional=2, out=tmp_path, add=True)
