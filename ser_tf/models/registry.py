"""Model registry: build a complete :class:`SERModel` by name from a :class:`ModelConfig`."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import keras

from ser_tf.frontend import FeatureNormalization, InputNoise, LogMelFrontend, SpecAugment
from ser_tf.models.base import SERModel
from ser_tf.models.cnn import cnn_classifier
from ser_tf.models.cnn_lstm import cnn_lstm_classifier, functionals_classifier
from ser_tf.models.layers import BASE_DESCRIPTORS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model; apps fill it from flags.

    Attributes:
      name: registry name of the classifier (see :data:`MODELS`).
      sample_rate: input sample rate in Hz.
      segment_s: training input length in seconds.
      n_mels: mel bands of the frontend.
      n_mfcc: 0 for log-mel, else MFCCs to keep.
      use_deltas: add delta and delta-delta channels.
      frame_ms: analysis window in milliseconds.
      hop_ms: frame hop in milliseconds.
      fmin: lowest mel edge in Hz.
      per_utterance_norm: subtract each utterance's feature mean (see FeatureNormalization).
      log_floor: added to the mel power before the log. Larger floors make the features
        of quiet frames (and of tiny perturbations there) flatter: a frontend less
        sensitive to low-level adversarial noise.
      specaugment: enable SpecAugment during training.
      input_noise_db: 0 for none, else Gaussian noise at this level (dB below each
        waveform's peak) added before the frontend in training and at inference: the
        randomized input defense (:class:`ser_tf.frontend.InputNoise`).
      noise_draws: noise draws averaged per prediction at inference.
      conv_filters: filters per conv block.
      chunk_frames: CNN-LSTM chunk length in frames.
      hop_frames: CNN-LSTM chunk hop in frames.
      chunk_units: CNN-LSTM chunk embedding size.
      lstm_units: CNN-LSTM units per direction.
      dense_units: CNN hidden dense width.
      dropout: dropout rate.
      statistics: CNN-LSTM: add the utterance-functionals branch.
      n_cepstra: cepstral coefficients of the functionals' descriptors.
      stats_dropout: dropout on the standardised functionals.
      descriptors: frame-level descriptors of the functionals (names from
        ``ser_tf.models.layers.DESCRIPTORS``).
    """

    name: str = "cnn_lstm"
    sample_rate: int = 16000
    segment_s: float = 3.0
    n_mels: int = 64
    n_mfcc: int = 0
    use_deltas: bool = False
    frame_ms: float = 25.0
    hop_ms: float = 10.0
    fmin: float = 20.0
    per_utterance_norm: bool = False
    log_floor: float = 1e-6
    specaugment: bool = True
    input_noise_db: float = 0.0
    noise_draws: int = 1
    conv_filters: Sequence[int] = (16, 32, 64)
    chunk_frames: int = 32
    hop_frames: int = 16
    chunk_units: int = 128
    lstm_units: int = 64
    dense_units: int = 64
    dropout: float = 0.3
    statistics: bool = False
    n_cepstra: int = 20
    stats_dropout: float = 0.5
    descriptors: Sequence[str] = BASE_DESCRIPTORS


def _cnn_lstm(cfg: ModelConfig, num_classes: int, bins: int, channels: int) -> keras.Model:
    return cnn_lstm_classifier(num_classes, bins, channels, chunk_frames=cfg.chunk_frames,
                               hop_frames=cfg.hop_frames, conv_filters=cfg.conv_filters,
                               chunk_units=cfg.chunk_units, lstm_units=cfg.lstm_units,
                               dropout=cfg.dropout, statistics=cfg.statistics,
                               n_cepstra=cfg.n_cepstra, stats_dropout=cfg.stats_dropout,
                               descriptors=cfg.descriptors)


def _functionals(cfg: ModelConfig, num_classes: int, bins: int, channels: int) -> keras.Model:
    return functionals_classifier(num_classes, bins, channels, n_cepstra=cfg.n_cepstra,
                                  dropout=cfg.stats_dropout, descriptors=cfg.descriptors)


def _cnn(cfg: ModelConfig, num_classes: int, bins: int, channels: int) -> keras.Model:
    return cnn_classifier(num_classes, bins, channels, conv_filters=cfg.conv_filters,
                          dense_units=cfg.dense_units, dropout=cfg.dropout)


ClassifierFn = Callable[[ModelConfig, int, int, int], keras.Model]
MODELS: dict[str, ClassifierFn] = {"cnn_lstm": _cnn_lstm, "cnn": _cnn,
                                   "functionals": _functionals}


def build_model(config: ModelConfig, labels: Sequence[str], seed: int | None = None) -> SERModel:
    """Builds an (unadapted) :class:`SERModel` for ``labels``.

    Args:
      config: the model configuration.
      labels: class names (their order is the logits' order).
      seed: seed for SpecAugment's random masks and the input noise.

    Returns:
      A built model; call ``model.normalizer.adapt(...)`` on training features before
      training (the trainers do).

    Raises:
      ValueError: unknown model name or fewer than two labels.
    """
    if config.name not in MODELS:
        raise ValueError(f"unknown model {config.name!r}; known: {sorted(MODELS)}")
    if len(labels) < 2:
        raise ValueError(f"need at least two classes, got {list(labels)}")
    frontend = LogMelFrontend(config.sample_rate, frame_ms=config.frame_ms, hop_ms=config.hop_ms,
                              n_mels=config.n_mels, fmin=config.fmin, n_mfcc=config.n_mfcc,
                              use_deltas=config.use_deltas, log_floor=config.log_floor,
                              name="frontend")
    classifier = MODELS[config.name](config, len(labels), frontend.bins, frontend.channels)
    model = SERModel(frontend, FeatureNormalization(config.per_utterance_norm, name="normalizer"),
                     classifier,
                     SpecAugment(seed=seed, name="specaugment") if config.specaugment else None,
                     labels=labels, segment_s=config.segment_s, name=f"ser_{config.name}",
                     noise=InputNoise(config.input_noise_db, config.noise_draws, seed=seed,
                                      name="noise") if config.input_noise_db else None)
    model.build((None, model.segment_samples))
    return model
