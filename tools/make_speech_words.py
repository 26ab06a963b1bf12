"""Make ``src/headatlas/data/speech_words.npz``: synthetic speech with known word timings.

Each word of each sentence is spoken alone by espeak-ng (``apt-get install espeak-ng``; voice
en-us, 150 words per minute), resampled to 16 kHz, trimmed to where its amplitude first and last
exceeds 1% of full scale, and the words are joined with 80 ms of silence. A word's gold span is
exactly where its samples sit, so the ``speech`` battery can score a cross-attention head's
word alignment against timings known by construction. Run from the repository root::

    .venv/bin/python tools/make_speech_words.py

The file holds, per sentence i: ``audio_i`` (int16, 16 kHz), ``spans_i`` (``[word, 2]`` start and
end sample) and ``words`` (``[sentence]`` strings). It is regenerated only on purpose.
"""

from __future__ import annotations

import io
import subprocess
import wave
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "she sells sea shells by the sea shore",
    "please call stella and ask her to bring these things",
    "a large black cat sat quietly on the warm mat",
    "we will meet at the station before nine tomorrow",
    "my brother plays the guitar every evening",
    "the river flows slowly down to the sea",
    "open the window and let the fresh air in",
)
RATE = 16_000
GAP = np.zeros(int(0.08 * RATE), np.float32)


def spoken(word: str) -> np.ndarray:
    """Return ``word`` spoken by espeak-ng at 16 kHz, float32, trimmed to its sound."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", word], capture_output=True, check=True
    ).stdout
    with wave.open(io.BytesIO(wav)) as f:
        rate = f.getframerate()
        samples = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768
    audio = resample_poly(samples, RATE // 100, rate // 100)
    loud = np.nonzero(np.abs(audio) > 0.01)[0]
    return audio[loud[0] : loud[-1] + 1].astype(np.float32)


def main() -> None:
    arrays: dict[str, np.ndarray] = {"words": np.array(SENTENCES)}
    for i, sentence in enumerate(SENTENCES):
        parts, spans, at = [GAP], [], len(GAP)
        for word in sentence.split():
            audio = spoken(word)
            spans.append((at, at + len(audio)))
            parts += [audio, GAP]
            at += len(audio) + len(GAP)
        arrays[f"audio_{i}"] = (np.concatenate(parts) * 32767).astype(np.int16)
        arrays[f"spans_{i}"] = np.asarray(spans, dtype=np.int64)
    out = Path("src/headatlas/data/speech_words.npz")
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
