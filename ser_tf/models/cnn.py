"""Compact CNN classifier: conv blocks over the whole spectrogram, global pooling, dense.

A small, fast model with no recurrence: a useful baseline and the friendliest to edge
conversion (only conv, pooling and dense ops).
"""

from __future__ import annotations

from typing import Sequence

import keras

from ser_tf.models.layers import conv_block


def cnn_classifier(num_classes: int, bins: int, channels: int, *,
                   conv_filters: Sequence[int] = (16, 32, 64, 64), dense_units: int = 64,
                   dropout: float = 0.3, name: str = "cnn") -> keras.Model:
    """Builds the classifier network ``[batch, frames, bins, C]`` -> logits.

    Args:
      num_classes: number of emotions.
      bins: feature bins per frame.
      channels: feature channels.
      conv_filters: filters of each conv block (each halves time and frequency).
      dense_units: width of the hidden dense layer.
      dropout: dropout rate before the dense layers.
      name: model name.

    Returns:
      A functional Keras model returning logits.
    """
    inputs = keras.Input((None, bins, channels), name="features")
    x = inputs
    for i, f in enumerate(conv_filters):
        for layer in conv_block(f, 5 if i == 0 else 3, (2, 2), name=f"block{i + 1}"):
            x = layer(x)
    # Average pooling only: a global max over a whole batch-normalised map starts training
    # with logits several times too large (initial loss ~4.7 instead of ln 7), and the model
    # never recovered on EmoDB.
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(pooled)
    x = keras.layers.Dense(dense_units, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(dropout, name="dropout_hidden")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)
