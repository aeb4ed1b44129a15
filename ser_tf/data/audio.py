"""Audio decoding and conditioning as graph functions (usable inside ``tf.data``).

Decoding uses tensorflow-io's audio readers, which sniff the container (WAV, FLAC, Ogg
Vorbis, MP3) and report the sample type and rate as tensors; we branch on the sample type
in-graph so one function decodes any file. The rest (down-mix, resampling to the model's
rate, silence trimming, level normalisation) is plain TF so it runs in parallel in
``tf.data`` and inside ``tf.function``.

Bad audio (unreadable, not audio, truncated, empty, silent, non-finite) raises a TF error
whose message names the problem; :mod:`ser_tf.data.pipeline` turns those into a per-file
report (``--on_bad_audio=skip|fail``).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf
import tensorflow_io as tfio
from tensorflow_io.python.ops import core_ops

from ser_tf.data.resample import resample

# Sample types the tfio readers return, and the scale that maps each to [-1, 1).
_SAMPLE_TYPES = ((tf.int16, 1.0 / 32768.0, 0.0), (tf.int32, 1.0 / 2147483648.0, 0.0),
                 (tf.float32, 1.0, 0.0), (tf.uint8, 1.0 / 128.0, -128.0),
                 (tf.int8, 1.0 / 128.0, 0.0), (tf.float64, 1.0, 0.0))

# Input rates resampled by the fast polyphase path (ser_tf.data.resample); any other rate
# falls back to tfio.audio.resample, which is correct but slow.
COMMON_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """How raw files become model input waveforms.

    Attributes:
      sample_rate: the model's rate; every file is resampled to it.
      trim_db: trim leading/trailing audio quieter than this many dB below the peak frame
        (None: no trimming).
      normalize: ``"peak"`` (scale the peak to ``level_db`` dBFS), ``"rms"`` (scale the RMS
        to ``level_db`` dBFS) or ``"none"``.
      level_db: target level for normalisation in dBFS.
      min_duration_s: audio shorter than this after trimming is reported as bad.
      resample_quality: ``"hq"`` or ``"fast"`` (see :func:`ser_tf.data.resample.resample`).
    """

    sample_rate: int = 16000
    trim_db: float | None = 30.0
    normalize: str = "peak"
    level_db: float = -1.0
    min_duration_s: float = 0.1
    resample_quality: str = "hq"

    def __post_init__(self):
        if self.normalize not in ("peak", "rms", "none"):
            raise ValueError(f"normalize must be peak, rms or none, got {self.normalize!r}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")


def decode_audio(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes an audio file of any supported format.

    Args:
      path: scalar string tensor, the file's path.

    Returns:
      ``(audio, rate)``: float32 ``[samples, channels]`` in [-1, 1] and the int64 rate.

    Raises:
      tf.errors.OpError: the file is missing, not audio, corrupt or truncated.
    """
    resource = core_ops.io_audio_readable_init(path)
    _, dtype_enum, rate = core_ops.io_audio_readable_spec(resource)

    def reader(dtype: tf.DType, scale: float, offset: float):
        def read():
            raw = core_ops.io_audio_readable_read(resource, 0, -1, dtype=dtype)
            return (tf.cast(raw, tf.float32) + offset) * scale
        return read

    known = tf.constant([t.as_datatype_enum for t, _, _ in _SAMPLE_TYPES], tf.int64)
    matches = tf.equal(known, tf.cast(dtype_enum, tf.int64))
    tf.debugging.assert_equal(tf.reduce_any(matches), True,
                              message="unsupported audio sample type")
    branch = tf.cast(tf.argmax(tf.cast(matches, tf.int32)), tf.int32)
    audio = tf.switch_case(branch, [reader(*t) for t in _SAMPLE_TYPES])
    audio = tf.ensure_shape(audio, [None, None])
    return audio, tf.cast(rate, tf.int64)


def to_mono(audio: tf.Tensor) -> tf.Tensor:
    """Down-mixes ``[samples, channels]`` to ``[samples]`` by averaging the channels."""
    return tf.reduce_mean(audio, axis=-1)


def resample_to(waveform: tf.Tensor, rate: tf.Tensor, target_rate: int,
                quality: str = "hq") -> tf.Tensor:
    """Resamples a mono waveform from a rate known only at run time to ``target_rate``.

    Common rates take the fast polyphase path (one compiled branch per rate, selected
    in-graph); others use ``tfio.audio.resample``.

    Args:
      waveform: ``[samples]`` float32.
      rate: scalar integer tensor, the waveform's rate.
      target_rate: the wanted rate (static).
      quality: quality of the polyphase path.

    Returns:
      ``[samples']`` float32 at ``target_rate``.
    """
    rate = tf.cast(rate, tf.int64)
    tf.debugging.assert_positive(rate, message="audio sample rate must be positive")
    rates = tf.constant(COMMON_RATES, tf.int64)
    matches = tf.equal(rates, rate)

    def fast(r: int):
        return lambda: resample(waveform, r, target_rate, quality=quality)

    def general():
        out = tfio.audio.resample(waveform[:, None], rate, target_rate)
        return out[:, 0]

    index = tf.where(tf.reduce_any(matches),
                     tf.cast(tf.argmax(tf.cast(matches, tf.int32)), tf.int32),
                     len(COMMON_RATES))
    out = tf.switch_case(index, [fast(r) for r in COMMON_RATES] + [general])
    return tf.ensure_shape(out, [None])


def trim_silence(waveform: tf.Tensor, top_db: float, frame_length: int = 1024,
                 hop_length: int = 256) -> tf.Tensor:
    """Removes leading and trailing frames quieter than ``top_db`` below the loudest frame.

    Frame energies are RMS over ``frame_length`` windows every ``hop_length`` samples (the
    rule ``librosa.effects.trim`` uses); the kept span runs from the first to the end of the
    last loud frame. Silent input comes back empty.

    Args:
      waveform: ``[samples]`` float32.
      top_db: threshold in dB below the peak frame.
      frame_length: analysis frame in samples.
      hop_length: hop between frames in samples.

    Returns:
      The trimmed waveform.
    """
    n = tf.shape(waveform)[0]
    padded = tf.pad(waveform, [[0, tf.maximum(0, frame_length - n)]])
    frames = tf.signal.frame(padded, frame_length, hop_length, pad_end=True)
    rms = tf.sqrt(tf.reduce_mean(tf.square(frames), axis=-1))
    peak = tf.reduce_max(rms)
    loud = tf.where(rms > tf.maximum(peak * 10.0 ** (-top_db / 20.0), 1e-10))[:, 0]
    empty = tf.equal(tf.size(loud), 0)
    start = tf.where(empty, 0, tf.cast(tf.reduce_min(loud), tf.int32) * hop_length)
    stop = tf.where(empty, 0, tf.minimum(
        n, (tf.cast(tf.reduce_max(loud), tf.int32)) * hop_length + frame_length))
    return waveform[start:stop]


def normalize_level(waveform: tf.Tensor, mode: str, level_db: float) -> tf.Tensor:
    """Scales a waveform so its peak or RMS sits at ``level_db`` dBFS (``mode="none"``: as is)."""
    if mode == "none":
        return waveform
    target = 10.0 ** (level_db / 20.0)
    if mode == "peak":
        current = tf.reduce_max(tf.abs(waveform))
    else:
        current = tf.sqrt(tf.reduce_mean(tf.square(waveform)))
    scaled = waveform * (target / tf.maximum(current, 1e-8))
    # RMS normalisation may push peaks past full scale; keep samples in the valid range.
    return tf.clip_by_value(scaled, -1.0, 1.0)


def load_waveform(path: tf.Tensor, config: AudioConfig) -> tf.Tensor:
    """File -> conditioned mono waveform at ``config.sample_rate`` (graph function).

    Decode, down-mix, check, resample, trim, check length, normalise level.

    Raises:
      tf.errors.InvalidArgumentError: the audio is empty, silent, too short or not finite
        (the message says which); decoding errors propagate from :func:`decode_audio`.
    """
    audio, rate = decode_audio(path)
    wave = to_mono(audio)
    tf.debugging.assert_greater(tf.size(wave), 0, message="empty audio (no samples)")
    tf.debugging.assert_all_finite(wave, message="audio has NaN or Inf samples")
    wave = resample_to(wave, rate, config.sample_rate, config.resample_quality)
    tf.debugging.assert_greater(tf.reduce_max(tf.abs(wave)), 1e-6,
                                message="silent audio (all samples zero)")
    if config.trim_db is not None:
        wave = trim_silence(wave, config.trim_db)
    min_samples = int(config.min_duration_s * config.sample_rate)
    tf.debugging.assert_greater_equal(tf.size(wave), max(1, min_samples),
                                      message="audio too short after trimming")
    return normalize_level(wave, config.normalize, config.level_db)
