"""The model every ser_tf job handles: frontend -> normalisation -> classifier -> logits.

:class:`SERModel` composes a waveform frontend (:mod:`ser_tf.frontend`), a feature
normaliser whose statistics are learned from the training split, optional SpecAugment,
and a classifier network over normalised features. It exposes the two halves separately
(:meth:`SERModel.features`, :meth:`SERModel.classify`) so that feature-domain attacks and
defenses can reach the classifier's input, while ``model(waveform)`` is the end-to-end,
differentiable waveform -> logits graph used for training, waveform attacks and export.
Softmax is deliberately absent: models return logits (serving adds the softmax).
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from ser_tf.frontend import FeatureNormalization, LogMelFrontend, SpecAugment


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
    """

    def __init__(self, frontend: LogMelFrontend, normalizer: FeatureNormalization,
                 classifier: keras.Model, specaugment: SpecAugment | None = None,
                 labels: Sequence[str] = (), segment_s: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.frontend = frontend
        self.normalizer = normalizer
        self.classifier = classifier
        self.specaugment = specaugment
        self.labels = tuple(labels)
        self.segment_s = float(segment_s)

    @property
    def sample_rate(self) -> int:
        """Input sample rate in Hz."""
        return self.frontend.sample_rate

    @property
    def segment_samples(self) -> int:
        """Training input length in samples."""
        return int(round(self.segment_s * self.sample_rate))

    def build(self, input_shape):
        feature_shape = self.frontend.compute_output_shape(tuple(input_shape))
        if not self.normalizer.built:
            self.normalizer.build(feature_shape)
        if self.specaugment is not None and not self.specaugment.built:
            self.specaugment.build(feature_shape)
        if not self.classifier.built:
            self.classifier.build(feature_shape)
        super().build(input_shape)

    def features(self, inputs, training: bool | None = None) -> tf.Tensor:
        """Normalised features ``[batch, frames, bins, C]`` (the classifier's input).

        Args:
          inputs: waveforms ``[batch, samples]``, or a dict with ``"waveform"`` and, for
            per-speaker normalisation, ``"norm_mean"``/``"norm_var"`` ``[batch, bins, C]``
            that replace the learned statistics.
          training: unused here (the frontend and normaliser behave the same).
        """
        if isinstance(inputs, dict):
            return self.normalizer(self.frontend(inputs["waveform"]),
                                   mean=inputs.get("norm_mean"), variance=inputs.get("norm_var"))
        return self.normalizer(self.frontend(inputs))

    def classify(self, features: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        """Logits from normalised features (SpecAugment applies only when training)."""
        if self.specaugment is not None:
            features = self.specaugment(features, training=training)
        return self.classifier(features, training=training)

    def call(self, inputs, training: bool | None = None) -> tf.Tensor:
        return self.classify(self.features(inputs, training=training), training=training)

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
        }

    @classmethod
    def from_config(cls, config: dict) -> "SERModel":
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        for key in ("frontend", "normalizer", "classifier"):
            config[key] = de(config[key])
        if config.get("specaugment") is not None:
            config["specaugment"] = de(config["specaugment"])
        return cls(**config)
