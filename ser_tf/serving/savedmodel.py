"""SavedModel export: the serving model for raw audio, and the fixed-length edge graph.

Two graphs come from one trained :class:`~ser_tf.models.SERModel`:

* :func:`export_savedmodel`, the serving SavedModel. ``serving_default`` takes a float32
  waveform ``[samples]`` of any length at the model's rate (another rank or dtype is
  rejected with an error that says what it expects), conditions it as training did
  (trim, level), cuts it into windows, averages the window logits and returns the class
  probabilities and the emotion label; ``classify_windows`` maps fixed-length windows
  ``[batch, segment_samples]`` to logits and probabilities (for batch scoring and for
  attacks on the artifact).
* :func:`export_edge_savedmodel`, the graph TFLite is converted from: one window, batch
  1, recurrent layers unrolled (:func:`fixed_length_model`), so every op maps to a TFLite
  built-in and integer calibration does not meet a WHILE loop (which segfaults in TF 2.16).

Both are written with Keras' ``ExportArchive``: on TF 2.16 with Keras 3 it is the path
whose SavedModels the TFLite converter accepts (DESIGN.md).
"""

from __future__ import annotations

import os
import shutil

import keras
import tensorflow as tf

from ser_tf.data.audio import condition
from ser_tf.data.pipeline import utterance_windows
from ser_tf.serving.spec import SPEC_FILE, ServingSpec

RECURRENT_LAYERS = ("LSTM", "GRU", "SimpleRNN")


def _fix_for_edge(config, frames: int) -> int:
    """Unrolls recurrent layers and fixes the classifier input to one window, in place.

    Returns:
      The number of classifier inputs fixed.
    """
    fixed = 0
    if isinstance(config, dict):
        name = config.get("class_name")
        inner = config.get("config")
        if name in RECURRENT_LAYERS and isinstance(inner, dict):
            inner["unroll"] = True
        if name == "InputLayer" and isinstance(inner, dict) and "batch_shape" in inner:
            inner["batch_shape"] = [1, frames] + list(inner["batch_shape"][2:])
            fixed += 1
        for value in config.values():
            fixed += _fix_for_edge(value, frames)
    elif isinstance(config, list):
        for value in config:
            fixed += _fix_for_edge(value, frames)
    return fixed


def fixed_length_model(model) -> keras.Model:
    """The same model (same weights) for one window of ``model.segment_samples``, batch 1,
    its recurrent layers unrolled.

    Args:
      model: a built :class:`~ser_tf.models.SERModel`.

    Returns:
      A new SERModel whose outputs equal ``model``'s on ``[1, segment_samples]`` inputs.
    """
    config = keras.saving.serialize_keras_object(model)
    frames = model.frontend.num_frames(model.segment_samples)
    _fix_for_edge(config["config"]["classifier"], frames)
    edge = keras.saving.deserialize_keras_object(config)
    edge.build((1, model.segment_samples))
    edge.set_weights(model.get_weights())
    return edge


def _write(archive: keras.export.ExportArchive, path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    archive.write_out(path, verbose=False)


def export_savedmodel(model, spec: ServingSpec, path: str) -> str:
    """Writes the serving SavedModel (see the module docstring) to ``path``.

    Args:
      model: the trained SERModel.
      spec: its serving spec (a copy goes into ``path/assets.extra/serving.json``).
      path: output folder (replaced if it exists).

    Returns:
      ``path``.
    """
    if tuple(spec.labels) != tuple(model.labels) or spec.sample_rate != model.sample_rate:
        raise ValueError("the serving spec does not describe this model")
    labels = tf.constant(list(spec.labels))
    segment, hop = spec.segment_samples, spec.hop_samples

    def outputs(logits):
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    expected = (f"waveform must be 1-D: mono float32 samples in [-1, 1] at "
                f"{spec.sample_rate} Hz")

    def serve(waveform):
        # The signature takes any rank so that a wrong one fails with this message rather
        # than deep inside the graph.
        # Each check gates the ops after it (control dependencies): otherwise an op on
        # bad input, e.g. a division by the length, may fail first with a cryptic error.
        with tf.control_dependencies([tf.debugging.assert_equal(tf.rank(waveform), 1,
                                                                message=expected)]):
            wave = tf.reshape(waveform, [-1])
        with tf.control_dependencies([tf.debugging.assert_positive(
                tf.size(wave), message="the waveform has no samples")]):
            wave = tf.identity(wave)
        wave = condition(wave, spec.audio)
        windows = utterance_windows(wave, segment, hop, spec.pad_mode)
        logits = tf.reduce_mean(model(windows, training=False), axis=0)
        index = tf.argmax(logits, output_type=tf.int32)
        return dict(outputs(logits), label=tf.gather(labels, index), label_index=index,
                    windows=tf.shape(windows)[0])

    def classify_windows(windows):
        return outputs(model(windows, training=False))

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[
        tf.TensorSpec(None, tf.float32, name="waveform")])
    archive.add_endpoint("classify_windows", classify_windows, input_signature=[
        tf.TensorSpec([None, segment], tf.float32, name="windows")])
    _write(archive, path)
    spec.write(os.path.join(path, "assets.extra"))
    return path


def export_edge_savedmodel(model, path: str) -> str:
    """Writes the fixed-length edge graph ``waveform [1, segment_samples]`` ->
    ``{"logits", "probabilities"}`` (the TFLite converter's input) to ``path``."""
    edge = fixed_length_model(model)

    def serve(waveform):
        logits = edge(waveform, training=False)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(edge)
    archive.add_endpoint("serving_default", serve, input_signature=[
        tf.TensorSpec([1, model.segment_samples], tf.float32, name="waveform")])
    _write(archive, path)
    return path


__all__ = ["SPEC_FILE", "export_savedmodel", "export_edge_savedmodel", "fixed_length_model"]
