"""ser_tf: speech emotion recognition in TensorFlow/Keras, robust to attack, ready for the edge.

The library is layered: ``ser_tf.data`` (corpora, decoding, resampling, tf.data pipelines),
``ser_tf.frontend`` (waveform -> features as Keras layers), ``ser_tf.models`` (Keras models
whose frontend is part of the model), ``ser_tf.training`` (protocols and trainers) and
``ser_tf.evaluation`` (metrics and reports). Apps in ``trainers/`` and ``export/`` are thin
absl wrappers around it; nothing in this package reads absl flags.
"""

__version__ = "0.1.0"
