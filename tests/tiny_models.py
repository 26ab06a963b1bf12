"""Tiny, seeded, random transformer models and a tokenizer, built entirely in code.

Nothing here touches the network: the tokenizer is trained on a hard-coded corpus with the
``tokenizers`` library and every model is created from a config with random weights. The same
seed always gives the same weights, so tests can compare runs exactly.

Randomly initialised attention is almost uniform, which makes "does my capture match the
reference exactly" tests weak. Every builder therefore sharpens the query/key projections (see
:func:`sharpen_attention`) so attention patterns are peaky but finite.

Usage from a test::

    from tiny_models import BUILDERS, eager_attentions, left_padded_batch, make_tokenizer

    tok = make_tokenizer()
    model = BUILDERS["llama"](0)
    ids, mask = left_padded_batch(tok, ["a short one", "a much longer sentence than that"])
    attns = eager_attentions(model, ids, mask)  # per layer [batch, head, query, key]
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "BUILDERS",
    "CORPUS",
    "GEMMA3_LAYER_TYPES",
    "GEMMA3_SLIDING_WINDOW",
    "QK_SCALE",
    "SAMPLE_TEXTS",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "blank_llama",
    "eager_attentions",
    "left_padded_batch",
    "make_tokenizer",
    "one_layer_llama_config",
    "sharpen_attention",
    "tiny_bert",
    "tiny_gemma3",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_qwen2",
    "word_tokenizer",
]

#: Fixed training corpus for the tokenizer. Common words ("the", "of", "and", ...) appear often
#: enough to become single tokens; rarer long words are split into several pieces.
CORPUS: tuple[str, ...] = (
    "The cat sat on the mat and looked at the dog.",
    "The dog ran to the park with the ball in its mouth.",
    "A bird sang in the tree while the sun was rising over the hill.",
    "She read a book about the history of the old city.",
    "He opened the door and walked into the quiet room.",
    "The children played in the garden until it was dark.",
    "We went to the market to buy apples, bread, and milk.",
    "The river flows from the mountains down to the sea.",
    "My brother likes to play the guitar in the evening.",
    "It was raining, so they stayed at home and watched a film.",
    "The teacher asked the students to write a short story.",
    "On Monday the office was closed because of the storm.",
    "The train to London leaves at seven in the morning.",
    "Please put the cup on the table next to the window.",
    "The scientist measured the temperature of the water twice.",
    "Our neighbour has a small red car and a large black dog.",
    "The museum was full of paintings, statues, and ancient coins.",
    "If you are hungry, there is soup in the kitchen.",
    "The king and the queen lived in a castle by the lake.",
    "They walked along the beach and collected shells.",
    "The computer stopped working after the update last night.",
    "Water boils at one hundred degrees at sea level.",
    "The first word of the sentence is always written with a capital letter.",
    "Mary gave John the key, and John opened the box.",
    "When the music started, everyone began to dance.",
    "The old man told the boy a story about the war.",
    "Birds fly south in the winter to find warmer weather.",
    "The number of people in the town has grown every year.",
    "I think that the answer to the question is very simple.",
    "The farmer planted corn, beans, and potatoes in the field.",
    "After dinner we talked about our plans for the summer.",
    "The doctor said that the patient would recover quickly.",
    "Light travels much faster than sound through the air.",
    "The library opens at nine and closes at five on weekdays.",
    "She smiled when she saw the letter from her sister.",
    "The bridge over the river was built more than a century ago.",
    "Two plus two is four, and three plus three is six.",
    "The wind was cold, but the sky was clear and blue.",
    "Everyone in the class passed the examination with good marks.",
    "The little girl was afraid of the thunder and lightning.",
    "He forgot his umbrella and got wet on the way to work.",
    "The company announced a new product at the conference.",
    "Photosynthesis allows plants to convert sunlight into chemical energy.",
    "The committee postponed the extraordinary meeting indefinitely.",
    "Archaeologists discovered fragments of pottery near the riverbank.",
    "The orchestra performed a magnificent symphony yesterday evening.",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
    'He said, "Hello there!" and she replied, "Good morning."',
)

#: Special tokens in id order; ``<bos>``, ``<eos>`` and ``<pad>`` get ids 0, 1 and 2.
SPECIAL_TOKENS: tuple[str, ...] = ("<bos>", "<eos>", "<pad>", "[CLS]", "[SEP]", "[MASK]")

#: Target vocabulary size of the BPE trainer (special tokens and the 256 byte symbols included).
VOCAB_SIZE: int = 400

#: Factor applied to query and key projection weights (so logits scale by its square).
QK_SCALE: float = 10.0

#: Sliding window of the tiny Gemma3 model. In transformers' ``sliding_window_overlay`` a query
#: at position ``i`` may see key ``j`` only when ``j > i - sliding_window`` (and ``j <= i``), i.e.
#: the query itself plus the ``sliding_window - 1`` keys before it.
GEMMA3_SLIDING_WINDOW: int = 8

#: Layer types of the tiny Gemma3 model (three local layers, then one global layer).
GEMMA3_LAYER_TYPES: tuple[str, ...] = (
    "sliding_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
)

#: Texts of clearly different lengths, for left-padded batches in tests. The longest is longer
#: than :data:`GEMMA3_SLIDING_WINDOW` tokens so the window is visible.
SAMPLE_TEXTS: tuple[str, ...] = (
    "The cat sat.",
    "The dog ran to the park with the ball in its mouth.",
    "Archaeologists discovered fragments of pottery near the riverbank yesterday evening.",
)


@functools.lru_cache(maxsize=2)
def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Train (once per process) a small byte-level BPE tokenizer on :data:`CORPUS`.

    The tokenizer uses a ByteLevel pre-tokenizer and decoder, so ``word_ids()`` and
    ``return_offsets_mapping`` work. ``<bos>``/``<eos>``/``<pad>`` have ids 0/1/2 and padding is on
    the left. Training is deterministic, so ids are identical across runs.

    With ``add_bos`` (the default) it starts every text with ``<bos>``, as Llama's and Gemma's
    tokenizers do; with ``add_bos=False`` it has a BOS token but never adds it, as Qwen2's and
    SmolLM2's do (so a sequence then starts with the text's first token).

    The result is cached and shared: callers must not mutate it.

    Returns:
        The wrapped fast tokenizer.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(CORPUS), trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 0)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        padding_side="left",
    )
    for i, token in enumerate(SPECIAL_TOKENS[:3]):
        if tokenizer.convert_tokens_to_ids(token) != i:
            raise RuntimeError(f"special token {token!r} did not get id {i}")
    return tokenizer


def word_tokenizer(words: list[str] | tuple[str, ...], unk_token: str = "<unk>") -> PreTrainedTokenizerFast:
    """A word-level tokenizer: each of ``words`` (in id order, duplicates dropped) is one token,
    text is split on whitespace and punctuation, anything else is ``unk_token``.

    ``<bos>``, ``<eos>``, ``<pad>`` and ``unk_token`` must be among ``words``; padding is on the left.
    Hand-built models in tests use it so that every word they care about is exactly one token.
    """
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token=unk_token,
        padding_side="left",
    )


def one_layer_llama_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    """A one-layer Llama config (hidden 64, 4 heads of 16, 2 KV heads) for models whose weights a
    test sets by hand; ``overrides`` replace any field (heads, head_dim, tied embeddings, ...)."""
    fields: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def blank_llama(config: LlamaConfig) -> LlamaForCausalLM:
    """A Llama with every weight 0 and every norm's gain 1, for a test to wire by hand."""
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    return model


def sharpen_attention(model: PreTrainedModel, scale: float | None = None) -> PreTrainedModel:
    """Multiply every query and key projection weight of ``model`` by ``scale``, in place.

    Parameters are found by name: ``q_proj.weight``/``k_proj.weight`` (Llama, Qwen2, Gemma3),
    ``query.weight``/``key.weight`` (BERT), and the q and k thirds of the output columns of GPT-2's
    fused ``c_attn.weight`` (a ``Conv1D`` weight is ``[in, 3 * hidden]``). Biases are left alone.

    Models that normalise queries and keys after the projection (Gemma3's ``q_norm``/``k_norm``)
    are not affected by this; their builders sharpen attention through the config instead.

    Args:
        model: The model to modify.
        scale: Factor for the weights (default :data:`QK_SCALE`); attention logits scale by
            ``scale ** 2`` (up to biases).

    Returns:
        ``model`` itself.
    """
    scale = QK_SCALE if scale is None else scale
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                param.mul_(scale)
            elif name.endswith("c_attn.weight"):
                width = param.shape[1] // 3
                param[:, : 2 * width].mul_(scale)
    return model


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    """Sharpen attention, cast to float32 and switch to eval mode."""
    sharpen_attention(model)
    return model.float().eval()


def tiny_llama(seed: int = 0) -> PreTrainedModel:
    """A 3-layer Llama with grouped-query attention (4 query heads, 2 KV heads, head_dim 16).

    Args:
        seed: Seed for ``torch.manual_seed`` before the weights are created.

    Returns:
        The model, in eval mode and float32.
    """
    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(cfg))


def tiny_gpt2(seed: int = 0) -> PreTrainedModel:
    """A 2-layer GPT-2 (4 heads, hidden 64, fused ``c_attn`` projection).

    Args:
        seed: Seed for ``torch.manual_seed`` before the weights are created.

    Returns:
        The model, in eval mode and float32.
    """
    tok = make_tokenizer()
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _finish(GPT2LMHeadModel(cfg))


def tiny_bert(seed: int = 0) -> PreTrainedModel:
    """A 2-layer bidirectional BERT encoder with a masked-LM head (4 heads, hidden 64).

    Args:
        seed: Seed for ``torch.manual_seed`` before the weights are created.

    Returns:
        The model, in eval mode and float32.
    """
    tok = make_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _finish(BertForMaskedLM(cfg))


def tiny_gemma3(seed: int = 0) -> PreTrainedModel:
    """A 4-layer Gemma3 text model: three sliding-window layers then one global layer, MQA.

    The window is :data:`GEMMA3_SLIDING_WINDOW` tokens, shorter than the test sequences. Gemma3
    RMS-normalises queries and keys after the projections, so scaling ``q_proj``/``k_proj`` has no
    effect; instead ``query_pre_attn_scalar`` is set to 2 (scores are divided by ``sqrt(2)`` rather
    than ``sqrt(head_dim)``), which makes random attention about as peaky as the other builders'.

    Args:
        seed: Seed for ``torch.manual_seed`` before the weights are created.

    Returns:
        The model, in eval mode and float32.
    """
    tok = make_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(GEMMA3_LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=GEMMA3_SLIDING_WINDOW,
        layer_types=list(GEMMA3_LAYER_TYPES),
        query_pre_attn_scalar=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _finish(Gemma3ForCausalLM(cfg))


def tiny_qwen2(seed: int = 0) -> PreTrainedModel:
    """A 2-layer Qwen2 (4 query heads, 2 KV heads, q/k/v biases).

    Args:
        seed: Seed for ``torch.manual_seed`` before the weights are created.

    Returns:
        The model, in eval mode and float32.
    """
    tok = make_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return _finish(Qwen2ForCausalLM(cfg))


#: Builders by short name; each takes a seed and returns a fresh model.
BUILDERS: dict[str, Callable[[int], PreTrainedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "gemma3": tiny_gemma3,
    "qwen2": tiny_qwen2,
}


def left_padded_batch(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], add_bos: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise ``texts`` into one left-padded batch.

    Args:
        tokenizer: A tokenizer from :func:`make_tokenizer` (or any fast tokenizer with a pad token).
        texts: The texts; give them clearly different lengths so padding is exercised.
        add_bos: Prepend ``<bos>`` to every row (what decoders expect). Padding goes before it.

    Returns:
        ``(input_ids, attention_mask)``, both ``[batch, seq]`` ``int64`` tensors; the mask is 0 at
        padding positions and 1 elsewhere.
    """
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows.append(([tokenizer.bos_token_id] if add_bos else []) + list(ids))
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
    attention_mask = torch.tensor(
        [[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long
    )
    return input_ids, attention_mask


def eager_attentions(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Reference attention probabilities from transformers' own eager implementation.

    Switches ``model`` to ``"eager"``, runs one forward pass with ``output_attentions=True`` under
    ``torch.no_grad()``, and restores the previous implementation (even on error). Position ids
    count real tokens only, so a left-padded row gets the positions it has alone (this matters for
    absolute position embeddings: BERT, GPT-2).

    Args:
        model: The model; it is temporarily modified in place.
        input_ids: ``[batch, seq]`` token ids.
        attention_mask: ``[batch, seq]`` mask, 0 at padding.

    Returns:
        One tensor per layer, ``[batch, head, query, key]``.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"{type(model).__name__} refused set_attn_implementation('eager')")
    try:
        with torch.no_grad():
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # [batch, seq]
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                output_attentions=True,
            )
    finally:
        model.set_attn_implementation(previous)
    if out.attentions is None:
        raise RuntimeError(f"{type(model).__name__} returned no attentions")
    return tuple(out.attentions)
