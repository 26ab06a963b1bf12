"""ITI steering: fit, the hook (α = 0 is the model), save/load checks, bake == hook, lm-eval export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.steer.steering import load_steering
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, make_tokenizer

TEXT = "The capital of France is Paris and the dog ran."


@pytest.fixture(scope="module")
def steering(tiny_loaded: ha.LoadedModel) -> ha.steer.Steering:
    return ha.steer.fit(tiny_loaded, task="truth", k=3)


def _logits(loaded: ha.LoadedModel) -> torch.Tensor:
    enc = loaded.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**enc).logits


def test_fit_keeps_the_top_k_heads_by_validation_accuracy(steering: ha.steer.Steering) -> None:
    assert len(steering.shift.heads) == 3 and len(set(steering.shift.heads)) == 3
    assert steering.val_accuracy == sorted(steering.val_accuracy, reverse=True)
    norms = steering.shift.directions.norm(dim=-1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5)
    assert (steering.shift.sigma > 0).all() and (steering.control.sigma > 0).all()
    assert steering.params["positive_class"] == "true"


def test_alpha_zero_is_bitwise_the_model_and_alpha_changes_it(
    tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering
) -> None:
    plain = _logits(tiny_loaded)
    with ha.steer.applied(tiny_loaded, steering, alpha=0.0):
        zero = _logits(tiny_loaded)
    with ha.steer.applied(tiny_loaded, steering, alpha=15.0):
        steered = _logits(tiny_loaded)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, steered, atol=1e-3)
    assert torch.equal(plain, _logits(tiny_loaded))  # the hook is gone after the block


def test_steering_applies_while_generating(tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering) -> None:
    plain = ha.steer.generate(tiny_loaded, None, "The capital of", max_new_tokens=4)
    assert ha.steer.generate(tiny_loaded, steering, "The capital of", alpha=0.0, max_new_tokens=4) == plain
    big = ha.steer.generate(tiny_loaded, steering, "The capital of", alpha=400.0, max_new_tokens=4)
    assert big != plain


def test_saved_steering_round_trips_and_refuses_another_model(
    tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering, tmp_path: Path
) -> None:
    steering.save(tmp_path / "s")
    again = load_steering(tmp_path / "s", tiny_loaded)
    assert again.shift.heads == steering.shift.heads
    assert torch.equal(again.shift.directions, steering.shift.directions)
    other = ha.load(BUILDERS["llama"](1), tokenizer=make_tokenizer())
    with pytest.raises(HeadatlasError, match="fitted on another model") as err:
        load_steering(tmp_path / "s", other)
    assert "\n" not in str(err.value)
    with pytest.raises(HeadatlasError, match="not a readable steering directory"):
        load_steering(tmp_path / "nothing", tiny_loaded)


def test_the_same_weights_loaded_from_files_are_accepted(
    tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering, tmp_path: Path
) -> None:
    """Fitted in memory, used on the same weights saved and loaded from a directory (whose files'
    sha256 is all its ModelInfo knows): accepted through the parameters' sha256."""
    steering.save(tmp_path / "s")
    tiny_loaded.model.save_pretrained(tmp_path / "model")
    tiny_loaded.tokenizer.save_pretrained(tmp_path / "model")
    from_files = ha.load(str(tmp_path / "model"))
    assert from_files.info.sha256 and from_files.info.sha256 != steering.model_sha256
    assert load_steering(tmp_path / "s", from_files).shift.heads == steering.shift.heads
    fitted_on_files = ha.steer.Steering(**{**steering.__dict__, "model_sha256": from_files.info.sha256})
    fitted_on_files.save(tmp_path / "f")
    assert load_steering(tmp_path / "f", tiny_loaded).shift.heads == steering.shift.heads


def test_baked_checkpoint_equals_the_hook(
    tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering, tmp_path: Path
) -> None:
    out = ha.steer.export_bake(tiny_loaded, steering, 15.0, tmp_path / "baked")
    from transformers import AutoModelForCausalLM

    baked = AutoModelForCausalLM.from_pretrained(out).float().eval()
    enc = tiny_loaded.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        from_bake = baked(**enc).logits
    with ha.steer.applied(tiny_loaded, steering, alpha=15.0):
        from_hook = _logits(tiny_loaded)
    assert not torch.allclose(from_bake, _logits(tiny_loaded), atol=1e-3)
    torch.testing.assert_close(from_bake, from_hook, atol=1e-5, rtol=1e-5)


def test_lm_eval_file_holds_the_shift_through_w_o(
    tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering, tmp_path: Path
) -> None:
    path = ha.steer.export_lm_eval(tiny_loaded, steering, 15.0, tmp_path)
    config = torch.load(path, weights_only=True)
    layers = {layer for layer, _ in steering.shift.heads}
    assert len(config) == len(layers)
    modules = dict(tiny_loaded.model.named_modules())
    enc = tiny_loaded.tokenizer(TEXT, return_tensors="pt")
    hooks = []
    for name, entry in config.items():
        assert entry["action"] == "add" and entry["steering_vector"].shape == (1, 64)

        def add(
            _m: torch.nn.Module, _i: object, output: torch.Tensor, v: torch.Tensor = entry["steering_vector"]
        ) -> torch.Tensor:
            return output + v

        hooks.append(modules[name].register_forward_hook(add))
    try:
        with torch.no_grad():
            via_file = tiny_loaded.model(**enc).logits
    finally:
        for hook in hooks:
            hook.remove()
    with ha.steer.applied(tiny_loaded, steering, alpha=15.0):
        via_hook = _logits(tiny_loaded)
    torch.testing.assert_close(via_file, via_hook, atol=1e-5, rtol=1e-5)


def test_bad_steering_input_is_a_one_line_error(tiny_loaded: ha.LoadedModel) -> None:
    with pytest.raises(HeadatlasError, match="larger than the model's 12 heads"):
        ha.steer.fit(tiny_loaded, task="truth", k=13)
    with pytest.raises(HeadatlasError, match="unknown direction"):
        ha.steer.fit(tiny_loaded, task="truth", direction="mean")
    with pytest.raises(HeadatlasError, match="two classes"):
        ha.steer.fit(tiny_loaded, task="upos", k=2)


def test_evaluate_sweeps_alpha_for_probe_and_random_heads(
    tiny_loaded: ha.LoadedModel, steering: ha.steer.Steering, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headatlas.apps.steer.evaluation as steer_eval

    monkeypatch.setattr(steer_eval, "ewt_sentences", lambda split, limit: [TEXT, "A cat sat on the mat."])
    table = ha.steer.evaluate(tiny_loaded, steering, alphas=(0.0, 30.0), n_text=2)
    assert list(table["kind"]) == ["probe", "probe", "random", "random"]
    zero = table[table["alpha"] == 0.0]
    assert (zero["kl"].abs() < 1e-6).all() and zero["ce"].nunique() == 1
    assert (table[table["alpha"] == 30.0]["kl"] > 1e-4).all()
    assert table["mc_accuracy"].between(0, 1).all() and (table["n_facts"] > 0).all()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(ha.__file__).parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "headatlas.cli", *args], capture_output=True, text=True, env=env
    )


def _one_line(result: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]


def _invoke_one_line(needle: str, *args: str) -> None:
    """Run the CLI in this process (typer's CliRunner, stderr kept apart): exit code 2 and exactly
    one non-blank line on stderr holding ``needle``, as :func:`_one_line` checks of a subprocess
    (and nothing on stdout)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, (result.exception, result.stderr)
    assert result.stdout == "", result.stdout
    assert needle in lines[0], lines[0]


def test_cli_bad_input_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Every case in this process; the last one also through the real entry point in a subprocess
    (``python -m headatlas.cli``, the console script's ``main``), where every stray line a library
    writes to stderr while loading the model would break the one line."""
    model = str(tiny_model_dir)
    _invoke_one_line("unknown --task 'nope'", "probe", model, "--task", "nope", "--out", str(tmp_path / "a"))
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(json.dumps({"text": f"row {i}", "label": "x"}) for i in range(12)))
    _invoke_one_line("one class", "probe", model, "--task", str(one), "--out", str(tmp_path / "a"))
    _invoke_one_line("--k 99 is larger", "steer", "fit", model, "--k", "99", "--out", str(tmp_path / "s"))
    other = ha.load(BUILDERS["llama"](1), tokenizer=make_tokenizer())
    ha.steer.fit(other, task="truth", k=2).save(tmp_path / "other")
    generate = ("steer", "generate", model, "--steer", str(tmp_path / "other"))
    _invoke_one_line("fitted on another model", *generate)
    _one_line(_cli(*generate), "fitted on another model")
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists()


def test_cli_probe_writes_columns_and_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    args = [
        "probe",
        str(tiny_model_dir),
        "--task",
        "truth",
        "--seeds",
        "1",
        "--no-random-init",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # in this process: no interpreter start
    assert result.exit_code == 0, (result.exception, result.stderr)
    atlas = ha.Atlas.load(out)
    assert {"probe_truth", "probe_truth_selectivity"} <= set(atlas.table)
    assert (out / "probes.parquet").exists() and (out / "figures" / "scores" / "probe_truth.png").exists()


@pytest.fixture(scope="module")
def tiny_qwen2_loaded() -> ha.LoadedModel:
    return ha.load(BUILDERS["qwen2"](0), tokenizer=make_tokenizer())


def test_qwen2_bakes_as_llama_with_the_hooks_logits_and_generations(
    tiny_qwen2_loaded: ha.LoadedModel, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    loaded = tiny_qwen2_loaded
    assert loaded.info.arch == "qwen2" and not hasattr(loaded.model.config, "attention_bias")
    steering = ha.steer.fit(loaded, task="truth", k=3)
    out = ha.steer.export_bake(loaded, steering, 15.0, tmp_path / "baked")
    baked = AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert baked.config.model_type == "llama" and baked.config.attention_bias
    enc = loaded.tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        from_bake = baked(**enc).logits
    with ha.steer.applied(loaded, steering, alpha=15.0):
        from_hook = _logits(loaded)
    assert not torch.allclose(from_bake, _logits(loaded), atol=1e-3)
    torch.testing.assert_close(from_bake, from_hook, atol=1e-5, rtol=1e-5)
    prompt = loaded.tokenizer("The capital of", return_tensors="pt")
    with torch.no_grad():
        generated = baked.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    hooked = ha.steer.generate(loaded, steering, "The capital of", alpha=15.0, max_new_tokens=6)
    assert (
        loaded.tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        == hooked
    )


def test_bake_refuses_a_rewrite_that_changes_the_network(
    tiny_qwen2_loaded: ha.LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from headatlas.apps.steer import export

    steering = ha.steer.fit(tiny_qwen2_loaded, task="truth", k=2)
    wrong = export.BakeTarget("llama", "LlamaForCausalLM", {"attention_bias": True, "rms_norm_eps": 0.5})
    monkeypatch.setitem(export.BAKE_TARGETS, "qwen2", wrong)
    with pytest.raises(HeadatlasError, match="changes its logits"):
        ha.steer.export_bake(tiny_qwen2_loaded, steering, 15.0, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    monkeypatch.delitem(export.BAKE_TARGETS, "qwen2")
    with pytest.raises(HeadatlasError, match="no attention_bias"):
        ha.steer.export_bake(tiny_qwen2_loaded, steering, 15.0, tmp_path / "none")
