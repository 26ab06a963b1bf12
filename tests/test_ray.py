"""Ray: a sharded scan equals the single-process atlas, a killed worker is recovered, head sweeps
and seeds over Ray equal in-process, bad shards and a missing Ray are one-line errors.

One local Ray instance (2 CPUs, no dashboard) for the module, stopped at the end. The tests that
use it are marked ``ray`` (about half a minute with Ray's start): ``make test-fast`` leaves them
out, ``make test`` and ``make test-ray`` run them. The missing-Ray test starts nothing, so it is
not marked and runs in ``make test-fast`` too."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import headatlas as ha
from headatlas.apps.common.evaluation import heldout_data
from headatlas.apps.prune.importance import ablation_importance
from headatlas.cli import app
from headatlas.core.errors import HeadatlasError
from headatlas.scanning.config import ScanConfig
from headatlas.scanning.parallel import worker_pool
from headatlas.scanning.scan import build_batteries
from headatlas.scanning.stream import run_scan

ray = pytest.importorskip("ray")  # a dev dependency: installed by `make setup`


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def on_ray(test):  # type: ignore[no-untyped-def]
    """Mark ``test`` ``ray`` and run it with the module's local Ray instance (started at the first
    such test, stopped after the module's last test)."""
    return pytest.mark.ray(pytest.mark.usefixtures("local_ray")(test))


KW = {
    "probes": ["natural", "repeat", "copy"],
    "n_prompts": 4,
    "seq_len": 24,
    "batch_size": 2,
    "n_functional": 2,
}


def _same_tables(a: ha.Atlas, b: ha.Atlas) -> None:
    assert a.scores == b.scores
    for column in a.scores:
        np.testing.assert_allclose(
            a.table[column].to_numpy(float),
            b.table[column].to_numpy(float),
            rtol=1e-9,
            atol=1e-12,
            equal_nan=True,
        )  # float64 sums merged in another order
    assert (a.table["roles"] == b.table["roles"]).all()


@on_ray
def test_a_sharded_scan_equals_the_single_process_atlas(tiny_model_dir: Path, tmp_path: Path) -> None:
    alone = ha.scan(str(tiny_model_dir), **KW)
    sharded = ha.scan(str(tiny_model_dir), ray="auto", workers=2, out=tmp_path / "a", **KW)
    _same_tables(alone, sharded)
    assert (
        sharded.meta["parallel"]["workers"] == 2
        and ha.Atlas.load(tmp_path / "a").meta["parallel"]["engine"] == "ray"
    )


@on_ray
def test_a_killed_worker_is_recovered_and_nothing_is_counted_twice(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    loaded = ha.load(str(tiny_model_dir))
    batteries = build_batteries(loaded, ScanConfig.of(["natural", "repeat"], n_prompts=6, seq_len=24, seed=0))
    alone = run_scan(loaded, batteries, batch_size=1).stats
    killed: list[int] = []
    with worker_pool(str(tiny_model_dir), workers=2) as pool:
        victim = pool.pids()[0]

        def kill_once(done: object) -> None:
            if not killed:
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)

        sharded = run_scan(loaded, batteries, batch_size=1, on_batch=kill_once, pool=pool).stats
        assert victim not in pool.pids()  # the restarted worker is a new process
    assert killed
    for name in alone.names:
        assert np.array_equal(alone.n(name), sharded.n(name)), name  # every row exactly once
        np.testing.assert_allclose(alone.mean(name), sharded.mean(name), rtol=1e-9, equal_nan=True)


@on_ray
def test_ablation_importance_over_ray_equals_in_process(tiny_model_dir: Path) -> None:
    loaded = ha.load(str(tiny_model_dir))
    data = heldout_data(loaded, "natural", "dev", 2, 16, 2)
    alone = ablation_importance(loaded, data)
    with worker_pool(str(tiny_model_dir), workers=2) as pool:
        sharded = ablation_importance(loaded, data, pool=pool)
    np.testing.assert_allclose(alone.scores, sharded.scores, rtol=0, atol=1e-6)  # 1 vs 2 threads
    assert sharded.forwards > alone.forwards  # each shard runs its own unablated passes


@on_ray
def test_verify_and_the_prune_curve_over_ray(tiny_model_dir: Path, tmp_path: Path) -> None:
    from headatlas.apps.prune.pruning import prune_curve, random_order
    from headatlas.apps.verify.causal import verify
    from headatlas.functional import FunctionalConfig

    loaded = ha.load(str(tiny_model_dir))
    atlas = ha.scan(loaded, probes=["repeat"], n_prompts=2, seq_len=24)
    config = FunctionalConfig(n_prompts=4, batch_size=4)
    data = heldout_data(loaded, "natural", "test", 2, 16, 2)
    orders = {"random": [random_order(3, 4, s) for s in range(2)]}
    alone = verify(loaded, atlas, "induction", k=2, seeds=2, config=config)
    curve = prune_curve(loaded, orders, [0.0, 0.25], data)
    with worker_pool(str(tiny_model_dir), workers=2) as pool:
        sharded = verify(loaded, atlas, "induction", k=2, seeds=2, config=config, pool=pool)
        curve_ray = prune_curve(loaded, orders, [0.0, 0.25], data, pool=pool)
    assert sharded.baseline == pytest.approx(alone.baseline, abs=1e-5)
    assert sharded.random_values == pytest.approx(alone.random_values, abs=1e-5)
    np.testing.assert_allclose(
        curve_ray["curves"]["random"]["runs"], curve["curves"]["random"]["runs"], rtol=1e-5
    )


def _bad_shard(_loaded: object, item: int) -> int:
    if item == 2:
        raise HeadatlasError("shard 2 has bad input")
    return item


@on_ray
def test_a_shard_that_fails_on_its_own_stops_the_job_with_one_line(tiny_model_dir: Path) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    with worker_pool(str(tiny_model_dir), workers=2) as pool:
        with pytest.raises(HeadatlasError, match=r"^shard 2 has bad input$"):
            list(pool.map_unordered(_bad_shard, range(5)))
        assert sorted(pool.map_unordered(_bad_shard, [0, 1, 3])) == [0, 1, 3]  # the pool still works
    with pytest.raises(HeadatlasError, match="workers load the model themselves"):
        on_disk = ha.load(str(tiny_model_dir))
        in_memory = ha.load(on_disk.model, tokenizer=on_disk.tokenizer)
        ha.scan(in_memory, probes=["repeat"], ray="auto")


def test_ray_missing_is_a_one_line_error(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    missing = r"Ray is not installed: pip install 'headatlas\[ray\]'"
    with pytest.raises(HeadatlasError, match=missing), worker_pool(str(tiny_model_dir)):
        pass
    res = CliRunner().invoke(app, ["importance", str(tiny_model_dir), "--method", "ablation-zero", "--ray", "auto",
                                   "--n-seqs", "1", "--seq-len", "16", "--out", str(tiny_model_dir.parent / "imp")])  # fmt: skip
    assert res.exit_code == 2 and "Ray is not installed" in res.output
