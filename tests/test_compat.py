"""The cache argument's name across the transformers range (model/compat.py)."""

from __future__ import annotations

import inspect
import warnings

import torch

import headatlas as ha
from headatlas.model.compat import cache_kwargs, output_cache
from tiny_models import BUILDERS, make_tokenizer


class _NewStyle:
    def forward(self, input_ids=None, cache=None):  # type: ignore[no-untyped-def]  # transformers >= 5.25
        return input_ids, cache


class _OldStyle:
    def forward(self, input_ids=None, past_key_values=None):  # type: ignore[no-untyped-def]  # 5.20 – 5.24
        return input_ids, past_key_values


def test_the_name_follows_the_forward_signature() -> None:
    marker = object()
    assert cache_kwargs(_NewStyle(), marker) == {"cache": marker}
    assert cache_kwargs(_OldStyle(), marker) == {"past_key_values": marker}


def test_installed_transformers_decodes_through_the_cache_without_warnings() -> None:
    """Whatever transformers is installed, prefill + one decode step through ``cache_kwargs`` and
    ``output_cache`` equals one forward over the whole sequence, and warns about nothing."""
    loaded = ha.load(BUILDERS["llama"](0), tokenizer=make_tokenizer())
    model = loaded.model
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert list(cache_kwargs(model, None)) == [expected]
    ids = torch.tensor([[3, 17, 42, 9, 28, 5]])  # [batch=1, seq]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        full = model(input_ids=ids).logits[0, -1]  # [vocab]
        cache = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
        assert cache is not None
        step = model(input_ids=ids[:, -1:], **cache_kwargs(model, cache), use_cache=True)
        assert output_cache(step) is not None
    assert torch.allclose(step.logits[0, -1], full, atol=1e-5)
