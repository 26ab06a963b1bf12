"""Battery ``translate``: the pure argmax score, a hand-built translation head, bad tokenizers, the metric.

The hand-built model is a one-layer Llama "translator" over a word-level tokenizer (every word is
one token, so the list structure is fixed: with ``k`` words the predicting position of target
word ``i`` is exactly ``2k`` tokens after source word ``i``). Every embedding has the same norm
and the same constant first coordinate, so after RMSNorm head 0's query and key are constant
vectors; rotary embeddings then make its score a function of the offset only,
``sum_f cos(theta_f (offset - 2k))``, largest at ``offset = 2k`` (Su et al. 2021, RoFormer: the
rotated dot product depends on the relative position only). Its value/output copy the attended
source word into the residual stream and the unembedding maps it to the French word, so the
model translates only through that head.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

import headatlas as ha
from headatlas.batteries.base import pad_id
from headatlas.core.errors import HeadatlasError
from headatlas.functional import FunctionalConfig, battery_spec
from headatlas.functional import translate as tr
from tiny_models import one_layer_llama_config, word_tokenizer

K = tr.WORDS_PER_PROMPT
OFFSET = 2 * K
"""Tokens from source word ``i`` to the position predicting target word ``i`` (word-level tokenizer)."""


def language_tokenizer(languages: tuple[str, ...] = ("en", "fr")) -> PreTrainedTokenizerFast:
    """A word-level tokenizer knowing the words (and names) of ``languages``; others are ``[UNK]``."""
    words = tr.load_word_pairs()
    tokens = ["<bos>", "<eos>", "<pad>", "[UNK]", ":", ","]
    tokens += [words.languages[c] for c in languages] + [w[c] for w in words.words for c in languages]
    return word_tokenizer(tokens, unk_token="[UNK]")


def translator(tok: PreTrainedTokenizerFast, sharpness: float = 2.5, gain: float = 5.0) -> LlamaForCausalLM:
    """A 1-layer Llama (4 heads, 2 KV heads) whose head 0 attends ``OFFSET`` tokens back and translates."""
    cfg = one_layer_llama_config(
        len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(0)
    vocab, d_head = len(tok), 16
    with torch.no_grad():
        rest = torch.randn(vocab, 63, generator=gen)  # [vocab, d_model - 1]
        emb = torch.cat([torch.ones(vocab, 1), rest / rest.norm(dim=1, keepdim=True)], 1)  # [vocab, d_model]
        model.model.embed_tokens.weight.copy_(emb)
        attn = model.model.layers[0].self_attn
        theta = model.model.rotary_emb.inv_freq.float()  # [d_head / 2]
        q_vec = torch.cat([torch.cos(theta * OFFSET), -torch.sin(theta * OFFSET)])  # [d_head]
        k_vec = torch.cat([torch.ones(d_head // 2), torch.zeros(d_head // 2)])  # [d_head]
        attn.q_proj.weight[:d_head] = 0.0
        attn.q_proj.weight[:d_head, 0] = sharpness * q_vec
        attn.k_proj.weight[:d_head] = 0.0
        attn.k_proj.weight[:d_head, 0] = sharpness * k_vec
        proj = torch.randn(d_head, 64, generator=gen)  # [d_head, d_model]
        proj[:, 0] = 0.0
        attn.v_proj.weight[:d_head] = proj
        attn.o_proj.weight.zero_()
        attn.o_proj.weight[:d_head, :d_head] = gain * torch.eye(d_head)
        model.model.layers[0].mlp.down_proj.weight.zero_()
        normed = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()  # [vocab, d_model] RMSNorm(embedding)
        copied = normed @ proj.T  # [vocab, d_head] what head 0 writes for each attended token
        unembed = torch.zeros(vocab, 64)  # [vocab, d_model]
        ids = tok.convert_tokens_to_ids
        for source, target in tr.load_word_pairs().pair("fr"):
            row = copied[ids(source)]  # [d_head]
            unembed[ids(target), :d_head] = row / row.norm()
        model.lm_head.weight.copy_(unembed)
    return model


@pytest.fixture(scope="module")
def translator_loaded() -> ha.LoadedModel:
    """The hand-built translator as a LoadedModel."""
    tok = language_tokenizer()
    return ha.load(translator(tok), tokenizer=tok)


def _prompt_batch(n_prompts: int) -> tuple[list[tr.TranslationPrompt], tr.PromptBatch]:
    """English–French prompts of the word-level tokenizer, ``k`` words and ``k // 2`` mixed (padding)."""
    tok = language_tokenizer()
    long, _ = tr.translation_prompts(tok, "words", n_prompts, seed=1)
    short, _ = tr.translation_prompts(tok, "words", n_prompts, seed=2, k=K // 2)
    prompts = [p for pair in zip(long, short, strict=True) for p in pair]
    return prompts, tr.prompt_batches(prompts, pad_id(tok), batch_size=len(prompts))[0]


def test_pure_score_aligned_uniform_random() -> None:
    prompts, pb = _prompt_batch(20)
    batch, rows = pb.queries.shape
    seq = pb.batch.input_ids.shape[1]
    assert pb.valid.sum() == 20 * (K + K // 2)
    causal = torch.ones(seq, seq).tril().bool()  # [query, key]
    real = pb.batch.attention_mask.bool()  # [batch, key]
    allowed = (causal[None] & real[:, None, :]).float()  # [batch, query, key]
    uniform = allowed / allowed.sum(-1, keepdim=True).clamp(min=1)  # [batch, query, key]
    noise = torch.rand(batch, seq, seq, generator=torch.Generator().manual_seed(0)) * allowed
    noisy = noise / noise.sum(-1, keepdim=True).clamp(min=1e-9)  # [batch, query, key]
    aligned = uniform.clone()  # [batch, query, key]
    for b in range(batch):
        for r in range(rows):
            if pb.valid[b, r]:
                q = int(pb.queries[b, r])
                aligned[b, q] = pb.sources[b, r].float() / pb.sources[b, r].sum()
    probs = torch.stack([aligned, uniform, noisy], dim=1)  # [batch, head, query, key]
    hits = tr.translation_hits(probs, pb.queries, pb.sources, pb.keys_ok)  # [batch, head, row]
    assert hits.shape == (batch, 3, rows)
    score = hits.sum((0, 2)) / pb.valid.sum()  # [head]
    assert score[0] == 1.0
    assert score[1] < 0.5  # ties go to the earliest key, the language name after BOS
    chance_sum, n = tr.chance_hits(pb.queries, pb.sources, pb.keys_ok, pb.valid)
    assert n == int(pb.valid.sum())
    assert abs(float(score[2]) - chance_sum / n) < 0.08
    assert score[2] < 0.5
    # The sink is never chosen: a head putting everything on the first token still picks among the rest.
    sink = torch.zeros_like(uniform)  # [batch, query, key]
    for b, p in enumerate(prompts):
        sink[b, :, seq - len(p.ids)] = 1.0
    sink_hits = tr.translation_hits(sink[:, None], pb.queries, pb.sources, pb.keys_ok)  # [batch, 1, row]
    assert sink_hits.sum() == 0
    # Inputs are not modified.
    assert torch.equal(probs[:, 0], aligned)


def test_spans_and_queries_on_word_tokens() -> None:
    prompts, _ = _prompt_batch(2)
    p = prompts[0]
    assert p.text.startswith("English: ") and "\nFrench: " in p.text
    assert all(b - a == 1 for a, b in p.source_spans + p.target_spans)
    for (s0, _), (t0, _) in zip(p.source_spans, p.target_spans, strict=True):
        assert t0 - 1 - s0 == OFFSET
    tok = language_tokenizer()
    assert tok.convert_ids_to_tokens(p.ids[p.target_spans[0][0] - 1]) == ":"
    assert {tok.convert_ids_to_tokens(p.ids[t0 - 1]) for t0, _ in p.target_spans[1:]} == {","}
    first, _ = tr.translation_prompts(tok, "words", 2, seed=1)
    again, _ = tr.translation_prompts(tok, "words", 2, seed=1)
    assert first == again
    assert first[0].ids != tr.translation_prompts(tok, "words", 2, seed=3)[0][0].ids


def test_slow_tokenizer_path_matches_offsets() -> None:
    tok = language_tokenizer()

    class Slow:
        is_fast = False
        bos_token_id = tok.bos_token_id

        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            return {"input_ids": tok(text, add_special_tokens=False)["input_ids"]}

    pairs = tr.load_word_pairs().pair("fr")[:K]
    fast = tr.build_prompt(tok, ("English", "French"), "fr", pairs)
    slow = tr.build_prompt(Slow(), ("English", "French"), "fr", pairs)
    assert fast is not None and fast == slow


def test_hand_built_translation_head_is_found(translator_loaded: ha.LoadedModel) -> None:
    result = battery_spec("translate").run(translator_loaded, FunctionalConfig(n_prompts=10), tr.no_progress)
    mean = result.stats.mean("translation")  # [layer, head]
    assert mean.shape == (1, 4)
    assert mean[0, 0] == 1.0
    assert (mean[0, 1:] < 0.5).all()
    assert result.stats.n("translation")[0, 0] == 10 * K
    assert result.params["pairs"] == ["en-fr"]
    assert set(result.params["skipped"]) == {"en-de", "en-es", "en-tr"}
    assert "unknown token" in result.params["skipped"]["en-de"]
    assert 0 < result.params["chance"] < 0.2


def test_metric_drops_when_heads_are_ablated(translator_loaded: ha.LoadedModel) -> None:
    config = FunctionalConfig(n_prompts=10, batch_size=4)
    metric = battery_spec("translate").metric
    assert metric is not None
    full = metric(translator_loaded, config, tr.no_progress)
    assert 0.0 <= full <= 1.0
    assert full > 0.9
    assert metric(translator_loaded, config, tr.no_progress) == full  # identical prompts every call
    every_head = [(0, h) for h in range(4)]
    with ha.ablate(translator_loaded, every_head):
        none = metric(translator_loaded, config, tr.no_progress)
    with ha.ablate(translator_loaded, [(0, 0)]):
        without_translator = metric(translator_loaded, config, tr.no_progress)
    with ha.ablate(translator_loaded, [(0, 3)]):
        without_other = metric(translator_loaded, config, tr.no_progress)
    assert 0.0 <= none <= 1.0 and none < 0.2
    assert without_translator < 0.2
    assert without_other == full


def test_english_only_byte_level_tokenizer_is_refused(tiny_loaded: ha.LoadedModel) -> None:
    # The tiny BPE has no [UNK]; it spells French/German/… words out at ~1.2-1.3 characters per token.
    with pytest.raises(
        HeadatlasError, match=r"no tokens for French/German/Spanish/Turkish words.*gemma3-270m"
    ):
        tr.run_translate(tiny_loaded, FunctionalConfig(n_prompts=2))
    with pytest.raises(HeadatlasError, match="characters per token"):
        tr.translation_accuracy(tiny_loaded, FunctionalConfig(n_prompts=2))


def test_english_only_word_tokenizer_is_refused() -> None:
    tok = language_tokenizer(("en",))
    with pytest.raises(HeadatlasError, match=r"unknown token\): translate needs a multilingual model") as err:
        tr.translation_prompts(tok, "english-only", 2, seed=0)
    assert "\n" not in str(err.value)


def test_encoder_and_missing_data_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiny_models import BUILDERS, make_tokenizer

    bert = ha.load(BUILDERS["bert"](0), tokenizer=make_tokenizer())
    with pytest.raises(HeadatlasError, match="causal"):
        tr.run_translate(bert, FunctionalConfig(n_prompts=2))
    with pytest.raises(HeadatlasError, match=r"word list .*nope\.json is missing"):
        tr.load_word_pairs("data/nope.json")
    real = tr.load_word_pairs
    monkeypatch.setattr(tr, "load_word_pairs", lambda: real("data/nope.json"))
    with pytest.raises(HeadatlasError, match="missing"):
        tr.translation_prompts(language_tokenizer(), "words", 2, seed=0)


def test_word_list_is_big_enough() -> None:
    words = tr.load_word_pairs()
    assert words.source == "en"
    assert {"fr", "de", "es", "tr"} <= set(words.targets)
    for target in words.targets:
        pairs = words.pair(target)
        assert len(pairs) >= 40
        assert len({t for _, t in pairs}) == len(pairs)
        assert all(" " not in s + t and s.lower() != t.lower() for s, t in pairs)
