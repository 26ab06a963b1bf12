"""Battery ``syntax`` (Clark et al. 2019): pure scoring functions on hand-made attention, word
alignment for BPE and WordPiece tokenizers, and end-to-end runs on tiny models (no network)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import headatlas as ha
from headatlas.core.errors import HeadatlasError
from headatlas.data.ud import Sentence, read_conllu
from headatlas.detectors.words import word_attention
from headatlas.functional import FunctionalConfig, battery_spec
from headatlas.functional.syntax import (
    DEP_TO_HEAD,
    DIRECTIONS,
    ENCODER_OFFSETS,
    HEAD_TO_DEP,
    best_pairs,
    encode_sentence,
    example_hits,
    offset_hits,
    predict_words,
    relation_scores,
    run_syntax,
    sentence_examples,
    syntactic_stats,
)
from tiny_models import BUILDERS, make_tokenizer

WP_WORDS: tuple[str, ...] = (
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "in",
    "park",
    "mat",
    "big",
    "old",
    "red",
    "saw",
)
WP_WORDS += ("john", "mary", "'", "s", "gave", "book", ".", ",", "found", "near", "and")
WP_PIECES = ("archae", "##ologists", "pot", "##tery", "river", "##bank")


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer ([CLS] … [SEP]) with ids below the tiny BERT's vocab size."""
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WP_WORDS, *WP_PIECES])
    }
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="left",
    )


CONLLU = """\
# text = The cat sat on the mat .
1\tThe\tthe\tDET\t_\t_\t2\tdet\t_\t_
2\tcat\tcat\tNOUN\t_\t_\t3\tnsubj\t_\t_
3\tsat\tsit\tVERB\t_\t_\t0\troot\t_\t_
4\ton\ton\tADP\t_\t_\t6\tcase\t_\t_
5\tthe\tthe\tDET\t_\t_\t6\tdet\t_\t_
6\tmat\tmat\tNOUN\t_\t_\t3\tobl\t_\t_
7\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_

# text = John 's big dog saw the archaeologists .
1\tJohn\tJohn\tPROPN\t_\t_\t4\tnmod:poss\t_\t_
2\t's\t's\tPART\t_\t_\t1\tcase\t_\t_
3\tbig\tbig\tADJ\t_\t_\t4\tamod\t_\t_
4\tdog\tdog\tNOUN\t_\t_\t5\tnsubj\t_\t_
5\tsaw\tsee\tVERB\t_\t_\t0\troot\t_\t_
6\tthe\tthe\tDET\t_\t_\t7\tdet\t_\t_
7\tarchaeologists\tarchaeologist\tNOUN\t_\t_\t5\tobj\t_\t_
8\t.\t.\tPUNCT\t_\t_\t5\tpunct\t_\t_

# text = Mary gave the old dog a red book in the park .
1\tMary\tMary\tPROPN\t_\t_\t2\tnsubj\t_\t_
2\tgave\tgive\tVERB\t_\t_\t0\troot\t_\t_
3\tthe\tthe\tDET\t_\t_\t5\tdet\t_\t_
4\told\told\tADJ\t_\t_\t5\tamod\t_\t_
5\tdog\tdog\tNOUN\t_\t_\t2\tiobj\t_\t_
6\ta\ta\tDET\t_\t_\t8\tdet\t_\t_
7\tred\tred\tADJ\t_\t_\t8\tamod\t_\t_
8\tbook\tbook\tNOUN\t_\t_\t2\tobj\t_\t_
9\tin\tin\tADP\t_\t_\t11\tcase\t_\t_
10\tthe\tthe\tDET\t_\t_\t11\tdet\t_\t_
11\tpark\tpark\tNOUN\t_\t_\t2\tobl\t_\t_
12\t.\t.\tPUNCT\t_\t_\t2\tpunct\t_\t_

# text = The dog ran .
1\tThe\tthe\tDET\t_\t_\t2\tdet\t_\t_
2\tdog\tdog\tNOUN\t_\t_\t3\tnsubj\t_\t_
3\tran\trun\tVERB\t_\t_\t0\troot\t_\t_
4\t.\t.\tPUNCT\t_\t_\t3\tpunct\t_\t_

"""


@pytest.fixture
def gold(tmp_path: Path) -> list[Sentence]:
    """The four synthetic gold trees of :data:`CONLLU`, read back through ``read_conllu``."""
    path = tmp_path / "tiny.conllu"
    path.write_text(CONLLU, encoding="utf-8")
    return list(read_conllu(path))


# --- word-level pooling -------------------------------------------------------------------------


def test_word_attention_sums_to_and_averages_from() -> None:
    torch.manual_seed(0)
    word_ids = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1]])  # [batch, key]: CLS, w0×2, w1, w2×3, SEP
    attn = torch.softmax(torch.randn(1, 2, 8, 8), -1)  # [batch, head, query, key]
    before = attn.clone()
    out = word_attention(attn, word_ids, n_query_words=4, n_key_words=4)  # [batch, head, word, word]
    assert out.shape == (1, 2, 4, 4)
    assert torch.equal(attn, before)
    pieces = {w: [t for t in range(8) if word_ids[0, t] == w] for w in range(3)}
    for h in range(2):
        for a in range(3):
            for b in range(3):
                expected = np.mean([sum(float(attn[0, h, q, k]) for k in pieces[b]) for q in pieces[a]])
                assert float(out[0, h, a, b]) == pytest.approx(expected, abs=1e-6)
    assert torch.all(out[0, :, 3] == 0) and torch.all(out[0, :, :, 3] == 0)  # empty word slot
    # rows lose exactly the mass on special tokens
    assert torch.allclose(out[0].sum(-1)[:, :3], torch.ones(2, 3) - special_mass(attn, word_ids, pieces))


def special_mass(attn: torch.Tensor, word_ids: torch.Tensor, pieces: dict[int, list[int]]) -> torch.Tensor:
    """Mean over each word's pieces of the attention on tokens with no word, ``[head, word]``."""
    off = (word_ids[0] < 0).float()  # [key]
    per_token = attn[0] @ off  # [head, query]
    return torch.stack([per_token[:, pieces[w]].mean(-1) for w in range(3)], -1)


def test_predict_excludes_self_special_and_future() -> None:
    # one head, words 0..2; each word attends most to itself, then to a distinct other word
    wa = torch.tensor([[[[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.3, 0.6]]]])  # [batch, head, word, word]
    valid = torch.tensor([[True, True, True]])  # [batch, word]
    assert predict_words(wa, valid, causal=False).tolist() == [[[1, 0, 1]]]
    assert predict_words(wa, valid, causal=True).tolist() == [[[-1, 0, 1]]]
    assert predict_words(wa, torch.tensor([[True, False, True]]), causal=False).tolist() == [[[2, 0, 0]]]


# --- examples and baselines ---------------------------------------------------------------------


def test_sentence_examples_directions_subtypes_and_causality(gold: list[Sentence]) -> None:
    enc = sentence_examples(gold[1], causal=False)
    pairs = {(e.relation, e.direction) for e in enc}
    assert ("nmod", DEP_TO_HEAD) in pairs  # nmod:poss → nmod
    assert not any(e.relation in ("root", "punct") for e in enc)
    assert {e.query for e in enc if e.relation == "det" and e.direction == DEP_TO_HEAD} == {5}
    dec = sentence_examples(gold[1], causal=True)
    assert all(t < e.query for e in dec for t in e.targets)
    assert ("det", DEP_TO_HEAD) not in {(e.relation, e.direction) for e in dec}
    assert ("det", HEAD_TO_DEP) in {(e.relation, e.direction) for e in dec}
    # head->dep: one example per (head word, relation), hit by any of its dependents
    amod = [e for e in sentence_examples(gold[2], causal=False) if e.direction == HEAD_TO_DEP]
    dets = {e.query: e.targets for e in amod if e.relation == "det"}
    assert dets == {4: (2,), 7: (5,), 10: (9,)}
    assert sentence_examples(gold[1], causal=False, valid=[False] + [True] * 7) == [
        e for e in enc if 0 not in (e.query, *e.targets)
    ]


def test_offset_hits() -> None:
    targets = torch.zeros(3, 5, dtype=torch.bool)  # [example, word]
    targets[0, 1] = True  # query 2 → word 1 (offset −1)
    targets[1, 4] = True  # query 2 → word 4 (offset +2)
    targets[2, 0] = True  # query 0 → word 0 never (offsets ≠ 0)
    hits = offset_hits(torch.tensor([2, 2, 0]), targets, ENCODER_OFFSETS)
    assert hits.shape == (5, 3)
    expected = {(-1, 0), (2, 1)}
    for i, k in enumerate(ENCODER_OFFSETS):
        for e in range(3):
            assert bool(hits[i, e]) == ((k, e) in expected)


def test_relation_scores_and_stats_arithmetic() -> None:
    # pair 0: 4 examples, pair 1: 2 examples; one layer, two heads
    pair = torch.tensor([0, 0, 0, 0, 1, 1])
    hits = torch.tensor(
        [[[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]]], dtype=torch.bool
    )  # [layer, head, example]
    base = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)  # [offset, example]
    s = relation_scores(hits, base, pair, 2)
    assert s.n.tolist() == [4, 2]
    assert s.baseline_offset.tolist() == [1, 0]
    assert s.baseline_accuracy.tolist() == [0.5, 0.0]
    assert s.accuracy[0, 0].tolist() == [0.75, 1.0]
    assert s.margin[0, 1].tolist() == [-0.5, 0.0]
    assert s.diff_sq[0, 0, 0] == 3  # d = [1, 0, -1, 1]
    best = best_pairs(s.margin, s.n, min_examples=3)
    assert best.tolist() == [[0, 0]]  # pair 1 has the larger margin for head 0 but too few examples
    assert best_pairs(s.margin, s.n, min_examples=1).tolist() == [[1, 1]]
    assert best_pairs(s.margin, s.n, min_examples=5).tolist() == [[-1, -1]]
    stats = syntactic_stats(s, best)
    assert stats.mean("syntactic")[0].tolist() == [0.25, -0.5]
    assert stats.n("syntactic")[0].tolist() == [4, 4]
    assert stats.std("syntactic")[0, 0] == pytest.approx(math.sqrt(0.75 - 0.25**2))
    none = syntactic_stats(s, best_pairs(s.margin, s.n, min_examples=5))
    assert none.n("syntactic").sum() == 0 and np.isnan(none.mean("syntactic")).all()


# --- oracle and uniform heads on random trees ----------------------------------------------------


def random_tree(rng: np.random.Generator, n: int) -> Sentence:
    """A random projective-or-not tree over ``n`` words with random relations."""
    order = rng.permutation(n)
    heads = [0] * n
    for i in range(1, n):
        heads[int(order[i])] = int(order[rng.integers(0, i)]) + 1
    rels = [("nsubj", "obj", "amod")[int(rng.integers(0, 3))] for _ in range(n)]
    rels[int(order[0])] = "root"
    words = tuple(f"w{i}" for i in range(n))
    return Sentence("x", " ".join(words), words, tuple(heads), tuple(rels), ("X",) * n)


@pytest.mark.parametrize("causal", [False, True])
def test_oracle_head_wins_and_uniform_head_does_not(causal: bool) -> None:
    rng = np.random.default_rng(0)
    n_words, n_sent = 12, 200
    sents = [random_tree(rng, n_words) for _ in range(n_sent)]
    # tokens: [sink, w0, w0', w1, w2, ...]: word 0 split in two pieces
    word_ids = torch.tensor([[-1, 0, *range(n_words)]] * n_sent)  # [batch, key]
    n_tok = word_ids.shape[1]
    attn = torch.zeros(n_sent, 2, n_tok, n_tok)  # [batch, head, query, key]
    for b, s in enumerate(sents):
        for q in range(n_tok):
            w = int(word_ids[b, q])
            gold = s.heads[w] - 1 if w >= 0 else -1
            if w >= 0 and gold >= 0 and (not causal or gold < w):
                keys = [k for k in range(n_tok) if word_ids[b, k] == gold]
                attn[b, 0, q, keys] = 0.6 / len(keys)
                attn[b, 0, q, 0] = 0.4
            else:
                attn[b, 0, q, 0] = 1.0
    allowed = torch.ones(n_tok, n_tok).tril() if causal else torch.ones(n_tok, n_tok)  # [query, key]
    attn[:, 1] = allowed / allowed.sum(-1, keepdim=True)  # head 1: uniform
    offsets = (-3, -2, -1) if causal else ENCODER_OFFSETS
    examples = [(b, e) for b, s in enumerate(sents) for e in sentence_examples(s, causal)]
    pairs = [(r, d) for r in ("amod", "nsubj", "obj") for d in DIRECTIONS]
    ex_batch = torch.tensor([b for b, _ in examples])
    ex_query = torch.tensor([e.query for _, e in examples])
    ex_targets = torch.zeros(len(examples), n_words, dtype=torch.bool)
    for i, (_, e) in enumerate(examples):
        ex_targets[i, list(e.targets)] = True
    pair = torch.tensor([pairs.index((e.relation, e.direction)) for _, e in examples])
    valid = torch.ones(n_sent, n_words, dtype=torch.bool)
    pred = predict_words(
        word_attention(attn, word_ids, n_query_words=n_words, n_key_words=n_words), valid, causal
    )
    hits = example_hits(pred, ex_batch, ex_query, ex_targets)[None]  # [layer, head, example]
    scores = relation_scores(hits, offset_hits(ex_query, ex_targets, offsets), pair, len(pairs))
    dep = [i for i, (_, d) in enumerate(pairs) if d == DEP_TO_HEAD]
    assert torch.all(scores.accuracy[0, 0, dep] == 1.0)
    stats = syntactic_stats(scores, best_pairs(scores.margin, scores.n, min_examples=50))
    oracle, uniform = stats.mean("syntactic")[0]
    assert oracle > 0.5
    assert uniform < 0.15 and oracle - uniform > 0.5  # uniform: ties go to the first word, ~chance
    assert stats.n("syntactic")[0, 0] >= 50


# --- tokenisation ---------------------------------------------------------------------------------


def test_encode_bpe_aligns_pieces_and_adds_bos(gold: list[Sentence]) -> None:
    tok = make_tokenizer()
    for s in gold:
        enc = encode_sentence(tok, s, causal=True)
        assert enc.ids[0] == tok.bos_token_id and enc.word_ids[0] == -1
        for w, word in enumerate(s.words):
            ids = [i for i, wid in zip(enc.ids, enc.word_ids, strict=True) if wid == w]
            assert str(tok.decode(ids)).strip() == word
    assert encode_sentence(tok, gold[0], causal=False).word_ids[0] == -1  # the tokenizer's own BOS
    plain = make_tokenizer(add_bos=False)  # a BOS token the tokenizer never adds: none is added
    assert encode_sentence(plain, gold[0], causal=False).word_ids[0] == 0
    enc = encode_sentence(plain, gold[0], causal=True)
    assert plain.bos_token_id not in enc.ids and enc.word_ids[0] == -1  # the first token is the sink


def test_encode_wordpiece_excludes_cls_sep(gold: list[Sentence]) -> None:
    tok = wordpiece_tokenizer()
    enc = encode_sentence(tok, gold[1], causal=False)
    pieces = tok.convert_ids_to_tokens(list(enc.ids))
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert enc.word_ids[0] == -1 and enc.word_ids[-1] == -1
    assert [p for p, w in zip(pieces, enc.word_ids, strict=True) if w == 6] == ["archae", "##ologists"]
    assert [p for p, w in zip(pieces, enc.word_ids, strict=True) if w == 1] == ["'", "s"]


def test_errors_for_slow_tokenizer_and_missing_data(
    tiny_loaded: ha.LoadedModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow = dataclasses.replace(tiny_loaded, tokenizer=object())  # type: ignore[arg-type]
    with pytest.raises(HeadatlasError, match="fast tokenizer"):
        run_syntax(slow, FunctionalConfig())
    monkeypatch.setenv("HEADATLAS_CACHE", str(tmp_path / "empty"))
    with pytest.raises(HeadatlasError, match="make data") as err:
        run_syntax(tiny_loaded, FunctionalConfig())
    assert "\n" not in str(err.value)


# --- end to end on tiny models -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_run_syntax_end_to_end(kind: str, gold: list[Sentence], tiny_loaded: ha.LoadedModel) -> None:
    bert = kind == "bert"
    loaded = ha.load(BUILDERS["bert"](0), tokenizer=wordpiece_tokenizer()) if bert else tiny_loaded
    info = loaded.info
    calls: list[tuple[int, int]] = []
    result = run_syntax(
        loaded,
        FunctionalConfig(n_prompts=10, batch_size=3),
        lambda d, t: calls.append((d, t)),
        sentences=gold,
        min_examples=2,
    )
    assert calls[-1] == (2, 2)
    assert result.battery == "syntax"
    assert battery_spec("syntax").scores == ("syntactic",)
    p = result.params
    assert p["n_sentences"] == 4 and p["n_words"] == sum(len(s.words) for s in gold)
    assert p["split"] == "given" and p["min_examples"] == 2
    table = result.tables["syntax_relations"]
    assert list(table.columns) == [
        "layer",
        "head",
        "relation",
        "direction",
        "accuracy",
        "n",
        "baseline_accuracy",
        "baseline_offset",
        "margin",
    ]
    assert len(table) % (info.n_layers * info.n_heads) == 0
    assert table["accuracy"].between(0, 1).all() and table["baseline_accuracy"].between(0, 1).all()
    assert table["margin"].between(-1, 1).all() and (table["n"] > 0).all()
    assert set(table["direction"]) <= set(DIRECTIONS)
    assert not set(table["relation"]) & {"root", "punct"}
    if info.causal:
        assert (table["baseline_offset"] < 0).all()
        assert not ((table["relation"] == "det") & (table["direction"] == DEP_TO_HEAD)).any()
    mean, n = result.stats.mean("syntactic"), result.stats.n("syntactic")
    assert mean.shape == n.shape == (info.n_layers, info.n_heads)
    eligible = table[table["n"] >= 2]
    best = eligible.groupby(["layer", "head"], as_index=False)["margin"].max()
    for row in best.itertuples():
        layer, head = int(row.layer), int(row.head)
        assert mean[layer, head] == pytest.approx(row.margin)
        assert n[layer, head] in set(eligible[(eligible["layer"] == layer) & (eligible["head"] == head)]["n"])
    assert (result.stats.std("syntactic") <= 1.0 + 1e-9).all()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_batching_does_not_change_results(kind: str, gold: list[Sentence]) -> None:
    """Absolute-position models (BERT, GPT-2): padding must not shift positions, so a batch of
    sentences of different lengths scores exactly like one sentence at a time."""
    tok = wordpiece_tokenizer() if kind == "bert" else make_tokenizer()
    loaded = ha.load(BUILDERS[kind](0), tokenizer=tok)
    tables = [
        run_syntax(loaded, FunctionalConfig(batch_size=size), sentences=gold, min_examples=2).tables[
            "syntax_relations"
        ]
        for size in (1, 4)
    ]
    assert tables[0].equals(tables[1])
