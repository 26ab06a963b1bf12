"""Mergeable per-head statistics: count, sum and sum of squares of per-row scores.

``HeadStats`` follows scikit-learn's ``partial_fit`` idea: a scan is a sequence of
:meth:`HeadStats.add` calls, two partial results combine with :meth:`HeadStats.merge`, and the
state round-trips through plain NumPy arrays (:meth:`state` / :meth:`from_state`, saved with
``np.savez`` and loaded with ``allow_pickle=False``). So streaming equals one shot, an interrupted
scan resumes, and several processes' results merge.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..core.errors import HeadatlasError, param
from ..core.storage import atomic_path


class HeadStats:
    """Sums over rows for every score, ``[layer, head(, offset)]`` each, in float64."""

    def __init__(self, n_layers: int, n_heads: int) -> None:
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.total: dict[str, np.ndarray] = {}
        self.total_sq: dict[str, np.ndarray] = {}
        self.count: dict[str, np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        """Names of the scores seen so far."""
        return sorted(self.total)

    def _ensure(self, name: str, tail: tuple[int, ...]) -> None:
        if name not in self.total:
            shape = (self.n_layers, self.n_heads, *tail)
            self.total[name] = np.zeros(shape)
            self.total_sq[name] = np.zeros(shape)
            self.count[name] = np.zeros(shape)

    def add(self, name: str, layer: int, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Accumulate per-row ``values [batch, head, query(, offset)]`` where ``valid [batch, query(, offset)]``."""
        mask = valid[:, None].to(torch.float64)  # [batch, 1, query(, offset)]
        vals = values.to(torch.float64) * mask  # [batch, head, query(, offset)]
        dims = (0, 2)
        tail = tuple(values.shape[3:])
        self._ensure(name, tail)
        self.total[name][layer] += vals.sum(dims).cpu().numpy()
        self.total_sq[name][layer] += (vals * vals).sum(dims).cpu().numpy()
        n = mask.expand_as(vals).sum(dims).cpu().numpy()  # [head(, offset)]
        self.count[name][layer] += n

    def merge(self, other: HeadStats) -> HeadStats:
        """Return a new :class:`HeadStats` holding both operands' rows."""
        if (self.n_layers, self.n_heads) != (other.n_layers, other.n_heads):
            raise HeadatlasError("cannot merge statistics of models with different layer/head counts")
        out = HeadStats(self.n_layers, self.n_heads)
        for src in (self, other):
            for name in src.total:
                out._ensure(name, src.total[name].shape[2:])
                out.total[name] = out.total[name] + src.total[name]
                out.total_sq[name] = out.total_sq[name] + src.total_sq[name]
                out.count[name] = out.count[name] + src.count[name]
        return out

    def mean(self, name: str) -> np.ndarray:
        """Mean over rows, ``[layer, head(, offset)]`` (NaN where no row counted)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count[name] > 0, self.total[name] / self.count[name], np.nan)

    def std(self, name: str) -> np.ndarray:
        """Population standard deviation over rows, ``[layer, head(, offset)]``."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_sq = np.where(self.count[name] > 0, self.total_sq[name] / self.count[name], np.nan)
        return np.sqrt(np.clip(mean_sq - self.mean(name) ** 2, 0.0, None))

    def n(self, name: str) -> np.ndarray:
        """Rows counted, ``[layer, head(, offset)]``."""
        return self.count[name].astype(np.int64)

    def state(self) -> dict[str, np.ndarray]:
        """Return the state as flat NumPy arrays (``"<name>/total"`` …) for ``np.savez``."""
        arrays: dict[str, np.ndarray] = {"shape": np.array([self.n_layers, self.n_heads])}
        for name in self.total:
            arrays[f"{name}/total"] = self.total[name]
            arrays[f"{name}/total_sq"] = self.total_sq[name]
            arrays[f"{name}/count"] = self.count[name]
        return arrays

    @classmethod
    def from_state(cls, arrays: Mapping[str, np.ndarray]) -> HeadStats:
        """Rebuild from :meth:`state` output; raise :class:`HeadatlasError` on a malformed state."""
        try:
            n_layers, n_heads = (int(x) for x in arrays["shape"])
            out = cls(n_layers, n_heads)
            for key in arrays:
                if key.endswith("/total"):
                    name = key[: -len("/total")]
                    out.total[name] = np.asarray(arrays[key], dtype=np.float64)
                    out.total_sq[name] = np.asarray(arrays[f"{name}/total_sq"], dtype=np.float64)
                    out.count[name] = np.asarray(arrays[f"{name}/count"], dtype=np.float64)
        except (KeyError, ValueError, TypeError) as exc:
            raise HeadatlasError(
                f"corrupt partial statistics ({exc}): rerun with {param('force', 'force=True')}"
            ) from exc
        return out

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state` to ``path`` (``.npz``) atomically and return the path."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **self.state())  # type: ignore[arg-type]
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> HeadStats:
        """Read statistics written by :meth:`save` (no pickle); raise :class:`HeadatlasError` if unreadable."""
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls.from_state({k: data[k] for k in data.files})
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise HeadatlasError(
                f"partial statistics {path} are damaged (an interrupted write?) and cannot be resumed ({type(exc).__name__}): rerun with {param('force', 'force=True')}"
            ) from exc
