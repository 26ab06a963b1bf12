"""Each detector on hand-made attention patterns whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from headatlas.capture.views import DenseView
from headatlas.detectors.attention import DETECTOR_SCORES, DETECTORS, Context, Score

T = 12


def causal_uniform(t: int = T) -> torch.Tensor:
    """[1, 1, t, t] uniform over allowed keys."""
    tri = torch.ones(t, t).tril()
    return (tri / tri.sum(-1, keepdim=True))[None, None]


def shifted(offset: int, t: int = T) -> torch.Tensor:
    """[1, 1, t, t] all mass on key i - offset (on key 0 where that does not exist)."""
    probs = torch.zeros(1, 1, t, t)
    for i in range(t):
        probs[0, 0, i, max(i - offset, 0)] = 1.0
    return probs


def rows(t: int = T, pad: int = 0, **kwargs: object) -> Context:
    positions = torch.cat([torch.full((pad,), -1), torch.arange(t - pad)])[None]  # [1, key]
    return Context(positions=positions, **kwargs)  # type: ignore[arg-type]


def view(probs: torch.Tensor, pad: int = 0) -> DenseView:
    t = probs.shape[-1]
    n_keys = (torch.arange(t) + 1 - pad).clamp_min(0)[None].expand(probs.shape[0], t)  # [batch, query]
    return DenseView(0, probs, 0, n_keys)


def mean(score: Score) -> float:
    values, valid = score.values, score.valid
    w = valid[:, None].to(values.dtype).expand_as(values)
    return float((values * w).sum() / w.sum())


def stack(*patterns: torch.Tensor) -> torch.Tensor:
    return torch.cat(patterns, dim=1)  # heads side by side


def test_positional_scores_on_known_patterns() -> None:
    probs = stack(shifted(1), shifted(0), shifted(T), causal_uniform())  # prev, self, first, uniform
    out = DETECTORS["positional"](view(probs), rows())
    prev, self_, first, local = (out[k] for k in ("previous_token", "self", "first_token", "local"))
    assert prev.values.shape == (1, 4, T)
    per_head = [
        [mean(Score(s.values[:, h : h + 1], s.valid)) for h in range(4)] for s in (prev, self_, first, local)
    ]
    one_row = 1 / (T - 1)  # row 1's previous token is the first token
    assert per_head[0][:3] == pytest.approx([1.0, 0.0, one_row])
    assert per_head[1][:3] == pytest.approx([0.0, 1.0, 0.0])
    assert per_head[2][:3] == pytest.approx([one_row, 0.0, 1.0])
    assert per_head[3][:2] == pytest.approx([1.0, 1.0]), "previous and self lie inside the local window"
    # uniform: local mass over rows i >= 3 is 4/(i+1)
    expected_local = sum(4 / (i + 1) for i in range(3, T)) / (T - 3)
    assert per_head[3][3] == pytest.approx(expected_local)


def test_first_token_follows_left_padding() -> None:
    pad = 3
    probs = torch.zeros(1, 1, T, T)
    probs[0, 0, pad:, pad] = 1.0  # every real query attends to the first real token
    out = DETECTORS["positional"](view(probs, pad), rows(pad=pad))
    assert mean(out["first_token"]) == pytest.approx(1.0)
    assert not out["previous_token"].valid[0, : pad + 1].any(), "pads and the first real token are not rows"


def test_entropy_uniform_is_log_n_and_one_normalised() -> None:
    probs = stack(causal_uniform(), shifted(1))
    out = DETECTORS["entropy"](view(probs), rows())
    ent, norm = out["entropy"], out["entropy_norm"]
    valid = ent.valid[0]
    expected = torch.log(torch.arange(1, T + 1).float())
    assert torch.allclose(ent.values[0, 0][valid], expected[valid], atol=1e-5)
    assert torch.allclose(norm.values[0, 0][valid], torch.ones(int(valid.sum())), atol=1e-5)
    assert mean(Score(ent.values[:, 1:], ent.valid)) == pytest.approx(0.0, abs=1e-6)


def test_subword_mass_on_other_pieces_of_the_word() -> None:
    word_ids = torch.tensor([[-1, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 6]])  # words 1, 3, 5 are split
    probs = stack(shifted(1), shifted(0))  # head 0 previous token, head 1 self
    out = DETECTORS["subword"](view(probs), rows(word_ids=word_ids))["subword"]
    continuing = out.valid[0].nonzero().flatten().tolist()
    assert continuing == [3, 4, 7, 10]
    assert mean(Score(out.values[:, :1], out.valid)) == pytest.approx(1.0)
    assert mean(Score(out.values[:, 1:], out.valid)) == pytest.approx(0.0)


def test_attention_parked_on_the_first_token_is_not_subword() -> None:
    """Without a BOS the first token is a piece of the first word; a sink head is not a subword head."""
    word_ids = torch.tensor([[0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8]])  # word 0 is split over tokens 0..2
    probs = stack(shifted(T), shifted(1))  # head 0: everything on token 0 (the sink); head 1: previous
    out = DETECTORS["subword"](view(probs), rows(word_ids=word_ids))["subword"]
    assert out.valid[0].nonzero().flatten().tolist() == [1, 2, 5]
    assert mean(Score(out.values[:, :1], out.valid)) == pytest.approx(0.0)
    values = out.values[0, 1, [1, 2, 5]].tolist()  # previous token: token 1's is the sink (not counted)
    assert values == pytest.approx([0.0, 1.0, 1.0])


def test_distance_profile_of_a_previous_token_head() -> None:
    out = DETECTORS["distance"](view(shifted(1)), rows(max_offset=5))["distance_profile"]
    assert out.values.shape == (1, 1, T, 5)
    w = out.valid[:, None].float()
    profile = (out.values * w).sum((0, 2)) / w.sum((0, 2))
    assert profile[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize(("offset", "score"), [(4, "induction"), (5, "duplicate_token")])
def test_repeat_scores(offset: int, score: str) -> None:
    period = 5  # [BOS, x(5), x(5)] -> 11 tokens
    t = 1 + 2 * period
    probs = stack(shifted(offset, t), causal_uniform(t))
    out = DETECTORS["repeat"](view(probs), rows(t=t, period=period, repeat_start=1))[score]
    assert out.valid[0].nonzero().flatten().tolist() == list(range(1 + period, t))
    assert mean(Score(out.values[:, :1], out.valid)) == pytest.approx(1.0)
    assert mean(Score(out.values[:, 1:], out.valid)) < 0.3


def test_detectors_do_not_mutate_inputs() -> None:
    probs = torch.rand(2, 3, T, T).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    word_ids = torch.arange(T).repeat(2, 1) // 2
    context = Context(positions=torch.arange(T).repeat(2, 1), word_ids=word_ids, period=5)
    dense = DenseView(0, probs, 0, torch.arange(1, T + 1).repeat(2, 1))
    before = probs.clone()
    for name, detector in DETECTORS.items():
        out = detector(dense, context)
        assert set(out) == set(DETECTOR_SCORES[name])
        for score in out.values():
            if score.values.dim() == 3:
                finite = score.values[score.valid[:, None].expand_as(score.values)]
                assert torch.isfinite(finite).all()
                if name != "entropy":
                    assert finite.min() >= 0 and finite.max() <= 1 + 1e-6, f"{name} in [0, 1]"
        assert torch.equal(probs, before), f"{name} mutated its input"
    norm = DETECTORS["entropy"](dense, context)["entropy_norm"]
    assert norm.values[norm.valid[:, None].expand_as(norm.values)].max() <= 1 + 1e-5
    assert math.isclose(float(norm.values.min()), max(0.0, float(norm.values.min())), abs_tol=1e-6)
