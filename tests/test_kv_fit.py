"""``kv fit``: DuoAttention's gated attention (exact at the ends of the gate range) and the gate
optimisation that turns into a plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.kv.backends import gate as backend_gate
from headatlas.apps.kv.fit import (
    _teacher_forced,
    fit_gates,
    fit_samples,
    fitted_plan,
    gate_atlas,
    loss_positions,
)
from headatlas.apps.kv.tasks import make_samples
from headatlas.core.errors import HeadatlasError
from tiny_models import SAMPLE_TEXTS, left_padded_batch, make_tokenizer


def test_streaming_mask_keeps_sink_and_window_of_real_keys() -> None:
    # one row left-padded by 2: real keys are 2..7; sink 2 = keys 2, 3; window 3 = the query and 2 before
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    allowed = (causal[None] & real[:, None, :])[:, None]  # [batch, 1, query, key]
    got = backend_gate.streaming_mask(allowed, sink=2, recent=3)[0, 0]
    assert got[7].nonzero().flatten().tolist() == [2, 3, 5, 6, 7]
    assert got[4].nonzero().flatten().tolist() == [2, 3, 4]
    assert not got[:, :2].any(), "padding stays masked"


def _logits(
    loaded: ha.LoadedModel, ids: torch.Tensor, mask: torch.Tensor, gate: float | None
) -> torch.Tensor:
    model = loaded.model
    backend_gate.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(backend_gate.NAME if gate is not None else "sdpa")
    state = (
        None
        if gate is None
        else backend_gate.GateState(
            torch.full((loaded.info.n_layers, loaded.info.n_kv_heads), gate), sink=1, recent=2
        )
    )
    token = backend_gate.ACTIVE_GATES.set(state)
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        backend_gate.ACTIVE_GATES.reset(token)
        model.set_attn_implementation(previous)


def test_open_gates_are_the_plain_model_and_closed_gates_stream(tiny_loaded: ha.LoadedModel) -> None:
    ids, mask = left_padded_batch(make_tokenizer(), list(SAMPLE_TEXTS))
    valid = mask.bool()
    plain = _logits(tiny_loaded, ids, mask, None)
    assert torch.allclose(_logits(tiny_loaded, ids, mask, 1.0)[valid], plain[valid], atol=1e-5)
    closed = _logits(tiny_loaded, ids, mask, 0.0)
    assert not torch.allclose(closed[valid], plain[valid], atol=1e-3), (
        "a 1 + 2 token window changes the output"
    )
    half = _logits(tiny_loaded, ids, mask, 0.5)
    assert torch.isfinite(half[valid]).all()


def test_fit_trains_only_the_gates_and_gives_a_plan(tiny_loaded: ha.LoadedModel) -> None:
    before = {n: p.clone() for n, p in tiny_loaded.model.named_parameters()}
    result = fit_gates(tiny_loaded, steps=8, seq_len=96, n_prompts=2, recent=8, lam=0.5, lr=0.1)
    assert result.alpha.shape == (tiny_loaded.info.n_layers, tiny_loaded.info.n_kv_heads)
    assert (result.alpha >= 0).all() and (result.alpha <= 1).all() and result.alpha.mean() < 1.0
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    assert all(torch.equal(p, before[n]) for n, p in tiny_loaded.model.named_parameters()), (
        "weights unchanged"
    )
    assert tiny_loaded.model.config._attn_implementation != backend_gate.NAME, "backend restored"
    atlas = gate_atlas(tiny_loaded, result.alpha)
    assert atlas.matrix("duo_gate")[0, 0] == pytest.approx(float(result.alpha[0, 0]))
    plan = fitted_plan(tiny_loaded, result, 0.5, 256)
    top = divmod(int(result.alpha.argmax()), tiny_loaded.info.n_kv_heads)
    assert top[1] in plan.full_heads[top[0]], "the most needed KV head stays full"
    assert plan.rule["by"] == ["duo_gate"] and plan.rule["fit"]["steps"] == 8
    with pytest.raises(HeadatlasError, match=r"^recent 64 must be below seq_len 64"):
        fit_gates(tiny_loaded, steps=1, seq_len=64, recent=64)
    with pytest.raises(HeadatlasError, match=r"loss.on must be answer or all"):
        fit_gates(tiny_loaded, steps=1, seq_len=96, recent=8, loss_on="middle")
    with pytest.raises(HeadatlasError, match="tasks must be some of"):
        fit_gates(tiny_loaded, steps=1, seq_len=96, recent=8, tasks=["sudoku"])


def test_fit_prompts_end_with_their_answer_and_are_never_the_eval_prompts(
    tiny_loaded: ha.LoadedModel,
) -> None:
    tok = tiny_loaded.tokenizer
    fit = fit_samples(tok, ["niah", "multikey"], 128, 3, seed=0)
    assert [s.task for s in fit] == ["niah", "multikey", "niah"], "tasks taken in turn"
    evaluated = {
        s.prompt
        for t in ("niah", "multikey")
        for seed in range(3)
        for s in make_samples(tok, t, 128, 3, seed)
    }
    assert not evaluated & {s.prompt for s in fit}, "kv eval's seeds never give a fit prompt"
    ids, sizes = _teacher_forced(tok, ["niah"], 128, 2, seed=0)
    for row, (prompt, answer), sample in zip(
        ids, sizes, fit_samples(tok, ["niah"], 128, 2, seed=0), strict=True
    ):
        assert row.shape == (1, prompt + answer)
        assert tok.decode(row[0, prompt:]).strip() == sample.expected[0], "the answer follows the prompt"


def test_the_answer_loss_is_taken_where_the_answer_is_predicted(tiny_loaded: ha.LoadedModel) -> None:
    ids, sizes = _teacher_forced(tiny_loaded.tokenizer, ["niah"], 128, 1, seed=0)
    (prompt, answer), row = sizes[0], ids[0][0]
    at = loss_positions(prompt, answer, "answer")
    positions = torch.arange(row.shape[0])[at]
    assert positions.tolist() == list(range(prompt - 1, prompt + answer - 1))
    assert torch.equal(row[positions + 1], row[prompt:]), "each position's next token is an answer token"
    assert torch.arange(row.shape[0])[loss_positions(prompt, answer, "all")].shape[0] == row.shape[0]
    result = fit_gates(tiny_loaded, steps=2, seq_len=96, n_prompts=1, recent=8, lam=0.5, loss_on="all")
    assert result.settings["loss_on"] == "all" and result.settings["tasks"] == "niah,multikey"


def test_the_command_line_writes_a_plan(tiny_model_dir: Path, tmp_path: Path) -> None:
    from headatlas.cli import app

    out = tmp_path / "fitted.json"
    args = ["kv", "fit", str(tiny_model_dir), "--steps", "2", "--seq-len", "96", "--n-prompts", "1"]
    refused = CliRunner().invoke(app, [*args, "--recent", "8", "--keep-fraction", "0.5", "--out", str(out)])
    assert refused.exit_code == 2 and "--context 2,048 is beyond" in refused.output  # before fitting
    assert "fitting gates" not in refused.output and not out.exists()
    options = ["--recent", "8", "--keep-fraction", "0.5", "--context", "512", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    assert "2 steps × 96 tokens" in result.output
    plan = ha.kv.Plan.load(out)
    assert plan.rule["fit"]["n_prompts"] == 1 and plan.kv_bytes["fraction"] <= 0.5 + 1e-9
