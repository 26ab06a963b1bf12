"""Tiny, seeded encoder–decoder models (T5, BART, Marian, mBART, Pegasus) built from configs,
and one wired by hand to align target token i with source token i.

Like :mod:`tiny_models`, nothing touches the network; query/key projections are sharpened so
attention is peaky and a capture that reads the wrong rows or mask cannot pass by accident.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf

from tiny_models import make_tokenizer, word_tokenizer

__all__ = ["SEQ2SEQ_BUILDERS", "aligned_bart", "eager_seq2seq", "sharpen_seq2seq", "tiny_whisper"]


def sharpen_seq2seq(model: tf.PreTrainedModel, scale: float = 4.0) -> tf.PreTrainedModel:
    """Multiply every query and key projection (``q_proj``/``k_proj``, T5's ``q``/``k``) by ``scale``."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", ".q.weight", ".k.weight")):
                param.mul_(scale)
    return model.eval()


def _bart_like(config_class: type, model_class: type, **extra: object) -> Callable[[int], tf.PreTrainedModel]:
    def build(seed: int) -> tf.PreTrainedModel:
        torch.manual_seed(seed)
        fields: dict[str, object] = {
            "vocab_size": len(make_tokenizer()),
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 512,
            "pad_token_id": 2,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 2,
        }
        return sharpen_seq2seq(model_class(config_class(**{**fields, **extra})))

    return build


def _t5(seed: int) -> tf.PreTrainedModel:
    torch.manual_seed(seed)
    config = tf.T5Config(
        vocab_size=len(make_tokenizer()),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=2,
        pad_token_id=2,
        eos_token_id=1,
    )
    return sharpen_seq2seq(tf.T5ForConditionalGeneration(config))


SEQ2SEQ_BUILDERS: dict[str, Callable[[int], tf.PreTrainedModel]] = {
    "t5": _t5,
    "bart": _bart_like(tf.BartConfig, tf.BartForConditionalGeneration),
    "marian": _bart_like(tf.MarianConfig, tf.MarianMTModel),
    "mbart": _bart_like(tf.MBartConfig, tf.MBartForConditionalGeneration),
    "pegasus": _bart_like(tf.PegasusConfig, tf.PegasusForConditionalGeneration),
}
"""Seeded tiny encoder–decoder models: 2 encoder and 2 decoder layers of 4 heads each."""

tiny_whisper = _bart_like(
    tf.WhisperConfig,
    tf.WhisperForConditionalGeneration,
    num_mel_bins=80,
    max_source_positions=1500,
    max_target_positions=64,
    decoder_start_token_id=0,
)
"""A seeded tiny Whisper (the same sizes) over the real 80-mel, 1500-frame window."""


ALIGNED_WORDS = ("<bos>", "<eos>", "<pad>", "<unk>", *(f"w{i}" for i in range(20)))
"""The vocabulary of :func:`aligned_bart`'s word tokenizer: one token per word."""
_SPAN = 16
"""Positions the wired model tells apart (one-hot in the first 16 of its 32 dimensions)."""


def aligned_bart() -> tuple[tf.PreTrainedModel, tf.PreTrainedTokenizerFast]:
    """A BART (1 encoder, 1 decoder layer, 2 heads of 16) whose cross-attention head 0 attends
    from target row i to source token i, and its word tokenizer.

    Token embeddings are zero and position p's learned embedding is a one-hot vector in dimension
    p, so after the embedding layer norm every hidden state says only where it is. The encoder
    layer and the decoder's self-attention and feed-forward add nothing (zero output
    projections), so the cross-attention query of row i and the key of source token j are
    the same normalised one-hot vectors u: head 0's logits ``4·<u_i, u_j>`` peak at j = i by over
    100 (probability ≈ 1 for i < 16). Head 1 has zero query weights: uniform attention.
    Positions are not padding-aware in BART, so the alignment holds for unpadded batches.
    """
    tokenizer = word_tokenizer(ALIGNED_WORDS)
    config = tf.BartConfig(
        vocab_size=len(ALIGNED_WORDS),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
        max_position_embeddings=_SPAN,
        pad_token_id=2,
        bos_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=2,
    )
    model = tf.BartForConditionalGeneration(config).eval()
    core = model.model
    with torch.no_grad():
        core.shared.weight.zero_()
        for positions in (core.encoder.embed_positions, core.decoder.embed_positions):
            positions.weight.zero_()
            positions.weight[2 : 2 + _SPAN, :_SPAN] = torch.eye(_SPAN) * 10.0  # BART's offset of 2
        for layer in (*core.encoder.layers, *core.decoder.layers):
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()
            layer.fc2.weight.zero_()
            layer.fc2.bias.zero_()
        cross = core.decoder.layers[0].encoder_attn
        for proj in (cross.q_proj, cross.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        cross.q_proj.weight[:_SPAN, :_SPAN] = torch.eye(_SPAN) * 16.0  # head 0: query = 16·u
        cross.k_proj.weight[:_SPAN, :_SPAN] = torch.eye(_SPAN)  # head 0: key = u
    return model, tokenizer


def eager_seq2seq(
    model: tf.PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    decoder_input_ids: torch.Tensor,
    decoder_attention_mask: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reference attention in atlas layer order (encoder, decoder self, cross) and the logits,
    from transformers' eager implementation with ``output_attentions=True``. Float ``input_ids``
    are a speech encoder's ``input_features`` (Whisper; no source mask)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            source = (
                {"input_features": input_ids}
                if input_ids.is_floating_point()
                else {"input_ids": input_ids, "attention_mask": attention_mask}
            )
            out = model(
                **source,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                output_attentions=True,
            )
    finally:
        model.set_attn_implementation(previous)
    layers = [*out.encoder_attentions, *out.decoder_attentions, *out.cross_attentions]
    return layers, out.logits
