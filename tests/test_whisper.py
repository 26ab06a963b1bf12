"""Speech encoder–decoders (Whisper): capture on log-mel features exact against eager, the
CTranslate2 converter, the speech battery, and the packaged Whisper tiny.en's alignment heads
against OpenAI's published list."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import headatlas as ha
from conftest import requires_whisper
from headatlas.batteries.speech import speech_battery
from headatlas.core.errors import HeadatlasError
from headatlas.model.ct2 import convert_whisper, read_model_bin
from tiny_models import make_tokenizer, word_tokenizer
from tiny_seq2seq import eager_seq2seq, tiny_whisper


@pytest.fixture(scope="module")
def whisper() -> ha.LoadedModel:
    return ha.load(tiny_whisper(0), tokenizer=make_tokenizer())


def test_capture_on_features_equals_eager(whisper: ha.LoadedModel) -> None:
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    dec = torch.tensor([[0, 5, 6, 7, 8], [0, 9, 10, 2, 2]])
    dec_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    reference, _ = eager_seq2seq(whisper.model, features, None, dec, dec_mask)  # type: ignore[arg-type]
    maps = ha.attention_maps(
        whisper, features, torch.ones(2, 1500), decoder_input_ids=dec, decoder_attention_mask=dec_mask
    )
    assert whisper.info.attn_kinds == ("encoder",) * 2 + ("decoder",) * 2 + ("cross",) * 2
    for layer, probs in maps.items():
        rows = torch.ones(2, probs.shape[2], dtype=torch.bool) if layer < 2 else dec_mask.bool()
        err = ((probs - reference[layer]).abs() * rows[:, None, :, None]).max().item()
        assert err <= (1e-6 if layer == 0 else 5e-5), f"layer {layer}: {err}"
    assert maps[4].shape == (2, 4, 5, 1500), "cross-attention: target rows over encoder frames"


def test_speech_battery_scans_and_refuses_text_batteries(whisper: ha.LoadedModel, tmp_path: Path) -> None:
    battery = speech_battery(whisper)
    first = battery.sequences[0]
    assert first.features is not None and first.features.shape == (80, 3000)
    assert first.links == tuple((w, w, True) for w in range(9)), "one sure link per spoken word"
    assert max(first.word_ids or ()) == 8 and -1 in (first.word_ids or ()), "words and pauses"
    atlas = ha.scan(whisper, probes=("speech",), batch_size=4, out=tmp_path / "a")
    cross = atlas.table[atlas.table.attn_kind == "cross"]
    assert cross[["alignment", "alignment_error", "diagonal"]].notna().all().all()
    assert (cross["alignment_n"] == sum(len(s.links or ()) for s in battery.sequences)).all()
    with pytest.raises(HeadatlasError, match="reads audio"):
        ha.scan(whisper, probes=("natural",))


def _ct2_bytes(model: tf.WhisperForConditionalGeneration) -> bytes:
    """Write ``model`` as a CTranslate2 ``model.bin`` (float16, fused projections), the layout the
    converter reads: the test's own writer, so the round trip checks the reader and the mapping."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def put(name: str, value: np.ndarray) -> None:
        out[name] = value

    def norm(ct: str, hf: str) -> None:
        put(f"{ct}/gamma", sd[f"{hf}.weight"])
        put(f"{ct}/beta", sd[f"{hf}.bias"])

    def linear(ct: str, hf: str) -> None:
        put(f"{ct}/weight", sd[f"{hf}.weight"])
        put(f"{ct}/bias", sd[f"{hf}.bias"])

    cfg = model.config
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    put("encoder/position_encodings/encodings", sd["model.encoder.embed_positions.weight"])
    put("decoder/position_encodings/encodings", sd["model.decoder.embed_positions.weight"])
    put("decoder/embeddings/weight", sd["model.decoder.embed_tokens.weight"])
    put("encoder/num_heads", np.array(cfg.encoder_attention_heads, dtype=np.int32))
    put("decoder/num_heads", np.array(cfg.decoder_attention_heads, dtype=np.int32))
    for stack in ("encoder", "decoder"):
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        for i in range(2):
            ct, hf = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            zero = np.zeros(cfg.d_model, np.float32)
            a = f"{hf}.self_attn"
            put(
                f"{ct}/self_attention/linear_0/weight",
                np.concatenate([sd[f"{a}.{p}_proj.weight"] for p in "qkv"]),
            )
            put(
                f"{ct}/self_attention/linear_0/bias",
                np.concatenate([sd[f"{a}.q_proj.bias"], zero, sd[f"{a}.v_proj.bias"]]),
            )
            linear(f"{ct}/self_attention/linear_1", f"{a}.out_proj")
            norm(f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if stack == "decoder":
                c = f"{hf}.encoder_attn"
                linear(f"{ct}/attention/linear_0", f"{c}.q_proj")
                put(
                    f"{ct}/attention/linear_1/weight",
                    np.concatenate([sd[f"{c}.k_proj.weight"], sd[f"{c}.v_proj.weight"]]),
                )
                put(f"{ct}/attention/linear_1/bias", np.concatenate([zero, sd[f"{c}.v_proj.bias"]]))
                linear(f"{ct}/attention/linear_2", f"{c}.out_proj")
                norm(f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            norm(f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
            linear(f"{ct}/ffn/linear_0", f"{hf}.fc1")
            linear(f"{ct}/ffn/linear_1", f"{hf}.fc2")

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    blob = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<II", 3, len(out))
    for name, value in out.items():
        array = value.astype(np.int32 if value.dtype == np.int32 else np.float16)
        code = 3 if array.dtype == np.int32 else 4
        blob += string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        blob += struct.pack("<BI", code, array.nbytes) + array.tobytes()
    return blob + struct.pack("<I", 0)


def test_ctranslate2_whisper_converts_to_the_same_model(tmp_path: Path) -> None:
    original = tiny_whisper(3)
    with torch.no_grad():  # float16 in the file: make the original exactly representable
        for param in original.parameters():
            param.copy_(param.half().float())
    source = tmp_path / "ct2"
    source.mkdir()
    (source / "model.bin").write_bytes(_ct2_bytes(original))
    (source / "config.json").write_text(
        '{"alignment_heads": [[1, 2]], "suppress_ids": [], "suppress_ids_begin": []}'
    )
    specials = (
        "<|endoftext|>",
        "<|startoftranscript|>",
        "<|notimestamps|>",
        "<bos>",
        "<eos>",
        "<pad>",
        "<unk>",
    )
    words = (*specials, *(f"w{i}" for i in range(original.config.vocab_size - len(specials))))
    word_tokenizer(words).backend_tokenizer.save(str(source / "tokenizer.json"))
    spec, variables = read_model_bin(source / "model.bin")
    assert spec == "WhisperSpec" and variables["encoder/num_heads"] == 4
    convert_whisper(source, tmp_path / "hf")
    converted = ha.load(str(tmp_path / "hf"))
    assert converted.model.generation_config.alignment_heads == [[1, 2]]
    assert (
        converted.model.config.decoder_start_token_id,
        converted.model.generation_config.no_timestamps_token_id,
    ) == (1, 2)
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    dec = torch.tensor([[converted.model.config.decoder_start_token_id, 5, 6]])
    with torch.no_grad():
        want = original.eval()(input_features=features, decoder_input_ids=dec).logits
        got = converted.model(input_features=features, decoder_input_ids=dec).logits
    assert torch.allclose(got, want, atol=1e-5)
    (source / "model.bin").write_bytes(b"\x06\x00\x00\x00 not a model")
    with pytest.raises(HeadatlasError, match=r"not a CTranslate2 model\.bin"):
        read_model_bin(source / "model.bin")


@pytest.mark.slow
@requires_whisper
def test_packaged_whisper_alignment_heads_agree_with_openais(tmp_path: Path) -> None:
    """The heads OpenAI lists for word timestamps (generation_config.alignment_heads) align spoken
    words better than the other cross-attention heads, and the best heads align almost every word."""
    loaded = ha.load("whisper-tiny-en")
    published = {tuple(pair) for pair in loaded.model.generation_config.alignment_heads}
    assert len(published) == 8
    atlas = ha.scan(loaded, probes=("speech",), batch_size=4, out=tmp_path / "whisper")
    cross = atlas.table[atlas.table.attn_kind == "cross"]
    listed = np.array(
        [
            (int(layer), int(head)) in published
            for layer, head in zip(cross.stack_layer, cross["head"], strict=True)
        ]
    )
    assert cross.alignment[listed].mean() > cross.alignment[~listed].mean() + 0.15
    assert cross.alignment.nlargest(2).min() >= 0.9
    assert cross.alignment_error.min() <= 0.05
