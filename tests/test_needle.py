"""The ``needle`` battery: copy-paste scoring, a hand-built retrieval head, trials and errors.

Tiny models only (no network, no packaged data): the haystack corpus is the tiny tokenizer's own
training corpus, patched in for the EWT sentences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

import headatlas as ha
from headatlas.core.errors import HeadatlasError
from headatlas.functional import FunctionalConfig, battery_spec
from headatlas.functional import needle as nd
from headatlas.functional.needle_prompts import Needle, Trial, build_trial, build_trials, rouge1_recall
from tiny_models import BUILDERS, CORPUS, blank_llama, make_tokenizer, one_layer_llama_config

COPY_HEAD = 1
"""The query head of the hand-built model that copies the needle (it shares KV head 0 with head 0)."""


@pytest.fixture
def tiny_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve the tiny corpus instead of the (possibly uninstalled) UD EWT sentences."""
    monkeypatch.setattr(nd, "ewt_sentences", lambda split="train", limit=None: list(CORPUS))


# (1) the pure scoring function on hand-made attention ----------------------------------------


def _scores_from_attention(
    probs_per_step: list[torch.Tensor], emitted: list[int], prompt: torch.Tensor, span: tuple[int, int]
) -> torch.Tensor:
    """Score heads from per-step attention ``[batch=1, head, query=1, key]`` as the battery does."""
    covered = torch.zeros(probs_per_step[0].shape[1], span[1] - span[0], dtype=torch.bool)  # [head, span]
    for probs, token in zip(probs_per_step, emitted, strict=True):
        top = probs[0, :, -1].argmax(-1)  # [head]
        covered |= nd.copy_paste_hits(top, span, token, prompt)  # [head, span]
    return nd.retrieval_from_hits(covered)  # [head]


def test_copy_paste_scoring_on_hand_made_attention() -> None:
    prompt = torch.arange(100, 120)  # [key] distinct token ids
    span = (8, 12)
    emitted = prompt[8:12].tolist()  # the model answers with the needle's tokens
    n_key = 20 + len(emitted)
    steps = []
    for step, _token in enumerate(emitted):
        probs = torch.full((1, 3, 1, n_key), 1.0 / n_key)  # [batch, head, query, key]: uniform
        probs[0, 0, 0] = 0.0
        probs[0, 0, 0, 8 + step] = 1.0  # head 0 attends to the needle token it emits
        probs[0, 2, 0] = 0.0
        probs[0, 2, 0, 8] = 1.0  # head 2 always attends to the needle's first token
        steps.append(probs)
    scores = _scores_from_attention(steps, emitted, prompt, span)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == 0.0 and scores[1] < 0.1  # uniform head: top-1 key is position 0, no role
    assert scores[2] == pytest.approx(0.25)  # it copies the first token once, not at every step


def test_copy_paste_needs_the_emitted_token_and_counts_positions_once() -> None:
    prompt = torch.tensor([5, 6, 7, 8, 9, 7])  # [key]
    span = (1, 4)  # tokens 6, 7, 8
    top = torch.tensor([[2, 2, 5, 0]])  # [layer=1, head=4]
    hits = nd.copy_paste_hits(top, span, 7, prompt)  # [layer, head, span]
    assert hits.shape == (1, 4, 3)
    assert hits[0, :, 1].tolist() == [True, True, False, False]  # key 5 holds 7 but is outside the span
    assert not nd.copy_paste_hits(top, span, 8, prompt).any()  # right place, wrong emitted token
    twice = hits | nd.copy_paste_hits(top, span, 7, prompt)
    assert nd.retrieval_from_hits(twice)[0, 0] == pytest.approx(1 / 3)  # the reference would give 2/3
    assert top.tolist() == [[2, 2, 5, 0]] and prompt.tolist() == [5, 6, 7, 8, 9, 7]  # inputs untouched


def test_rouge1_recall() -> None:
    assert rouge1_recall("purple tiger", "The secret code word is Purple tiger.") == 1.0
    assert rouge1_recall("eat a sandwich by the river", "eat a sandwich") == 0.5
    assert rouge1_recall("482913", "The number is 482,913.") == 0.0


# (2) a hand-built retrieval head must be found ------------------------------------------------


def _hand_trial() -> Trial:
    """A trial on the tiny corpus whose needle value is four letters found nowhere else in the prompt."""
    tok = make_tokenizer()

    def trial(value: str) -> Trial:
        needle = Needle(
            "test", "The secret code word of Ann is", value, ".", "What is the secret code word of Ann?"
        )
        return build_trial(tok, CORPUS, needle, length=160, depth=0.5, rng=np.random.default_rng(3))

    draft = trial(" Q")
    elsewhere = set(draft.ids[: draft.span[0]] + draft.ids[draft.span[1] :])
    letters = [c for c in "QJXKVYUZ" if tok.convert_tokens_to_ids(c) not in elsewhere][:4]
    assert len(letters) == 4, "the tiny prompt uses too many capital letters for this test"
    out = trial(" " + "".join(letters))
    value = list(out.answer_ids)
    assert len(set(value)) == 4 and not set(value) & set(out.ids[: out.span[0]] + out.ids[out.span[1] :])
    return out


def _copying_llama(starts: list[int], value: list[int], eos: int, vocab: int) -> LlamaForCausalLM:
    """A one-layer Llama whose head :data:`COPY_HEAD` copies ``value`` out of the prompt, by hand.

    After any token of ``starts`` it emits ``value[0]``, after ``value[j]`` it emits
    ``value[j+1]``, after the last one EOS; each time by attending to that token in the needle.

    Why this construction: a real retrieval head is an induction-style circuit (a previous-token
    head, then a head matching "the token before" to the current token), which under RoPE needs
    two layers and fragile positional tuning. The score only asks whether the head's top-1 key is
    the needle position of the token the model emits, so a one-layer *bigram* version is enough:
    with ``chain = [start, *value]``, the query of ``chain[j]`` matches the key of ``chain[j+1]``
    (value tokens occur only in the needle), and that head's OV circuit plus the unembedding turn
    the attended token into the next output. The model really decodes the value through that
    head's attention (ablating the head breaks it), so the test exercises capture, the KV-cache
    decoding loop and the spans end to end. RoPE is made negligible (``rope_theta`` 1e30, and the
    fast-rotating pair left unused) so attention is by content only. It is not a test that a
    trained model's copying circuit is found; the real-model run is.

    Hidden dims: 0..15 input slots (``chain[j]`` embeds as slot j, every start token as slot 0,
    which has no key), 16..31 output slots (what the head writes), 32..63 random content for
    every other token. The unembedding reads output slot j as ``chain[j]`` and the last value
    token's input slot as EOS, so decoding stops after the value.
    """
    cfg = one_layer_llama_config(
        vocab,
        intermediate_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e30},
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    model = blank_llama(cfg)
    qk_dims = [d for d in range(16) if d % 8 != 0]  # skip RoPE's fast pair (dims 0 and 8)
    strength, gain, kv = 160.0, 10.0, COPY_HEAD // 2
    with torch.no_grad():
        emb = model.model.embed_tokens.weight  # [vocab, hidden]
        emb[:, 32:] = torch.randn(vocab, 32)
        attn = model.model.layers[0].self_attn
        chain = [starts[0], *value]
        for j, token in enumerate([*starts, *value]):
            emb[token] = 0.0
            emb[token, max(0, j - len(starts) + 1)] = 1.0  # RMSNorm turns this into 8.0 (hidden 64)
        for j in range(len(chain) - 1):  # projection weights are [out, in]
            attn.q_proj.weight[COPY_HEAD * 16 + qk_dims[j], j] = strength / 8  # query of chain[j]
            attn.k_proj.weight[kv * 16 + qk_dims[j], j + 1] = 1.0 / 8  # key of chain[j+1]
            attn.v_proj.weight[kv * 16 + j + 1, j + 1] = 1.0 / 8  # value: which token it is
            attn.o_proj.weight[16 + j + 1, COPY_HEAD * 16 + j + 1] = gain  # → output slot
            model.lm_head.weight[chain[j + 1], 16 + j + 1] = 1.0  # [vocab, hidden]
        model.lm_head.weight[eos, len(chain) - 1] = 1.0  # after the last value token: EOS
    return model


@pytest.fixture(scope="module")
def hand_model() -> tuple[ha.LoadedModel, Trial]:
    tok = make_tokenizer()
    trial = _hand_trial()
    # decoding starts from the last prompt token, the teacher-forced answer reaches the value
    # from the token before it in the gold answer: both lead to the first value token
    starts = [trial.ids[-1], trial.gold_ids[trial.gold_value[0] - 1]]
    model = _copying_llama(starts, list(trial.answer_ids), int(tok.eos_token_id), len(tok))
    return ha.load(model, tokenizer=tok), trial


def test_hand_built_retrieval_head_is_found(
    hand_model: tuple[ha.LoadedModel, Trial], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded, trial = hand_model
    decoded = nd.greedy_decode(loaded, trial, nd.prefill(loaded, trial))
    assert decoded.tokens == list(trial.answer_ids)  # the model decodes the value, then EOS
    assert decoded.text == trial.needle.answer
    retrieval = nd.retrieval_from_hits(decoded.covered)  # [layer, head]
    assert retrieval[0, COPY_HEAD] == pytest.approx(1.0)
    assert torch.count_nonzero(retrieval).item() == 1  # every other head has no role

    covered, accuracy = nd.teacher_forced(loaded, trial, nd.prefill(loaded, trial))
    assert accuracy == pytest.approx(1.0)  # on the value tokens of the gold answer
    assert torch.equal(nd.retrieval_from_hits(covered), retrieval)

    # the whole battery, on this one trial
    monkeypatch.setattr(nd, "needle_trials", lambda _loaded, _config: [trial])
    result = nd.run_needle(loaded, FunctionalConfig())
    assert result.params["n_counted"] == 1 and result.params["n_counted_tf"] == 1
    for score in ("retrieval", "retrieval_tf"):
        mean = result.stats.mean(score)  # [layer, head]
        assert mean[0, COPY_HEAD] == pytest.approx(1.0)
        assert np.count_nonzero(mean) == 1
    assert nd.needle_accuracy(loaded, FunctionalConfig()) == 1.0
    with ha.ablate(loaded, [(0, COPY_HEAD)]):  # what `headatlas verify` does
        assert nd.needle_accuracy(loaded, FunctionalConfig()) == 0.0
    with ha.ablate(loaded, [(0, 0), (0, 3)]):
        assert nd.needle_accuracy(loaded, FunctionalConfig()) == 1.0


# trials and the battery on a random tiny model ----------------------------------------------


def test_trials_are_seeded_with_exact_spans() -> None:
    tok = make_tokenizer()
    first = build_trials(tok, CORPUS, (160, 192), seed=4)
    assert first == build_trials(tok, CORPUS, (160, 192), seed=4)
    assert len(first) == 2 * 3 * 3
    for trial in first:
        assert len(trial.ids) <= trial.length
        assert str(tok.decode(list(trial.ids[slice(*trial.span)]))).strip() == trial.needle.answer
        assert str(tok.decode(list(trial.ids[slice(*trial.needle_span)]))).strip() == trial.needle.sentence
        assert trial.gold_ids[slice(*trial.gold_value)] == trial.answer_ids
        assert str(tok.decode(list(trial.gold_ids))) == trial.needle.lead + trial.needle.value
        assert trial.ids[-3:] == tuple(tok("\nAnswer:", add_special_tokens=False)["input_ids"])[-3:]
    few = build_trials(tok, CORPUS, (160, 192), seed=4, n_trials=4)
    assert len(few) == 4 and all(t in first for t in few)  # capping keeps the remaining trials


def test_run_needle_on_a_random_tiny_model(
    tiny_loaded: ha.LoadedModel, tiny_corpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nd, "MAX_NEW_TOKENS", 6)  # a random model never says EOS: keep it short
    spec = battery_spec("needle")
    assert spec.scores == ("retrieval", "retrieval_tf") and spec.metric is nd.needle_accuracy
    seen: list[tuple[int, int]] = []
    result = spec.run(
        tiny_loaded, FunctionalConfig(n_prompts=3, max_len=160), lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (3, 3)
    assert result.params["n_trials"] == 3 and result.params["lengths"] == [160]
    assert set(result.stats.names) == {"retrieval", "retrieval_tf"}
    assert result.stats.count["retrieval"].shape == (3, 4)
    assert len(result.tables["needle_trials"]) == 3
    assert result.stats.n("retrieval").max() == result.params["n_counted"]
    accuracy = nd.needle_accuracy(tiny_loaded, FunctionalConfig(n_prompts=3, max_len=160))
    assert 0.0 <= accuracy <= 1.0


# (3) errors --------------------------------------------------------------------------------


def test_needle_longer_than_max_len(tiny_loaded: ha.LoadedModel, tiny_corpus: None) -> None:
    with pytest.raises(HeadatlasError, match="max-len") as err:
        nd.run_needle(tiny_loaded, FunctionalConfig(max_len=20))
    assert "\n" not in str(err.value)
    with pytest.raises(HeadatlasError, match="max-len"):
        nd.needle_accuracy(tiny_loaded, FunctionalConfig(max_len=20))


def test_encoder_is_refused() -> None:
    bert = ha.load(BUILDERS["bert"](0), tokenizer=make_tokenizer())
    for fn in (nd.run_needle, nd.needle_accuracy):
        with pytest.raises(HeadatlasError, match="needle needs a decoder"):
            fn(bert, FunctionalConfig())


def test_missing_ewt_data(
    tiny_loaded: ha.LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEADATLAS_CACHE", str(tmp_path))
    with pytest.raises(HeadatlasError, match="not installed"):
        nd.run_needle(tiny_loaded, FunctionalConfig(max_len=160))
