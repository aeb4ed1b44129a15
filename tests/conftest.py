"""Shared fixtures: small generated audio files and a tiny synthetic corpus."""

from __future__ import annotations

import os
import wave
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EMODB_DIR = Path(os.environ.get(
    "SER_TF_EMODB", Path(__file__).resolve().parents[2] / "shared" / "data" / "emodb"))


def write_wav(path: str | os.PathLike, audio: np.ndarray, rate: int) -> str:
    """Writes float audio in [-1, 1] (``[samples]`` or ``[samples, channels]``) as 16-bit PCM."""
    audio = np.asarray(audio, np.float64)
    if audio.ndim == 1:
        audio = audio[:, None]
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(audio.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return str(path)


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amp * np.sin(2 * np.pi * freq * t)


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory):
    """A tiny synthetic corpus (4 speakers x 3 emotions x 3 utterances), generated once."""
    from ser_tf.data.synthetic import generate_corpus

    out = tmp_path_factory.mktemp("synthetic")
    return generate_corpus(out, emotions=("anger", "neutral", "sadness"), n_speakers=4,
                           utterances_per_speaker=3, min_duration_s=0.6, max_duration_s=1.2,
                           seed=0)


def require_emodb() -> Path:
    """The EmoDB folder, or skip the test with the reason."""
    if not (EMODB_DIR / "wav").is_dir():
        pytest.skip(f"EmoDB not found at {EMODB_DIR} (set SER_TF_EMODB to its folder)")
    return EMODB_DIR
