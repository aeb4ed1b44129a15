"""CNN-LSTM classifier: conv blocks over time chunks of the spectrogram, then a BiLSTM.

The layout of the CNN-LSTM SER literature (e.g. Facchinetti et al. 2024: a spectrogram cut
into time chunks, a shared conv stack per chunk, a BiLSTM over the chunk sequence): here the
LSTM's outputs are mean- and max-pooled over chunks rather than only the last state, which
uses every chunk of a variable-length input.

With ``statistics=True`` a second branch summarises the whole input with utterance-level
functionals (:class:`~ser_tf.models.layers.UtteranceStatistics`) and the output layer reads
both: the functionals carry the global prosodic and spectral shape that the strongest
classical SER systems classify, the CNN-LSTM the local time-frequency patterns.
"""

from __future__ import annotations

from typing import Sequence

import keras

from ser_tf.models.layers import BASE_DESCRIPTORS, ChunkEncoder, UtteranceStatistics


def cnn_lstm_classifier(num_classes: int, bins: int, channels: int, *,
                        chunk_frames: int = 32, hop_frames: int = 16,
                        conv_filters: Sequence[int] = (16, 32, 64), chunk_units: int = 128,
                        lstm_units: int = 64, dropout: float = 0.3, statistics: bool = False,
                        n_cepstra: int = 20, stats_dropout: float = 0.5,
                        descriptors: Sequence[str] = BASE_DESCRIPTORS,
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
      statistics: add the utterance-functionals branch.
      n_cepstra: cepstral coefficients of that branch's descriptors.
      stats_dropout: dropout on the standardised functionals.
      descriptors: frame-level descriptors of that branch (see ``UtteranceStatistics``).
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
    if statistics:
        x = keras.layers.Concatenate(name="fuse")([
            x, statistics_branch(inputs, n_cepstra, stats_dropout, descriptors)])
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def statistics_branch(features, n_cepstra: int = 20, dropout: float = 0.5,
                      descriptors: Sequence[str] = BASE_DESCRIPTORS):
    """Utterance functionals of ``features``, standardised (BatchNorm) and dropped out."""
    x = UtteranceStatistics(n_cepstra, descriptors=descriptors, name="functionals")(features)
    x = keras.layers.BatchNormalization(momentum=0.9, name="functionals_bn")(x)
    return keras.layers.Dropout(dropout, name="functionals_dropout")(x)


def functionals_classifier(num_classes: int, bins: int, channels: int, *, n_cepstra: int = 20,
                           dropout: float = 0.5, descriptors: Sequence[str] = BASE_DESCRIPTORS,
                           name: str = "functionals") -> keras.Model:
    """Linear classifier on utterance functionals alone (the classical SER recipe, in-graph).

    Args:
      num_classes: number of emotions.
      bins: feature bins per frame.
      channels: feature channels (only the static channel is summarised).
      n_cepstra: cepstral coefficients of the descriptors.
      dropout: dropout on the standardised functionals.
      descriptors: frame-level descriptors (see ``UtteranceStatistics``).
      name: model name.

    Returns:
      A functional Keras model returning logits.
    """
    inputs = keras.Input((None, bins, channels), name="features")
    x = statistics_branch(inputs, n_cepstra, dropout, descriptors)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=name)
