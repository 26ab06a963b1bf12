"""Head-level circuits: faithfulness is 0 and 1 at the ends by construction and the full circuit is
the model itself, CPR / CMD of hand-made curves, EAP-IG against attribution and exact patching,
mean ablation through the hook against a hand-written hook, a hand-wired head found by every
method, the task generators, and the ``circuit`` command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from conftest import requires_qwen
from headatlas.apps.common.circuit_tasks import TASKS, circuit_task, encode_exact, usable
from headatlas.apps.common.patch_tasks import PatchPair, PatchTask
from headatlas.apps.patch.circuits import (
    circuit_column,
    compare_results,
    default_sizes,
    measure_circuits,
    write_results,
)
from headatlas.apps.patch.faithfulness import (
    areas,
    circuit_metrics,
    faithfulness_curve,
    minimal_size,
    prepare,
    stable_size,
)
from headatlas.apps.patch.patching import activation_patching, attribution_patching
from headatlas.apps.patch.rankings import eap_ig, method_scores, order_by, random_order
from headatlas.capture import output_projections
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from headatlas.core.heads import parse_head
from headatlas.core.scores import score_spec
from headatlas.report.data import atlas_payload
from headatlas.report.html import render_report
from test_patching import MOVER, _mover_model
from tiny_models import make_tokenizer


def _tiny_task() -> PatchTask:
    tok = make_tokenizer()
    words = ("dog", "river", "she")
    pairs = []
    for a in words:
        for b in words:
            for prep in ("in", "on", "of"):
                if a != b:
                    pairs.append(
                        PatchPair(
                            f"The {a} was {prep} the {b} and",
                            f"The {b} was {prep} the {a} and",
                            f" {a}",
                            f" {b}",
                        )
                    )
    kept = tuple(p for p in pairs if usable(tok, p))
    assert len(kept) >= 6
    return PatchTask("tiny", kept[:8])


def _mover_task() -> PatchTask:
    pairs = [
        PatchPair(f"the {a} gave the to", f"the {b} gave the to", f" {a}", f" {b}")
        for a, b in (("Mary", "John"), ("Anna", "Paul"), ("Kate", "Mary"), ("John", "Anna"))
    ]
    return PatchTask("mover", tuple(pairs))


def test_curve_areas_of_hand_made_curves() -> None:
    cpr, cmd = areas([0, 1, 2, 4], [0.0, 0.5, 1.0, 1.0], 4)
    assert cpr == pytest.approx(0.75) and cmd == pytest.approx(0.25)
    cpr, cmd = areas([0, 1, 2], [0.0, 1.5, 1.0], 2)  # overshooting counts in CMD, not against CPR
    assert cpr == pytest.approx(1.0) and cmd == pytest.approx(0.5)
    assert minimal_size([0, 1, 2, 4], [0.0, 0.95, 0.5, 1.0]) == 1
    assert stable_size([0, 1, 2, 4], [0.0, 0.95, 0.5, 1.0]) == 4
    with pytest.raises(HeadatlasError):
        areas([0, 0], [0.0, 1.0], 2)
    assert (
        default_sizes(270)[:4] == [0, 1, 2, 4] and default_sizes(270)[-1] == 270 and 27 in default_sizes(270)
    )


def test_all_heads_is_the_model_and_the_ends_are_0_and_1(tiny_loaded: ha.LoadedModel) -> None:
    prep = prepare(tiny_loaded, encode_exact(tiny_loaded, _tiny_task()))
    info = tiny_loaded.info
    keep = torch.stack(
        [
            torch.ones(info.n_layers, info.n_heads, dtype=torch.bool),
            torch.zeros(info.n_layers, info.n_heads, dtype=torch.bool),
        ]
    )
    for ablation in ("mean", "counterfactual", "zero"):
        full, empty = circuit_metrics(tiny_loaded, prep, keep, ablation, rows_per_pass=16).tolist()
        assert full == pytest.approx(
            float(prep.clean_metric.mean()), abs=1e-4
        )  # keeping every head changes nothing
        assert abs(full - empty) > 1e-3, ablation
    order = random_order(info.n_layers, info.n_heads, 0)
    curve = faithfulness_curve(tiny_loaded, prep, order, [1, 3, 6], "zero")
    assert (
        curve.sizes == [0, 1, 3, 6, 12]
        and curve.faithfulness[0] == 0.0
        and curve.faithfulness[-1] == pytest.approx(1.0)
    )
    with pytest.raises(HeadatlasError, match="all 12 heads"):
        faithfulness_curve(tiny_loaded, prep, order[:5], [1], "zero")


def test_mean_ablation_through_the_hook_equals_a_hand_written_hook(tiny_loaded: ha.LoadedModel) -> None:
    enc = encode_exact(tiny_loaded, _tiny_task())
    prep = prepare(tiny_loaded, enc)
    info, d = tiny_loaded.info, tiny_loaded.info.head_dim
    keep = torch.from_numpy(np.random.default_rng(3).random((1, info.n_layers, info.n_heads)) < 0.5)
    got = float(circuit_metrics(tiny_loaded, prep, keep, "mean", rows_per_pass=3)[0])
    projections = output_projections(tiny_loaded)
    mask = prep.mask.float()  # [pair, query]
    recorded: dict[int, torch.Tensor] = {}
    hooks = [
        projections[layer].register_forward_pre_hook(
            lambda _m, a, layer=layer: recorded.__setitem__(layer, a[0].detach().clone())
        )
        for layer in projections
    ]
    with torch.no_grad():
        tiny_loaded.model(
            input_ids=prep.ids, attention_mask=prep.mask, position_ids=(prep.mask.cumsum(-1) - 1).clamp_min(0)
        )
    for h in hooks:
        h.remove()
    means = {
        layer: (x * mask[..., None]).sum(0) / mask.sum(0)[:, None].clamp_min(1)
        for layer, x in recorded.items()
    }  # [query, hidden]

    def replace(layer: int):  # type: ignore[no-untyped-def]
        def hook(_m, args):  # type: ignore[no-untyped-def]
            x = args[0].clone()  # [pair, query, head * d_head]
            for head in range(info.n_heads):
                if not keep[0, layer, head]:
                    x[..., head * d : (head + 1) * d] = means[layer][:, head * d : (head + 1) * d]
            return (x,)

        return hook

    hooks = [projections[layer].register_forward_pre_hook(replace(layer)) for layer in projections]
    with torch.no_grad():
        logits = tiny_loaded.model(
            input_ids=prep.ids, attention_mask=prep.mask, position_ids=(prep.mask.cumsum(-1) - 1).clamp_min(0)
        ).logits[:, -1]
    for h in hooks:
        h.remove()
    want = float((logits.gather(1, enc.answer[:, None]) - logits.gather(1, enc.wrong[:, None])).mean())
    assert got == pytest.approx(want, abs=1e-4)


def test_eap_ig_with_one_step_is_attribution_patching(tiny_loaded: ha.LoadedModel) -> None:
    enc = encode_exact(tiny_loaded, _tiny_task())
    prep = prepare(tiny_loaded, enc)
    one = eap_ig(tiny_loaded, prep, steps=1, rows_per_pass=5).float()
    attribution = attribution_patching(tiny_loaded, enc, prep.clean_z, "logit_diff", "all")
    assert torch.allclose(one, attribution, atol=1e-5)
    assert attribution.abs().max() > 1e-3


def test_eap_ig_approaches_exact_patching_and_sums_to_the_total_effect() -> None:
    """Only the mover head differs between clean and counterfactual; the final RMSNorm makes the
    metric non-linear in its output. More steps bring EAP-IG onto the exact patching effect, which
    attribution patching (one step) misses; the scores sum to m(clean) − m(counterfactual)."""
    loaded = _mover_model()
    enc = encode_exact(loaded, _mover_task())
    prep = prepare(loaded, enc)
    exact = (
        activation_patching(loaded, enc, prep.clean_z, "logit_diff", "all")[:, 0, MOVER] - prep.corrupt_metric
    )
    errors = {
        s: float((eap_ig(loaded, prep, steps=s)[:, 0, MOVER].float() - exact).abs().mean())
        for s in (1, 4, 64)
    }
    assert errors[64] < errors[4] < errors[1]
    assert errors[64] < 0.02 * float(exact.abs().mean())
    total = eap_ig(loaded, prep, steps=64).sum((1, 2)).float()
    assert torch.allclose(total, prep.clean_metric - prep.corrupt_metric, rtol=0.02)


def test_every_method_finds_the_hand_wired_head_and_one_head_is_the_whole_circuit() -> None:
    loaded = _mover_model()
    prep = prepare(loaded, encode_exact(loaded, _mover_task()))
    for method in ("activation", "attribution", "eap-ig"):
        score, seconds = method_scores(loaded, prep, method, steps=4)
        assert order_by(score)[0] == (0, MOVER), method
        assert seconds >= 0
    result = measure_circuits(
        loaded, _mover_task(), ("eap-ig", "random"), "counterfactual", [1, 2], steps=4, seeds=(0, 1)
    )
    entry = result.methods["eap-ig"]
    assert entry["minimal_k"] == 1 and entry["signed"]["faithfulness"][1] == pytest.approx(1.0, abs=1e-5)
    assert entry["cpr"] > result.methods["random"]["cpr"]
    assert entry["top"][0] == f"L0H{MOVER}"


@pytest.mark.slow
def test_built_in_tasks_are_seeded_single_token_and_equal_length() -> None:
    loaded = ha.load("default")
    tok = loaded.tokenizer
    for name in (*TASKS, "arithmetic:*", "icl:country-capital"):
        task = circuit_task(tok, name, 8, seed=1)
        assert len(task.pairs) == 8 and all(usable(tok, p) for p in task.pairs), name
        assert circuit_task(tok, name, 8, seed=1).pairs == task.pairs
        assert circuit_task(tok, name, 8, seed=2).pairs != task.pairs
        encode_exact(loaded, task)
    with pytest.raises(HeadatlasError, match="unknown"):
        circuit_task(tok, "nope", 4)


def test_pair_file_errors(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps(
            {"clean": "The dog was", "corrupt": "The dog was in the river", "answer": " in", "wrong": " of"}
        )
        + "\n"
    )
    with pytest.raises(HeadatlasError, match="equal lengths"):
        encode_exact(tiny_loaded, circuit_task(tiny_loaded.tokenizer, str(path)))
    with pytest.raises(HeadatlasError, match="no pair file"):
        circuit_task(tiny_loaded.tokenizer, str(tmp_path / "missing.jsonl"))


def test_circuit_command_writes_results_atlas_columns_and_compares(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer, "wrong": p.wrong}
        for p in _tiny_task().pairs
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = []
    for ablation, methods in (
        ("counterfactual", "eap-ig,attribution,random"),
        ("mean", "attribution,atlas:circuit_pairs"),
    ):
        out = tmp_path / ablation
        args = ["circuit", str(tiny_model_dir), "--task", str(pairs), "--method", methods, "--ablation", ablation,
                "--sizes", "1,2,4", "--seeds", "0,1", "--steps", "2", "--only-correct", "--out", str(out), "--atlas", str(tmp_path / "atlas")]  # fmt: skip
        res = CliRunner().invoke(app, args + ["--edges", "4"] * (ablation == "mean"))
        assert res.exit_code == 0, res.output
        data = json.loads((out / "circuit.json").read_text())
        assert set(data["methods"]) == set(methods.split(",")) and (out / "circuit.png").exists()
        assert data["methods"]["attribution"]["signed"]["sizes"] == [0, 1, 2, 4, 12]
        runs.append(out)
    edges = pd.read_csv(runs[1] / "edges.csv")  # among the top 4 heads by attribution
    assert list(edges.columns) == ["sender", "receiver", "channel", "effect", "effect_std", "n_pairs"]
    assert (edges["receiver"] == "logits").sum() == 4 and "strongest edges" in res.output
    inner = edges[edges["receiver"] != "logits"]
    layer = lambda name: int(name[1:].split("H")[0])  # noqa: E731
    assert len(inner) and all(
        layer(s) < layer(r) for s, r in zip(inner["sender"], inner["receiver"], strict=True)
    )
    res = CliRunner().invoke(
        app, [*args[:4], "--method", "random", "--edges", "3", "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 2 and "--edges follows a method's ranking" in res.output
    atlas = ha.Atlas.load(tmp_path / "atlas")
    rank = atlas.matrix("circuit_pairs_rank")
    k = atlas.meta["circuits"]["pairs"]["minimal_k"]
    assert (
        atlas.matrix("circuit_pairs").sum() == (k or 0)
        and atlas.meta["circuits"]["pairs"]["method"] == "attribution"
    )
    assert sorted(rank.ravel().tolist()) == list(range(1, 13))
    stored = atlas.meta["circuits"]["pairs"]  # what the report reads: curves and the minimal circuit
    assert stored["column"] == "circuit_pairs" and len(stored["heads"]) == (k or 0)
    assert {parse_head(h) for h in stored["heads"]} == {
        (int(r), int(c)) for r, c in zip(*np.nonzero(atlas.matrix("circuit_pairs")), strict=True)
    }
    assert stored["methods"]["attribution"]["sizes"] == [0, 1, 2, 4, 12]
    assert stored["methods"]["attribution"]["faithfulness"][::4] == [0.0, 1.0]
    shown = {c["task"]: c for c in atlas_payload(atlas)["circuits"]}["pairs"]
    assert [m["name"] for m in shown["methods"]] == ["attribution", "atlas:circuit_pairs"]
    assert shown["methods"][0]["curve"][0] == [0, 0.0] and len(shown["heads"]) == (k or 0)
    assert 'id="circuits"' in render_report(atlas) and score_spec("circuit_ioi_rank").paper.startswith(
        "Mueller"
    )
    res = CliRunner().invoke(app, ["circuit", "compare", *map(str, runs), "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cmp" / "compare.png").exists() and len(compare_results(runs)) == 5
    res = CliRunner().invoke(
        app,
        [
            "circuit",
            str(tiny_model_dir),
            "--task",
            str(pairs),
            "--ablation",
            "half",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert res.exit_code == 2 and "ablation" in res.output
    res = CliRunner().invoke(
        app,
        [
            "circuit",
            str(tiny_model_dir),
            "--task",
            str(pairs),
            "--method",
            "magic",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert res.exit_code == 2 and "unknown method" in res.output


def test_write_results_round_trip(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    result = measure_circuits(tiny_loaded, _tiny_task(), ("attribution",), "zero", [2], seeds=(0,))
    paths = write_results(result, tmp_path / "r")
    assert {p.name for p in paths} == {"circuit.json", "pairs.jsonl", "scores.csv", "circuit.png"}
    assert len((tmp_path / "r" / "pairs.jsonl").read_text().splitlines()) == len(_tiny_task().pairs)


def test_only_correct_keeps_the_pairs_the_model_gets_right(tiny_loaded: ha.LoadedModel) -> None:
    task = _tiny_task()
    right = int((prepare(tiny_loaded, encode_exact(tiny_loaded, task)).clean_metric > 0).sum())
    assert 2 <= right < len(task.pairs)  # the tiny random model gets some right, some wrong
    result = measure_circuits(tiny_loaded, task, ("random",), "zero", [2], seeds=(0,), only_correct=True)
    assert result.baseline["n_pairs"] == right and result.baseline["drawn_pairs"] == len(task.pairs)
    assert result.baseline["clean_accuracy"] == 1.0 and result.baseline["drawn_accuracy"] < 1.0


def test_circuit_columns_are_named_per_task_and_operator() -> None:
    names = [circuit_column(t) for t in ("arithmetic:+", "arithmetic:-", "arithmetic:*", "arithmetic:/")]
    assert names == [
        "circuit_arithmetic_plus", "circuit_arithmetic_minus", "circuit_arithmetic_times", "circuit_arithmetic_divide"
    ]  # fmt: skip
    assert (
        circuit_column("greater-than") == "circuit_greater_than"
        and circuit_column("My task!") == "circuit_my_task"
    )
    for task in (*TASKS, "arithmetic:+", "icl:country-capital"):  # every built-in task's columns have a spec
        assert score_spec(circuit_column(task)).battery == "circuits", task
        assert score_spec(circuit_column(task) + "_rank").battery == "circuits", task


@pytest.mark.slow
@requires_qwen
def test_acronym_falls_back_to_the_spaced_form_where_the_tokenizer_merges_letters() -> None:
    from transformers import AutoTokenizer

    from headatlas.model.convert import packaged_dir
    from headatlas.model.packaged import packaged_model

    qwen = AutoTokenizer.from_pretrained(packaged_dir(packaged_model("qwen2.5-coder-0.5b"))[0])  # merges ".U"
    task = circuit_task(qwen, "acronym", 6)
    assert len(task.pairs) == 6 and all(usable(qwen, p) and p.answer.startswith(" ") for p in task.pairs)
    assert all("." not in p.clean for p in task.pairs)
    dotted = circuit_task(make_tokenizer(), "acronym", 4).pairs  # a tokenizer that keeps letters apart
    assert all(p.clean.endswith(".") and not p.answer.startswith(" ") for p in dotted)
