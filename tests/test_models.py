"""Models: shapes, variable-length input, gradients to the waveform, .keras round trip."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from ser_tf.models import MODELS, ModelConfig, SERModel, build_model

LABELS = ("anger", "neutral", "sadness")


def _small(name: str) -> ModelConfig:
    return ModelConfig(name=name, segment_s=1.0, n_mels=32, conv_filters=(8, 16),
                       chunk_frames=16, hop_frames=8, chunk_units=16, lstm_units=8,
                       dense_units=16)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_shape_any_length_and_gradient(name):
    model = build_model(_small(name), LABELS, seed=0)
    for n in (16000, 23456, 300):
        assert model(tf.zeros([2, n])).shape == (2, 3)
    x = tf.Variable(tf.random.normal([2, 16000]) * 0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=False)[:, 0])
    grad = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_load_round_trip_safe_mode(tmp_path, name):
    model = build_model(_small(name), LABELS, seed=0)
    x = np.random.default_rng(0).standard_normal((3, 16000)).astype(np.float32) * 0.1
    model.normalizer.adapt([model.frontend(x)])
    before = model(x).numpy()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded, SERModel)
    assert loaded.labels == LABELS and loaded.sample_rate == 16000
    np.testing.assert_allclose(loaded(x).numpy(), before, atol=1e-5)
    np.testing.assert_allclose(loaded.normalizer.mean.numpy(), model.normalizer.mean.numpy())


def test_features_and_classify_compose_to_call():
    model = build_model(_small("cnn_lstm"), LABELS, seed=0)
    x = tf.random.normal([2, 16000]) * 0.1
    feats = model.features(x)
    assert feats.shape[2:] == (32, 1)
    np.testing.assert_allclose(model.classify(feats), model(x), atol=1e-6)


def test_build_model_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown model"):
        build_model(ModelConfig(name="transformer"), LABELS)
    with pytest.raises(ValueError, match="two classes"):
        build_model(ModelConfig(), ["anger"])
