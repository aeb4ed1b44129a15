"""One interface over every form of a trained model: Keras, SavedModel and TFLite.

A :class:`Predictor` takes raw mono audio at the model's rate, conditions it and cuts it
into windows exactly as training evaluated utterances (:mod:`ser_tf.data.audio`,
:mod:`ser_tf.data.pipeline`), runs its artifact on the windows and averages their logits.
The SavedModel does all of that inside its own graph (its ``serving_default``); for Keras
and TFLite, which take fixed-length windows, the predictor does it with the same TF ops.
:meth:`Predictor.window_logits` exposes the artifact's window classifier itself, which is
what attacks on an artifact query.

``load_predictor(path)`` opens a SavedModel folder or a ``.tflite`` file written by
``ser-export``; :func:`read_audio` decodes any file the pipeline decodes (WAV, FLAC, Ogg,
MP3; any rate; mono or stereo) into a predictor's input.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from ser_tf.data.audio import (AudioConfig, AudioHeaderError, condition, load_waveform,
                               read_audio_header)
from ser_tf.data.pipeline import error_reason, utterance_windows
from ser_tf.serving.spec import ServingSpec


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of logits ``[..., classes]`` (float64)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


class InputError(ValueError):
    """A waveform a model cannot take (wrong shape, type, or no samples)."""


def check_waveform(waveform, sample_rate: int) -> np.ndarray:
    """A predictor's input as float32 ``[samples]``, or a clear :class:`InputError`."""
    x = np.asarray(waveform)
    expected = f"a 1-D float32 array of mono samples in [-1, 1] at {sample_rate} Hz"
    if x.dtype.kind != "f":
        hint = (f" (integer PCM: divide by {2 ** (8 * x.dtype.itemsize - 1)} first)"
                if x.dtype.kind in "iu" else "")
        raise InputError(f"expected {expected}, got dtype {x.dtype}{hint}")
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise InputError(f"expected {expected}, got shape {x.shape}"
                         + (" (mix the channels down first)" if x.ndim == 2 else ""))
    if x.size == 0:
        raise InputError("the waveform has no samples")
    if not np.isfinite(x).all():
        raise InputError("the waveform has NaN or Inf samples")
    return x.astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A model's answer for one utterance."""

    label: str
    probabilities: dict
    windows: int

    def to_dict(self) -> dict:
        return {"label": self.label, "probabilities": self.probabilities,
                "windows": self.windows}


class Predictor:
    """Base class: conditioning, windowing and averaging around a window classifier.

    Args:
      spec: the model's serving spec.

    Attributes:
      kind: ``keras``, ``savedmodel`` or ``tflite``.
      spec: the serving spec.
    """

    kind = "base"

    def __init__(self, spec: ServingSpec):
        self.spec = spec
        self._prepare = tf.function(
            lambda wave: utterance_windows(condition(wave, spec.audio), spec.segment_samples,
                                           spec.hop_samples, spec.pad_mode),
            input_signature=[tf.TensorSpec([None], tf.float32)])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.spec.labels)

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    def windows(self, waveform) -> np.ndarray:
        """The conditioned windows ``[n, segment_samples]`` of a raw waveform.

        Raises:
          InputError: a bad waveform, or audio that conditioning rejects (silent, too
            short after trimming).
        """
        wave = check_waveform(waveform, self.sample_rate)
        try:
            return self._prepare(wave).numpy()
        except tf.errors.InvalidArgumentError as err:
            raise InputError(error_reason(err)) from None

    def window_logits(self, windows) -> np.ndarray:
        """Logits ``[n, classes]`` of fixed-length windows ``[n, segment_samples]``."""
        raise NotImplementedError

    def utterance_logits(self, waveform) -> tuple[np.ndarray, int]:
        """Mean window logits ``[classes]`` of a raw waveform, and the number of windows."""
        windows = self.windows(waveform)
        return self.window_logits(windows).mean(axis=0), len(windows)

    def predict(self, waveform) -> Prediction:
        """The emotion and class probabilities of a raw mono waveform at the model's rate."""
        logits, count = self.utterance_logits(waveform)
        p = softmax(logits)
        return Prediction(self.labels[int(np.argmax(p))],
                          {c: float(v) for c, v in zip(self.labels, p)}, count)

    def _check_windows(self, windows) -> np.ndarray:
        w = np.asarray(windows, np.float32)
        if w.ndim != 2 or w.shape[1] != self.spec.segment_samples:
            raise InputError(f"expected windows [n, {self.spec.segment_samples}], got shape "
                             f"{w.shape}")
        return w


class KerasPredictor(Predictor):
    """A Keras :class:`~ser_tf.models.SERModel` (the reference every artifact is checked
    against)."""

    kind = "keras"

    def __init__(self, model, spec: ServingSpec, batch_size: int = 64):
        super().__init__(spec)
        self.model = model
        self.batch_size = batch_size
        self._forward = tf.function(lambda x: model(x, training=False))

    def window_logits(self, windows) -> np.ndarray:
        w = self._check_windows(windows)
        return np.concatenate([self._forward(w[i:i + self.batch_size]).numpy()
                               for i in range(0, len(w), self.batch_size)])


class SavedModelPredictor(Predictor):
    """A serving SavedModel: utterances go through its own ``serving_default`` graph."""

    kind = "savedmodel"

    def __init__(self, path: str, batch_size: int = 64):
        super().__init__(ServingSpec.read(path))
        self.path = path
        self.batch_size = batch_size
        self._loaded = tf.saved_model.load(path)
        self._serve = self._loaded.signatures["serving_default"]
        self._classify = self._loaded.signatures["classify_windows"]

    def window_logits(self, windows) -> np.ndarray:
        w = self._check_windows(windows)
        return np.concatenate([self._classify(windows=tf.constant(w[i:i + self.batch_size]))
                               ["logits"].numpy() for i in range(0, len(w), self.batch_size)])

    def utterance_logits(self, waveform) -> tuple[np.ndarray, int]:
        wave = check_waveform(waveform, self.sample_rate)
        try:
            out = self._serve(waveform=tf.constant(wave))
        except tf.errors.InvalidArgumentError as err:
            raise InputError(error_reason(err)) from None
        return out["logits"].numpy(), int(out["windows"])


class TFLitePredictor(Predictor):
    """A ``.tflite`` model (one window, batch 1) in ``tf.lite.Interpreter``.

    Args:
      path: the ``.tflite`` file (its ``serving.json`` beside it).
      num_threads: interpreter threads (1 measures single-core latency).
    """

    kind = "tflite"

    def __init__(self, path: str, num_threads: int = 1):
        super().__init__(ServingSpec.read(path))
        self.path = path
        self.interpreter = tf.lite.Interpreter(model_path=path, num_threads=num_threads)
        self._runner = self.interpreter.get_signature_runner()
        shape = tuple(self._runner.get_input_details()["waveform"]["shape"])
        if shape != (1, self.spec.segment_samples):
            raise ValueError(f"{path} takes input {shape}, its serving.json says windows of "
                             f"{self.spec.segment_samples} samples")

    def window_logits(self, windows) -> np.ndarray:
        w = self._check_windows(windows)
        return np.stack([self._runner(waveform=row[None])["logits"][0] for row in w])


def load_predictor(path: str, num_threads: int = 1) -> Predictor:
    """Opens an artifact written by ``ser-export``: a SavedModel folder or a ``.tflite``.

    Raises:
      FileNotFoundError: nothing at ``path``, or its ``serving.json`` is missing.
      ValueError: ``path`` is neither kind of artifact.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model at {path}")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ValueError(f"{path} is a folder but not a SavedModel (no saved_model.pb)")
        return SavedModelPredictor(path)
    if path.endswith(".tflite"):
        return TFLitePredictor(path, num_threads=num_threads)
    raise ValueError(f"{path}: expected a SavedModel folder or a .tflite file")


@functools.lru_cache(maxsize=None)
def _reader(sample_rate: int, file_rate: int, wav_format: str | None):
    """The pipeline's own file loader, built for one file rate and format (a small graph:
    one resampler, one decoder), with conditioning switched off (predictors condition)."""
    config = AudioConfig(sample_rate=sample_rate, trim_db=None, normalize="none",
                         min_duration_s=0.0)
    return tf.function(
        lambda path: load_waveform(path, config, rate=file_rate, wav_format=wav_format),
        input_signature=[tf.TensorSpec([], tf.string)])


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    """Decodes an audio file (WAV, FLAC, Ogg Vorbis, MP3; any rate; any channels) to mono
    float32 at ``sample_rate``, unconditioned (predictors condition it).

    Raises:
      InputError: the file is missing, unreadable, corrupt, empty, silent or not audio.
    """
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    try:
        header = read_audio_header(path)
    except (OSError, AudioHeaderError) as err:
        raise InputError(str(err)) from None
    try:
        reader = _reader(int(sample_rate), header.rate, header.wav_format)
        return reader(tf.constant(path)).numpy()
    except tf.errors.OpError as err:
        raise InputError(error_reason(err)) from None
