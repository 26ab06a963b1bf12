"""The ``speech`` battery: cross-attention of a speech encoder–decoder (Whisper) against word
timings known by construction.

The packaged ``data/speech_words.npz`` holds eight English sentences spoken word by word by
espeak-ng and joined with 80 ms pauses (``tools/make_speech_words.py``), so every word's samples
are known exactly. The encoder reads Whisper's log-mel features of the 30 s window; encoder frame
``f`` covers samples ``[f·320, (f+1)·320)`` (hop 160, then a stride-2 convolution). The decoder
reads the transcript by teacher forcing, framed as the tokenizer frames a text (Whisper:
``<|startoftranscript|><|notimestamps|> … <|endoftext|>``). A frame of word ``w`` is a "source
word" ``w`` and the gold alignment links target word ``w`` to it, so :mod:`headatlas.detectors.cross`'s
``alignment``/``alignment_error`` say whether a head's most-attended stretch of audio is the
word being written (the use OpenAI's ``alignment_heads`` have for word timestamps), and
``diagonal`` whether attention moves through the speech at the transcript's pace. Frames after
the speech (the window's silent padding) count as keys but not as positions.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import numpy as np
import torch

from ..core.errors import HeadatlasError
from ..data.sequences import encode_split_words, sequence_frame
from .base import CROSS_BASE, AttentionBatterySpec, Battery, BatterySettings, ProbeSequence

SAMPLE_RATE = 16_000
SAMPLES_PER_FRAME = 320
"""Audio samples per Whisper encoder frame (feature hop 160 × convolution stride 2)."""
SPEECH_DETECTORS = ("positional", "entropy", "distance")
"""Detectors on the encoder's and decoder's self-attention layers (no subword score over frames)."""


def _sentences() -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    path = resources.files("headatlas") / "data" / "speech_words.npz"
    with resources.as_file(path) as file, np.load(file, allow_pickle=False) as data:
        texts = [str(t) for t in data["words"]]
        return [(data[f"audio_{i}"], data[f"spans_{i}"], text.split()) for i, text in enumerate(texts)]


def speech_battery(loaded: Any) -> Battery:
    """Battery ``speech`` for a Whisper-style model: features, per-frame word ids, the transcript
    as the decoder target and one sure gold link per word (module docstring)."""
    from transformers import WhisperFeatureExtractor

    config = loaded.model.config
    extractor = WhisperFeatureExtractor(feature_size=int(config.num_mel_bins))
    frame = sequence_frame(loaded.tokenizer)
    start = getattr(config, "decoder_start_token_id", None)
    sequences = []
    for audio, spans, words in _sentences():
        features = extractor(audio.astype(np.float32) / 32767, sampling_rate=SAMPLE_RATE, return_tensors="np")
        n_frames = math.ceil(len(audio) / SAMPLES_PER_FRAME)
        frame_words = np.full(n_frames, -1, dtype=np.int64)
        for w, (first, last) in enumerate(spans):
            frame_words[first // SAMPLES_PER_FRAME : math.ceil(last / SAMPLES_PER_FRAME)] = w
        ids, word_ids = encode_split_words(loaded.tokenizer, words, target=True, leading_space=True)
        target, target_words = frame.wrap(ids, word_ids)
        if target and target[0] == start:  # the decoder reads the start token anyway
            target, target_words = target[1:], (target_words or [])[1:]
        sequences.append(
            ProbeSequence(
                (0,) * n_frames,
                tuple(int(w) for w in frame_words),
                tuple(target),
                tuple(target_words or ()),
                tuple((w, w, True) for w in range(len(words))),
                features=features["input_features"][0].astype(np.float32),
            )
        )
    params = {
        "source": "espeak-ng word by word (headatlas/data/speech_words.npz)",
        "n_sentences": len(sequences),
    }
    return Battery("speech", sequences, SPEECH_DETECTORS, params, cross_detectors=(*CROSS_BASE, "alignment"))


def speech_source(
    sequences: list[ProbeSequence], n_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the encoder side of a speech batch: ``features [batch, mel, 2·frame]``, frame
    ``positions [batch, frame]`` (−1 after the speech) and per-frame ``word_ids [batch, frame]``."""
    arrays = [s.features for s in sequences if s.features is not None]
    if len(arrays) != len(sequences):
        raise HeadatlasError("a speech batch needs features for every sequence")
    features = torch.from_numpy(np.stack(arrays))  # [batch, mel, 2·frame]
    positions = torch.full((len(sequences), n_frames), -1, dtype=torch.long)  # [batch, frame]
    words = torch.full((len(sequences), n_frames), -1, dtype=torch.long)  # [batch, frame]
    for row, s in enumerate(sequences):
        n = min(len(s.ids), n_frames)
        positions[row, :n] = torch.arange(n)
        words[row, :n] = torch.tensor((s.word_ids or (-1,) * n)[:n])
    return features, positions, words


def build(loaded: Any, _settings: BatterySettings) -> Battery:
    """The ``speech`` battery a scan runs (its sentences are packaged: no setting applies)."""
    return speech_battery(loaded)


SPEC = AttentionBatterySpec(
    "speech",
    SPEECH_DETECTORS,
    build,
    "synthetic speech with word timings known by construction (Whisper-style models)",
    reads="audio",
    cross=True,
)
