"""Head redundancy: which heads attend alike and write alike.

- **Attention distance**: the Jensen–Shannon distance (square root of the base-2 JS
  divergence, in [0, 1]) between two heads' attention rows on the same inputs, averaged over
  the valid query rows (Clark et al. 2019, "What Does BERT Look At?", Section 6, which clusters
  heads by this distance). Attention comes from :func:`headatlas.attention_maps`, one layer at
  a time.
- **Output similarity**: the cosine similarity of two heads' contributions to the residual
  stream, ``z_h W_O[:, h]`` over the same tokens (``z_h`` the head's slice of the output
  projection's input), flattened over tokens. Raw ``z_h`` of different layers live in
  unrelated bases, so the comparison is made after the output projection.
- **Clusters** of near-duplicates: connected components of the graph linking heads with JS
  distance ≤ :data:`JS_THRESHOLD` *and* output cosine ≥ :data:`COS_THRESHOLD` (both, so that
  heads which merely share an attention sink but write different things are not merged).
  ``cluster`` is -1 for a head without a near-duplicate.

Matrices are ``[head, head]`` over heads in (layer, head) order, saved as ``.npy`` (no pickle).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...atlas.table import Atlas
from ...capture import attention_maps, head_outputs, output_projections, output_weight
from ...core.errors import HeadatlasError
from ...core.progress import Progress
from ...core.storage import atomic_path
from ...model.info import LoadedModel
from ..common.evaluation import EvalData

logger = logging.getLogger(__name__)

JS_THRESHOLD = 0.2
COS_THRESHOLD = 0.5
JS_FILE = "redundancy_js.npy"
COS_FILE = "redundancy_cos.npy"


@dataclass
class Redundancy:
    """Pairwise matrices ``[head, head]`` and clusters ``[layer, head]``."""

    js: np.ndarray
    cosine: np.ndarray
    cluster: np.ndarray

    def save(self, directory: Path) -> list[Path]:
        """Write the two matrices as ``.npy`` side files; return their paths."""
        paths = [directory / JS_FILE, directory / COS_FILE]
        for path, matrix in zip(paths, (self.js, self.cosine), strict=True):
            with atomic_path(path, suffix=".npy") as tmp:
                np.save(tmp, matrix.astype(np.float32), allow_pickle=False)
        return paths


def _js_to_all(p: torch.Tensor, all_p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """JS distance of one head ``p [row, key]`` to every head ``all_p [head, row, key]``, mean over ``valid [row]``."""
    m = 0.5 * (p.unsqueeze(0) + all_p)  # [head, row, key]
    log_m = torch.log2(m.clamp_min(1e-12))

    def kl(a: torch.Tensor) -> torch.Tensor:
        return (a * (torch.log2(a.clamp_min(1e-12)) - log_m)).sum(-1)  # [head, row]

    div = (0.5 * kl(p.unsqueeze(0)) + 0.5 * kl(all_p)).clamp(0.0, 1.0)  # [head, row]
    dist = div.sqrt()
    return (dist * valid).sum(-1) / valid.sum().clamp_min(1)  # [head]


def clusters(js: np.ndarray, cosine: np.ndarray, n_layers: int, n_heads: int) -> np.ndarray:
    """Connected components of near-duplicate pairs; ``[layer, head]`` ids, -1 for singletons."""
    n = js.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    close = (js <= JS_THRESHOLD) & (cosine >= COS_THRESHOLD)
    for i, j in zip(*np.nonzero(np.triu(close, k=1)), strict=True):
        parent[find(int(i))] = find(int(j))
    roots = [find(i) for i in range(n)]
    sizes: dict[int, int] = {}
    for r in roots:
        sizes[r] = sizes.get(r, 0) + 1
    ids: dict[int, int] = {}
    out = np.full(n, -1, dtype=np.int64)
    for i, r in enumerate(roots):
        if sizes[r] > 1:
            out[i] = ids.setdefault(r, len(ids))
    return out.reshape(n_layers, n_heads)


def _head_contributions(loaded: LoadedModel, data: EvalData) -> torch.Tensor:
    """Per head, its residual-stream contribution over the data's real tokens, ``[head, token * hidden]``."""
    info = loaded.info
    weights = {
        layer: output_weight(m).float().reshape(-1, info.n_heads, info.head_dim)  # [hidden, head, d_head]
        for layer, m in output_projections(loaded).items()
    }
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in weights}

    def contribution(layer: int, z: torch.Tensor, mask: torch.Tensor) -> None:
        real = z[mask].float()  # [token, head, d_head]
        contrib = torch.einsum("thd,nhd->htn", real, weights[layer])  # [head, token, hidden]
        parts[layer].append(contrib.reshape(info.n_heads, -1))

    with head_outputs(loaded, contribution) as tap, torch.no_grad():
        for batch in data.batches:
            tap.context = batch.attention_mask.bool().to(loaded.device)  # [batch, seq]
            loaded.model(input_ids=batch.input_ids.to(loaded.device), attention_mask=tap.context.long())
    return torch.cat(
        [torch.cat(parts[layer], dim=1) for layer in sorted(parts)], dim=0
    )  # [head, token * hidden]


def measure(loaded: LoadedModel, data: EvalData, progress: Progress | None = None) -> Redundancy:
    """JS distances, output cosines and clusters over ``data`` (keep it short: every layer's maps are held)."""
    info = loaded.info
    n_layers, n_heads = info.n_layers, info.n_heads
    rows: list[torch.Tensor] = []  # per layer [head, row, key]
    valid_rows: torch.Tensor | None = None
    for layer in range(n_layers):
        per_batch, valids = [], []
        for batch in data.batches:
            maps = attention_maps(loaded, batch.input_ids, batch.attention_mask, layers={layer})[layer]
            mask = batch.attention_mask.bool()  # [batch, seq]
            rows_valid = mask.clone()
            if info.causal:  # row 0 of a causal model is forced to attend to itself
                first = mask.float().argmax(dim=1)
                rows_valid[torch.arange(mask.shape[0]), first] = False
            flat = maps.permute(1, 0, 2, 3).reshape(n_heads, -1, maps.shape[-1])  # [head, batch * query, key]
            per_batch.append(flat)
            valids.append(rows_valid.reshape(-1))
        width = max(t.shape[-1] for t in per_batch)
        per_batch = [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in per_batch]
        rows.append(torch.cat(per_batch, dim=1))
        valid_rows = torch.cat(valids).float()  # [row]
        if progress:
            progress(layer + 1, n_layers + 1)
    all_p = torch.cat(rows, dim=0)  # [head, row, key]
    if valid_rows is None:
        raise HeadatlasError("redundancy needs at least one layer and one batch of text")
    total = n_layers * n_heads
    js = torch.zeros(total, total)
    for i in range(total):
        js[i] = _js_to_all(all_p[i], all_p, valid_rows)
    js = 0.5 * (js + js.T)
    js.fill_diagonal_(0.0)
    contrib = _head_contributions(loaded, data)  # [head, token * hidden]
    unit = contrib / contrib.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.T  # [head, head]
    if progress:
        progress(n_layers + 1, n_layers + 1)
    js_np, cos_np = js.numpy(), cosine.numpy()
    return Redundancy(js_np, cos_np, clusters(js_np, cos_np, n_layers, n_heads))


def plot_redundancy(result: Redundancy, n_heads: int, title: str, path: Path) -> Path:
    """Side-by-side heatmaps of the JS distance and output cosine matrices, layer ticks marked."""
    from matplotlib.figure import Figure

    from ...report.figures import save_figure

    total = result.js.shape[0]
    fig = Figure(figsize=(12, 5.6))
    axes = fig.subplots(1, 2)
    panels = (
        (result.js, "Jensen–Shannon distance of attention", "viridis_r", 0.0, 1.0),
        (result.cosine, "cosine similarity of head outputs", "RdBu_r", -1.0, 1.0),
    )
    for ax, (matrix, name, cmap, vmin, vmax) in zip(axes, panels, strict=True):
        image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        step = max(1, (total // n_heads) // 10)
        ticks = list(range(0, total, n_heads * step))
        ax.set_xticks(ticks, [str(t // n_heads) for t in ticks])
        ax.set_yticks(ticks, [str(t // n_heads) for t in ticks])
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(name)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def write_redundancy(atlas: Atlas, result: Redundancy, data: EvalData, directory: Path) -> list[Path]:
    """Add the ``cluster`` column and the redundancy metadata to ``atlas``; write the matrices
    (``.npy``) into ``directory``. Returns the matrix paths."""
    atlas.set_matrix("cluster", result.cluster)
    atlas.meta["redundancy"] = {
        "js_threshold": JS_THRESHOLD,
        "cos_threshold": COS_THRESHOLD,
        "files": [JS_FILE, COS_FILE],
        "data": data.describe(),
    }
    return result.save(directory)
