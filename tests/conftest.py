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


def write_wav_encoded(path: str | os.PathLike, audio: np.ndarray, rate: int, encoding: str,
                      extensible: bool = False, list_chunk_first: bool = False,
                      chunk_before_data: bool = False) -> str:
    """Writes float audio in [-1, 1] as a WAV file of any supported sample encoding.

    Args:
      path: output file.
      audio: ``[samples]`` (mono) or ``[samples, channels]`` float audio.
      rate: sample rate.
      encoding: ``"pcm8"`` (unsigned), ``"pcm16"``, ``"pcm24"``, ``"pcm32"`` or ``"float32"``.
      extensible: write a WAVE_FORMAT_EXTENSIBLE ``fmt `` chunk (the encoding in its
        sub-format GUID).
      list_chunk_first: put a ``LIST`` chunk (odd size, padded) before ``fmt ``.
      chunk_before_data: put a ``fact`` chunk between ``fmt `` and ``data``.

    Returns:
      The path as a string.
    """
    import struct

    x = np.clip(np.asarray(audio, np.float64), -1.0, 1.0)
    if encoding == "pcm8":
        data, tag, bits = np.round(x * 127.0 + 128.0).astype(np.uint8).tobytes(), 1, 8
    elif encoding == "pcm16":
        data, tag, bits = np.round(x * 32767.0).astype("<i2").tobytes(), 1, 16
    elif encoding == "pcm24":
        ints = np.round(x * 8388607.0).astype("<i4")
        data = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
        tag, bits = 1, 24
    elif encoding == "pcm32":
        data, tag, bits = np.round(x * 2147483647.0).astype("<i4").tobytes(), 1, 32
    elif encoding == "float32":
        data, tag, bits = x.astype("<f4").tobytes(), 3, 32
    else:
        raise ValueError(f"unknown encoding {encoding!r}")
    channels = x.shape[1] if x.ndim == 2 else 1
    block = bits // 8 * channels
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block,
                      block, bits)
    if extensible:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 4) + struct.pack("<H", tag) + guid_tail
    chunks = b""
    if list_chunk_first:
        chunks += b"LIST" + struct.pack("<I", 5) + b"INFOx\x00"
    chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
    if chunk_before_data:
        chunks += b"fact" + struct.pack("<I", 4) + struct.pack("<I", len(x))
    chunks += b"data" + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) % 2)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)
    return str(path)


TONE_LABELS = ("low", "mid", "high")


def tone_dataset(n_per_class: int, seed: int, rate: int = 8000,
                 seconds: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of harmonic tones (low, mid, high pitch) with random phase, level and
    noise: ``(waves [N, samples] float32 in [-1, 1], labels [N] int32)``."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(rate * seconds))) / rate
    waves, labels = [], []
    for label, (lo, hi) in enumerate(((120.0, 180.0), (350.0, 450.0), (900.0, 1100.0))):
        for _ in range(n_per_class):
            f0 = rng.uniform(lo, hi)
            x = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
                    for h in (1, 2, 3))
            x = x / np.abs(x).max() * rng.uniform(0.3, 0.8)
            x += rng.normal(0.0, 0.01, x.shape)
            waves.append(np.clip(x, -1.0, 1.0))
            labels.append(label)
    return np.asarray(waves, np.float32), np.asarray(labels, np.int32)


def fit_tone_model(config, *, n_per_class: int = 40, epochs: int = 15,
                   learning_rate: float = 3e-3):
    """A :class:`ser_tf.models.SERModel` built from ``config`` (seed 0), its normaliser
    adapted on :func:`tone_dataset` (seed 0) and trained on it with Adam, batch 20."""
    import keras

    from ser_tf.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(config, TONE_LABELS, seed=0)
    x_train, y_train = tone_dataset(n_per_class, seed=0)
    model.normalizer.adapt([model.raw_features(x_train)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=20, epochs=epochs, verbose=0, shuffle=True)
    return model


@pytest.fixture(scope="session")
def tone_model():
    """A tiny compact-CNN SERModel (8 kHz, 0.5 s) trained to near-perfect accuracy on
    :func:`tone_dataset`; returns ``(model, x_test, y_test)`` with 10 test tones per class."""
    import tensorflow as tf

    from ser_tf.models import ModelConfig

    config = ModelConfig(name="cnn", sample_rate=8000, segment_s=0.5, n_mels=24,
                         conv_filters=(8, 16), dense_units=16, dropout=0.0,
                         specaugment=False)
    model = fit_tone_model(config)
    x_test, y_test = tone_dataset(10, seed=1)
    accuracy = float(np.mean(np.argmax(model(x_test), -1) == y_test))
    assert accuracy >= 0.9, f"the tone model did not learn (test accuracy {accuracy:.2f})"
    return model, tf.constant(x_test), tf.constant(y_test)
