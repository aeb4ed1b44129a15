"""Utterance-level prediction: run a model over every window, average logits per utterance."""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm


def predict_utterances(model_fn: Callable[[tf.Tensor], tf.Tensor], dataset: tf.data.Dataset,
                       num_utterances: int, num_windows: int | None = None,
                       progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """Averages window logits into utterance logits.

    Args:
      model_fn: waveforms ``[B, S]`` -> logits ``[B, C]`` (e.g. a Keras model, or a
        ``tf.function`` around one).
      dataset: yields ``(positions [B], windows [B, S])`` as built by
        :func:`ser_tf.data.pipeline.evaluation_dataset`.
      num_utterances: number of utterances (positions run from 0 to this - 1).
      num_windows: total windows, for the progress bar.
      progress: show a progress bar.
      desc: progress bar label.

    Returns:
      ``[num_utterances, C]`` float32 mean logits.

    Raises:
      ValueError: some utterance got no window.
    """
    sums, counts = None, np.zeros(num_utterances, np.int64)
    bar = tqdm(total=num_windows, desc=desc, unit="win", disable=not progress, leave=False)
    for positions, windows in dataset:
        logits = np.asarray(model_fn(windows), np.float64)
        if sums is None:
            sums = np.zeros((num_utterances, logits.shape[-1]), np.float64)
        pos = positions.numpy()
        np.add.at(sums, pos, logits)
        np.add.at(counts, pos, 1)
        bar.update(len(pos))
    bar.close()
    if sums is None or (counts == 0).any():
        missing = np.flatnonzero(counts == 0)[:5].tolist()
        raise ValueError(f"no windows for utterance positions {missing}")
    return (sums / counts[:, None]).astype(np.float32)
