"""Slow: on the packaged default model, an atlas plan at 25 % of the KV bytes beats a random plan."""

from __future__ import annotations

import random

import pytest

import headatlas as ha
from conftest import requires_default_model
from headatlas.apps import kv
from headatlas.apps.kv.evaluate import evaluate
from headatlas.apps.kv.tasks import make_samples

pytestmark = [pytest.mark.slow, requires_default_model]


def test_atlas_plan_at_a_quarter_of_the_bytes_beats_a_random_plan_on_needles() -> None:
    loaded = ha.load("default")
    atlas = ha.scan(loaded, probes=["repeat"], n_prompts=4, seq_len=128)
    length = 384
    plan = kv.plan(atlas, keep_fraction=0.25, by="induction", sink=4, recent=32, context=length)
    cells = [(layer, k) for layer in range(loaded.info.n_layers) for k in range(loaded.info.n_kv_heads)]
    chosen = random.Random(0).sample(cells, plan.n_full())
    heads: list[list[int]] = [[] for _ in range(loaded.info.n_layers)]
    for layer, k in chosen:
        heads[layer].append(k)
    rand = kv.from_heads(loaded.info, heads, sink=4, recent=32)
    samples = make_samples(loaded.tokenizer, "niah", length, 6, seed=1)
    full = evaluate(loaded, samples, None, "full")
    ours = evaluate(loaded, samples, plan, "atlas")
    other = evaluate(loaded, samples, rand, "random")
    assert full.accuracy >= 50
    assert ours.accuracy > other.accuracy
    assert ours.kv_bytes < 0.3 * full.kv_bytes and other.kv_bytes == pytest.approx(ours.kv_bytes)
