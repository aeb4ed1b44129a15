"""The model every ser_tf job handles: frontend -> normalisation -> classifier -> logits.

:class:`SERModel` composes a waveform frontend (:mod:`ser_tf.frontend`), a feature
normaliser whose statistics are learned from the training split, optional SpecAugment,
and a classifier network over normalised features. It exposes the two halves separately
(:meth:`SERModel.features`, :meth:`SERModel.classify`) so that feature-domain attacks and
defenses can reach the classifier's input, while ``model(waveform)`` is the end-to-end,
differentiable waveform -> logits graph used for training, waveform attacks and export.
Softmax is deliberately absent: models return logits (serving adds the softmax).

A model may be random at inference: with an :class:`ser_tf.frontend.InputNoise` layer
(the randomized input defense) every call adds fresh noise to the waveforms, and
``model(waveform)`` returns the logits averaged over the layer's ``draws``.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from ser_tf.frontend import FeatureNormalization, InputNoise, LogMelFrontend, SpecAugment


def mean_over_copies(fn, inputs, copies: int) -> tf.Tensor:
    """``fn`` of ``copies`` copies of ``inputs`` run as one batch, its outputs averaged per
    example: how a random model's draws are averaged (each copy gets its own randomness).

    Args:
      fn: a batch (a tensor or a nest of tensors with a leading batch axis) -> ``[B, C]``.
      inputs: the batch.
      copies: how many times each example goes through ``fn``.

    Returns:
      ``[B, C]``: per example, the mean of its copies' outputs.
    """
    batch = tf.shape(tf.nest.flatten(inputs)[0])[0]
    tiled = tf.nest.map_structure(lambda t: tf.concat([t] * copies, axis=0), inputs)
    return tf.reduce_mean(tf.reshape(fn(tiled), [copies, batch, -1]), axis=0)


@keras.saving.register_keras_serializable(package="ser_tf")
class SERModel(keras.Model):
    """Waveform ``[batch, samples]`` -> logits ``[batch, classes]``.

    Args:
      frontend: waveform -> features layer.
      normalizer: feature standardisation (adapted on the training split).
      classifier: network mapping normalised features ``[batch, frames, bins, C]`` to logits.
      specaugment: optional masking applied to normalised features when training.
      labels: class names, index order of the logits.
      segment_s: the fixed input length (seconds) the model was trained on; evaluation
        windows long utterances with it and averages the logits.
      purifier: optional network mapping normalised features to features of the same
        shape before the classifier (the GAN defense, :mod:`ser_tf.defenses.purifier`);
        part of :meth:`classify`, so feature- and waveform-domain attacks, saving and
        export all see it.
      noise: optional random noise added to the waveforms before the frontend, in training
        and at inference (:class:`ser_tf.frontend.InputNoise`).
    """

    def __init__(self, frontend: LogMelFrontend, normalizer: FeatureNormalization,
                 classifier: keras.Model, specaugment: SpecAugment | None = None,
                 labels: Sequence[str] = (), segment_s: float = 3.0,
                 purifier: keras.Model | None = None, noise: InputNoise | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.frontend = frontend
        self.normalizer = normalizer
        self.classifier = classifier
        self.specaugment = specaugment
        self.labels = tuple(labels)
        self.segment_s = float(segment_s)
        self.purifier = purifier
        self.noise = noise

    @property
    def sample_rate(self) -> int:
        """Input sample rate in Hz."""
        return self.frontend.sample_rate

    @property
    def segment_samples(self) -> int:
        """Training input length in samples."""
        return int(round(self.segment_s * self.sample_rate))

    @property
    def random(self) -> bool:
        """Whether the logits are random at inference (the model has input noise)."""
        return self.noise is not None

    def build(self, input_shape):
        if self.noise is not None and not self.noise.built:
            self.noise.build(tuple(input_shape))
        feature_shape = self.frontend.compute_output_shape(tuple(input_shape))
        if not self.normalizer.built:
            self.normalizer.build(feature_shape)
        if self.specaugment is not None and not self.specaugment.built:
            self.specaugment.build(feature_shape)
        if self.purifier is not None and not self.purifier.built:
            self.purifier.build(feature_shape)
        if not self.classifier.built:
            self.classifier.build(feature_shape)
        super().build(input_shape)

    def features(self, inputs, training: bool | None = None) -> tf.Tensor:
        """Normalised features ``[batch, frames, bins, C]`` (the classifier's input).

        Args:
          inputs: waveforms ``[batch, samples]``, or a dict with ``"waveform"`` and, for
            per-speaker normalisation, ``"norm_mean"``/``"norm_var"`` ``[batch, bins, C]``
            that replace the learned statistics.
          training: unused here (the frontend and normaliser behave the same; input
            noise, if any, is drawn in both modes, once per example).
        """
        if isinstance(inputs, dict):
            return self.normalizer(self.raw_features(inputs["waveform"]),
                                   mean=inputs.get("norm_mean"), variance=inputs.get("norm_var"))
        return self.normalizer(self.raw_features(inputs))

    def raw_features(self, waveform) -> tf.Tensor:
        """Features before normalisation ``[batch, frames, bins, C]``: the frontend's, of
        the waveforms with the input noise, if any (what the normaliser's statistics are
        learned from)."""
        if self.noise is not None:
            waveform = self.noise(waveform)
        return self.frontend(waveform)

    def classify(self, features: tf.Tensor, training: bool | None = None,
                 bpda: bool = False) -> tf.Tensor:
        """Logits from normalised features: the purifier if there is one, then SpecAugment
        (only when training), then the classifier.

        Args:
          features: normalised features ``[batch, frames, bins, C]``.
          training: training mode.
          bpda: differentiate through the purifier as if it were the identity (the
            straight-through BPDA of Athalye et al. 2018: ``x + stop_gradient(P(x) - x)``);
            the logits are unchanged. For attacks adapted to the purifier.
        """
        if self.purifier is not None:
            purified = self.purifier(features, training=training)
            features = (features + tf.stop_gradient(purified - features)) if bpda else purified
        if self.specaugment is not None:
            features = self.specaugment(features, training=training)
        return self.classifier(features, training=training)

    def call(self, inputs, training: bool | None = None, bpda: bool = False) -> tf.Tensor:
        draws = self.noise.draws if self.noise is not None and not training else 1
        if draws == 1:
            return self.classify(self.features(inputs, training=training), training=training,
                                 bpda=bpda)
        # Inference of a random model: every example ``draws`` times in one batch, each
        # with its own noise, and the logits averaged per example.
        return mean_over_copies(
            lambda batch: self.classify(self.features(batch, training=training),
                                        training=training, bpda=bpda), inputs, draws)

    def with_purifier(self, purifier: keras.Model) -> "SERModel":
        """A new model with the same (shared) layers and ``purifier`` before the classifier.

        Keras does not let a built model gain layers, so adding a purifier to a trained
        model makes a new one.
        """
        model = SERModel(self.frontend, self.normalizer, self.classifier,
                         specaugment=self.specaugment, labels=self.labels,
                         segment_s=self.segment_s, purifier=purifier, noise=self.noise,
                         name=self.name)
        model.build((None, self.segment_samples))
        return model

    def get_config(self) -> dict:
        ser = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "frontend": ser(self.frontend),
            "normalizer": ser(self.normalizer),
            "classifier": ser(self.classifier),
            "specaugment": ser(self.specaugment) if self.specaugment is not None else None,
            "labels": list(self.labels),
            "segment_s": self.segment_s,
            "purifier": ser(self.purifier) if self.purifier is not None else None,
            "noise": ser(self.noise) if self.noise is not None else None,
        }

    @classmethod
    def from_config(cls, config: dict) -> "SERModel":
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        for key in ("frontend", "normalizer", "classifier"):
            config[key] = de(config[key])
        for key in ("specaugment", "purifier", "noise"):
            if config.get(key) is not None:
                config[key] = de(config[key])
        return cls(**config)
