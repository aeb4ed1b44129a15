"""CNN-LSTM classifier: conv blocks over time chunks of the spectrogram, then a BiLSTM.

The layout of the CNN-LSTM SER literature (e.g. Facchinetti et al. 2024: a spectrogram cut
into time chunks, a shared conv stack per chunk, a BiLSTM over the chunk sequence): here the
LSTM's outputs are mean- and max-pooled over chunks rather than only the last state, which
uses every chunk of a variable-length input.
"""

from __future__ import annotations

from typing import Sequence

import keras

from ser_tf.models.layers import ChunkEncoder


def cnn_lstm_classifier(num_classes: int, bins: int, channels: int, *,
                        chunk_frames: int = 32, hop_frames: int = 16,
                        conv_filters: Sequence[int] = (16, 32, 64), chunk_units: int = 128,
                        lstm_units: int = 64, dropout: float = 0.3,
                        name: str = "cnn_lstm") -> keras.Model:
    """Builds the classifier network ``[batch, frames, bins, C]`` -> logits.

    Args:
      num_classes: number of emotions.
      bins: feature bins per frame.
      channels: feature channels.
      chunk_frames: frames per time chunk.
      hop_frames: hop between chunks.
      conv_filters: filters of each conv block.
      chunk_units: embedding size per chunk.
      lstm_units: units per direction of the BiLSTM.
      dropout: dropout rate (chunk embedding and before the output layer).
      name: model name.

    Returns:
      A functional Keras model returning logits.
    """
    inputs = keras.Input((None, bins, channels), name="features")
    x = ChunkEncoder(chunk_frames, hop_frames, conv_filters, units=chunk_units,
                     dropout=dropout, name="chunk_encoder")(inputs)
    x = keras.layers.Bidirectional(keras.layers.LSTM(lstm_units, return_sequences=True),
                                   name="bilstm")(x)
    pooled = keras.layers.Concatenate(name="pool")([
        keras.layers.GlobalAveragePooling1D(name="mean_pool")(x),
        keras.layers.GlobalMaxPooling1D(name="max_pool")(x)])
    x = keras.layers.Dropout(dropout, name="dropout")(pooled)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)
