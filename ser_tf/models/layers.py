"""Building-block layers shared by the classifiers."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf


def conv_block(filters: int, kernel: int, pool: tuple[int, int], name: str) -> list:
    """Conv2D (no bias) -> BatchNorm -> ReLU -> MaxPool, as a list of layers."""
    return [
        keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False,
                            name=f"{name}_conv"),
        # Momentum 0.9: SER corpora give few steps per epoch, and with the default 0.99 the
        # moving statistics used at evaluation lag far behind the weights for many epochs.
        keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn"),
        keras.layers.Activation("relu", name=f"{name}_relu"),
        keras.layers.MaxPooling2D(pool, padding="same", name=f"{name}_pool"),
    ]


@keras.saving.register_keras_serializable(package="ser_tf")
class ChunkEncoder(keras.layers.Layer):
    """Cut a feature map into time chunks and encode each chunk with the same conv stack.

    ``[batch, frames, bins, C]`` -> ``[batch, chunks, units]``. This is the
    TimeDistributed conv stage of the CNN-LSTM SER models, done as one batched conv over
    ``batch * chunks`` images (a reshape, not a per-step loop, so it is fast and exports to
    TFLite built-ins). Inputs shorter than one chunk are zero-padded to one chunk.

    Args:
      chunk_frames: frames per chunk.
      hop_frames: frames between chunk starts (``< chunk_frames`` overlaps chunks).
      filters: conv filters per block; each block halves time and frequency.
      kernel_sizes: kernel per block (defaults to 5 for the first block, 3 after).
      units: size of each chunk's embedding (a Dense after flattening the last block).
      dropout: dropout before the embedding.
    """

    def __init__(self, chunk_frames: int = 32, hop_frames: int = 16,
                 filters: Sequence[int] = (16, 32, 64), kernel_sizes: Sequence[int] = (),
                 units: int = 128, dropout: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        if chunk_frames < 1 or hop_frames < 1:
            raise ValueError("chunk_frames and hop_frames must be positive")
        self.chunk_frames = int(chunk_frames)
        self.hop_frames = int(hop_frames)
        self.filters = [int(f) for f in filters]
        self.kernel_sizes = [int(k) for k in kernel_sizes] or [5] + [3] * (len(filters) - 1)
        if len(self.kernel_sizes) != len(self.filters):
            raise ValueError("kernel_sizes must have one entry per conv block")
        self.units = int(units)
        self.dropout = float(dropout)
        stack = []
        for i, (f, k) in enumerate(zip(self.filters, self.kernel_sizes)):
            stack += conv_block(f, k, (2, 2), name=f"block{i + 1}")
        stack += [keras.layers.Flatten(name="flatten"),
                  keras.layers.Dropout(self.dropout, name="dropout"),
                  keras.layers.Dense(self.units, activation="relu", name="embed")]
        self.encoder = keras.Sequential(stack, name="chunk_conv")

    def build(self, input_shape):
        self.encoder.build((None, self.chunk_frames) + tuple(input_shape[2:]))
        super().build(input_shape)

    def num_chunks(self, frames: tf.Tensor) -> tf.Tensor:
        return 1 + tf.maximum(0, frames - self.chunk_frames) // self.hop_frames

    def call(self, features: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        shape = tf.shape(features)
        short = tf.maximum(0, self.chunk_frames - shape[1])
        features = tf.pad(features, [[0, 0], [0, short], [0, 0], [0, 0]])
        chunks = tf.signal.frame(features, self.chunk_frames, self.hop_frames, axis=1)
        n = tf.shape(chunks)[1]
        flat = tf.reshape(chunks, tf.concat([[-1, self.chunk_frames], shape[2:]], 0))
        flat.set_shape([None, self.chunk_frames] + list(features.shape[2:]))
        encoded = self.encoder(flat, training=training)
        return tf.reshape(encoded, [shape[0], n, self.units])

    def compute_output_shape(self, input_shape):
        frames = input_shape[1]
        chunks = None
        if frames is not None:
            chunks = 1 + max(0, frames - self.chunk_frames) // self.hop_frames
        return (input_shape[0], chunks, self.units)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(chunk_frames=self.chunk_frames, hop_frames=self.hop_frames,
                      filters=self.filters, kernel_sizes=self.kernel_sizes, units=self.units,
                      dropout=self.dropout)
        return config
