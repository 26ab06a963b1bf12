"""Capture sessions: run a model and stream one view of each layer's attention to a callback.

A session switches the model to the ``headatlas`` backend for its lifetime. During each forward
pass every attention layer hands its query/key tensors to the session, which passes an
:class:`~headatlas.capture.views.AttentionView` to ``on_view`` and drops it before the next
layer, so the T×T attention of all layers is never held at once. Two exact paths:

- ``fast`` (CPU, no soft-capping): the fused flash kernel returns the layer output *and* the
  per-row log-sum-exp; the view reads probabilities from it without a T×T buffer
  (:class:`~headatlas.capture.views.LseView`). Learned sinks (gpt-oss, Granite SWA, ...) stay on
  it: a sink logit ``s`` is one more term of the softmax denominator, so ``LSE' = logaddexp(LSE,
  s)`` and the output is the kernel's scaled by the real keys' share ``exp(LSE − LSE')``.
- ``dense``: probabilities are materialised a block of query rows at a time
  (:class:`~headatlas.capture.views.DenseView`), and the output comes from the delegate backend.

Models that cannot swap attention backends fall back to eager ``output_attentions`` (logged),
which does hold every layer at once.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from ..core.errors import HeadatlasError, check_choice, param
from ..model.archs import arch_spec, attention_layer_numbers, attention_stacks
from ..model.compat import attention_implementation
from ..model.info import LoadedModel, check_loaded
from .backends import eager as backend_eager
from .backends import headatlas as backend
from .probs import allowed_keys, attention_probs, block_rows
from .views import AttentionView, DenseView, LseView

logger = logging.getLogger(__name__)


ViewCallback = Callable[[AttentionView], None]
QKVCallback = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, Any],
    "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None",
]


def check_head_count(info: Any, layer: int, n_heads: int) -> None:
    """Raise :class:`HeadatlasError` when layer ``layer`` has ``n_heads`` query heads and the model's
    config says otherwise (per-layer head counts: an atlas needs one count for every layer)."""
    if n_heads != info.n_heads:
        raise HeadatlasError(
            f"layer {layer} of {info.name} ({info.arch}) has {n_heads} heads, its config says {info.n_heads}: "
            "an atlas needs the same head count in every layer; capture refused"
        )


def with_sinks(lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(LSE', mass)`` for rows whose softmax denominator also holds a learned sink logit
    per head: ``LSE' = logaddexp(LSE, sink)`` and ``mass = exp(LSE − LSE')``, the share of the
    probability the real keys keep, both ``[batch, head, query]`` in fp32 (``lse [batch, head,
    query]`` over the keys alone, ``sinks [head]``)."""
    sink = sinks.detach().float().view(1, -1, 1)  # [1, head, 1]
    lse = lse.float()  # [batch, head, query]
    both = torch.logaddexp(lse, sink.expand_as(lse))  # [batch, head, query]
    return both, torch.exp(lse - both)


def check_finite(layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
    """Raise :class:`HeadatlasError` when layer ``layer``'s ``query [batch, head, query, d_head]`` or
    ``key [batch, kv_head, key, d_head]`` hold NaN or infinite values: every score of the layer (and
    of the layers after it) would be meaningless."""
    if not (bool(torch.isfinite(query).all()) and bool(torch.isfinite(key).all())):
        raise HeadatlasError(
            f"layer {layer}'s queries or keys hold NaN or infinite values: the model's weights or its "
            "inputs are damaged (for float16, try float32)"
        )


class CaptureSession:
    """Streams attention views to ``on_view`` for each forward pass of :meth:`run`.

    ``mode`` is ``"auto"`` (fast path where it applies, else dense), ``"dense"``, or ``"none"``
    (no attention views at all: only :attr:`on_qkv` runs, at the delegate backend's cost).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        on_view: ViewCallback,
        fallback: bool = False,
        mode: str = "auto",
        grad: bool = False,
    ) -> None:
        self.loaded = loaded
        self.on_view = on_view
        self.fallback = fallback
        self.mode = mode
        self.grad = grad
        """With ``grad``, :meth:`run` keeps autograd on and views' probabilities are differentiable
        functions of the queries and keys (attention distillation); the fused fast path is off."""
        self.layers_seen: set[int] = set()
        self._module_layer: dict[int, int] = {}
        stacks = attention_stacks(loaded.model) if loaded.info.encoder_decoder else None
        self._cross_layers: set[int] = set()
        if stacks is not None:
            # encoder–decoder: atlas layers number encoder, decoder self and cross layers in turn
            modules = dict(loaded.model.named_modules())
            self._module_layer = {id(modules[a.name]): a.layer for a in stacks}
            self._cross_layers = {a.layer for a in stacks if a.kind == "cross"}
        self.on_qkv: QKVCallback | None = None
        """Optional: receives ``(layer, query, key, value, context)`` of each attention layer —
        ``query [batch, head, query, d_head]`` after rotary embeddings, ``key``/``value``
        ``[batch, kv_head, key, d_head]`` before GQA repetition — and returns ``None`` or
        replacements ``(query, key, value)`` of the same shapes: OV-circuit scores read ``value``,
        path patching writes a receiver head's query, key or value."""
        self.context: Any = None
        """Per-batch data for the callbacks (positions, word ids, prompts), set by :meth:`run`."""
        self.keys_are_tokens = True
        """In :meth:`run` (no cache) a self-attention layer's keys are the input's tokens; a layer with
        more or fewer keys (DeepSeek V4's compressed memory) is refused. :meth:`forward` turns it off."""

    def check_keys(self, layer: int, n_query: int, n_key: int) -> None:
        """Raise :class:`HeadatlasError` when self-attention layer ``layer`` of a cacheless pass has
        ``n_key`` keys for ``n_query`` tokens: its keys are not the tokens, and no score would mean
        what it says."""
        if self.keys_are_tokens and n_key != n_query and layer not in self._cross_layers:
            raise HeadatlasError(
                f"layer {layer} of {self.loaded.info.name} ({self.loaded.info.arch}) attends over {n_key} "
                f"keys for {n_query} tokens (compressed or extra memory keys, not the tokens): capture refused"
            )

    def layer_of(self, module: torch.nn.Module) -> int:
        """Return the layer index of attention module ``module``."""
        return self._layer_of(module)

    def _layer_of(self, module: torch.nn.Module) -> int:
        if self._cross_layers:
            return self._module_layer[id(module)]
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int):
            return layer
        # Modules without ``layer_idx`` are numbered in call order, which is layer order.
        return self._module_layer.setdefault(id(module), len(self._module_layer))

    def observe(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Compute one layer's probabilities block by block and pass them to ``on_block``.

        ``query [batch, head, query, d_head]``, ``key [batch, kv_head, key, d_head]``,
        ``attention_mask`` as the model passed it (see :func:`allowed_keys`), ``bias`` an additive
        logit bias ``[1 | batch, head, query, key]`` (T5's relative position bias). A
        cross-attention view's ``q_index`` counts target rows from 0 (its keys are the source).
        """
        layer = self._layer_of(module)
        self.layers_seen.add(layer)
        if self.mode == "none":
            return
        check_head_count(self.loaded.info, layer, query.shape[1])
        self.check_keys(layer, query.shape[2], key.shape[2])
        check_finite(layer, query, key)
        batch, n_heads, n_query, _ = query.shape
        n_key = key.shape[2]
        causal = bool(getattr(module, "is_causal", self.loaded.info.causal))
        shift = 0 if layer in self._cross_layers else n_key - n_query
        with torch.no_grad():
            allowed = allowed_keys(attention_mask, batch, n_query, n_key, causal, query.device)
            n_keys = allowed[:, 0].sum(-1)  # [batch, query]
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            rows = block_rows(batch, n_heads, n_query, n_key)
            for q0 in range(0, n_query, rows):
                q1 = min(n_query, q0 + rows)
                block_bias = None if bias is None else bias[:, :, q0:q1]  # [1 | batch, head, block, key]
                probs = attention_probs(
                    query[:, :, q0:q1],
                    key,
                    allowed[:, :, q0:q1],
                    scaling,
                    softcap=softcap,
                    sinks=sinks,
                    bias=block_bias,
                )  # [batch, head, block, key]
                self.on_view(DenseView(layer, probs, q0 + shift, n_keys[:, q0:q1]))

    def attend_fast(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor | bool:
        """Fast path: fused attention with log-sum-exp, one :class:`LseView` to ``on_view``.

        ``sinks [head]``: learned sink logits (gpt-oss; Xiao et al. 2024's attention sink made a
        parameter), which take probability mass without being a key. Returns the layer output
        ``[batch, query, head, d_head]`` (bitwise what SDPA returns on CPU; with sinks, the
        kernel's output times the real keys' share of the mass, as the eager sink softmax
        computes it up to rounding); ``True`` when the view went out but the output must come from the delegate (values
        of another head size than queries and keys, as in DeepSeek's latent attention: the fused
        kernel needs one size, so the log-sum-exp comes from a call with the keys as values); or
        ``False`` when the fast path does not apply (then the caller delegates and calls
        :meth:`observe`).
        """
        batch, _n_heads, n_query, d_head = query.shape
        n_key = key.shape[2]
        layer = self._layer_of(module)
        if (
            self.mode != "auto"
            or self.grad  # the fused kernel with log-sum-exp has no backward
            or layer in self._cross_layers  # cross detectors read whole rows
            or query.device.type != "cpu"
            or key.shape[-1] != d_head
            or (attention_mask is None and n_query != n_key)
            or query.dtype not in (torch.float32, torch.bfloat16)
        ):
            return False
        split_value = value.shape[-1] != d_head
        self.layers_seen.add(layer)
        check_head_count(self.loaded.info, layer, query.shape[1])
        self.check_keys(layer, n_query, n_key)
        check_finite(layer, query, key)
        causal = bool(getattr(module, "is_causal", self.loaded.info.causal))
        allowed: torch.Tensor | None = None
        additive: torch.Tensor | None = None
        if attention_mask is not None:
            allowed = allowed_keys(attention_mask, batch, n_query, n_key, causal, query.device)
            additive = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~allowed, float("-inf")
            )  # [batch, 1, query, key]
            n_keys = allowed[:, 0].sum(-1)  # [batch, query]
        elif causal:
            n_keys = torch.arange(1, n_query + 1, device=query.device).expand(batch, n_query)
        else:
            n_keys = torch.full((batch, n_query), n_key, device=query.device)
        is_causal = attention_mask is None and causal and n_query > 1
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        with torch.no_grad():
            out, lse = flash(
                query, key, key if split_value else value, 0.0, is_causal, attn_mask=additive, scale=scaling
            )
            mass: torch.Tensor | None = None
            if sinks is not None:
                lse, mass = with_sinks(lse, sinks)
                # the kernel gives a row with no allowed key LSE 0, not −inf: it keeps no mass
                mass = mass * (n_keys > 0)[:, None].to(mass.dtype)  # [batch, head, query]

            def keys_times_attention() -> torch.Tensor:
                if split_value:  # the call above already had the keys as values
                    return out
                return flash(query, key, key, 0.0, is_causal, attn_mask=additive, scale=scaling)[0]

            self.on_view(
                LseView(layer, query, key, lse, scaling, allowed, causal, n_keys, keys_times_attention, mass)
            )
        if split_value:
            return True
        if mass is not None:
            out = out * mass.unsqueeze(-1).to(out.dtype)  # [batch, head, query, d_head]
        return out.transpose(1, 2).contiguous()

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        with_head: bool = True,
        context: Any = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run one forward pass over ``input_ids [batch, seq]`` (no grad unless the session's ``grad``).

        ``attention_mask [batch, seq]`` is 1 for real tokens, 0 for padding. An encoder–decoder
        model reads ``input_ids`` as the source and takes ``decoder_input_ids [batch, target]``
        (teacher forcing; right-padded, with ``decoder_attention_mask``); a speech encoder's
        source is float ``input_features [batch, mel, frame]`` (Whisper: no mask). ``context`` becomes
        :attr:`context` for this pass (callbacks read it instead of sharing mutable state). Returns the logits
        ``[batch, seq, vocab]``; with ``with_head=False`` only the transformer body runs (scores
        do not need the LM head, which at 49k vocab is a fifth of SmolLM2's compute and
        the largest activation at long context) and its last hidden states are returned.
        """
        self.context = context
        model = self.loaded.model if with_head else self.loaded.model.base_model
        device = self.loaded.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        # a speech encoder (Whisper) reads log-mel features, padded to its fixed window, unmasked
        speech = input_ids.is_floating_point()
        source = (
            {"input_features": input_ids}
            if speech
            else {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        extra = {} if speech else padded_positions(model, attention_mask)
        if decoder_input_ids is not None:
            extra["decoder_input_ids"] = decoder_input_ids.to(device)
            if decoder_attention_mask is not None:
                extra["decoder_attention_mask"] = decoder_attention_mask.to(device)
        elif self.loaded.info.encoder_decoder:
            raise HeadatlasError(
                f"{self.loaded.info.name} is encoder–decoder: this command feeds one sequence; "
                "scan it (headatlas scan MODEL --probes natural,align or speech)"
            )
        with torch.set_grad_enabled(self.grad):
            if self.fallback:
                out = model(**source, output_attentions=True, **extra)
                maps = tuple(a for a in getattr(out, "attentions", None) or () if a is not None)
                if not maps:
                    raise HeadatlasError(
                        f"{self.loaded.info.name} ({self.loaded.info.arch}) returns no attention maps "
                        "from output_attentions and cannot swap attention backends: capture refused"
                    )
                numbers = eager_layer_numbers(self.loaded, len(maps))
                for view in backend_eager.views(maps, attention_mask, self.loaded.info.causal, numbers):
                    check_head_count(self.loaded.info, view.layer, view.probs.shape[1])
                    self.layers_seen.add(view.layer)
                    self.on_view(view)
            else:
                token = backend.ACTIVE_SESSION.set(self)
                try:
                    out = model(**source, **extra)
                finally:
                    backend.ACTIVE_SESSION.reset(token)
        result = getattr(out, "logits", None)
        return out[0] if result is None else result  # type: ignore[no-any-return]

    def forward(self, **model_kwargs: Any) -> Any:
        """Run ``model(**model_kwargs)`` (no grad) with capture on and return the model's whole output.

        For callers that need more than logits, e.g. decoding with ``past_key_values`` and
        ``use_cache=True``: each step's attention (one query row per sequence) reaches ``on_view``.
        Not available in the eager fallback.
        """
        if self.fallback:
            raise RuntimeError("CaptureSession.forward needs a model that can swap attention backends")
        self.keys_are_tokens = False
        token = backend.ACTIVE_SESSION.set(self)
        try:
            with torch.no_grad():
                return self.loaded.model(**model_kwargs)
        finally:
            backend.ACTIVE_SESSION.reset(token)


def eager_layer_numbers(loaded: LoadedModel, n_maps: int) -> list[int]:
    """Return the layer index of each of ``n_maps`` eager attention maps: ``0 … n_layers − 1`` when
    every layer has one, else (a hybrid stack: Jamba, Qwen3-Next, Nemotron-H, whose Mamba or
    linear-attention layers return no map) the ``layer_idx`` of the attention modules in order, so
    scores land on the layer whose heads they are. Raises :class:`HeadatlasError` when they cannot
    be matched (never a score on the wrong layer)."""
    if n_maps == loaded.info.n_layers:
        return list(range(n_maps))
    numbers = attention_layer_numbers(loaded.model)
    if len(numbers) != n_maps:
        raise HeadatlasError(
            f"{loaded.info.name} ({loaded.info.arch}) returns {n_maps} attention maps for "
            f"{loaded.info.n_layers} layers and headatlas cannot tell which layers they belong to: "
            "capture refused"
        )
    return numbers


def padded_positions(model: torch.nn.Module, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return ``{"position_ids": [batch, seq]}`` counting real tokens only, when the batch is padded.

    Left padding shifts every real token's default position by the pad length: harmless for
    rotary models (attention depends on offsets only) but wrong for absolute position embeddings
    (BERT, GPT-2), whose attention then differs from the unpadded sequence's. Padding positions
    get 0. Returns ``{}`` for an unpadded batch or a model whose forward takes no ``position_ids``.
    """
    if bool(attention_mask.all()) or "position_ids" not in inspect.signature(model.forward).parameters:
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp_min(0)}


def supports_backend(loaded: LoadedModel) -> bool:
    """Return whether the model can swap attention backends: transformers'
    ``_supports_attention_backend``, or an encoder–decoder family of :data:`headatlas.model.archs.ARCHITECTURES`
    (their attention modules call the attention interface, but transformers does not flag them)."""
    if arch_spec(loaded.info.arch).cross_attention is not None and loaded.info.encoder_decoder:
        return True
    return bool(getattr(type(loaded.model), "_supports_attention_backend", False))


@contextmanager
def capture(
    loaded: LoadedModel, on_view: ViewCallback, mode: str = "auto", grad: bool = False
) -> Iterator[CaptureSession]:
    """Context manager yielding a :class:`CaptureSession`; restores the model's backend on exit.

    ``mode="auto"`` takes the fast log-sum-exp path where it applies; ``"dense"`` always
    materialises probabilities (both are exact); ``"none"`` sends no views (for sessions that only
    use :attr:`CaptureSession.on_qkv`). With ``grad=True`` the session's passes keep autograd on and
    its views' probabilities carry gradients to the queries and keys (attention distillation, as in
    SEEKR, He et al. 2024); views then arrive as :class:`DenseView` blocks.
    """
    check_choice("mode", mode, ("auto", "dense", "none"))
    model = check_loaded(loaded).model
    spec = arch_spec(loaded.info.arch)
    refused = spec.refused or spec.capture_refused
    if refused is not None:
        raise HeadatlasError(f"{loaded.info.arch}: {refused}")
    fallback = not supports_backend(loaded)
    name = "eager" if fallback else (backend.EAGER_NAME if backend.needs_eager(model) else backend.NAME)
    if fallback:
        logger.warning(
            "%s cannot swap attention backends: falling back to eager output_attentions "
            "(slower, holds every layer's attention at once)",
            type(model).__name__,
        )
    backend.register()
    with ExitStack() as restore:
        try:
            restore.enter_context(attention_implementation(model, name))
        except ValueError as error:  # a submodule (an audio tokenizer, ...) refuses custom attention
            raise HeadatlasError(
                f"{type(model).__name__} refuses the {name} attention backend "
                f"({' '.join(str(error).split())[:120]}): capture refused"
            ) from error
        yield CaptureSession(loaded, on_view, fallback=fallback, mode=mode, grad=grad)


def attention_maps(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers: set[int] | None = None,
    decoder_input_ids: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Return full attention probabilities ``{layer: [batch, head, query, key]}`` (CPU, fp32).

    Uses the same capture path as scanning. Holds the requested layers in memory, so pass
    ``layers`` for long inputs. An encoder–decoder model also takes the decoder's input
    (``decoder_input_ids [batch, target]``): its atlas layers are the encoder's
    ``[batch, head, source, source]``, the decoder's ``[batch, head, target, target]`` and the
    cross-attention's ``[batch, head, target, source]`` (:attr:`ModelInfo.attn_kinds`).
    ``attention_mask [batch, seq]`` defaults to all ones (no padding).
    """
    check_loaded(loaded)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() < 2:
        raise HeadatlasError(
            f"{param('input_ids')} must be a [batch, seq] tensor of token ids (a speech model's: its "
            f"features), got {getattr(input_ids, 'shape', type(input_ids).__name__)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
    elif not isinstance(attention_mask, torch.Tensor) or (
        attention_mask.shape != input_ids.shape if input_ids.dim() == 2 else attention_mask.dim() != 2
    ):
        raise HeadatlasError(
            f"{param('attention_mask')} must be a tensor shaped like input_ids, [batch, seq]"
        )
    blocks: dict[int, list[torch.Tensor]] = {}

    def keep(view: AttentionView) -> None:
        if (layers is None or view.layer in layers) and isinstance(view, DenseView):
            blocks.setdefault(view.layer, []).append(view.probs.cpu())

    with capture(loaded, keep, mode="dense") as session:
        session.run(  # no map needs the logits
            input_ids,
            attention_mask,
            with_head=False,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        )
    return {layer: torch.cat(parts, dim=2) for layer, parts in sorted(blocks.items())}
