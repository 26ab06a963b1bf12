"""Patching: a hand-wired mover head is found by both methods, batching and the shared prefix change
nothing but float rounding, pairs are checked, results land in the atlas and ``verify`` uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.common.patch_tasks import (
    FV_TASKS,
    PatchPair,
    PatchTask,
    build_task,
    fv_task,
    ioi_task,
    read_pair_file,
)
from headatlas.apps.patch.patching import (
    activation_patching,
    clean_outputs,
    encode_task,
    function_vector,
    patch,
    write_patch,
    zero_shot_accuracy,
)
from headatlas.apps.verify.causal import verify
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, blank_llama, make_tokenizer, one_layer_llama_config, word_tokenizer

NAMES = ("Mary", "John", "Anna", "Paul", "Kate")
WORDS = ("<bos>", "<eos>", "<pad>", "<unk>", *NAMES, "to", "the", "gave")
MOVER = 1  # the head that moves the name to the output


def _mover_model() -> ha.LoadedModel:
    """One layer; head :data:`MOVER` attends from ``to`` to the name and writes it to the logits.

    Embeddings: a name is one-hot in dims 0..4 plus a "name" flag in dim 5, ``to`` has dim 6, the
    rest dim 7. The mover's query reads dim 6, its key dim 5 (so ``to`` looks at the name), its
    value dims 0..4 (which name), its output goes to dims 16..20, which the unembedding reads as
    that name. Every other weight is 0, so the other heads output nothing.
    """
    tok = word_tokenizer(list(WORDS))
    cfg = one_layer_llama_config(
        len(tok), intermediate_size=16, rope_parameters={"rope_type": "default", "rope_theta": 1e30}
    )
    model = blank_llama(cfg)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        attn = model.model.layers[0].self_attn
        kv = MOVER // 2
        for j, name in enumerate(NAMES):
            token = tok.convert_tokens_to_ids(name)
            emb[token, j] = 1.0
            emb[token, 5] = 1.0
            attn.v_proj.weight[kv * 16 + 1 + j, j] = 1.0
            attn.o_proj.weight[16 + j, MOVER * 16 + 1 + j] = 4.0
            model.lm_head.weight[token, 16 + j] = 1.0
        emb[tok.convert_tokens_to_ids("to"), 6] = 1.0
        for word in ("the", "gave"):
            emb[tok.convert_tokens_to_ids(word), 7] = 1.0
        attn.q_proj.weight[MOVER * 16 + 1, 6] = 30.0
        attn.k_proj.weight[kv * 16 + 1, 5] = 1.0
    return ha.load(model, tokenizer=tok)


def _mover_task() -> PatchTask:
    pairs = [
        PatchPair(f"the {a} gave the to", f"the {b} gave the to", a, b)
        for a, b in (("Mary", "John"), ("Anna", "Paul"), ("Kate", "Mary"), ("John", "Anna"))
    ]
    return PatchTask("mover", tuple(pairs))


@pytest.fixture(scope="module")
def mover() -> ha.LoadedModel:
    return _mover_model()


def test_a_hand_wired_mover_head_is_found_by_both_methods(mover: ha.LoadedModel) -> None:
    result = patch(mover, _mover_task(), method="both")
    exact, _ = result.matrices["activation"]
    estimate, _ = result.matrices["attribution"]
    assert result.params["clean_accuracy"] == 1.0
    assert exact[0, MOVER] == pytest.approx(1.0, abs=1e-4)
    others = np.delete(exact[0], MOVER)
    assert np.abs(others).max() < 1e-4
    assert estimate[0, MOVER] > 0.5 and np.abs(np.delete(estimate[0], MOVER)).max() < 1e-4
    frame = result.effects
    assert set(frame.columns) == {"layer", "head", "effect", "effect_std", "n", "method"}
    assert set(frame["method"]) == {"activation", "attribution"} and len(frame) == 2 * 4


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_batching_and_the_shared_prefix_change_only_rounding(kind: str) -> None:
    loaded = ha.load(BUILDERS[kind](0), tokenizer=make_tokenizer())
    pairs = (
        PatchPair("The cat sat on the mat and the dog", "The dog ran to the park and the", " ran", " sat"),
        PatchPair("A bird sang in the tree", "A dog sang in the park", " while", " the"),
    )
    enc = encode_task(loaded, PatchTask("t", pairs), "last")
    source, _ = clean_outputs(loaded, enc.clean, "last")
    naive = activation_patching(loaded, enc, source, "logit_diff", rows_per_pass=1)
    batched = activation_patching(loaded, enc, source, "logit_diff", rows_per_pass=64)
    again = activation_patching(loaded, enc, source, "logit_diff", rows_per_pass=64)
    full = activation_patching(loaded, enc, source, "logit_diff", rows_per_pass=64, share_prefix=False)
    assert torch.equal(batched, again)  # deterministic
    # Matmul kernels depend on the batch size, so rows agree to float rounding, not bitwise.
    torch.testing.assert_close(naive, batched, rtol=0, atol=1e-5)
    torch.testing.assert_close(full, batched, rtol=0, atol=1e-5)
    assert float(batched.abs().sum()) > 0


def test_positions_and_pairs_are_checked(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    uneven = PatchTask("u", (PatchPair("The cat sat on the mat", "The cat sat", " and", " the"),))
    encode_task(tiny_loaded, uneven, "last")  # fine: only the last position is patched
    with pytest.raises(HeadatlasError, match="equal lengths"):
        encode_task(tiny_loaded, uneven, "all")
    same = PatchTask("s", (PatchPair("The cat sat", "The dog sat", " and", " and"),))
    with pytest.raises(HeadatlasError, match="same token"):
        encode_task(tiny_loaded, same, "last")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(HeadatlasError, match="no pairs"):
        read_pair_file(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a", "corrupt": "b", "answer": " x", "wrong": " x"}\n')
    with pytest.raises(HeadatlasError, match=r"bad\.jsonl:1: the answer equals"):
        read_pair_file(bad)
    bad.write_text('{"clean": "a"}\n')
    with pytest.raises(HeadatlasError, match=r"bad\.jsonl:1 needs"):
        read_pair_file(bad)
    with pytest.raises(HeadatlasError, match="unknown task"):
        build_task(tiny_loaded.tokenizer, "nonsense")
    with pytest.raises(HeadatlasError, match="function-vector task"):
        build_task(tiny_loaded.tokenizer, "fv:nonsense")


def test_built_in_tasks_are_seeded_and_well_formed() -> None:
    from headatlas.apps.common.patch_tasks import _NAMES

    with pytest.raises(HeadatlasError, match="5 names"):
        ioi_task(make_tokenizer(), 8)  # its BPE splits names
    tok = word_tokenizer(["<bos>", "<eos>", "<pad>", "<unk>", *_NAMES])
    ioi = ioi_task(tok, 8, seed=3)
    assert ioi == ioi_task(tok, 8, seed=3) and ioi != ioi_task(tok, 8, seed=4)
    for i, pair in enumerate(ioi.pairs):
        subject, indirect = pair.wrong.strip(), pair.answer.strip()
        assert pair.clean.count(subject) == 2 and pair.clean.count(indirect) == 1
        assert subject not in pair.corrupt and indirect not in pair.corrupt  # ABC: three new names
        first = min(pair.clean.find(subject), pair.clean.find(indirect))
        assert (pair.clean.find(indirect) == first) == (i % 2 == 0)  # ABBA, then BABA
    for name in FV_TASKS:
        task = fv_task(name, 4)
        for pair in task.pairs:
            clean, corrupt = pair.clean.splitlines(), pair.corrupt.splitlines()
            assert len(clean) == 11 and clean[-1] == corrupt[-1] and clean != corrupt
            assert task.metric == "prob" and task.source == "mean"


def test_results_land_in_the_atlas_and_verify_uses_them(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    task = build_task(tiny_loaded.tokenizer, "fv:capitalize", 6)
    result = patch(tiny_loaded, task, method="both")
    atlas = ha.Atlas.minimal(tiny_loaded.info)
    assert write_patch(atlas, result) == ["patch_fv_capitalize", "patch_fv_capitalize_attribution"]
    atlas.save(tmp_path)
    loaded = ha.Atlas.load(tmp_path)
    assert {"patch_fv_capitalize", "patch_fv_capitalize_attribution"} <= set(loaded.scores)
    assert loaded.meta["patch"]["fv:capitalize"]["n_pairs"] == 6
    checked = verify(tiny_loaded, loaded, "patch_fv_capitalize", k=2, seeds=2)
    assert checked.higher_is_better and "held-out" in checked.metric
    assert len(checked.random_values) == 2


def test_function_vectors_are_saved_and_applied(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    task = fv_task("capitalize", 4)
    result = patch(tiny_loaded, task)
    vector = function_vector(tiny_loaded, task, result, k=3)
    assert len(vector.heads) == 3 and vector.vector.shape == (64,)
    path = vector.save(tmp_path / "fv.npz")
    with np.load(path, allow_pickle=False) as saved:
        assert saved["heads"].shape == (3, 2) and int(saved["layer"]) == vector.layer
    for value in (zero_shot_accuracy(tiny_loaded, task), zero_shot_accuracy(tiny_loaded, task, vector)):
        assert 0.0 <= value <= 1.0


def test_the_command_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {
            "clean": "The cat sat on the mat",
            "corrupt": "The dog ran to the park",
            "answer": "and",
            "wrong": "the",
        },
        {
            "clean": "A bird sang in the tree",
            "corrupt": "A dog sang in the park",
            "answer": "while",
            "wrong": "the",
        },
    ]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "atlas"
    res = CliRunner().invoke(
        app, ["patch", str(tiny_model_dir), "--task", str(pairs), "--method", "both", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "Spearman" in res.output and "patch_pairs" in res.output
    assert (
        "patch_pairs" in ha.Atlas.load(out).scores
        and (out / "figures" / "scores" / "patch_pairs.png").exists()
    )
    res = CliRunner().invoke(
        app,
        ["patch", str(tiny_model_dir), "--task", str(pairs), "--position", "everywhere", "--out", str(out)],
    )
    assert res.exit_code == 2 and "--position" in res.output


# ---------------------------------------------------------------- path patching


CHAIN_WORDS = ("<bos>", "<eos>", "<pad>", "<unk>", "Mary", "John", "to", "x", "y")
SENDER, RECEIVER = (0, 0), (1, 2)


def _chain_model() -> ha.LoadedModel:
    """Two layers; the answer depends on the first word only through a chain of two heads.

    Layer 0 head 0 (the *sender*) attends from ``to`` to the first word (``x`` or ``y``) and writes
    +1 (``x``) or −1 (``y``) into residual dim 10. Layer 1 head 2 (the *receiver*) reads dim 10 in
    its query; its keys are +1 for ``Mary`` and −1 for ``John`` (dim 5), so it attends to Mary after
    ``x`` and to John after ``y``, and its value/output move that name to the logits. The sender's
    output is never read by the unembedding: its whole effect runs through the receiver's query.
    """
    tok = word_tokenizer(list(CHAIN_WORDS))
    cfg = one_layer_llama_config(
        len(tok),
        num_hidden_layers=2,
        intermediate_size=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e30},
    )
    model = blank_llama(cfg)
    ids = {w: tok.convert_tokens_to_ids(w) for w in CHAIN_WORDS}
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[ids["Mary"], 0], emb[ids["John"], 1] = 1.0, 1.0
        emb[ids["Mary"], 5], emb[ids["John"], 5] = 1.0, -1.0
        emb[ids["to"], 6] = 1.0
        emb[ids["x"], 7], emb[ids["y"], 9] = 1.0, 1.0
        emb[ids["x"], 8], emb[ids["y"], 8] = 1.0, 1.0
        sender = model.model.layers[0].self_attn
        sender.q_proj.weight[1, 6] = 40.0  # head 0 query: "to" (dim 1: RoPE's dims 0 and 8 still rotate)
        sender.k_proj.weight[1, 8] = 1.0  # kv head 0 key: the marked first word
        sender.v_proj.weight[0, 7], sender.v_proj.weight[0, 9] = 1.0, -1.0  # x → +1, y → −1
        sender.o_proj.weight[10, 0] = 8.0  # → residual dim 10
        receiver = model.model.layers[1].self_attn
        receiver.q_proj.weight[2 * 16 + 1, 10] = 40.0  # head 2 query: dim 10
        receiver.k_proj.weight[1 * 16 + 1, 5] = 1.0  # kv head 1 key: Mary +, John −
        for j in (0, 1):
            receiver.v_proj.weight[1 * 16 + 1 + j, j] = 1.0
            receiver.o_proj.weight[16 + j, 2 * 16 + 1 + j] = 8.0
        model.lm_head.weight[ids["Mary"], 16] = 1.0
        model.lm_head.weight[ids["John"], 17] = 1.0
    return ha.load(model, tokenizer=tok)


def test_path_patching_finds_the_path_through_the_receivers_query() -> None:
    from headatlas.apps.patch.circuit import path_effects

    loaded = _chain_model()
    task = PatchTask("chain", (PatchPair("x Mary John to", "y Mary John to", "Mary", "John"),) * 2)
    enc = encode_task(loaded, task, "all")
    total = patch(loaded, task, method="activation").matrices["activation"][0]
    assert total[SENDER] == pytest.approx(1.0, abs=1e-3) and total[RECEIVER] == pytest.approx(1.0, abs=1e-3)
    senders = [(0, h) for h in range(4)]
    direct = path_effects(loaded, enc, senders).mean(0)
    via = {c: path_effects(loaded, enc, senders, [RECEIVER], c).mean(0) for c in ("q", "k", "v")}
    assert abs(direct[0]) < 1e-3  # nothing of the sender reaches the logits directly
    assert via["q"][0] == pytest.approx(1.0, abs=1e-3)  # all of it runs through the query
    assert abs(via["k"][0]) < 1e-3 and abs(via["v"][0]) < 1e-3
    assert np.abs(np.stack([direct[1:], via["q"][1:]])).max() < 1e-3  # the other heads do nothing


def test_edges_find_the_wire_from_the_sender_into_the_receivers_query() -> None:
    from headatlas.apps.patch.edges import LOGITS, circuit_edges

    loaded = _chain_model()
    task = PatchTask("chain", (PatchPair("x Mary John to", "y Mary John to", "Mary", "John"),) * 2)
    enc = encode_task(loaded, task, "all")
    edges = circuit_edges(loaded, enc, [RECEIVER, SENDER, (0, 1), (1, 0)], rows_per_pass=3)
    table = edges.table.set_index(["sender", "receiver", "channel"])["effect"]
    assert table[("L0H0", "L1H2", "q")] == pytest.approx(1.0, abs=1e-3)  # the wired edge carries it all
    assert abs(table[("L0H0", "L1H2", "k")]) < 1e-3 and abs(table[("L0H0", "L1H2", "v")]) < 1e-3
    assert table[("L1H2", LOGITS, "")] == pytest.approx(1.0, abs=1e-3)  # the receiver writes the answer
    assert abs(table[("L0H0", LOGITS, "")]) < 1e-3  # the sender reaches the logits only through it
    others = edges.table[(edges.table["sender"] != "L0H0") | (edges.table["receiver"] != "L1H2")]
    assert others[others["receiver"] != LOGITS]["effect"].abs().max() < 1e-3
    layer = {name: int(name[1:].split("H")[0]) for name in ("L0H0", "L0H1", "L1H0", "L1H2")}
    inner = edges.table[edges.table["receiver"] != LOGITS]
    assert all(layer[s] < layer[r] for s, r in zip(inner["sender"], inner["receiver"], strict=True))
    assert len(inner) == 2 * 2 * 3  # two senders of layer 0 × two receivers of layer 1 × q, k, v
    assert edges.strongest(1)[["sender", "receiver", "channel"]].values.tolist() == [["L0H0", "L1H2", "q"]]
    with pytest.raises(HeadatlasError, match="at least two heads"):
        circuit_edges(loaded, enc, [SENDER, SENDER])
    with pytest.raises(HeadatlasError, match="no head L5H0"):
        circuit_edges(loaded, enc, [SENDER, (5, 0)])


def test_the_ioi_circuit_command_writes_classes_roles_and_a_figure(tmp_path: Path) -> None:
    from headatlas.apps.common.patch_tasks import _NAMES
    from headatlas.core.roles import RULES
    from headatlas.report.data import ROLE_COLORS

    tok = word_tokenizer(["<bos>", "<eos>", "<pad>", "<unk>", *_NAMES, "and", "to", "the", "gave"])
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(one_layer_llama_config(len(tok), num_hidden_layers=2)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "atlas"
    res = CliRunner().invoke(
        app, ["circuit", str(model_dir), "--method", "path", "--n", "4", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    atlas = ha.Atlas.load(out)
    assert "ioi_direct" in atlas.scores and (out / "figures" / "circuit-ioi.png").exists()
    direct = atlas.matrix("ioi_direct")
    movers = {(int(r.layer), int(r.head)) for r in atlas.with_role("name-mover").itertuples()}
    assert movers == {
        tuple(map(int, np.argwhere(direct >= 0.1)[i])) for i in range(int((direct >= 0.1).sum()))
    }
    assert set(atlas.meta["circuit"]["ioi"]["steps"]) >= {"ioi_direct"}
    assert all(rule.role in ROLE_COLORS for rule in RULES)  # every role has a colour in the pictures
    res = CliRunner().invoke(
        app, ["circuit", str(model_dir), "--method", "path", "--task", "fv:antonym", "--out", str(out)]
    )
    assert res.exit_code == 2 and "ioi task only" in res.output


def test_ha_patch_takes_plain_dicts(tiny_loaded: ha.LoadedModel) -> None:
    pairs = [
        {
            "clean": "The cat sat on the mat",
            "corrupt": "The dog ran to the park",
            "answer": "and",
            "wrong": "the",
        }
    ]
    effects = ha.patch(tiny_loaded, pairs, method="attribution")
    assert list(effects.columns) == ["layer", "head", "effect", "effect_std", "n", "method"]
    assert len(effects) == tiny_loaded.info.n_layers * tiny_loaded.info.n_heads
    assert effects.attrs["params"]["n_pairs"] == 1
    with pytest.raises(HeadatlasError, match="no pairs"):
        ha.patch(tiny_loaded, [])
