"""Encoder–decoder models: capture of encoder, decoder and cross-attention exact against eager on
left-padded sources, the atlas's attn_kind column, and the cross-attention scores (diagonal,
argmax alignment, AER) on a model wired by hand to align by position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.batteries.align import make_target_batch, read_aligned_pairs
from headatlas.batteries.base import ProbeSequence, make_batch
from headatlas.capture import capture
from headatlas.capture.views import DenseView
from headatlas.core.errors import HeadatlasError
from headatlas.detectors.cross import CrossContext, aer, alignment, cross_positional
from headatlas.scanning.config import ScanConfig
from headatlas.scanning.scan import build_batteries
from headatlas.scanning.stream import scan_batch
from tiny_models import SAMPLE_TEXTS, left_padded_batch, make_tokenizer
from tiny_seq2seq import SEQ2SEQ_BUILDERS, aligned_bart, eager_seq2seq

FAMILIES = sorted(SEQ2SEQ_BUILDERS)


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request: pytest.FixtureRequest) -> ha.LoadedModel:
    return ha.load(SEQ2SEQ_BUILDERS[request.param](0), tokenizer=make_tokenizer())


def _pair_batch(loaded: ha.LoadedModel) -> tuple[torch.Tensor, ...]:
    """A left-padded source batch and a right-padded decoder batch of other lengths."""
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS), add_bos=False)
    assert (mask[:, 0] == 0).any(), "the source batch must contain left padding"
    targets = [
        ProbeSequence(tuple(int(t) for t in row[m.bool()][: 3 + 2 * i]))
        for i, (row, m) in enumerate(zip(ids, mask, strict=True))
    ]
    target = make_target_batch(targets, 2, 2)
    assert (target.attention_mask[:, -1] == 0).any(), "the target batch must contain right padding"
    return ids, mask, target.input_ids, target.attention_mask


def test_layers_are_numbered_by_kind(loaded: ha.LoadedModel) -> None:
    info = loaded.info
    assert info.encoder_decoder
    assert info.attn_kinds == ("encoder",) * 2 + ("decoder",) * 2 + ("cross",) * 2
    assert [info.stack_layer(layer) for layer in range(6)] == [0, 1, 0, 1, 0, 1]
    assert info.to_dict()["attn_kinds"] == list(info.attn_kinds)


def test_every_kind_equals_eager_on_left_padded_sources(loaded: ha.LoadedModel) -> None:
    ids, mask, dec, dec_mask = _pair_batch(loaded)
    reference, logits = eager_seq2seq(loaded.model, ids, mask, dec, dec_mask)
    maps = ha.attention_maps(loaded, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert sorted(maps) == list(range(loaded.info.n_layers))
    for layer, probs in maps.items():
        kind = loaded.info.kind(layer)
        assert probs.shape == reference[layer].shape, kind
        rows = (mask if kind == "encoder" else dec_mask).bool()[:, None, :, None]  # [batch, 1, query, 1]
        err = ((probs - reference[layer]).abs() * rows).max().item()
        # Layer 0 sees the same input in both runs: exact. Later layers read outputs that SDPA and
        # eager round differently (T5's unscaled logits amplify that to ~1e-5).
        assert err <= (1e-6 if layer == 0 else 5e-5), f"{kind} layer {layer}: max |capture - eager| = {err}"
        if kind != "decoder":  # keys are the source: padding gets nothing
            assert (probs * (1 - mask[:, None, None, :])).abs().max() == 0
    model = loaded.model
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask
        )
    with capture(loaded, lambda view: None) as session:
        captured = session.run(ids, mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    valid = dec_mask.bool()
    assert torch.equal(captured[valid], plain.logits[valid]), "model outputs equal the SDPA backend's"
    assert torch.allclose(captured[valid], logits[valid], atol=1e-4), "and eager's up to rounding"
    assert model.config._attn_implementation == "sdpa", "capture restores the backend"


def test_fast_and_dense_paths_give_the_same_scores(loaded: ha.LoadedModel) -> None:
    tok = loaded.tokenizer
    seqs = [ProbeSequence(tuple(tok(t, add_special_tokens=False)["input_ids"])) for t in SAMPLE_TEXTS]
    battery = build_batteries(
        loaded, ScanConfig.of(("natural",), texts=list(SAMPLE_TEXTS), n_prompts=4, seq_len=16, seed=0)
    )[0]
    fast = scan_batch(loaded, battery, 0, seqs, mode="auto").stats
    dense = scan_batch(loaded, battery, 0, seqs, mode="dense").stats
    assert fast.names == dense.names and "diagonal" in fast.names
    for name in fast.names:
        assert torch.allclose(
            torch.as_tensor(fast.mean(name)), torch.as_tensor(dense.mean(name)), atol=1e-5, equal_nan=True
        ), name


def test_atlas_labels_each_row_with_its_kind(tmp_path: Path) -> None:
    loaded = ha.load(SEQ2SEQ_BUILDERS["bart"](1), tokenizer=make_tokenizer())
    atlas = ha.scan(loaded, n_prompts=2, seq_len=24, batch_size=2, out=tmp_path / "a")  # schema-checked
    table = atlas.table
    assert list(table.groupby("attn_kind")["layer"].nunique().items()) == [
        ("cross", 2),
        ("decoder", 2),
        ("encoder", 2),
    ]
    cross, encoder = table[table.attn_kind == "cross"], table[table.attn_kind == "encoder"]
    assert cross["previous_token"].isna().all() and cross["diagonal"].notna().all()
    assert encoder["diagonal"].isna().all() and encoder["induction"].notna().all()
    assert sorted(cross["stack_layer"].unique()) == [0, 1]
    assert "stack_layer" not in atlas.score_columns
    saved = json.loads((tmp_path / "a" / "atlas.json").read_text())
    assert saved["model"]["attn_kinds"] == list(loaded.info.attn_kinds)
    assert ha.Atlas.load(tmp_path / "a").table["attn_kind"].tolist() == table["attn_kind"].tolist()


# --- the hand-wired aligner -------------------------------------------------------------------


@pytest.fixture(scope="module")
def aligner() -> ha.LoadedModel:
    model, tokenizer = aligned_bart()
    return ha.load(model, tokenizer=tokenizer)


def _gold_file(tmp_path: Path) -> Path:
    lines = [
        "w1 w2 w3 w4 ||| w5 w6 w7 w8 ||| 0-0 1-1 2-2 3-3",
        "w3 w9 w2 w7 w1 w4 w8 ||| w1 w2 w3 w4 w5 w6 w7 ||| 0-0 1-1 2-2 3-3 4-4 5?5 6-6",
        "# a comment line",
        "w5 w6 w7 w8 w9 w10 ||| w4 w3 w2 w1 w0 w11",
    ]
    path = tmp_path / "gold.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_head_wired_to_align_by_position_scores_one(aligner: ha.LoadedModel, tmp_path: Path) -> None:
    atlas = ha.scan(
        aligner, probes=("align",), align_file=_gold_file(tmp_path), batch_size=1, out=tmp_path / "atlas"
    )
    info = aligner.info
    assert info.attn_kinds == ("encoder", "decoder", "cross")
    row = atlas.table.set_index(["layer", "head"])
    wired, uniform = row.loc[(2, 0)], row.loc[(2, 1)]
    assert wired["diagonal"] == pytest.approx(1.0, abs=1e-4)
    assert wired["alignment"] == pytest.approx(1.0)
    assert wired["alignment_error"] == pytest.approx(0.0, abs=1e-9)
    assert "alignment" in wired["roles"] and "diagonal" in wired["roles"]
    assert uniform["diagonal"] < 0.7 and uniform["entropy_norm"] > 0.99
    assert atlas.meta["batteries"]["align"]["n_gold"] == 2
    assert int(wired["alignment_n"]) == 4 + 6  # target words with a sure link (5?5 is only possible)
    assert int(wired["alignment_error_n"]) == (4 + 7) + (4 + 6)  # |A| + |S| over the gold pairs


def test_alignment_rows_reproduce_och_and_ney_aer() -> None:
    """Random attention and random gold links: the detector's mean over rows is the corpus AER
    that the reference formula gives on the argmax links."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, n_src, n_tgt = 3, 2, 6, 5
    probs = torch.softmax(torch.randn(batch, heads, n_tgt, n_src, generator=gen) * 3, -1)
    src_words = torch.tensor([0, 0, 1, 2, 3, 3]).expand(batch, -1)  # pieces of 4 words
    tgt_words = torch.tensor([0, 1, 1, 2, 3]).expand(batch, -1)
    sure = torch.rand(batch, 4, 4, generator=gen) > 0.7
    possible = sure | (torch.rand(batch, 4, 4, generator=gen) > 0.8)
    positions = torch.arange(n_src).expand(batch, -1), torch.arange(n_tgt).expand(batch, -1)
    ctx = CrossContext(*positions, src_words, tgt_words, sure, possible)
    view = DenseView(0, probs, 0, torch.full((batch, n_tgt), n_src))
    scores = alignment(view, ctx)
    got = scores["alignment_error"]
    per_head = (got.values * got.valid[:, None]).sum((0, 2)) / got.valid.sum()
    for h in range(heads):
        predicted, s_links, p_links = set(), set(), set()
        for b in range(batch):
            word_rows = [probs[b, h, tgt_words[b] == w].mean(0) for w in range(4)]
            for w, row in enumerate(word_rows):
                mass = torch.stack([row[src_words[b] == v].sum() for v in range(4)])
                predicted.add((b, w, int(mass.argmax())))
            s_links |= {(b, int(w), int(v)) for w, v in sure[b].nonzero().tolist()}
            p_links |= {(b, int(w), int(v)) for w, v in possible[b].nonzero().tolist()}
        assert per_head[h].item() == pytest.approx(aer(predicted, s_links, p_links), abs=1e-6)


def test_aer_reference_formula() -> None:
    # A = {00, 12}, S = {00}, P = {00, 11, 12}: 1 − (1 + 2) / (2 + 1) = 0
    assert aer({(0, 0), (1, 2)}, {(0, 0)}, {(1, 1), (1, 2)}) == pytest.approx(0.0)
    # A = {00, 12}, S = {00, 11}, P = S: 1 − (1 + 1) / (2 + 2) = 0.5
    assert aer({(0, 0), (1, 2)}, {(0, 0), (1, 1)}, set()) == pytest.approx(0.5)


def test_diagonal_on_unequal_lengths() -> None:
    """Target of 3 rows over a source of 6: the diagonal points are 0.5, 2.5 and 4.5."""
    probs = torch.zeros(1, 1, 3, 6)
    probs[0, 0, 0, 0] = probs[0, 0, 1, 2] = probs[0, 0, 2, 5] = 1.0  # on (or within a token of) the diagonal
    ctx = CrossContext(torch.arange(6)[None], torch.arange(3)[None])
    out = cross_positional(DenseView(0, probs, 0, torch.full((1, 3), 6)), ctx)
    assert out["diagonal"].values.flatten().tolist() == [1.0, 1.0, 1.0]
    far = torch.zeros(1, 1, 3, 6)
    far[0, 0, :, 5] = 1.0
    assert cross_positional(DenseView(0, far, 0, torch.full((1, 3), 6)), ctx)[
        "diagonal"
    ].values.flatten().tolist() == [0.0, 0.0, 1.0]


def test_target_batch_is_teacher_forced_and_right_padded() -> None:
    seqs = [ProbeSequence((5, 6, 7), (0, 1, 1)), ProbeSequence((8,), (0,), (9, 10), (0, 1), ((0, 1, True),))]
    target = make_target_batch(seqs, pad=2, start=3)
    assert target.input_ids.tolist() == [[3, 5, 6], [3, 9, 2]]
    assert target.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert target.predicted_words.tolist() == [[0, 1, 1], [0, 1, -1]]
    assert target.input_words.tolist() == [[-1, 0, 1], [-1, 0, -1]]
    assert target.sure is not None and target.sure[1, 1, 0] and int(target.sure.sum()) == 1
    assert make_batch(seqs, 2).input_ids.tolist() == [[5, 6, 7], [2, 2, 8]], "sources stay left-padded"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a b ||| c d ||| 0-2", "beyond the 2 source × 2 target words"),
        ("a b ||| c d ||| 0:1", "not i-j"),
        ("a b c d", "expected 'source ||| target'"),
    ],
)
def test_bad_alignment_files_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text("a ||| b ||| 0-0\n" + line + "\n")
    with pytest.raises(HeadatlasError, match=rf"bad.txt:2: .*{message}"):
        read_aligned_pairs(path)


def test_what_needs_one_stack_says_so(
    aligner: ha.LoadedModel, tiny_loaded: ha.LoadedModel, tmp_path: Path
) -> None:
    with pytest.raises(HeadatlasError, match="encoder–decoder"):
        ha.scan(aligner, probes=("needle",))
    with pytest.raises(HeadatlasError, match="encoder–decoder"), ha.head_outputs(aligner, lambda *a: None):
        pass
    with pytest.raises(HeadatlasError, match="is encoder–decoder: this command feeds one sequence"):
        ha.attention_maps(aligner, torch.tensor([[4, 5]]), torch.ones(1, 2))
    with pytest.raises(HeadatlasError, match="head-wise KV caches"), ha.kv.compressed(aligner, None):
        pass
    with pytest.raises(HeadatlasError, match="has not: give an encoder–decoder model"):
        ha.scan(tiny_loaded, probes=("natural", "align"), align_file=_gold_file(tmp_path))
    with pytest.raises(HeadatlasError, match="go together"):
        ha.scan(aligner, probes=("natural",), align_file=_gold_file(tmp_path))


def test_the_command_line_scans_a_saved_model(tmp_path: Path) -> None:
    from headatlas.cli import app

    model, tokenizer = aligned_bart()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    gold = _gold_file(tmp_path)
    out = tmp_path / "atlas"
    args = ["scan", str(tmp_path / "model"), "--probes", "natural,align", "--align-file", str(gold)]
    result = CliRunner().invoke(
        app, [*args, "--n-prompts", "2", "--seq-len", "12", "--batch-size", "1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "encoder–decoder, 3 attention layers (1 encoder, 1 decoder, 1 cross)" in result.output
    assert "alignment" in result.output  # the role summary
    shown = CliRunner().invoke(app, ["show", str(out), "--by", "alignment", "--top", "1"])
    assert shown.exit_code == 0, shown.output
    top = next(line for line in shown.output.splitlines() if "cross 0" in line)
    assert top.split("│")[1:3] == ["     2 ", "    0 "] and "alignment" in top, shown.output
