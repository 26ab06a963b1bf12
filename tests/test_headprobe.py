"""Per-head probes: the batched trainer, hand-wired heads with known answers, controls, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import headatlas as ha
from headatlas.apps.common.head_features import collect_features
from headatlas.apps.common.logreg import choose_l2, fit_logreg, standardise
from headatlas.apps.common.probe_tasks import (
    FACTS,
    build_probe_task,
    control_labels,
    false_answer,
    truth_task,
)
from headatlas.apps.probe.probing import run_probes, write_probes
from headatlas.core.errors import HeadatlasError
from tiny_models import blank_llama, make_tokenizer, one_layer_llama_config, word_tokenizer

WORDS = ("cat", "dog", "cow", "red", "blue", "green", "run", "eat")
CLASSES = {"cat": "animal", "dog": "animal", "cow": "animal", "red": "colour", "blue": "colour",
           "green": "colour", "run": "verb", "eat": "verb"}  # fmt: skip
SPECIALS = ("<bos>", "<eos>", "<pad>", "<unk>")


def wired_model() -> ha.LoadedModel:
    """One layer, 4 heads of 16 (MHA). Head 0 attends to tokens of its own class and outputs the
    class one-hot; head 2 attends to its own word and outputs the word one-hot; heads 1 and 3
    output 0. Embedding of word w: e_w (dims 0–7) + e_{8 + class}; rotary pairs keep classes and
    words orthogonal, and the self score (cos 0 = 1) is the largest."""
    tokenizer = word_tokenizer([*SPECIALS, *WORDS])
    model = blank_llama(one_layer_llama_config(len(tokenizer), num_key_value_heads=4))
    classes = sorted(set(CLASSES.values()))
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[tokenizer.convert_tokens_to_ids("<bos>"), 11] = 1.0
        emb[tokenizer.convert_tokens_to_ids("<pad>"), 11] = 1.0
        for w, word in enumerate(WORDS):
            token = tokenizer.convert_tokens_to_ids(word)
            c = classes.index(CLASSES[word])
            emb[token, w] = 1.0
            emb[token, 8 + c] = 1.0
            attn.q_proj.weight[c, 8 + c] = 10.0
            attn.k_proj.weight[c, 8 + c] = 1.0
            attn.v_proj.weight[c, 8 + c] = 1.0
            attn.q_proj.weight[32 + w, w] = 10.0
            attn.k_proj.weight[32 + w, w] = 1.0
            attn.v_proj.weight[32 + w, w] = 1.0
    return ha.load(model, tokenizer=tokenizer)


def word_rows(path: Path, n: int = 150, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as fh:
        for _ in range(n):
            tokens = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=6)]
            fh.write(json.dumps({"tokens": tokens, "labels": [CLASSES[t] for t in tokens]}) + "\n")
    return path


def test_batched_trainer_matches_sklearn_within_one_point() -> None:
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    groups, n, d, classes = 6, 300, 12, 4
    y = torch.randint(0, classes, (n,), generator=gen)
    centres = torch.randn(groups, classes, d, generator=gen) * torch.linspace(0.1, 1.0, groups)[:, None, None]
    x = torch.randn(groups, n, d, generator=gen) + centres[:, y]  # [group, n, d]
    scaler = standardise(x[:, :200])
    train, test = scaler(x[:, :200]), scaler(x[:, 200:])
    l2 = 1e-2
    fit = fit_logreg(train, y[:200], classes, l2, max_iter=200)
    ours = fit.accuracy(test, y[200:]).numpy()
    theirs = []
    for g in range(groups):
        model = LogisticRegression(C=1.0 / (l2 * 200), max_iter=2000).fit(train[g].numpy(), y[:200].numpy())
        theirs.append(model.score(test[g].numpy(), y[200:].numpy()))
    assert np.abs(ours - np.array(theirs)).max() <= 0.01
    assert ours.max() - ours.min() > 0.3  # the groups really differ: not a trivially equal result


def test_choose_l2_picks_the_best_dev_strength() -> None:
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (120,), generator=gen)
    x = torch.randn(3, 120, 40, generator=gen)
    x[..., 0] += 0.8 * y  # one informative dimension among 40 noisy ones
    sc = standardise(x[:, :60])
    fit, path = choose_l2((sc(x[:, :60]), y[:60]), (sc(x[:, 60:]), y[60:]), 2, grid=(1.0, 1e-4))
    assert set(path) == {1.0, 1e-4}
    assert fit.l2 == max(path, key=lambda k: path[k])


def test_wired_heads_probe_to_one_and_the_rest_to_majority(tmp_path: Path) -> None:
    loaded = wired_model()
    task_file = word_rows(tmp_path / "classes.jsonl")
    result = run_probes(loaded, str(task_file), seeds=2, random_init=True)
    table = result.table.set_index(["layer", "head"])
    majority = result.params["majority"]
    assert table.loc[(0, 0), "accuracy"] >= 0.99  # copies the class
    assert table.loc[(0, 2), "accuracy"] >= 0.99  # copies the word, from which the class follows
    for head in (1, 3):
        assert abs(table.loc[(0, head), "accuracy"] - majority) <= 0.02
    # head 2 lets the probe memorise any labelling of word types, the control task too: selectivity ~0
    assert table.loc[(0, 2), "control_accuracy"] >= 0.97
    assert abs(table.loc[(0, 2), "selectivity"]) <= 0.03
    # head 0 only knows the class: it cannot fit the control task's per-word labels
    assert table.loc[(0, 0), "selectivity"] >= table.loc[(0, 2), "selectivity"] + 0.2
    assert np.isfinite(table["random_init_accuracy"]).all()
    assert table["seeds"].eq(2).all()


def test_probe_writes_atlas_columns_side_table_and_roles(tmp_path: Path) -> None:
    loaded = wired_model()
    result = run_probes(loaded, str(word_rows(tmp_path / "upos.jsonl")), seeds=1, random_init=False)
    result.column = "probe_upos"  # as if it were the built-in task: its spec and role rule apply
    atlas = ha.Atlas.minimal(loaded.info)
    columns = write_probes(atlas, result)
    assert columns == ["probe_upos", "probe_upos_selectivity"]
    atlas.save(tmp_path / "atlas")
    again = ha.Atlas.load(tmp_path / "atlas")
    assert {"probe_upos", "probe_upos_selectivity", "probe_upos_std", "probe_upos_n"} <= set(again.table)
    side = again.tables["probes"]
    assert {"accuracy", "control_accuracy", "random_init_accuracy", "selectivity", "seeds"} <= set(side)
    roles = again.table.set_index("head")["roles"]
    assert "probe-upos" in roles[0] and "probe-upos" not in roles[2]


def test_collect_features_reads_every_query_head_with_gqa(tiny_loaded: ha.LoadedModel) -> None:
    task = truth_task(tiny_loaded.tokenizer)
    feats = collect_features(tiny_loaded, task.splits["dev"][:3], batch_size=2)
    info = tiny_loaded.info
    assert feats.shape == (info.n_layers * info.n_heads, 3, info.head_dim)
    single = collect_features(tiny_loaded, task.splits["dev"][1:2])
    assert torch.allclose(feats[:, 1], single[:, 0], atol=1e-5)  # left padding does not change a row


def test_truth_facts_are_balanced_and_split_by_fact() -> None:
    task = truth_task(make_tokenizer(), seed=3)
    for items in task.splits.values():
        labels = [item.labels[0] for item in items]
        assert labels.count("true") == labels.count("false")
    prompts = {
        split: {item.types[0].rsplit(" ", 1)[0] for item in items} for split, items in task.splits.items()
    }
    assert not prompts["train"] & prompts["test"] and not prompts["dev"] & prompts["test"]
    assert all(false_answer(f) != f.answer for f in FACTS)


def test_control_labels_follow_the_type_and_the_empirical_distribution() -> None:
    train = ["a"] * 900 + ["b"] * 100
    types = [str(i) for i in range(2000)]
    labels = control_labels(types, train, seed=0)
    assert labels == control_labels(types, train, seed=0)
    assert control_labels(["x", "x", "y"], train, seed=0)[0] == control_labels(["x"], train, seed=0)[0]
    assert 0.85 < labels.count("a") / len(labels) < 0.95
    assert labels != control_labels(types, train, seed=1)


def test_bad_probe_input_is_a_one_line_error(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    with pytest.raises(HeadatlasError, match="unknown task 'nope'"):
        build_probe_task(tokenizer, "nope")
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"text": f"row {i}", "label": "same"}) for i in range(20)))
    with pytest.raises(HeadatlasError, match="one class"):
        build_probe_task(tokenizer, str(one))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 1}\n{"text": 3}\n')
    with pytest.raises(HeadatlasError, match=":2: "):
        build_probe_task(tokenizer, str(bad))


def test_treebank_labels_sit_on_first_pieces_and_fold_subtypes() -> None:
    from headatlas.apps.common.probe_tasks import treebank_item
    from headatlas.data.ud import Sentence

    tokenizer = make_tokenizer()
    words = ("Archaeologists", "discovered", "pottery", ".")
    sentence = Sentence("s1", " ".join(words), words, (2, 0, 2, 2), ("nsubj:pass", "root", "obj", "punct"),
                        ("NOUN", "VERB", "NOUN", "PUNCT"))  # fmt: skip
    upos = treebank_item(tokenizer, sentence, "upos")
    deprel = treebank_item(tokenizer, sentence, "deprel")
    starts = treebank_item(tokenizer, sentence, "word-start")
    assert upos is not None and deprel is not None and starts is not None
    assert upos.labels == ("NOUN", "VERB", "NOUN", "PUNCT") and upos.types == words
    assert deprel.labels == ("nsubj", "root", "obj", "punct") and deprel.positions == upos.positions
    pieces = starts.positions
    assert len(pieces) > len(words)  # the tiny tokenizer splits the long words
    assert [p for p, lab in zip(pieces, starts.labels, strict=True) if lab == "start"] == list(upos.positions)
    assert upos.ids[0] == tokenizer.bos_token_id and 0 not in pieces  # the frame token carries no label
