"""``Guard``: fit, save, load and score an attention-head injection guard (Hung et al. 2024).

``GUARD_DIR/guard.json`` holds the important heads, n, the benign-calibrated threshold (and k),
the two learned variants, and the model's sha256 (a guard refuses another model);
``GUARD_DIR/attention_tracker.json`` is the same heads in Attention Tracker's config layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ...core.errors import HeadatlasError, param
from ...core.heads import head_name
from ...core.outputs import Folder
from ...core.records import (
    check_record,
    is_bool,
    is_dict,
    is_int,
    is_number,
    is_text,
    list_of,
    one_of,
    optional,
)
from ...core.storage import write_json
from ...model.identity import same_weights, weights_record
from ...model.info import LoadedModel
from ...model.load import reload_spec
from ..common.formats import write_attention_tracker
from . import fitting
from .features import Features, encode, extract
from .metrics import best_single_head, summary
from .synthetic import synthetic_rows

FORMAT = "headatlas-guard/1"
N_SIGMA = 1.0
"""Default n of the head rule (Attention Tracker chooses n per model)."""
N_SIGMA_AUTO = (1.0, 0.5, 0.0)
"""The n tried in turn when none is given: the first that keeps at least one head is used."""
K_SIGMA = 2.0
"""Default k of the benign calibration τ = mean − k·std (≈ 2.3 % benign flagged if focus were normal)."""
GUARD_FOLDER = Folder("guard fit", "guard.json")
"""A guard directory: ``guard fit`` writes ``guard.json`` and ``attention_tracker.json`` there."""
DETECTORS = ("focus", "heads-lr", "residual-probe", "length")
PACKAGED_GUARDS = ("default", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
"""The packaged decoders a guard ships for (``apps/guard/packaged/NAME.json``, :meth:`Guard.packaged`)."""
"""What ``eval`` reports: 1 − focus, the head regression, the residual probe, the data's length."""


_LOGISTIC = {
    "weight": list_of(is_number),
    "bias": is_number,
    "mean": list_of(is_number),
    "scale": list_of(is_number),
}
GUARD_FIELDS = {
    "format": one_of(FORMAT),
    "model": is_text,
    "model_spec": optional(is_text),
    "model_sha256": is_text,
    "params_sha256": optional(is_text),
    "important_heads": list_of(list_of(is_int(0))),
    "important_head_names": list_of(is_text),
    "n_sigma": is_number,
    "n_sigma_auto": is_bool,
    "k_sigma": is_number,
    "threshold": is_number,
    "trained_on": is_dict,
    "heads_lr": is_dict,
    "residual_probe": optional(is_dict),
}
"""The fields of ``guard.json`` (:func:`check_guard_config`)."""


def check_guard_config(config: dict[str, Any], where: str) -> None:
    """Raise :class:`HeadatlasError` unless ``config`` is a whole ``guard.json``: every field, the
    head pairs, and the two regressions' weights."""
    check_record(config, GUARD_FIELDS, where, "guard", frozenset({"params_sha256", "n_sigma_auto"}))
    if not config["important_heads"] or any(len(h) != 2 for h in config["important_heads"]):
        raise HeadatlasError(f"{where}: field 'important_heads' needs one or more [layer, head] pairs")
    check_record(config["heads_lr"], _LOGISTIC, f"{where} (heads_lr)", "logistic regression")
    probe = config["residual_probe"]
    if probe is not None:
        check_record(probe, {"layer": is_int(0), "model": is_dict}, f"{where} (residual_probe)", "probe")
        check_record(probe["model"], _LOGISTIC, f"{where} (residual_probe)", "logistic regression")


@dataclass(frozen=True)
class GuardResult:
    """One scored row: ``focus`` (mean s over the important heads; low = injection), ``flagged``
    (focus < threshold), ``heads`` (s per important head, by name), ``learned`` (P(injected) of the
    head regression), ``probe`` (P(injected) of the residual probe), ``data_tokens``."""

    focus: float
    flagged: bool
    heads: dict[str, float]
    learned: float
    probe: float | None
    data_tokens: int
    threshold: float = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form written by ``guard score --json``."""
        return {
            "focus": self.focus,
            "flagged": self.flagged,
            "threshold": self.threshold,
            "learned": self.learned,
            "probe": self.probe,
            "data_tokens": self.data_tokens,
            "heads": self.heads,
        }


def check_rows(rows: Iterable[dict[str, Any]], need_label: bool) -> list[dict[str, Any]]:
    """Return ``rows`` checked to hold string ``instruction``/``data`` (and 0/1 ``label``)."""
    out = []
    for k, row in enumerate(rows, 1):
        wanted = ("instruction", "data", "label") if need_label else ("instruction", "data")
        for name in wanted:
            if not isinstance(row, dict) or name not in row:
                raise HeadatlasError(f"row {k} has no {name!r} field")
        if need_label and row["label"] not in (0, 1, True, False):
            raise HeadatlasError(f"row {k}: label must be 0 or 1, got {row['label']!r}")
        out.append(row)
    return out


class Guard:
    """An injection guard for one model: important heads, a threshold and two learned variants."""

    def __init__(self, loaded: LoadedModel, config: dict[str, Any]) -> None:
        self.loaded = loaded
        self.config = config
        self.heads: list[tuple[int, int]] = [(int(a), int(b)) for a, b in config["important_heads"]]
        self.threshold = float(config["threshold"])
        self.learned = fitting.Logistic.from_dict(config["heads_lr"])
        probe = config.get("residual_probe")
        self.probe = None if probe is None else fitting.Logistic.from_dict(probe["model"])
        self.probe_layer = None if probe is None else int(probe["layer"])

    @classmethod
    def fit(
        cls,
        model: LoadedModel | str,
        rows: Sequence[dict[str, Any]] | None = None,
        n_sigma: float | None = None,
        k_sigma: float = K_SIGMA,
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> Guard:
        """Return a guard fitted on ``rows`` (default: the synthetic set, :func:`synthetic_rows`).

        ``n_sigma=None`` tries :data:`N_SIGMA_AUTO` in turn (1, then 0.5, then 0) and keeps the
        first n that selects a head; ``guard.json`` records the n used. Raises
        :class:`HeadatlasError` when no head passes the rule at ``n_sigma`` (or at any of them).
        """
        loaded = _loaded(model)
        train = check_rows(rows if rows is not None else synthetic_rows(), need_label=True)
        feats = extract(
            loaded, [encode(loaded, r["instruction"], r["data"]) for r in train], batch_size, True, progress
        )
        labels = np.array([int(r["label"]) for r in train])
        sources = sorted({str(r.get("source", "file")) for r in train})
        return cls(loaded, fit_config(loaded, feats, labels, n_sigma, k_sigma, sources))

    @classmethod
    def load(cls, directory: str | Path, model: LoadedModel | str | None = None) -> Guard:
        """Return the guard saved in ``directory``; ``model`` defaults to the one it was fitted on."""
        path = Path(directory) / GUARD_FOLDER.marker
        if not path.is_file():
            raise HeadatlasError(f"no guard at {str(directory)!r} (no guard.json): run headatlas guard fit")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise HeadatlasError(
                f"{str(path)!r} is not readable JSON ({exc.__class__.__name__}): fit it again"
            ) from None
        return cls._checked(config, f"the guard in {str(directory)!r}", repr(str(path)), model)

    @classmethod
    def packaged(cls, model: LoadedModel | str) -> Guard:
        """Return the guard shipped with headatlas for a packaged model (:data:`PACKAGED_GUARDS`):
        fitted by ``tools/fit_packaged_guards.py`` the way ``guard fit`` fits one. Raises
        :class:`HeadatlasError` for a model without one (fit your own and pass ``--guard``)."""
        loaded = _loaded(model)
        name = reload_spec(loaded.info)
        file = resources.files(__package__) / "packaged" / f"{name}.json"
        if name not in PACKAGED_GUARDS or not file.is_file():
            raise HeadatlasError(
                f"no guard ships for {loaded.info.name} (shipped: {', '.join(PACKAGED_GUARDS)}): "
                "run headatlas guard fit MODEL --out DIR and pass --guard DIR"
            )
        config = json.loads(file.read_text(encoding="utf-8"))
        return cls._checked(config, f"the guard shipped for {name}", f"headatlas' {name}.json", loaded)

    @classmethod
    def _checked(
        cls, config: Any, what: str, where: str, model: LoadedModel | str | None
    ) -> Guard:  # fmt: skip
        """Return the guard of a ``guard.json`` ``config`` after checking its fields and that
        ``model`` (default: the one it names) holds the weights it was fitted on."""
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise HeadatlasError(f"{where} is not a headatlas guard ({FORMAT})")
        check_guard_config(config, where)
        spec: str | None = config.get("model_spec")
        if model is None and not spec:
            raise HeadatlasError(f"{what} was fitted on an in-memory model: pass {param('model')}")
        loaded = _loaded(model if model is not None else str(spec))
        if not same_weights(config, loaded):
            raise HeadatlasError(
                f"{what} was fitted on {config['model']} "
                f"(sha256 {config['model_sha256'][:12]}…), not on {loaded.info.name}: fit one for this model"
            )
        return cls(loaded, config)

    def save(self, directory: str | Path) -> Path:
        """Write ``guard.json`` and ``attention_tracker.json`` into ``directory``; return it."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / GUARD_FOLDER.marker, self.config, indent=1)
        write_attention_tracker(
            out / "attention_tracker.json", self.heads, str(self.config["model"]), threshold=self.threshold
        )
        return out

    def features(
        self,
        rows: Sequence[dict[str, Any]],
        batch_size: int = 8,
        progress: Callable[[int, int], None] | None = None,
    ) -> Features:
        """Return the :class:`Features` of ``rows`` (the residual only when the guard has a probe)."""
        prompts = [
            encode(self.loaded, str(r["instruction"]), str(r["data"])) for r in check_rows(rows, False)
        ]
        return extract(self.loaded, prompts, batch_size, self.probe is not None, progress)

    def results(self, feats: Features) -> list[GuardResult]:
        """Return one :class:`GuardResult` per row of ``feats``."""
        scores = self.detector_scores(feats)
        out = []
        for k in range(len(feats.data_tokens)):
            heads = {head_name(a, b): float(feats.focus[k, a, b]) for a, b in self.heads}
            focus = 1.0 - float(scores["focus"][k])
            probe = None if "residual-probe" not in scores else float(scores["residual-probe"][k])
            out.append(
                GuardResult(
                    focus,
                    focus < self.threshold,
                    heads,
                    float(scores["heads-lr"][k]),
                    probe,
                    int(feats.data_tokens[k]),
                    self.threshold,
                )
            )
        return out

    def score(self, instruction: str, data: str) -> GuardResult:
        """Return the :class:`GuardResult` of one (instruction, data) pair."""
        return self.results(self.features([{"instruction": instruction, "data": data}]))[0]

    def score_many(self, rows: Iterable[dict[str, Any]], batch_size: int = 8) -> Iterator[GuardResult]:
        """Yield results in order, a batch at a time (a bad row raises after the rows before it)."""
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == batch_size:
                yield from self.results(self.features(batch, batch_size))
                batch = []
        if batch:
            yield from self.results(self.features(batch, batch_size))

    def detector_scores(self, feats: Features) -> dict[str, np.ndarray]:
        """Return each detector's score ``[row]`` (higher = more likely injected), see :data:`DETECTORS`."""
        a, b = (np.array(x, dtype=int) for x in zip(*self.heads, strict=True))
        n = len(feats.data_tokens)
        out = {
            "focus": 1.0 - feats.focus[:, a, b].mean(-1),
            "heads-lr": self.learned.predict(feats.focus.reshape(n, -1)),
            "length": feats.data_tokens.astype(np.float64),
        }
        if self.probe is not None and feats.residual is not None and self.probe_layer is not None:
            out["residual-probe"] = self.probe.predict(feats.residual[:, self.probe_layer])
        return out

    def evaluate(self, feats: Features, labels: np.ndarray) -> dict[str, Any]:
        """Return AUROC, AUPRC and FPR@95 %TPR per detector, and the threshold verdict's TPR/FPR."""
        y = np.asarray(labels).astype(int)
        scores = self.detector_scores(feats)
        report: dict[str, Any] = {d: summary(s, y) for d, s in scores.items()}
        flagged = (1.0 - scores["focus"]) < self.threshold  # [row]
        report["threshold"] = {
            "tau": self.threshold,
            "tpr": float(flagged[y == 1].mean()),
            "fpr": float(flagged[y == 0].mean()),
        }
        report["rows"] = {"total": len(y), "injected": int(y.sum())}
        report["best_single_head"] = best_single_head(feats.focus, y)  # a bound, chosen on these rows
        return report


def fit_config(
    loaded: LoadedModel,
    feats: Features,
    labels: np.ndarray,
    n_sigma: float | None,
    k_sigma: float,
    sources: list[str],
) -> dict[str, Any]:
    """Return the ``guard.json`` content fitted on ``feats`` and ``labels`` (pure but for the
    fingerprint); ``n_sigma=None`` takes the first of :data:`N_SIGMA_AUTO` that keeps a head."""
    tried = N_SIGMA_AUTO if n_sigma is None else (n_sigma,)
    heads: list[tuple[int, int]] = []
    used = tried[0]
    for used in tried:
        heads = fitting.select_heads(feats.focus, labels, used)
        if heads:
            break
    if not heads:
        at = ", ".join(f"{n:g}" for n in tried)
        hint = (
            "lower it"
            if n_sigma is not None
            else "no head's focus is lower on the attacks than on benign rows"
        )
        raise HeadatlasError(f"no head passes the rule at {param('n_sigma')}={at}: {hint}")
    a, b = (np.array(x, dtype=int) for x in zip(*heads, strict=True))
    y = np.asarray(labels).astype(int)
    focus = feats.focus[:, a, b].mean(-1)  # [row]
    n = len(y)
    config: dict[str, Any] = {
        "format": FORMAT,
        "model": loaded.info.name,
        "model_spec": reload_spec(loaded.info),
        **weights_record(loaded),
        "important_heads": [list(h) for h in heads],
        "important_head_names": [head_name(*h) for h in heads],
        "n_sigma": used,
        "n_sigma_auto": n_sigma is None,
        "k_sigma": k_sigma,
        "threshold": fitting.calibrate(focus[y == 0], k_sigma),
        "trained_on": {"sources": sources, "rows": n, "injected": int(y.sum())},
        "heads_lr": fitting.fit_logistic(feats.focus.reshape(n, -1), y).to_dict(),
        "residual_probe": None,
    }
    if feats.residual is not None:
        layer = fitting.choose_layer(feats.residual, y)
        probe = fitting.fit_logistic(feats.residual[:, layer], y)
        config["residual_probe"] = {"layer": layer, "model": probe.to_dict()}
    return config


def from_features(
    loaded: LoadedModel,
    feats: Features,
    labels: np.ndarray,
    n_sigma: float | None = N_SIGMA,
    k_sigma: float = K_SIGMA,
    sources: list[str] | None = None,
) -> Guard:
    """Return a guard fitted on precomputed features (leave-one-source-out studies reuse them)."""
    return Guard(loaded, fit_config(loaded, feats, labels, n_sigma, k_sigma, sources or ["features"]))


def _loaded(model: LoadedModel | str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    from ...model.load import load

    return load(model)
