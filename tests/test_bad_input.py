"""No tracebacks: misuse of the Python API, degenerate numbers and damaged or hand-edited files
give one-line ``HeadatlasError`` messages that name the parameter, the file or the field."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import headatlas as ha
from headatlas.apps.interop.exchange import export_atlas
from headatlas.apps.kv.fit import fit_gates
from headatlas.apps.steer.steering import STEER_JSON, STEER_TENSORS, load_steering

MESSAGE = r"^[^\n]+$"


@pytest.fixture(scope="module")
def steering(tiny_loaded: ha.LoadedModel) -> ha.steer.Steering:
    return ha.steer.fit(tiny_loaded, task="truth", k=2)


@pytest.fixture(scope="module")
def atlas(tiny_atlas_dir: Path) -> ha.Atlas:
    return ha.Atlas.load(tiny_atlas_dir)


def _api_cases(
    loaded: ha.LoadedModel, atlas: ha.Atlas, steering: Any, tmp: Path
) -> dict[str, tuple[Callable[[], Any], str]]:
    ids = torch.tensor([[5, 6, 7, 8]])
    return {
        "ablate a name, not a model": (
            lambda: ha.ablate("default", [(0, 0)]).__enter__(),
            "must be the LoadedModel",
        ),
        "ablate a head outside": (lambda: ha.ablate(loaded, ["L9H0"]).__enter__(), "no head L9H0"),
        "ablate a head spelt badly": (
            lambda: ha.ablate(loaded, ["head one"]).__enter__(),
            "cannot read head",
        ),
        "patch without pairs": (lambda: ha.patch(loaded, None), "pairs must be"),  # type: ignore[arg-type]
        "patch with a bad pair": (lambda: ha.patch(loaded, [{"clean": "x"}]), "is a PatchPair or a dict"),
        "a config of strings": (lambda: ha.ScanConfig(seq_len="32"), "^seq_len must be an integer"),  # type: ignore[arg-type]
        "top as a string": (lambda: atlas.top("first_token", "5"), "^k must be an integer"),  # type: ignore[arg-type]
        "top below zero": (lambda: atlas.top("first_token", -1), "^k must be at least 0"),
        "maps of text": (lambda: ha.attention_maps(loaded, "The cat"), "input_ids must be a"),  # type: ignore[arg-type]
        "maps with a wrong mask": (
            lambda: ha.attention_maps(loaded, ids, ids[:, :2]),
            "attention_mask must be",
        ),
        "load an atlas of None": (lambda: ha.Atlas.load(None), "directory must be a path"),  # type: ignore[arg-type]
        "generate nothing": (lambda: ha.steer.generate(loaded, None, ""), "prompt is empty"),
        "generate zero tokens": (
            lambda: ha.steer.generate(loaded, None, "Hi", max_new_tokens=0),
            "max_new_tokens must be at least 1",
        ),
        "generate past the context": (
            lambda: ha.steer.generate(loaded, None, "Hi", max_new_tokens=10**8),
            "go beyond .* context",
        ),
        "steer at NaN": (
            lambda: ha.steer.generate(loaded, steering, "Hi", alpha=math.nan),
            "alpha must be a finite",
        ),
        "no strengths": (lambda: ha.steer.evaluate(loaded, steering, alphas=[]), "alphas is empty"),
        "a NaN strength": (
            lambda: ha.steer.evaluate(loaded, steering, alphas=[0, math.nan]),
            "alphas must be a finite",
        ),
        "no text": (lambda: ha.steer.evaluate(loaded, steering, n_text=0), "n_text must be at least 1"),
        "a negative lambda": (lambda: fit_gates(loaded, steps=1, lam=-1), "lam must be at least 0"),
        "an empty head list": (
            lambda: export_atlas(atlas, "attention-tracker", "first_token", tmp / "t.json", threshold=9.0),
            "no head has first_token",
        ),
        "a setting the format ignores": (
            lambda: export_atlas(atlas, "csv", "first_token", tmp / "t.csv", k=3),
            "k does not apply",
        ),
        "k and threshold": (
            lambda: export_atlas(
                atlas, "attention-tracker", "first_token", tmp / "t.json", k=3, threshold=0.1
            ),
            "not both",
        ),
    }


CASES = [
    "ablate a name, not a model", "ablate a head outside", "ablate a head spelt badly", "patch without pairs",
    "patch with a bad pair", "a config of strings", "top as a string", "top below zero", "maps of text",
    "maps with a wrong mask", "load an atlas of None", "generate nothing", "generate zero tokens",
    "generate past the context", "steer at NaN", "no strengths", "a NaN strength", "no text",
    "a negative lambda", "an empty head list", "a setting the format ignores", "k and threshold",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_misuse_of_the_python_api_is_one_line(
    case: str, tiny_loaded: ha.LoadedModel, atlas: ha.Atlas, steering: Any, tmp_path: Path
) -> None:
    action, match = _api_cases(tiny_loaded, atlas, steering, tmp_path)[case]
    with pytest.raises(ha.HeadatlasError, match=match) as info:
        action()
    assert "\n" not in str(info.value)


def test_what_the_docs_accept_is_accepted(tiny_loaded: ha.LoadedModel) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    with ha.ablate(tiny_loaded, ["L1H1", "0.2"]), torch.no_grad():
        tiny_loaded.model(input_ids=ids)
    maps = ha.attention_maps(tiny_loaded, ids)  # no mask: no padding
    assert maps[0].shape == (1, tiny_loaded.info.n_heads, 4, 4)


# ------------------------------------------------------------------- damaged or edited files


def _plan_edits() -> dict[str, tuple[Callable[[dict[str, Any]], None], str]]:
    return {
        "an extra key": (lambda d: d.update(extra=1), "unknown field 'extra'"),
        "a missing key": (lambda d: d.pop("full_heads"), "no 'full_heads' field"),
        "heads as text": (lambda d: d.update(full_heads="abc"), "'full_heads' must be a list"),
        "a head beyond the model": (
            lambda d: d.update(full_heads=[[9]] * len(d["full_heads"])),
            "KV head 9 does not exist",
        ),
        "a negative sink": (lambda d: d.update(sink=-3), "'sink' must be at least 0"),
        "too few layers": (lambda d: d.update(full_heads=[[0]]), "one list per layer"),
    }


@pytest.mark.parametrize("edit", sorted(_plan_edits()))
def test_a_damaged_kv_plan_is_one_line(edit: str, atlas: ha.Atlas, tmp_path: Path) -> None:
    path = ha.kv.plan(atlas, keep_fraction=0.5, by="first_token", sink=2, recent=30, context=200).save(
        tmp_path / "plan.json"
    )
    data = json.loads(path.read_text())
    change, match = _plan_edits()[edit]
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ha.HeadatlasError, match=match) as info:
        ha.kv.Plan.load(path)
    assert "\n" not in str(info.value)


def _steer_damage() -> dict[str, tuple[Callable[[Path], None], str]]:
    def edit(field: str, value: Any) -> Callable[[Path], None]:
        def change(where: Path) -> None:
            meta = json.loads((where / STEER_JSON).read_text())
            meta[field] = value
            (where / STEER_JSON).write_text(json.dumps(meta))

        return change

    def truncate(where: Path) -> None:
        data = (where / STEER_TENSORS).read_bytes()
        (where / STEER_TENSORS).write_bytes(data[: len(data) // 2])

    return {
        "a truncated tensor file": (truncate, "not a readable steering directory"),
        "a head beyond the model": (edit("heads", ["L9H0", "L0H1"]), "no head L9H0"),
        "an unknown direction": (edit("direction", "sideways"), "'direction' must be one of"),
        "a NaN alpha": (edit("alpha", "NaN"), "'alpha' must be a finite number"),
        "one head too many": (edit("heads", ["L0H0", "L0H1", "L1H0"]), "do not match in number"),
    }


@pytest.mark.parametrize("damage", sorted(_steer_damage()))
def test_a_damaged_steering_directory_is_one_line(damage: str, steering: Any, tmp_path: Path) -> None:
    where = steering.save(tmp_path / "steer")
    change, match = _steer_damage()[damage]
    change(where)
    with pytest.raises(ha.HeadatlasError, match=match) as info:
        load_steering(where)
    assert "\n" not in str(info.value)


def test_a_damaged_guard_is_one_line(tiny_loaded: ha.LoadedModel, tmp_path: Path) -> None:
    rows = [{"instruction": "Summarise.", "data": f"Text {i}.", "label": i % 2} for i in range(12)]
    guard = ha.Guard.fit(tiny_loaded, rows, n_sigma=0.0)
    where = guard.save(tmp_path / "guard")
    ha.Guard.load(where, tiny_loaded)
    for field, value, match in (
        ("threshold", None, "'threshold' must be a finite number"),
        ("important_heads", [], "one or more"),
        ("heads_lr", {"weight": []}, "no 'bias' field"),
    ):
        broken = tmp_path / f"broken-{field}"
        shutil.copytree(where, broken)
        config = json.loads((broken / "guard.json").read_text())
        config[field] = value
        (broken / "guard.json").write_text(json.dumps(config))
        with pytest.raises(ha.HeadatlasError, match=match) as info:
            ha.Guard.load(broken, tiny_loaded)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def cli_inputs(
    tiny_model_dir: Path, tiny_atlas_dir: Path, steering: Any, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    from tiny_models import BUILDERS, make_tokenizer

    root = tmp_path_factory.mktemp("cli-inputs")
    other = root / "other-model"
    BUILDERS["llama"](1).save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    plan = ha.kv.all_full(ha.load(tiny_model_dir).info).save(root / "plan.json")  # the model dir's own
    return {
        "steer": steering.save(root / "steer"),
        "other": other,
        "plan": plan,
        "atlas": tiny_atlas_dir,
        "root": root,
    }


CLI_CASES: dict[str, tuple[list[str], str]] = {
    "an empty prompt": (["steer", "generate", "{model}", "--steer", "{steer}", "--prompt", ""], "--prompt is empty"),
    "no new tokens": (["steer", "generate", "{model}", "--steer", "{steer}", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    "a NaN strength": (["steer", "generate", "{model}", "--steer", "{steer}", "--alpha", "nan"], "--alpha 'nan'"),
    "no strengths to sweep": (["steer", "eval", "{model}", "--steer", "{steer}", "--alphas", ""], "--alphas ''"),
    "a NaN in the sweep": (["steer", "eval", "{model}", "--steer", "{steer}", "--alphas", "0,nan"], "finite numbers"),
    "no text": (["steer", "eval", "{model}", "--steer", "{steer}", "--n-text", "0"], "--n-text must be at least 1"),
    "a negative lambda": (["kv", "fit", "{model}", "--lambda", "-1", "--context", "512", "--out", "{root}/f.json"], "--lambda must be at least 0"),
    "lengths beyond the context": (["kv", "eval", "{model}", "--plan", "{plan}", "--lengths", "99999"], "beyond"),
    "lengths that are not numbers": (["kv", "eval", "{model}", "--plan", "{plan}", "--lengths", "long"], "whole numbers"),
    "an atlas of another model": (["kv", "plan", "{atlas}", "--model", "{other}", "--out", "{root}/p.json"], "another model"),
    "a zero batch": (["guard", "score", "{model}", "--guard", "{root}/g", "--instruction", "x", "--data", "y", "--batch-size", "0"], "--batch-size must be at least 1"),
    "pruning nothing": (["prune", "{model}", "--fraction", "0", "--out", "{root}/pruned"], "removes no head"),
    "workers without Ray": (["scan", "{model}", "--workers", "2", "--out", "{root}/a"], "--workers counts Ray workers"),
    "one model in a zoo": (["zoo", "{model}", "--out", "{root}/zoo"], "give at least two MODELS"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_the_command_line_refuses_degenerate_input_in_one_line(
    case: str, cli_inputs: dict[str, Path], tiny_model_dir: Path
) -> None:
    from typer.testing import CliRunner

    from headatlas.cli import app

    words, message = CLI_CASES[case]
    values = {key: str(value) for key, value in {**cli_inputs, "model": tiny_model_dir}.items()}
    args = [word.format(**values) for word in words]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (case, result.output)
    assert not (cli_inputs["root"] / "pruned").exists() and not (cli_inputs["root"] / "a").exists()


def test_every_file_headatlas_writes_gets_the_usual_permissions(steering: Any, tmp_path: Path) -> None:
    import os
    import stat

    where = steering.save(tmp_path / "steer")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in where.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert modes == {STEER_JSON: 0o666 & ~mask, STEER_TENSORS: 0o666 & ~mask}
