"""Read a CTranslate2 Whisper model (``model.bin``) and write it as a Hugging Face checkpoint.

faster-whisper's models ship in CTranslate2's binary format: a little-endian header (format
version, spec name, spec revision), then each variable as ``name``, rank, dims, dtype, byte count
and raw bytes, then an alias table. The Whisper spec fuses the self-attention's query, key and
value projections (``linear_0``, ``[3·d, d]``) and the cross-attention's key and value
(``linear_1``, ``[2·d, d]``); Hugging Face keeps them apart and has no key bias, which the
converter checks is zero in the file. Values are kept as stored (float16 weights become exact
float32). The CTranslate2 ``config.json`` carries OpenAI's ``alignment_heads`` (the cross-attention
heads Whisper's word timestamps use); the converted generation config keeps them.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import HeadatlasError

_DTYPES: dict[int, Any] = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


class _Reader:
    """A cursor over the bytes of a ``model.bin``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("H")  # includes the trailing NUL
        text = self.data[self.at : self.at + length - 1].decode("utf-8")
        self.at += length
        return text

    def raw(self, n: int) -> bytes:
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk


def read_model_bin(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """Return ``(spec name, {variable name: array})`` of a CTranslate2 ``model.bin``; aliases are
    resolved to the variables they name. Raises :class:`HeadatlasError` on a file it cannot read."""
    try:
        reader = _Reader(Path(path).read_bytes())
        (_version,) = reader.unpack("I")
        spec = reader.string()
        (_revision, count) = reader.unpack("II")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = reader.string()
            (rank,) = reader.unpack("B")
            dims = reader.unpack(f"{rank}I") if rank else ()
            (dtype, n_bytes) = reader.unpack("BI")
            raw = reader.raw(n_bytes)
            kind = _DTYPES[dtype]
            if kind == "bfloat16":
                array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(raw, kind)
            variables[name] = array.reshape(dims)
        if reader.at < len(reader.data):
            (n_alias,) = reader.unpack("I")
            for _ in range(n_alias):
                alias, target = reader.string(), reader.string()
                variables[alias] = variables[target]
    except (OSError, struct.error, KeyError, ValueError, UnicodeDecodeError) as exc:
        raise HeadatlasError(f"{path} is not a CTranslate2 model.bin headatlas can read ({exc})") from None
    return spec, variables


def _count(variables: dict[str, np.ndarray], stack: str) -> int:
    return len({m.group(1) for k in variables if (m := re.match(rf"{stack}/layer_(\d+)/", k))})


def whisper_state_dict(variables: dict[str, np.ndarray]) -> dict[str, Any]:
    """Return the Hugging Face ``WhisperForConditionalGeneration`` state dict (float32 tensors) of
    a CTranslate2 ``WhisperSpec``'s variables."""
    import torch

    out: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(variables[name], dtype=np.float32).copy())

    def linear(hf: str, ct: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = tensor(f"{ct}/weight"), tensor(f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        out[f"{hf}.weight"], out[f"{hf}.bias"] = tensor(f"{ct}/gamma"), tensor(f"{ct}/beta")

    def split(hf: str, ct: str, names: tuple[str, ...]) -> None:
        weights, biases = tensor(f"{ct}/weight").chunk(len(names)), tensor(f"{ct}/bias").chunk(len(names))
        for name, weight, bias in zip(names, weights, biases, strict=True):
            out[f"{hf}.{name}.weight"] = weight
            if name == "k_proj":
                if float(bias.abs().max()) != 0.0:
                    raise HeadatlasError(f"{ct} has a key bias, which Hugging Face's Whisper has not")
            else:
                out[f"{hf}.{name}.bias"] = bias

    for conv in ("conv1", "conv2"):
        linear(f"model.encoder.{conv}", f"encoder/{conv}")
    out["model.encoder.embed_positions.weight"] = tensor("encoder/position_encodings/encodings")
    out["model.decoder.embed_tokens.weight"] = tensor("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = tensor("decoder/position_encodings/encodings")
    for stack in ("encoder", "decoder"):
        norm(f"model.{stack}.layer_norm", f"{stack}/layer_norm")
        for i in range(_count(variables, stack)):
            hf, ct = f"model.{stack}.layers.{i}", f"{stack}/layer_{i}"
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            split(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            linear(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            if stack == "decoder":
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
                linear(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                split(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
            linear(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct}/ffn/linear_1")
    return out


def _vocabulary(path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)  # type: ignore[no-any-return]


def _special_ids(vocab: dict[str, int], path: Path) -> tuple[int, int, int]:
    """Return the ids of ``<|endoftext|>``, ``<|startoftranscript|>`` and ``<|notimestamps|>`` in
    the vocabulary of Whisper tokenizer ``path``; raise :class:`HeadatlasError` when one is missing."""
    names = ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")
    missing = [n for n in names if n not in vocab]
    if missing:
        raise HeadatlasError(f"{path} has no {', '.join(missing)}: not a Whisper tokenizer")
    return vocab[names[0]], vocab[names[1]], vocab[names[2]]


def convert_whisper(source: Path, target: Path) -> None:
    """Write the CTranslate2 Whisper model in ``source`` (``model.bin``, ``config.json``,
    ``tokenizer.json``) as a Hugging Face checkpoint in ``target``: model, generation config (with
    OpenAI's ``alignment_heads``), tokenizer and feature extractor. Raises :class:`HeadatlasError`."""
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    spec, variables = read_model_bin(source / "model.bin")
    if spec != "WhisperSpec":
        raise HeadatlasError(f"{source} holds a CTranslate2 {spec}: only Whisper models convert")
    extra = json.loads((source / "config.json").read_text())
    vocab, width = variables["decoder/embeddings/weight"].shape
    vocabulary = _vocabulary(source / "tokenizer.json")
    eot, start, no_timestamps = _special_ids(vocabulary, source / "tokenizer.json")
    multilingual = "<|fr|>" in vocabulary
    heads = int(variables["encoder/num_heads"])
    config = WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(width),
        encoder_layers=_count(variables, "encoder"),
        decoder_layers=_count(variables, "decoder"),
        encoder_attention_heads=heads,
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=start,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(whisper_state_dict(variables), strict=False)
    if [m for m in missing if not m.endswith(("proj_out.weight", "k_proj.bias"))] or unexpected:
        raise HeadatlasError(f"{source}: weights missing {missing[:3]} / unexpected {unexpected[:3]}")
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=no_timestamps,
        suppress_tokens=extra.get("suppress_ids", []),
        begin_suppress_tokens=extra.get("suppress_ids_begin", []),
        alignment_heads=extra.get("alignment_heads", []),
        max_length=config.max_target_positions,
        is_multilingual=multilingual,
    )
    model.save_pretrained(target)
    special = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(source / "tokenizer.json"),
        bos_token=special,
        eos_token=special,
        unk_token=special,
        pad_token=special,
    )
    tokenizer.save_pretrained(target)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(target)
