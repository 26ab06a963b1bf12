"""Running shards on Ray workers: scans, head sweeps and seeds, merged by the driver.

Ray is imported only here, and only when a pool is opened. A :class:`WorkerPool` holds ``workers``
Ray actors; each loads the model once (from the same packaged name, local directory or GGUF the
driver uses: never a download) and runs shards ``fn(loaded, item)`` for the driver, which merges
what comes back (``HeadStats`` merge, concatenated tables) as shards finish.

Faults: an actor whose process dies is restarted (it loads the model again) and its shard is run
again, so nothing is lost or counted twice. A shard that fails on its own (bad input) stops the
job: its :class:`~headatlas.core.errors.HeadatlasError` is raised again on the driver, one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

from ..core.errors import HeadatlasError, check_at_least, param

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
MAX_RESTARTS = 3
"""How often a dead worker is restarted (each restart reloads the model) before the job fails."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HeadatlasError("Ray is not installed: pip install 'headatlas[ray]', then retry") from None
    return ray


@lru_cache(maxsize=1)
def _actor_class() -> Any:
    """The worker actor class, defined on first use so that importing headatlas never imports Ray."""
    ray = _import_ray()

    @ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
    class Worker:
        def __init__(self, spec: str, device: str, dtype: str, threads: int) -> None:
            import torch

            from ..model.load import load

            torch.set_num_threads(threads)
            self.loaded = load(spec, device=device, dtype=dtype)

        def call(self, fn: Callable[[Any, Any], Any], item: Any) -> Any:
            return fn(self.loaded, item)

        def pid(self) -> int:
            return os.getpid()

    return Worker


@dataclass
class WorkerPool:
    """Ray actors that each hold the model; :meth:`map_unordered` runs shards on them."""

    actors: list[Any]
    address: str
    spec: str
    threads: int

    @property
    def workers(self) -> int:
        """How many workers run shards."""
        return len(self.actors)

    def describe(self) -> dict[str, Any]:
        """What ``atlas.json`` records of the pool."""
        return {
            "engine": "ray",
            "workers": self.workers,
            "address": self.address,
            "threads_per_worker": self.threads,
        }

    def map_unordered(self, fn: Callable[[Any, T], R], items: Iterable[T]) -> Iterator[R]:
        """Yield ``fn(loaded, item)`` for every item as workers finish them (in completion order).

        ``fn`` must be importable (a module-level function); items and results travel by pickle
        between processes of this job only.
        """
        ray = _import_ray()
        pending = list(items)
        running: dict[Any, int] = {}
        free = list(range(len(self.actors)))
        while pending or running:
            while pending and free:
                actor = free.pop()
                running[self.actors[actor].call.remote(fn, pending.pop(0))] = actor
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            free.append(actor)
            try:
                yield ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, HeadatlasError):
                    raise HeadatlasError(cause.template) from None
                raise RuntimeError(f"a Ray worker failed: {type(cause).__name__}: {cause}") from None
            except ray.exceptions.ActorDiedError:
                raise HeadatlasError(
                    f"a Ray worker died {MAX_RESTARTS + 1} times (out of memory?): use fewer "
                    f"{param('workers')} or a smaller model"
                ) from None

    def pids(self) -> list[int]:
        """The worker processes' ids (tests kill one to check recovery)."""
        ray = _import_ray()
        return list(ray.get([actor.pid.remote() for actor in self.actors]))


@contextmanager
def worker_pool(
    spec: str,
    address: str = "auto",
    workers: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> Iterator[WorkerPool]:
    """Start or join Ray and yield a :class:`WorkerPool` of ``workers`` actors holding model ``spec``.

    ``address="auto"`` joins the cluster named by ``RAY_ADDRESS`` or a Ray instance this process
    already started, else starts a local one with this machine's CPUs (no dashboard); any other
    value is a cluster address (``ray://host:10001`` or ``host:6379``). ``workers`` defaults to the
    cluster's CPUs; each worker gets an equal share of threads. A Ray started here is stopped on
    exit; actors are always removed.
    """
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        target = None if address == "auto" else address
        try:
            ray.init(
                address=target, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise HeadatlasError(
                f"cannot reach Ray at {address!r}: {str(exc).splitlines()[0][:160]}"
            ) from None
        started = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = workers or max(1, cpus)
    check_at_least("workers", count, 1)
    threads = max(1, cpus // count)
    worker = _actor_class()
    actors = [
        worker.options(num_cpus=min(threads, cpus)).remote(spec, device, dtype, threads) for _ in range(count)
    ]
    try:
        pool = WorkerPool(actors, address, spec, threads)
        pool.pids()  # wait until every worker holds the model (a bad spec fails here, once)
        yield pool
    except ray.exceptions.RayActorError as exc:
        raise HeadatlasError(
            f"Ray workers could not load {spec!r}: {str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
