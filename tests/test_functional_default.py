"""Functional batteries on the real packaged default model (``slow``; CI runs them when it is installed).

Small configurations, so the whole file takes a few minutes on 2 CPU cores. The assertions are
about what the batteries must find on any competent language model, not tuned numbers: the model
recalls a needle, the heads that copy it are few, ablating them hurts recall more than ablating
as many random heads; some head beats the fixed-offset baseline on a dependency relation; the
copying score has both signs.
"""

from __future__ import annotations

import numpy as np
import pytest

import headatlas as ha
from conftest import requires_default_model
from headatlas.apps.verify.causal import verify
from headatlas.functional import FunctionalConfig, battery_spec

pytestmark = [pytest.mark.slow, requires_default_model]


@pytest.fixture(scope="module")
def default_loaded() -> ha.LoadedModel:
    return ha.load("default")


@pytest.fixture(scope="module")
def functional_atlas(default_loaded: ha.LoadedModel) -> ha.Atlas:
    """The needle battery's atlas, shared by the needle tests (6 trials: the share of heads above
    0.1 and the ablation depend on how many)."""
    return ha.scan(default_loaded, probes=["needle"], n_functional=6, max_len=512, batch_size=4)


@pytest.fixture(scope="module")
def copy_atlas(default_loaded: ha.LoadedModel) -> ha.Atlas:
    """The copy battery's atlas, on 2 sequences of 128 tokens instead of the needle's 6: its only
    check, that copying has both signs, does not depend on the count (min/max about -2.4/+4.0
    vocabulary standard deviations at 1, 2 and 6 sequences alike)."""
    return ha.scan(default_loaded, probes=["copy"], n_functional=2, batch_size=4)


def test_needle_retrieval_heads_are_few_and_real(
    default_loaded: ha.LoadedModel, functional_atlas: ha.Atlas
) -> None:
    table = functional_atlas.table
    retrieval = table["retrieval"].to_numpy()
    assert np.isfinite(retrieval).all() and (retrieval >= 0).all() and (retrieval <= 1).all()
    share = float((retrieval > 0.1).mean())
    assert 0 < share < 0.2, f"{share:.1%} of heads score > 0.1"  # Wu et al.: a small minority
    params = functional_atlas.meta["batteries"]["needle"]
    assert params["paper"].startswith("Wu et al. 2024")
    assert "needle_trials" in functional_atlas.tables


def test_ablating_retrieval_heads_breaks_recall(
    default_loaded: ha.LoadedModel, functional_atlas: ha.Atlas
) -> None:
    config = FunctionalConfig(n_prompts=6, max_len=512)
    result = verify(default_loaded, functional_atlas, "retrieval", k=10, seeds=1, config=config)
    assert result.baseline >= 0.5, "the default model should recall most needles"
    assert result.top_k < result.baseline
    assert result.top_k <= result.random_mean


def test_copy_scores_on_the_default_model(copy_atlas: ha.Atlas) -> None:
    copying = copy_atlas.table["copying"].to_numpy()
    assert copying.max() > 0 > copying.min()


def test_syntactic_heads_on_the_default_model(default_loaded: ha.LoadedModel) -> None:
    result = battery_spec("syntax").run(default_loaded, FunctionalConfig(n_prompts=120), lambda d, t: None)
    assert np.nanmax(result.stats.mean("syntactic")) > 0.1
    relations = result.tables["syntax_relations"]
    assert {"layer", "head", "relation", "direction", "accuracy", "baseline_accuracy"} <= set(
        relations.columns
    )
