"""``headatlas retain``: SEEKR's attention distillation (He et al. 2024) on tiny seeded models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.retain import (
    Example,
    RetainConfig,
    attention_kd,
    head_attention,
    read_examples,
    replay_subset,
    retain,
    save_checkpoint,
    top_heads,
)
from headatlas.apps.retain.data import encode
from headatlas.apps.retain.training import select_heads
from headatlas.capture import capture
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from tiny_models import BUILDERS, make_tokenizer

TRAIN = [Example("the cat sat", " on the mat"), Example("a dog ran", " far away"), Example("we go", " home")]
OLD = [Example("the sun is", " hot"), Example("a tree grew", " tall"), Example("birds can", " fly")]


def _tiny() -> ha.LoadedModel:
    return ha.load(BUILDERS["llama"](0), tokenizer=make_tokenizer())  # 3 layers × 4 heads, 2 KV heads


def test_capture_grad_gives_the_same_maps_with_gradients() -> None:
    loaded = _tiny()
    batch = encode(loaded, OLD)
    plain, _ = head_attention(loaded, batch, [(0, 1), (2, 3)], grad=False)
    maps, _ = head_attention(loaded, batch, [(0, 1), (2, 3)], grad=True)
    assert not plain.requires_grad and maps.requires_grad
    torch.testing.assert_close(maps.detach(), plain, rtol=0, atol=1e-6)

    seen: list[bool] = []
    with capture(loaded, lambda view: seen.append(view.probs.requires_grad), mode="dense") as session:
        session.run(batch.input_ids, batch.attention_mask)
    assert seen and not any(seen)  # the default stays no-grad


def test_kd_loss_is_zero_when_student_equals_teacher() -> None:
    loaded = _tiny()
    batch = encode(loaded, OLD)
    heads = [(0, 0), (1, 2), (2, 1)]
    teacher, _ = head_attention(loaded, batch, heads, grad=False)
    student, _ = head_attention(loaded, batch, heads, grad=True)
    assert attention_kd(student, teacher, batch.attention_mask).item() == 0.0
    with torch.no_grad():
        loaded.model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    moved, _ = head_attention(loaded, batch, heads, grad=True)
    assert attention_kd(moved, teacher, batch.attention_mask).item() > 1e-4


def test_kd_gradient_flows_only_into_what_shapes_the_chosen_heads() -> None:
    loaded = _tiny()
    batch = encode(loaded, OLD)
    chosen = [(1, 0)]  # layer 1, query head 0, which reads KV head 0
    teacher, _ = head_attention(loaded, batch, chosen, grad=False)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    maps, _ = head_attention(loaded, batch, chosen, grad=True)
    attention_kd(maps, teacher, batch.attention_mask).backward()
    grads = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in loaded.model.named_parameters()
    }
    d = loaded.info.head_dim
    layer1 = "model.layers.1."
    q = grads[layer1 + "self_attn.q_proj.weight"]  # [head * d_head, d_model]
    k = grads[layer1 + "self_attn.k_proj.weight"]  # [kv_head * d_head, d_model]
    assert q[:d].abs().sum() > 0 and q[d:].abs().sum() == 0  # only head 0's query rows
    assert k[:d].abs().sum() > 0 and k[d:].abs().sum() == 0  # only KV head 0's key rows
    for name in ("self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"):
        assert grads[layer1 + name].abs().sum() == 0  # the map does not depend on them
    assert all(g.abs().sum() == 0 for n, g in grads.items() if n.startswith("model.layers.2."))
    assert grads["lm_head.weight"].abs().sum() == 0
    assert grads["model.layers.0.mlp.up_proj.weight"].abs().sum() > 0  # earlier layers shape it


def test_head_selection_is_deterministic_and_puts_the_weights_back() -> None:
    ties = np.array([[1.0, 3.0], [3.0, 3.0], [np.nan, 2.0]])
    assert top_heads(ties, 3) == [(0, 1), (1, 0), (1, 1)]
    assert top_heads(ties, 3) == top_heads(ties.copy(), 3)
    loaded = _tiny()
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    config = RetainConfig(heads="seekr", k=4, probe_steps=2, batch_size=2)
    new, old = encode(loaded, TRAIN), encode(loaded, OLD)
    first, importance = select_heads(loaded, config, new, old)
    second, _ = select_heads(loaded, config, new, old)
    assert first == second and len(first) == 4 and importance is not None
    assert importance.shape == (3, 4) and np.all(importance >= 0) and importance.max() > 0
    for name, param in loaded.model.named_parameters():
        torch.testing.assert_close(param.detach(), before[name], rtol=0, atol=0)


def test_retain_learns_the_new_task_and_saves_a_checkpoint(tmp_path: Path) -> None:
    loaded = _tiny()
    result = retain(loaded, TRAIN, OLD, RetainConfig(heads="seekr", k=3, steps=6, lr=3e-3, batch_size=3))
    assert len(result.heads) == 3 and result.selection == "seekr"
    assert all(p.requires_grad and p.grad is None for p in loaded.model.parameters())  # as it was
    assert np.isfinite(result.loss_kd) and np.isfinite(result.loss_replay)
    fresh = _tiny()
    first = retain(fresh, TRAIN, [], RetainConfig(heads="none", steps=1, lr=0.0, batch_size=3))
    assert result.loss_new < first.loss_new  # it learned
    out = save_checkpoint(loaded, tmp_path / "ckpt", result.to_dict())
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "headatlas-retain.json").read_text())["heads"] == result.heads
    again = ha.load(str(out))
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        dict(again.model.named_parameters())[name], dict(loaded.model.named_parameters())[name]
    )


@pytest.mark.parametrize(
    "config",
    [
        RetainConfig(k=0),
        RetainConfig(k=13),
        RetainConfig(heads="bogus"),
        RetainConfig(heads="atlas:importance_gradient"),
        RetainConfig(heads="L9H0"),
        RetainConfig(steps=0),
        RetainConfig(lr=-1.0),
        RetainConfig(lam=float("nan")),
        RetainConfig(trainable="mlp"),
    ],
)
def test_bad_settings_are_headatlas_errors(config: RetainConfig) -> None:
    with pytest.raises(HeadatlasError):
        retain(_tiny(), TRAIN, OLD, config)


def test_bad_data_are_headatlas_errors(tmp_path: Path) -> None:
    with pytest.raises(HeadatlasError):
        retain(_tiny(), [], OLD)
    for fraction in (0.0, 1.5):
        with pytest.raises(HeadatlasError, match="replay_fraction"):
            replay_subset(OLD, fraction, 0)
    assert len(replay_subset(OLD, 0.01, 0)) == 1 and replay_subset(OLD, 0.5, 3) == replay_subset(OLD, 0.5, 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(HeadatlasError, match=r"bad\.jsonl:1"):
        read_examples(bad)
    with pytest.raises(HeadatlasError, match="cannot read"):
        read_examples(tmp_path / "missing.jsonl")
    assert len(read_examples("capitals")) == 40


def test_cli_retain(tmp_path: Path, tiny_model_dir: Path) -> None:
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("".join(json.dumps({"prompt": x.prompt, "answer": x.answer}) + "\n" for x in OLD))
    new.write_text("".join(json.dumps({"prompt": x.prompt, "answer": x.answer}) + "\n" for x in TRAIN))
    out = tmp_path / "out"
    args = ["retain", str(tiny_model_dir), "--replay", str(old), "--train", str(new), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--k", "2", "--steps", "2", "--replay-fraction", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output.strip().splitlines()[-1])
    assert len(report["heads"]) == 2 and report["n_replayed"] == 2
    assert (out / "model.safetensors").is_file()
    res = CliRunner().invoke(app, [*args, "--k", "99", "--force"])
    assert res.exit_code != 0 and "--k" in res.output and "Traceback" not in res.output
