"""ablate(): silencing heads through the output projection's input, on every backend."""

from __future__ import annotations

import pytest
import torch

import headatlas as ha
from headatlas.capture import capture, output_projections, padded_positions
from tiny_models import BUILDERS, SAMPLE_TEXTS, left_padded_batch, make_tokenizer


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def loaded(request: pytest.FixtureRequest) -> ha.LoadedModel:
    return ha.load(BUILDERS[request.param](0), tokenizer=make_tokenizer())


def _logits(loaded: ha.LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        # the same real-token positions capture passes for a padded batch
        return loaded.model(input_ids=ids, attention_mask=mask, **padded_positions(loaded.model, mask)).logits


def test_every_layer_has_an_output_projection(loaded: ha.LoadedModel) -> None:
    assert sorted(output_projections(loaded)) == list(range(loaded.info.n_layers))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_zero_ablation_equals_zeroed_weights(loaded: ha.LoadedModel, backend: str) -> None:
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS), add_bos=loaded.info.causal)
    loaded.model.set_attn_implementation(backend)
    try:
        base = _logits(loaded, ids, mask)
        layer, head = loaded.info.n_layers - 1, 1
        with ha.ablate(loaded, [(layer, head)]):
            ablated = _logits(loaded, ids, mask)
        assert torch.equal(_logits(loaded, ids, mask), base), "hooks are removed on exit"
        valid = mask.bool()
        assert not torch.allclose(ablated[valid], base[valid])
        proj = output_projections(loaded)[layer]
        weight = proj.weight
        d = loaded.info.head_dim
        saved = weight.detach().clone()
        with torch.no_grad():  # input features of the projection: nn.Linear [out, in], GPT-2 Conv1D [in, out]
            if type(proj).__name__ == "Conv1D":
                weight[head * d : (head + 1) * d, :] = 0
            else:
                weight[:, head * d : (head + 1) * d] = 0
        try:
            zeroed = _logits(loaded, ids, mask)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert torch.allclose(ablated[valid], zeroed[valid], atol=1e-5)
    finally:
        loaded.model.set_attn_implementation("sdpa")


def test_ablation_works_under_capture_and_mean_mode(loaded: ha.LoadedModel) -> None:
    ids, mask = left_padded_batch(loaded.tokenizer, list(SAMPLE_TEXTS), add_bos=loaded.info.causal)
    base = _logits(loaded, ids, mask)
    with ha.ablate(loaded, [(0, 0)]), capture(loaded, lambda b: None) as run:
        captured = run.run(ids, mask)
    with ha.ablate(loaded, [(0, 0)]):
        plain = _logits(loaded, ids, mask)
    valid = mask.bool()
    assert torch.allclose(captured[valid], plain[valid], atol=1e-5)
    with ha.ablate(loaded, [(0, 0)], mode="mean"):
        mean_ablated = _logits(loaded, ids, mask)
    assert not torch.allclose(mean_ablated[valid], base[valid])
    means = {(0, 0): torch.zeros(loaded.info.head_dim)}
    with ha.ablate(loaded, [(0, 0)], mode="mean", means=means):
        zero_means = _logits(loaded, ids, mask)
    assert torch.allclose(zero_means[valid], plain[valid], atol=1e-5)


def test_bad_heads_and_modes(loaded: ha.LoadedModel) -> None:
    with pytest.raises(ha.HeadatlasError, match="no head"), ha.ablate(loaded, [(99, 0)]):
        pass
    with pytest.raises(ha.HeadatlasError, match="mode"), ha.ablate(loaded, [(0, 0)], mode="half"):
        pass
