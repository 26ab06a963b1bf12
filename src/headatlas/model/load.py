"""Load a model: the only module that calls ``from_pretrained``.

``load("default")`` returns the packaged SmolLM2-135M-Instruct and ``load("minilm")`` /
``load("gemma3-270m")`` the other packaged models (rows of
:data:`headatlas.model.packaged.PACKAGED_MODELS`; a GGUF one is converted once to fp32 safetensors in
the cache dir); ``load(path)`` takes a local Hugging Face model dir or a ``.gguf`` file; any other
string is a hub id: fetched online at ``revision``, taken from the local Hugging Face cache offline
(:mod:`.hub`; a one-line error when neither has it).
``load(model, tokenizer=tok)`` wraps an in-memory model.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from ..core.errors import HeadatlasError, check_choice, param
from ..core.storage import cache_dir, check_cache_dir
from .convert import check_gguf, packaged_dir
from .hub import cached_snapshot, locate_hub_id, snapshot_commit
from .identity import check_finite_weights, file_sha256, weight_files
from .info import LoadedModel, ModelInfo, model_info
from .packaged import PACKAGED_MODELS, packaged_model_path
from .quiet import quiet_third_party

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .surgery import HeadLayout

DEFAULT_MODEL = "default"
_DTYPES = ("float32", "bfloat16", "float16")
_PACKAGED_NAMES = ", ".join(repr(name) for name in PACKAGED_MODELS)


def _auto_class(config: Any) -> Any:
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    remote = getattr(config, "auto_map", None) or {}  # a model with its own code (trust_remote_code)
    for name in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM", "AutoModel"):
        if name in remote:
            return getattr(transformers, name)
    if getattr(config, "is_encoder_decoder", False):
        for auto in (transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForSpeechSeq2Seq):
            try:
                auto._model_mapping[type(config)]
                return auto
            except KeyError:
                pass
    if any(a.endswith("ForMaskedLM") for a in archs):
        return transformers.AutoModelForMaskedLM
    if (
        any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
        or not archs
    ):
        try:
            transformers.AutoModelForCausalLM._model_mapping[type(config)]
            return transformers.AutoModelForCausalLM
        except KeyError:
            pass
    return transformers.AutoModel


def _resolve_device(device: str) -> torch.device:
    """Return ``torch.device(device)``; raise :class:`HeadatlasError` if it is unknown or not here."""
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise HeadatlasError(f"unknown {param('device')} {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise HeadatlasError(
                f"{param('device')} {device!r}: this torch build or machine has no CUDA GPU, use cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise HeadatlasError(
                f"{param('device')} {device!r}: only {torch.cuda.device_count()} CUDA devices here"
            )
    elif resolved.type not in ("cpu", "mps"):
        raise HeadatlasError(f"{param('device')} {device!r}: headatlas runs on cpu, cuda or mps")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise HeadatlasError(f"{param('device')} 'mps' is not available here: use cpu")
    return resolved


def _resolve_dtype(dtype: str) -> torch.dtype:
    import torch

    check_choice("dtype", dtype, _DTYPES)
    return getattr(torch, dtype)


def _load_pruned(
    directory: Path, config: Any, auto: Any, dtype: torch.dtype, layouts: dict[int, HeadLayout]
) -> Any:
    """Rebuild a checkpoint written by ``headatlas prune`` whose layers have different head counts.

    The config keeps the original head counts, so the model is built from it, its projections are
    cut to each layer's :class:`~headatlas.model.surgery.HeadLayout`, and the saved weights are loaded
    strictly (tied weights excepted).
    """
    from safetensors.torch import load_file

    from .surgery import apply_layouts

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HeadatlasError(f"{str(directory)!r} holds a pruned config but no .safetensors weights")
    model = auto.from_config(config, dtype=dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    apply_layouts(model, layouts, head_dim)
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise HeadatlasError(f"pruned checkpoint {str(directory)!r} does not match its layouts (at {first})")
    model.tie_weights()
    return model.to(dtype)


def reload_spec(model: dict[str, Any] | ModelInfo) -> str | None:
    """Return what to pass to :func:`load` to load again the model these facts describe.

    A packaged model's name (``"default"``, ``"minilm"``, …) when the model came from its package
    or its converted cache, the recorded path or hub id otherwise, ``None`` for an in-memory model.
    Atlases use it to name their model; Ray workers to load the driver's model.
    """
    facts = model.to_dict() if isinstance(model, ModelInfo) else model
    source = facts.get("source")
    if not source or source == "in-memory":
        return None
    for name, entry in PACKAGED_MODELS.items():
        if facts.get("name") != entry.display_name:
            continue
        places = [cache_dir() / "models" / entry.cache_name] if entry.cache_name else []
        with contextlib.suppress(HeadatlasError):
            places.append(packaged_model_path(name))
        if any(Path(source).resolve() == place.resolve() for place in places):
            return name
    return str(source)


def _torch_module() -> type:
    import torch

    return torch.nn.Module


def _locate(model: str, revision: str | None) -> tuple[str, Path, str, str | None, str | None]:
    """Return ``(display name, directory, source, weights sha256, GGUF file name)`` of a model spec:
    a packaged name (converted once if needed), a ``.gguf`` file, a model directory or a hub id
    (its directory is the id itself when the hub answers, its cached snapshot otherwise).
    Raises :class:`HeadatlasError` for a path that does not hold a model, for ``revision`` on
    anything but a hub id, and for a hub id neither the hub nor the local cache can give."""
    hub_id = model not in PACKAGED_MODELS and not Path(model).expanduser().exists()
    hub_id = hub_id and not model.startswith((".", "/", "~")) and not model.endswith(".gguf")
    if revision is not None and not hub_id:
        raise HeadatlasError(f"{param('revision')} applies to hub ids only, not to {model!r}")
    if model in PACKAGED_MODELS:
        entry = PACKAGED_MODELS[model]
        directory, source, sha = packaged_dir(entry)
        return entry.display_name, directory, source, sha, None
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.endswith(".gguf")
    if looks_local and not path.exists():
        raise HeadatlasError(
            f"no model at {model!r}: give {_PACKAGED_NAMES}, a local Hugging Face model dir, "
            "a .gguf file or a hub id"
        )
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path)
        return model, path.parent, str(path.resolve()), file_sha256([path]), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise HeadatlasError(
                f"{model!r} is a directory without config.json: not a Hugging Face model dir"
            )
        weights = weight_files(path)
        return model, path, str(path.resolve()), file_sha256(weights) if weights else None, None
    snapshot = locate_hub_id(model, revision)
    if snapshot is None:  # the hub answers: from_pretrained fetches it (cache first)
        return model, Path(model), model, None, None
    weights = weight_files(snapshot)
    return model, snapshot, model, file_sha256(weights) if weights else None, None


def _from_pretrained(
    directory: Path,
    kwargs: dict[str, Any],
    torch_dtype: torch.dtype,
    device_map: str | dict[str, Any] | None,
    offload_folder: str | Path | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` read from ``directory`` (a model dir, or a hub id as a path)
    with transformers' ``from_pretrained`` and ``kwargs`` (revision, trust_remote_code, gguf_file)."""
    from transformers import AutoConfig, AutoTokenizer

    from .surgery import layouts_from_config

    config = AutoConfig.from_pretrained(str(directory), **kwargs)
    auto = _auto_class(config)
    layouts = layouts_from_config(config)
    if layouts:
        if device_map is not None:
            raise HeadatlasError(f"{param('device_map')} is not supported for pruned checkpoints yet")
        hf_model = _load_pruned(directory, config, auto, torch_dtype, layouts)
    elif device_map is not None:
        placed = {
            "device_map": device_map,
            **({"offload_folder": str(offload_folder)} if offload_folder else {}),
        }
        hf_model = auto.from_pretrained(str(directory), dtype=torch_dtype, **kwargs, **placed)
    else:
        hf_model = auto.from_pretrained(str(directory), dtype=torch_dtype, **kwargs)
    tok = tokenizer or AutoTokenizer.from_pretrained(str(directory), **kwargs)
    return hf_model, tok


def _hub_facts(model: str, directory: Path, sha: str | None, hf_model: Any) -> tuple[str | None, str | None]:
    """Return ``(commit, weights sha256)`` of a loaded model: the commit of a Hugging Face cache
    snapshot it was read from (``None`` for any other directory); for a hub id fetched online
    (``directory`` is the id, not a path) the commit transformers resolved and the sha256 of the
    weights it cached."""
    commit = snapshot_commit(directory)
    if commit is None and not directory.exists():
        commit = getattr(hf_model.config, "_commit_hash", None)
        snapshot = cached_snapshot(model, commit) if commit else None
        weights = weight_files(snapshot) if snapshot is not None else []
        sha = file_sha256(weights) if weights else None
    return commit, sha


def load(
    model: str | PreTrainedModel = DEFAULT_MODEL,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a model for scanning and return a :class:`LoadedModel` (model in eval mode).

    ``model`` is a packaged model's name (``"default"``: SmolLM2-135M-Instruct, ``"minilm"``:
    all-MiniLM-L6-v2, ``"gemma3-270m"``: Gemma 3 270M; see
    :data:`~headatlas.model.packaged.PACKAGED_MODELS`), a local Hugging Face model dir, a ``.gguf`` file,
    a hub id, or an already-built ``PreTrainedModel`` (then ``tokenizer`` is required).

    A hub id (``"Org/Name"``) is fetched from the hub at ``revision`` (branch, tag or commit) when
    the hub answers, and read from the local Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``)
    offline; the commit it came from is recorded as ``info.revision``. ``trust_remote_code`` stays off
    unless asked for.

    ``device_map`` (``"auto"`` or an explicit ``{module: device}``, accelerate's) splits a model
    too large for one device over the devices of this node (``"disk"`` entries offload to
    ``offload_folder``); capture, ablation and patching follow each layer's device. It replaces
    ``device``. transformers' progress bars and warnings stay out of the output (:mod:`.quiet`).

    Raises :class:`HeadatlasError` with a one-line message for a missing or unknown model (naming
    what to install for a packaged one, what to download for a hub id).
    """

    torch_dtype = _resolve_dtype(dtype)
    target_device = _resolve_device(device)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        if not hasattr(model, "config") or not isinstance(model, _torch_module()):
            raise HeadatlasError(
                f"{param('model')} must be a packaged name, a path, a hub id or a transformers model, "
                f"got {type(model).__name__}"
            )
        if tokenizer is None:
            raise HeadatlasError("load(model_object) needs tokenizer=...: pass the model's tokenizer")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        info = model_info(model, name=name, source="in-memory", sha256=None)
        return LoadedModel(model.eval(), tokenizer, info)

    check_cache_dir()
    with quiet_third_party():
        name, directory, source, sha, gguf_file = _locate(model, revision)
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        if revision is not None and not directory.exists():  # fetched from the hub
            kwargs["revision"] = revision
        try:
            hf_model, tok = _from_pretrained(
                directory, kwargs, torch_dtype, device_map, offload_folder, tokenizer
            )
        except HeadatlasError:
            raise
        except (OSError, ValueError, KeyError, struct.error, SafetensorError) as exc:  # corrupt files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise HeadatlasError(
                f"could not load model {model!r} (tried {source}): {first[:200]} "
                f"— offline machines need {_PACKAGED_NAMES}, a local dir or a .gguf file"
            ) from exc
        commit, sha = _hub_facts(model, directory, sha, hf_model)
    placed: Any = hf_model if device_map is not None else hf_model.to(target_device)  # type: ignore[arg-type]
    placed.eval()
    check_finite_weights(placed, model)
    info = model_info(placed, name=name, source=source, sha256=sha, revision=commit)
    return LoadedModel(placed, tok, info)
