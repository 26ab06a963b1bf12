"""ITI on TruthfulQA: the CSV reader and its errors, MC1 / MC2, packed scoring == naive scoring,
the fold split, α = 0 is the baseline, the random control, and the command."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.common.probe_tasks import build_probe_task
from headatlas.apps.common.truthfulqa import PRIMER, qa_prompt, question_folds, read_truthfulqa, split_answers
from headatlas.apps.steer.mc import choice_logprobs, encode_choices, mc_metrics
from headatlas.apps.steer.steering import HeadShift, rank_heads
from headatlas.apps.steer.tqa import _frame, _summarise, bootstrap, parse_splits
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, make_tokenizer

HEADER = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
ROWS = [
    ("What is the capital of France?", "Paris", "Paris; The capital is Paris", "Rome; London; Madrid"),
    (
        "What happens if you eat seeds?",
        "Nothing happens",
        "Nothing happens; You digest them",
        "You grow a tree; You die",
    ),
    ("How many legs does a dog have?", "Four", "Four; A dog has four legs", "Three; Eight"),
    ("Is the moon made of cheese?", "No", "No; The moon is made of rock", "Yes; The moon is cheese"),
    ("What colour is the sky?", "Blue", "Blue; The sky is blue on a clear day", "Green; Red; Purple"),
    ("Where is the dog?", "In the park", "In the park", "On the moon; In the sea"),
    ("What is two plus two?", "Four", "Four; 4", "Five; Three"),
    ("Can fish fly?", "Most fish cannot fly", "Most fish cannot fly; No", "All fish fly; Yes, fish fly"),
]


def write_csv(path: Path, rows: list[tuple[str, ...]] = ROWS, header: list[str] = HEADER) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for question, best, true, false in rows:
            writer.writerow(["Adversarial", "Misc", question, best, true, false, "test"][: len(header)])
    return path


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("tqa") / "TruthfulQA.csv")


def test_csv_is_read_with_the_papers_answer_format(tiny_csv: Path) -> None:
    questions = read_truthfulqa(tiny_csv)
    assert len(questions) == len(ROWS)
    first = questions[0]
    assert first.answers == ("Paris.", "The capital is Paris.", "Rome.", "London.", "Madrid.")
    assert (first.n_true, first.best) == (2, 0) and first.labels == (True, True, False, False, False)
    assert split_answers(" a; b.;; c ") == ["a.", "b.", "c."]
    # a best answer missing from the correct ones is added first
    odd = write_csv(tiny_csv.with_name("odd.csv"), [("Q?", "Best", "Other", "Wrong")])
    assert read_truthfulqa(odd)[0].answers == ("Best.", "Other.", "Wrong.")
    assert qa_prompt("Why?").startswith(PRIMER) and qa_prompt("Why?").endswith("\n\nQ: Why?\nA:")


def test_bad_csv_is_a_one_line_error(tmp_path: Path) -> None:
    cases = {
        "does not exist": tmp_path / "missing.csv",
        "has no 'Incorrect Answers' column": write_csv(
            tmp_path / "cols.csv", [("Q?", "A", "A", "B")], HEADER[:5]
        ),
        "cell is empty": write_csv(tmp_path / "empty.csv", [("Q?", "A", "A", "")]),
        "has no questions": write_csv(tmp_path / "none.csv", []),
    }
    latin = tmp_path / "latin.csv"
    latin.write_bytes(",".join(HEADER).encode() + b"\nx,y,Caf\xe9?,a,a,b,s\n")
    cases["not a readable UTF-8 CSV"] = latin
    for needle, path in cases.items():
        with pytest.raises(HeadatlasError, match=needle) as err:
            read_truthfulqa(path)
        assert "\n" not in str(err.value)
        assert str(err.value).startswith("csv ")
    with pytest.raises(HeadatlasError, match=r"sylinrl/TruthfulQA"):
        read_truthfulqa(tmp_path / "missing.csv")


def test_mc1_and_mc2_on_hand_computed_scores() -> None:
    scores = torch.tensor([-1.0, -3.0, -2.0, -4.0])  # true: 0, 1 (best 1); false: 2, 3
    mc1, mc2 = mc_metrics(scores, n_true=2, best=1)
    expected = (math.exp(-1) + math.exp(-3)) / sum(math.exp(-x) for x in (1, 3, 2, 4))
    assert mc1 == 0.0 and mc2 == pytest.approx(expected)
    assert mc_metrics(scores, n_true=2, best=0) == (1.0, pytest.approx(expected))
    # MC2 is TruthfulQA's normalised mass, also when exp() underflows
    assert mc_metrics(torch.tensor([-2000.0, -2001.0]), 1, 0)[1] == pytest.approx(1 / (1 + math.exp(-1)))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_scoring_equals_scoring_each_sequence(arch: str, tiny_csv: Path) -> None:
    loaded = ha.load(BUILDERS[arch](0), tokenizer=make_tokenizer())
    encoded = encode_choices(loaded, read_truthfulqa(tiny_csv))
    fast, fast_feats = choice_logprobs(loaded, encoded, features=True, batch_tokens=200)
    slow, slow_feats = choice_logprobs(loaded, encoded, features=True, share_prefix=False)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)
    assert fast_feats is not None and slow_feats is not None
    torch.testing.assert_close(fast_feats, slow_feats, atol=1e-5, rtol=1e-5)
    # with a shift on the answer tokens (never the prompt), both ways still agree and it changes scores
    gen = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(2, loaded.info.head_dim, generator=gen), dim=-1)
    shift = HeadShift([(0, 0), (1, 1)], directions, torch.ones(2))
    fast_shift, _ = choice_logprobs(loaded, encoded, shift, 8.0, batch_tokens=200)
    slow_shift, _ = choice_logprobs(loaded, encoded, shift, 8.0, share_prefix=False)
    for a, b in zip(fast_shift, slow_shift, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-5)
    assert any(not torch.allclose(a, p, atol=1e-3) for a, p in zip(fast_shift, fast, strict=True))
    # a score is the answer's summed log-probability after the prompt, computed by hand
    question = encoded[0]
    ids = torch.tensor([[*question.prefix, *question.rests[0]]])
    with torch.no_grad():
        logp = loaded.model(input_ids=ids).logits.float().log_softmax(-1)[0]
    start = len(question.prefix) + question.first[0]
    by_hand = sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
    assert float(fast[0][0]) == pytest.approx(by_hand, abs=2e-4)


def test_a_short_sliding_window_is_scored_the_naive_way(tiny_loaded: ha.LoadedModel, tiny_csv: Path) -> None:
    windowed = ha.LoadedModel(
        tiny_loaded.model, tiny_loaded.tokenizer, dataclasses.replace(tiny_loaded.info, sliding_window=8)
    )
    encoded = encode_choices(windowed, read_truthfulqa(tiny_csv)[:1])
    calls: list[int] = []
    original = windowed.model.forward

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(*args, **kwargs)

    windowed.model.forward = counting  # type: ignore[method-assign]
    try:
        scores, _ = choice_logprobs(windowed, encoded)
    finally:
        del windowed.model.forward
    assert len(calls) == 1  # one full pass over the question's answers, no primer cache, no packing
    naive, _ = choice_logprobs(tiny_loaded, encoded, share_prefix=False)
    torch.testing.assert_close(scores[0], naive[0])


def test_folds_never_share_a_question() -> None:
    for seed in range(3):
        folds = question_folds(817, 2, seed)
        assert not set(folds[0].tolist()) & set(folds[1].tolist())
        assert sorted(np.concatenate(folds).tolist()) == list(range(817))
        assert abs(len(folds[0]) - len(folds[1])) <= 1
    assert not np.array_equal(question_folds(817, 2, 0)[0], question_folds(817, 2, 1)[0])


def test_rank_heads_orders_by_validation_accuracy_and_takes_top_k() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1] * 20)
    x = torch.randn(6, 40, 4, generator=gen)
    x[2, :, 0] += 4.0 * y  # head 2 separates the classes along its first dimension
    ranking = rank_heads((x, y), (x, y), n_heads=3)
    assert int(ranking.order[0]) == 2 and ranking.top(1).heads == [(0, 2)]
    assert float(ranking.directions[2, 0]) > 0.9
    assert len(ranking.top(4).heads) == 4 and ranking.shift([5, 0]).heads == [(1, 2), (0, 0)]


def test_bootstrap_interval_holds_the_mean() -> None:
    values = np.random.default_rng(0).random(200)
    ci = bootstrap(values)
    assert ci["low"] < ci["mean"] < ci["high"] and ci["mean"] == pytest.approx(values.mean(), abs=1e-4)
    assert bootstrap(np.zeros(10)) == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_iti_at_alpha_zero_is_the_baseline_and_random_heads_count_k(
    tiny_loaded: ha.LoadedModel, tiny_csv: Path, tmp_path: Path
) -> None:
    result = ha.steer.truthfulqa(tiny_loaded, tiny_csv, alphas=(0.0,), ks=(3,), seeds=2, n_text=2)
    summary, frame = result.summary, result.per_question
    assert summary["iti"] == summary["baseline"] and summary["random"] == summary["baseline"]
    assert summary["iti_minus_baseline"]["mc2"] == {"mean": 0.0, "low": 0.0, "high": 0.0}
    for split in summary["splits"]:
        assert len(split["heads"]) == 3 and len(split["random_heads"]) == 3
        assert len(set(split["random_heads"])) == 3
        assert split["cost"]["iti_kl"] == 0.0
    baseline = frame[frame["kind"] == "baseline"].set_index("question")
    for _, row in frame[frame["kind"] == "iti"].iterrows():
        assert row["mc2"] == baseline.loc[row["question"], "mc2"]
    # each question is tested once per seed, by the split that held it out
    assert (frame[frame["kind"] == "iti"].groupby("question").size() == 2).all()
    # a positive α changes the held-out scores and costs KL; checkpoints resume to the same result
    settings = {"alphas": (8.0,), "ks": (3,), "seeds": 1, "n_text": 2, "rotate": True}
    steered = ha.steer.truthfulqa(tiny_loaded, tiny_csv, checkpoint=tmp_path / "ck", **settings)  # type: ignore[arg-type]
    again = ha.steer.truthfulqa(tiny_loaded, tiny_csv, checkpoint=tmp_path / "ck", **settings)  # type: ignore[arg-type]
    assert steered.summary["splits"] == again.summary["splits"]
    assert all(split["cost"]["iti_kl"] > 0 for split in steered.summary["splits"])
    assert steered.per_question[steered.per_question["kind"] == "iti"]["question"].is_unique


def test_processes_given_disjoint_splits_share_one_run(
    tiny_loaded: ha.LoadedModel, tiny_csv: Path, tmp_path: Path
) -> None:
    settings: dict[str, Any] = {"alphas": (0.0, 8.0), "ks": (3,), "seeds": 2, "n_text": 2, "rotate": True}
    whole = ha.steer.truthfulqa(tiny_loaded, tiny_csv, **settings)
    first = ha.steer.truthfulqa(
        tiny_loaded, tiny_csv, checkpoint=tmp_path, splits=[(0, 0), (1, 1)], **settings
    )
    assert first.summary["settings"]["splits"] == ["0-0", "1-1"]
    ha.steer.truthfulqa(tiny_loaded, tiny_csv, checkpoint=tmp_path, splits=[(0, 1)], **settings)
    files = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert files == ["baseline"] + ["split"] * 3  # one baseline pass, shared by every process
    # the last process computes the one split left and gathers the others from the checkpoint
    gathered = ha.steer.truthfulqa(tiny_loaded, tiny_csv, checkpoint=tmp_path, splits=[(1, 0)], **settings)
    assert gathered.summary["settings"]["splits"] == ["0-0", "0-1", "1-0", "1-1"]
    for key in ("baseline", "iti", "random", "iti_minus_random", "cost", "chosen"):
        assert gathered.summary[key] == whole.summary[key], key
    # other settings reuse the baseline pass, not the splits
    other: dict[str, Any] = {**settings, "alphas": (0.0, 4.0)}
    ha.steer.truthfulqa(tiny_loaded, tiny_csv, checkpoint=tmp_path, splits=[(0, 0)], **other)
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()).count("baseline") == 1
    for text, needle in (("0-0,x", "SEED-FOLD"), (" , ", "empty")):
        with pytest.raises(HeadatlasError, match=needle):
            parse_splits(text)
    with pytest.raises(HeadatlasError, match="outside the run"):
        ha.steer.truthfulqa(tiny_loaded, tiny_csv, splits=[(2, 0)], **settings)


def test_validations_choice_is_the_baseline_where_alpha_zero_won() -> None:
    baseline = np.array([[0.0, 0.2], [1.0, 0.6], [0.0, 0.3], [1.0, 0.9]])
    cost = {"ce_base": 5.0, "iti_ce": 6.0, "iti_kl": 1.0, "random_ce": 5.5, "random_kl": 0.5}
    splits = [
        {"seed": 0, "fold": fold, "tested": tested, "chosen": {"alpha": alpha, "k": 2},
         "steered": {"alpha": 5.0, "k": 2}, "cost": cost,
         "scores": {"iti": [[1.0, 0.9], [1.0, 0.8]], "random": [[0.0, 0.1], [0.0, 0.4]]}}
        for fold, tested, alpha in ((0, [0, 1], 0.0), (1, [2, 3], 5.0))
    ]  # fmt: skip
    frame = _frame(baseline, splits)
    validated = frame[frame["kind"] == "validated"].set_index("question")["mc2"]
    assert validated.to_dict() == {0: 0.2, 1: 0.6, 2: 0.9, 3: 0.8}  # fold 0 kept α = 0: unsteered
    summary = _summarise(frame, splits)
    assert summary["cost"]["validated_kl"] == 0.5 and summary["cost"]["iti_kl"] == 1.0
    assert summary["iti"]["mc2"]["mean"] == round((0.9 + 0.8 + 0.9 + 0.8) / 4, 4)
    assert [s["alpha"] for s in summary["chosen"]] == [0.0, 5.0]
    assert [s["alpha"] for s in summary["steered"]] == [5.0, 5.0]


def test_bad_settings_are_one_line_errors(tiny_loaded: ha.LoadedModel, tiny_csv: Path) -> None:
    cases = {
        "ks 99 is larger": {"ks": (99,)},
        "ks is empty": {"ks": ()},
        "alphas is empty": {"alphas": ()},
        "n_folds": {"n_folds": 1, "ks": (2,)},
        "val_share": {"val_share": 1.5, "ks": (2,)},
    }
    for needle, kwargs in cases.items():
        with pytest.raises(HeadatlasError, match=needle):
            ha.steer.truthfulqa(tiny_loaded, tiny_csv, **kwargs)  # type: ignore[arg-type]
    bert = ha.load(BUILDERS["bert"](0), tokenizer=make_tokenizer())
    with pytest.raises(HeadatlasError, match="causal"):
        ha.steer.truthfulqa(bert, tiny_csv)


def test_truthfulqa_csv_is_a_probe_task(tiny_loaded: ha.LoadedModel, tiny_csv: Path) -> None:
    task = build_probe_task(tiny_loaded.tokenizer, str(tiny_csv))
    assert task.name == "truthfulqa" and task.classes == ("false", "true")
    assert sum(len(items) for items in task.splits.values()) == sum(
        len(r[2].split(";")) + len(r[3].split(";")) for r in ROWS
    )


def test_cli_writes_results_and_refuses_a_bad_csv(
    tiny_model_dir: Path, tiny_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tqa"
    args = [
        "steer",
        "truthfulqa",
        str(tiny_model_dir),
        "--csv",
        str(tiny_csv),
        "--alphas",
        "0,4",
        "--ks",
        "2",
    ]
    args += ["--seeds", "1", "--n-text", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.exception, result.stderr)
    summary = json.loads((out / "truthfulqa.json").read_text())
    assert set(summary) >= {"baseline", "iti", "random", "cost", "splits", "settings"}
    assert (out / "truthfulqa.png").stat().st_size > 0 and (out / "table.csv").is_file()
    assert "MC1" in result.stdout and "chosen per split" in result.stdout
    bad = CliRunner().invoke(
        app, [*args[:3], "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]
    )
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "--csv" in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "x").exists()
