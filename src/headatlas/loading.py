"""Load a model: the only module that calls ``from_pretrained``.

``load("default")`` returns the packaged SmolLM2-135M-Instruct and ``load("minilm")`` /
``load("gemma3-270m")`` the other packaged models (rows of
:data:`headatlas.datasets.PACKAGED_MODELS`; a GGUF one is converted once to fp32 safetensors in
the cache dir); ``load(path)`` takes a local Hugging Face model dir or a ``.gguf`` file; any other
string is tried as a hub id (which fails with a one-line error when offline).
``load(model, tokenizer=tok)`` wraps an in-memory model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from .archs import arch_spec, attention_stacks
from .datasets import (
    PACKAGED_MODELS,
    PackagedModel,
    assemble_packaged_gguf,
    cache_dir,
    check_cache_dir,
    packaged_model_path,
)
from .errors import HeadatlasError, check_choice, param
from .storage import write_json

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .surgery import HeadLayout

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_SOURCE_FILE = "headatlas-source.json"
"""In a converted model's cache dir: where its GGUF came from and the GGUF's sha256."""
_DTYPES = ("float32", "bfloat16", "float16")
_PACKAGED_NAMES = ", ".join(repr(name) for name in PACKAGED_MODELS)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that every later stage needs.

    ``n_heads`` counts query heads, ``n_kv_heads`` key/value heads (``n_heads`` for MHA, fewer
    for GQA/MQA); query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``.
    """

    name: str
    source: str
    sha256: str | None
    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool
    context_length: int | None
    sliding_window: int | None = None
    attn_kinds: tuple[str, ...] | None = None
    """Encoder–decoder models: the kind of each atlas layer (``encoder``, ``decoder``, ``cross``;
    :func:`headatlas.archs.attention_stacks`), and ``n_layers`` counts all of them. ``None`` for a
    model with one stack, whose layers are all ``decoder`` (causal) or all ``encoder``."""

    @property
    def encoder_decoder(self) -> bool:
        """Whether the model has an encoder and a decoder (and so cross-attention)."""
        return self.attn_kinds is not None

    def kind(self, layer: int) -> str:
        """Return the kind of atlas layer ``layer``: ``encoder``, ``decoder`` or ``cross``."""
        if self.attn_kinds is not None:
            return self.attn_kinds[layer]
        return "decoder" if self.causal else "encoder"

    def stack_layer(self, layer: int) -> int:
        """Return atlas layer ``layer``'s index within its own stack (encoder, decoder self, cross)."""
        if self.attn_kinds is None:
            return layer
        return self.attn_kinds[:layer].count(self.attn_kinds[layer])

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """Return the KV head that query head ``head`` reads."""
        return head // self.group_size

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict (``attn_kinds`` only for encoder–decoder models)."""
        out = asdict(self)
        if self.attn_kinds is None:
            del out["attn_kinds"]
        else:
            out["attn_kinds"] = list(self.attn_kinds)
        return out

    def require_one_stack(self, what: str) -> None:
        """Raise :class:`HeadatlasError` when ``what`` (a command or battery) cannot run on an
        encoder–decoder model."""
        if self.encoder_decoder:
            raise HeadatlasError(
                f"{what} works on decoder-only and encoder-only models; {self.name} ({self.arch}) is "
                "encoder–decoder: scan it with the natural, repeat and align batteries"
            )


@dataclass
class LoadedModel:
    """A model, its tokenizer and its :class:`ModelInfo`, as returned by :func:`load`."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device


def _config_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def model_info(model: PreTrainedModel, name: str, source: str, sha256: str | None) -> ModelInfo:
    """Return the :class:`ModelInfo` of ``model``; raise :class:`HeadatlasError` if it has no attention."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    if not n_layers or not n_heads:
        raise HeadatlasError(
            f"model {name!r} ({config.model_type}) has no attention layers headatlas can see: "
            "give a transformer with self-attention"
        )
    n_kv = _config_int(config, "num_key_value_heads", "n_kv_heads") or n_heads
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model") or 0
    head_dim = _config_int(config, "head_dim", "d_kv") or hidden // n_heads
    stacks = attention_stacks(model)
    if stacks is not None:
        n_layers = _encoder_decoder_layers(config, name, len(stacks), n_heads)
    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]
    causal = (
        any(bool(m.is_causal) for m in attn_modules) if attn_modules else arch_spec(config.model_type).causal
    )
    window = _config_int(config, "sliding_window")
    return ModelInfo(
        name=name,
        source=source,
        sha256=sha256,
        arch=str(config.model_type),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        causal=causal,
        context_length=_config_int(config, "max_position_embeddings", "n_positions"),
        sliding_window=window,
        attn_kinds=None if stacks is None else tuple(layer.kind for layer in stacks),
    )


def _encoder_decoder_layers(config: Any, name: str, found: int, n_heads: int) -> int:
    """Return the number of atlas layers of an encoder–decoder model (encoder + 2 × decoder), after
    checking that the modules found match the config and every stack has ``n_heads`` heads."""
    encoder = _config_int(config, "encoder_layers", "num_layers") or 0
    decoder = _config_int(config, "decoder_layers", "num_decoder_layers") or encoder
    if found != encoder + 2 * decoder:
        raise HeadatlasError(
            f"model {name!r} ({config.model_type}): found {found} attention modules, its config says "
            f"{encoder} encoder + 2 × {decoder} decoder layers; headatlas cannot number its layers"
        )
    heads = {
        _config_int(config, "encoder_attention_heads", "num_heads"),
        _config_int(config, "decoder_attention_heads", "num_heads"),
    }
    heads.discard(None)
    if heads and heads != {n_heads}:
        raise HeadatlasError(
            f"model {name!r} has different head counts in its encoder and decoder ({sorted(heads)}): "  # type: ignore[type-var]
            "an atlas needs one head count for every layer"
        )
    return encoder + 2 * decoder


def parameters_sha256(model: Any) -> str:
    """Return the sha256 of ``model``'s parameters and buffers: names in order, values as float32
    bytes. Equal for the same weights however they were loaded (files, GGUF, built in memory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_record(loaded: LoadedModel) -> dict[str, str]:
    """Return what a fitted artefact (steering, guard) records of the weights it was fitted on:
    ``model_sha256`` (the files' sha256, or the parameters' for a model built in memory) and
    ``params_sha256`` (always the parameters'), for :func:`same_weights`."""
    params = parameters_sha256(loaded.model)
    return {"model_sha256": loaded.info.sha256 or params, "params_sha256": params}


def same_weights(recorded: dict[str, Any], loaded: LoadedModel) -> bool:
    """Return whether ``loaded`` holds the weights of a :func:`weights_record`: the same files, or
    the same parameter values (a model saved and reloaded, or loaded from files and from memory).
    Records without ``params_sha256`` (older files) match on ``model_sha256`` alone."""
    if loaded.info.sha256 and recorded.get("model_sha256") == loaded.info.sha256:
        return True
    params = parameters_sha256(loaded.model)
    return params in (recorded.get("params_sha256"), recorded.get("model_sha256"))


def file_sha256(paths: list[Path]) -> str:
    """Return the sha256 hex digest of the concatenated bytes of ``paths`` (sorted by name).

    Digests are cached in ``$HEADATLAS_CACHE/hashes.json`` keyed by path, size and mtime.
    """
    paths = sorted(paths)
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    store = cache_dir() / "hashes.json"
    try:
        known: dict[str, str] = json.loads(store.read_text()) if store.exists() else {}
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    known[key] = _sha256_uncached(paths)
    try:
        write_json(store, known)
    except OSError:  # a read-only cache only costs a re-hash next time
        logger.debug("could not write %s", store)
    return known[key]


def _weight_files(directory: Path) -> list[Path]:
    files = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]
    return files


def _sha256_uncached(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _without_gguf_progress_bar() -> Iterator[None]:
    """Silence transformers' GGUF de-quantisation bar (a raw tqdm that ignores its logging settings)."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = saved


def needs_conversion(spec: str) -> bool:
    """Whether loading packaged model ``spec`` will first convert its GGUF (once, tens of seconds)."""
    entry = PACKAGED_MODELS.get(spec)
    return bool(
        entry and entry.cache_name and not (cache_dir() / "models" / entry.cache_name / _SOURCE_FILE).exists()
    )


def _convert_gguf(gguf: Path, target: Path, sha256: str, origin: str) -> None:
    """Convert ``gguf`` to fp32 safetensors (model + tokenizer) in ``target``, atomically.

    ``target/headatlas-source.json`` records ``origin`` (where the GGUF came from) and its sha256.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to fp32 safetensors in %s (once)", gguf.name, target)
    with _without_gguf_progress_bar():
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _SOURCE_FILE).write_text(json.dumps({"gguf": origin, "sha256": sha256}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _convert_ct2(source: Path, target: Path, sha256: str, origin: str) -> None:
    """Convert the CTranslate2 Whisper dir ``source`` to a Hugging Face checkpoint in ``target``,
    atomically (``target/headatlas-source.json`` records where it came from and its sha256)."""
    from .ct2 import convert_whisper

    logger.info("converting %s to a Hugging Face checkpoint in %s (once)", source, target)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_whisper(source, tmp)
    (tmp / _SOURCE_FILE).write_text(json.dumps({"ct2": origin, "sha256": sha256}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _packaged_dir(entry: PackagedModel) -> tuple[Path, str, str | None]:
    """Return (model dir, source, sha256) of a packaged model, converting its GGUF once if needed.

    The source is the GGUF file in the package, the model dir in the package, or, for a GGUF
    assembled from chunk packages (deleted after converting), the converted dir in the cache.
    Raises :class:`HeadatlasError` if the packages are missing or the conversion fails.
    """
    located = packaged_model_path(entry.name)
    if entry.cache_name is None:
        weights = _weight_files(located)
        return located, str(located), file_sha256(weights) if weights else None
    target = cache_dir() / "models" / entry.cache_name
    marker = target / _SOURCE_FILE
    if not marker.exists():
        try:
            if entry.converter == "ct2":
                _convert_ct2(located, target, file_sha256([located / "model.bin"]), str(located))
            elif not entry.assembled:
                _convert_gguf(located, target, file_sha256([located]), str(located))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=f".{entry.cache_name}-", dir=target.parent) as tmp:
                    gguf = assemble_packaged_gguf(entry.name, Path(tmp))
                    origin = f"{entry.packages[0]}:{entry.path}"
                    _convert_gguf(gguf, target, _sha256_uncached([gguf]), origin)
        except (OSError, ValueError, ImportError, KeyError, struct.error) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise HeadatlasError(
                f"could not convert the packaged {entry.name} model {entry.path}: {first[:200]}"
            ) from exc
    sha = json.loads(marker.read_text())["sha256"]
    return target, str(target if entry.assembled else located), sha


def _auto_class(config: Any) -> Any:
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
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
    cut to each layer's :class:`~headatlas.surgery.HeadLayout`, and the saved weights are loaded
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


def load(
    model: str | PreTrainedModel = DEFAULT_MODEL,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a model for scanning and return a :class:`LoadedModel` (model in eval mode).

    ``device_map`` (``"auto"`` or an explicit ``{module: device}``, accelerate's) splits a model
    too large for one device over the devices of this node (``"disk"`` entries offload to
    ``offload_folder``); capture, ablation and patching follow each layer's device. It replaces
    ``device``.

    ``model`` is a packaged model's name (``"default"``: SmolLM2-135M-Instruct, ``"minilm"``:
    all-MiniLM-L6-v2, ``"gemma3-270m"``: Gemma 3 270M; see
    :data:`~headatlas.datasets.PACKAGED_MODELS`), a local Hugging Face model dir, a ``.gguf`` file,
    a hub id, or an already-built ``PreTrainedModel`` (then ``tokenizer`` is required).
    ``trust_remote_code`` stays off unless asked for. Raises :class:`HeadatlasError` with a
    one-line message for a missing or unknown model (naming what to install for a packaged one).
    """

    torch_dtype = _resolve_dtype(dtype)
    target_device = _resolve_device(device)
    if not isinstance(model, str):
        if tokenizer is None:
            raise HeadatlasError("load(model_object) needs tokenizer=...: pass the model's tokenizer")
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        info = model_info(model, name=name, source="in-memory", sha256=None)
        return LoadedModel(model.eval(), tokenizer, info)

    from transformers import AutoConfig, AutoTokenizer

    check_cache_dir()
    name = model
    gguf_file: str | None = None
    if model in PACKAGED_MODELS:
        entry = PACKAGED_MODELS[model]
        directory, source, sha = _packaged_dir(entry)
        name = entry.display_name
    else:
        path = Path(model).expanduser()
        looks_local = path.exists() or model.startswith((".", "/", "~")) or model.endswith(".gguf")
        if looks_local and not path.exists():
            raise HeadatlasError(
                f"no model at {model!r}: give {_PACKAGED_NAMES}, a local Hugging Face model dir, "
                "a .gguf file or a hub id"
            )
        if path.is_file() and path.suffix == ".gguf":
            directory, gguf_file = path.parent, path.name
            source, sha = str(path.resolve()), file_sha256([path])
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise HeadatlasError(
                    f"{model!r} is a directory without config.json: not a Hugging Face model dir"
                )
            directory, source = path, str(path.resolve())
            weights = _weight_files(path)
            sha = file_sha256(weights) if weights else None
        else:
            directory, source, sha = Path(model), model, None
    try:
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        config = AutoConfig.from_pretrained(str(directory), **kwargs)
        from .surgery import layouts_from_config

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
    except HeadatlasError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        struct.error,
        SafetensorError,
    ) as exc:  # a corrupt GGUF / safetensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeadatlasError(
            f"could not load model {model!r} (tried {source}): {first[:200]} "
            f"— offline machines need {_PACKAGED_NAMES}, a local dir or a .gguf file"
        ) from exc
    hf_model = (hf_model if device_map is not None else hf_model.to(target_device)).eval()
    info = model_info(hf_model, name=name, source=source, sha256=sha)
    return LoadedModel(hf_model, tok, info)
