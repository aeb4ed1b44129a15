"""Keras models for SER. Every model takes waveforms ``[batch, samples]`` and returns logits.

``build_model(name, ...)`` builds one by registry name (``cnn_lstm``, ``cnn``).
"""

from ser_tf.models.base import SERModel
from ser_tf.models.registry import MODELS, ModelConfig, build_model

__all__ = ["SERModel", "MODELS", "ModelConfig", "build_model"]
