"""Exporting a steering (Li et al. 2023, ITI) so that it runs without headatlas.

- :func:`export_bake`: a checkpoint with the shift folded into the output projection's bias.
  The projection computes ``W_O (z + δ) + b = W_O z + (b + W_O δ)``, so the bias gains ``W_O δ``
  — not ``δ`` itself (the bug of the reference code's baked models). Plain ``transformers`` loads it.
  A family whose projection has no bias and whose config cannot add one is written as a family
  that is the same network with that bias (:data:`BAKE_TARGETS`: Qwen2 as Llama with
  ``attention_bias``). Before the shift goes in, a rewritten network is checked to give the
  original's logits, so a rewrite that changed the model is refused rather than saved.
- :func:`export_lm_eval`: the ``.pt`` lm-evaluation-harness's ``steered`` model reads: per hook
  point (the output projection's module name) a vector added to the module's output, ``W_O δ``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from ...capture import output_projections, output_weight
from ...core.errors import HeadatlasError, check_choice
from ...core.heads import head_name
from ...core.outputs import Folder, check_output_file, check_output_folder, output_folder
from ...core.storage import atomic_path, write_json
from ...model.info import LoadedModel
from .steering import Steering

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BakeTarget:
    """The family a checkpoint of another family is written as, so its output projection has a bias.

    ``config`` holds the settings that make ``model_type`` the same network plus that bias."""

    model_type: str
    architecture: str
    config: Mapping[str, Any] = field(default_factory=dict)


BAKE_TARGETS: dict[str, BakeTarget] = {
    # Qwen2 is Llama with biases on q/k/v only; Llama's attention_bias puts them on q/k/v/o.
    "qwen2": BakeTarget("llama", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": False}),
}
"""Families whose output projection has no bias and whose config has no switch for one."""

SAME_NETWORK_TOLERANCE = 1e-4
"""Largest |Δ logit|, relative to the largest |logit|, a rewritten checkpoint may show before the shift."""


def output_shifts(loaded: LoadedModel, steering: Steering, alpha: float) -> dict[int, torch.Tensor]:
    """Return ``{layer: W_O δ [d_model]}``: each steered layer's shift mapped through its output projection."""
    projections = output_projections(loaded)
    shifts = steering.shift.by_layer(alpha, loaded.info.n_heads)
    out = {}
    for layer, delta in shifts.items():
        weight = output_weight(projections[layer]).float()  # [d_model, head * d_head]
        out[layer] = weight @ delta.reshape(-1).to(weight.device)  # [d_model]
    return out


EXPORT_FORMATS = ("bake", "lm-eval")
BAKE_FOLDER = Folder("steer export --format bake", "headatlas-steer-bake.json")
"""A baked checkpoint: the marker records which steering and α it holds."""
LM_EVAL_FOLDER = Folder("steer export --format lm-eval", "steer.pt")
"""Where lm-evaluation-harness's steering file goes when ``out`` is a directory."""


def check_export_target(fmt: str, out: str | Path, force: bool = False, model: str | None = None) -> None:
    """Raise :class:`HeadatlasError` unless ``steer export --format fmt`` may write ``out``, before
    any work: a baked checkpoint's folder, or for ``lm-eval`` a ``.pt`` file or a folder for
    ``steer.pt`` (:mod:`headatlas.core.outputs`)."""
    check_choice("format", fmt, EXPORT_FORMATS)
    if fmt == "lm-eval" and Path(out).suffix == ".pt":
        check_output_file(out, (".pt",), force=force)
        return
    check_output_folder(out, BAKE_FOLDER if fmt == "bake" else LM_EVAL_FOLDER, force, model=model)


def _with_bias_config(loaded: LoadedModel) -> tuple[Any, BakeTarget | None]:
    """Return the config of a network equal to ``loaded``'s whose output projections have biases,
    and the :class:`BakeTarget` it was rewritten as (``None``: the family's own config)."""
    config = copy.deepcopy(loaded.model.config)
    if hasattr(config, "attention_bias"):
        config.attention_bias = True
        return config, None
    target = BAKE_TARGETS.get(loaded.info.arch)
    if target is None:
        raise HeadatlasError(
            f"a {loaded.info.arch} output projection has no bias and its config no attention_bias: "
            "use the hook (steer generate) or --format lm-eval"
        )
    from transformers import AutoConfig

    settings = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        settings.pop(key, None)
    settings.update(target.config)
    rewritten = AutoConfig.for_model(target.model_type, **settings)
    rewritten.architectures = [target.architecture]
    return rewritten, target


def _check_same_network(loaded: LoadedModel, baked: Any, written_as: str) -> None:
    """Raise :class:`HeadatlasError` unless ``baked`` (zero new biases) gives ``loaded``'s logits."""
    vocab = int(loaded.model.config.vocab_size)
    ids = (torch.arange(3, 35, device=loaded.device) * 7919 % vocab)[None]  # [1, 32]
    with torch.no_grad():
        want = loaded.model(input_ids=ids).logits.float()  # [1, 32, vocab]
        got = baked(input_ids=ids).logits.float()  # [1, 32, vocab]
    gap = float((want - got).abs().max())
    scale = float(want.abs().max()) or 1.0
    if gap > SAME_NETWORK_TOLERANCE * scale:
        raise HeadatlasError(
            f"writing {loaded.info.arch} as {written_as} changes its logits by {gap:.2e}: "
            "use the hook (steer generate) or --format lm-eval"
        )
    logger.info("%s written as %s: logits within %.2e before the shift", loaded.info.arch, written_as, gap)


def _biased_copy(loaded: LoadedModel) -> Any:
    """Return a copy of ``loaded.model`` whose steered layers' output projections have biases:
    the model's own, or zeros in a config (or family, :data:`BAKE_TARGETS`) that adds them."""
    model = loaded.model
    config, target = _with_bias_config(loaded)
    if target is None:
        baked: Any = type(model)(config)
    else:
        from transformers import AutoModelForCausalLM

        baked = AutoModelForCausalLM.from_config(config)
    baked = baked.to(device=loaded.device, dtype=next(model.parameters()).dtype).eval()
    result = baked.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys:
        raise HeadatlasError(
            f"cannot bake into {loaded.info.arch}: weight {result.unexpected_keys[0]} has no place"
        )
    with torch.no_grad():
        for name in result.missing_keys:
            if not name.endswith(".bias"):
                raise HeadatlasError(f"cannot bake into {loaded.info.arch}: weight {name} has no counterpart")
            baked.get_parameter(name).zero_()
    _check_same_network(loaded, baked, loaded.info.arch if target is None else target.model_type)
    return baked


def export_bake(loaded: LoadedModel, steering: Steering, alpha: float, out: str | Path) -> Path:
    """Write a checkpoint of ``loaded`` with the shift at ``alpha`` folded into the output
    projections' biases (``b + W_O δ``; Li et al. 2023) and return its directory. Models whose
    projection has no bias get one through ``config.attention_bias``, or are written as the family
    :data:`BAKE_TARGETS` names (checked to be the same network first); the other new biases are
    zero. A family with neither is refused."""
    target = Path(out)
    shifts = output_shifts(loaded, steering, alpha)
    projections = output_projections(loaded)
    if any(projections[layer].bias is None for layer in shifts):
        baked = _biased_copy(loaded)
    else:
        baked = copy.deepcopy(loaded.model)
    baked_loaded = LoadedModel(baked, loaded.tokenizer, loaded.info)
    with torch.no_grad():
        for layer, shift in shifts.items():
            bias = cast(torch.Tensor, output_projections(baked_loaded)[layer].bias)
            bias += shift.to(bias)
    with output_folder(target, BAKE_FOLDER) as tmp:
        baked.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        heads = [head_name(*h) for h in steering.shift.heads]
        write_json(tmp / BAKE_FOLDER.marker, {"task": steering.task, "alpha": alpha, "heads": heads})
    return target


def export_lm_eval(loaded: LoadedModel, steering: Steering, alpha: float, out: str | Path) -> Path:
    """Write ``steer.pt`` for lm-evaluation-harness ``--model steered``: ``{hook point: {
    "steering_vector" [1, d_model] = W_O δ, "steering_coefficient": 1.0, "action": "add"}}``
    (hook points are the output projections' module names); return the file."""

    names = {id(module): name for name, module in loaded.model.named_modules()}
    projections = output_projections(loaded)
    config = {
        names[id(projections[layer])]: {
            "steering_vector": shift[None].cpu().contiguous(),
            "steering_coefficient": 1.0,
            "action": "add",
        }
        for layer, shift in output_shifts(loaded, steering, alpha).items()
    }
    target = Path(out)
    target = target / LM_EVAL_FOLDER.marker if target.suffix != ".pt" else target
    with atomic_path(target, suffix=".pt") as tmp:
        torch.save(config, tmp)
    return target
