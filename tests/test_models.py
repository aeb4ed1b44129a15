"""Models: shapes, variable-length input, gradients to the waveform, .keras round trip."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from ser_tf.frontend import dct_matrix, deltas
from ser_tf.models import MODELS, ModelConfig, SERModel, build_model
from ser_tf.models.layers import DESCRIPTORS, STATISTICS, UtteranceStatistics

LABELS = ("anger", "neutral", "sadness")


def _small(name: str) -> ModelConfig:
    return ModelConfig(name=name, segment_s=1.0, n_mels=32, conv_filters=(8, 16),
                       chunk_frames=16, hop_frames=8, chunk_units=16, lstm_units=8,
                       dense_units=16, n_cepstra=8)


# Every registered model, plus the CNN-LSTM with its functionals branch.
VARIANTS = {**{name: _small(name) for name in MODELS},
            "cnn_lstm+statistics": dataclasses.replace(_small("cnn_lstm"), statistics=True,
                                                       descriptors=DESCRIPTORS)}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_logits_shape_any_length_and_gradient(name):
    model = build_model(VARIANTS[name], LABELS, seed=0)
    for n in (16000, 23456, 300):
        assert model(tf.zeros([2, n])).shape == (2, 3)
    x = tf.Variable(tf.random.normal([2, 16000]) * 0.1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=False)[:, 0])
    grad = tape.gradient(loss, x).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_load_round_trip_safe_mode(tmp_path, name):
    model = build_model(VARIANTS[name], LABELS, seed=0)
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


def _numpy_functionals(features: np.ndarray, n_cepstra: int) -> np.ndarray:
    """Reference for UtteranceStatistics: descriptors and statistics written out in NumPy."""
    static = features[..., 0]
    cep = static @ dct_matrix(static.shape[-1], n_cepstra)
    d = deltas(tf.constant(cep)).numpy()
    dd = deltas(tf.constant(d)).numpy()
    change = np.diff(static, axis=1, prepend=static[:, :1])
    flux = np.sqrt((change ** 2).mean(-1, keepdims=True) + 1e-6)
    desc = np.concatenate([static, static.mean(-1, keepdims=True), cep, d, dd, flux], axis=-1)
    frames = desc.shape[1]
    t = np.arange(frames, dtype=np.float64)
    t = (t - t.mean()) / t.std()

    z = (desc - desc.mean(1, keepdims=True)) / desc.std(1, keepdims=True)

    def pct(q):
        return np.sort(desc, axis=1)[:, int(round(q * (frames - 1)))]

    out = {
        "mean": desc.mean(1), "std": desc.std(1), "min": desc.min(1), "max": desc.max(1),
        "p10": pct(0.1), "p50": pct(0.5), "p90": pct(0.9), "iqr": pct(0.75) - pct(0.25),
        "skew": np.tanh((z ** 3).mean(1) / 3.0),
        "kurtosis": np.tanh(((z ** 4).mean(1) - 3.0) / 10.0),
        "slope": ((desc - desc.mean(1, keepdims=True)) * t[None, :, None]).mean(1),
    }
    return np.concatenate([out[name] for name in STATISTICS], axis=-1)


def test_utterance_statistics_match_numpy_reference():
    x = np.random.default_rng(1).standard_normal((3, 57, 12, 1)).astype(np.float32)
    x += np.linspace(0.0, 2.0, 57, dtype=np.float32)[None, :, None, None]  # a trend
    layer = UtteranceStatistics(n_cepstra=5, descriptors=DESCRIPTORS)
    got = layer(x).numpy()
    assert got.shape == (3, layer.output_size(12))
    np.testing.assert_allclose(got, _numpy_functionals(x, 5), atol=2e-4)


def test_utterance_statistics_gradient_reaches_every_frame():
    x = tf.Variable(tf.random.normal([2, 40, 12, 1]))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(UtteranceStatistics(n_cepstra=4, descriptors=DESCRIPTORS)(x) ** 2)
    grad = tape.gradient(y, x).numpy()
    assert np.all(np.isfinite(grad))
    assert np.all(np.abs(grad).sum(axis=(2, 3)) > 0)


def test_utterance_statistics_rejects_bad_config():
    with pytest.raises(ValueError, match="unknown statistics"):
        UtteranceStatistics(statistics=("mean", "entropy"))
    with pytest.raises(ValueError, match="unknown descriptors"):
        UtteranceStatistics(descriptors=("spectrum", "pitch"))
    with pytest.raises(ValueError, match="need n_cepstra"):
        UtteranceStatistics(n_cepstra=0, descriptors=("spectrum", "deltas"))
    with pytest.raises(ValueError, match="exceeds"):
        UtteranceStatistics(n_cepstra=20).build((None, None, 12, 1))


def test_utterance_statistics_descriptor_subset_is_a_slice_of_the_full_set():
    x = np.random.default_rng(2).standard_normal((2, 30, 10, 1)).astype(np.float32)
    full = UtteranceStatistics(n_cepstra=4, statistics=("mean",), descriptors=DESCRIPTORS)
    part = UtteranceStatistics(n_cepstra=4, statistics=("mean",), descriptors=("flux",))
    np.testing.assert_allclose(part(x).numpy(), full(x).numpy()[:, -1:], atol=1e-6)
