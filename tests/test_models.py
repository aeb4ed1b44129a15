"""Models: shapes, variable-length input, gradients to the waveform, .keras round trip."""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from ser_tf.frontend import automatic_gradients, dct_matrix, deltas
from ser_tf.models import MODELS, ModelConfig, SERModel, build_model
from ser_tf.models.layers import (DESCRIPTORS, STATISTICS, ChunkEncoder, UtteranceStatistics,
                                  conv2d_same, folded_stack, max_pool_same,
                                  unfolded_batchnorm)

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


@pytest.mark.parametrize("kernel_shape", [(5, 5, 1, 8), (3, 5, 3, 4), (3, 3, 6, 4),
                                          (2, 2, 1, 4)])
def test_conv2d_same_matches_tensorflow_conv_and_its_gradients(kernel_shape):
    # (5,5,1,8) and (3,5,3,4) take the written-out input gradient; (3,3,6,4) has too many
    # input channels and (2,2,1,4) an even kernel, so those are TensorFlow's own.
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((2, 9, 12, kernel_shape[2])).astype(np.float32))
    kernel = tf.constant(rng.standard_normal(kernel_shape).astype(np.float32))
    g = tf.constant(rng.standard_normal((2, 9, 12, kernel_shape[3])).astype(np.float32))

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = fn(x, kernel)
            loss = tf.reduce_sum(y * g)
        return [y.numpy()] + [t.numpy() for t in tape.gradient(loss, [x, kernel])]

    want = run(lambda v, k: tf.nn.conv2d(v, k, 1, "SAME"))
    got = run(conv2d_same)
    with automatic_gradients():
        automatic = run(conv2d_same)
    for w, a, b in zip(want, got, automatic):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(b, w)


@pytest.mark.parametrize("pool,shape", [((2, 2), (3, 8, 12, 4)), ((1, 2), (2, 5, 6, 3)),
                                        ((2, 2), (2, 7, 12, 3))])
def test_max_pool_same_matches_the_layer_and_its_gradient_ties_included(pool, shape):
    # (2, 2) on 8x12 and (1, 2) on 5x6 tile the input and take the written-out gradient;
    # (2, 2) on 7 rows does not, so that is the layer's own.
    rng = np.random.default_rng(3)
    values = rng.standard_normal(shape).astype(np.float32)
    values = np.maximum(values, 0.0)  # ReLU output: windows of tied zeros
    values[:, 0, 0, :] = values[:, 0, 1, :] = 0.5  # and tied maxima
    x = tf.constant(values)
    layer = keras.layers.MaxPooling2D(pool, padding="same")
    g = tf.constant(rng.standard_normal(layer(x).shape).astype(np.float32))

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y.numpy(), tape.gradient(y, x, output_gradients=g).numpy()

    want_y, want_dx = run(layer)
    got_y, got_dx = run(lambda v: max_pool_same(v, layer))
    np.testing.assert_array_equal(got_y, want_y)
    np.testing.assert_array_equal(got_dx, want_dx)
    graph = tf.function(lambda v: max_pool_same(v, layer)).get_concrete_function(x).graph
    # tf.custom_gradient marks its output with an IdentityN.
    written = any(op.type == "IdentityN" for op in graph.get_operations())
    assert written == (shape[1] % pool[0] == 0), "custom gradient used only when windows tile"


def _encoder_with_statistics(seed: int = 0) -> ChunkEncoder:
    """A built ChunkEncoder whose BatchNorms hold non-trivial moving statistics."""
    rng = np.random.default_rng(seed)
    encoder = ChunkEncoder(chunk_frames=8, hop_frames=4, filters=(4, 6), units=5, dropout=0.5)
    encoder(tf.zeros([1, 20, 12, 1]))
    for layer in encoder.encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(size=n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
            layer.beta.assign(rng.normal(size=n).astype(np.float32))
    return encoder


def test_chunk_encoder_inference_folds_batchnorm_into_the_convs():
    encoder = _encoder_with_statistics()
    x = tf.constant(np.random.default_rng(2).standard_normal((3, 20, 12, 1)), tf.float32)
    chunks = tf.reshape(tf.signal.frame(x, 8, 4, axis=1), [-1, 8, 12, 1])

    def loss_and_gradients():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = encoder(x, training=False)
            loss = tf.reduce_sum(tf.sin(y))
        return [y] + tape.gradient(loss, [x] + encoder.trainable_weights)

    with unfolded_batchnorm():
        want = loss_and_gradients()
    got = loss_and_gradients()
    assert np.abs(want[0].numpy()).max() > 0.1
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4,
                                   atol=1e-5 * np.abs(w.numpy()).max())
    np.testing.assert_allclose(folded_stack(encoder.encoder.layers, chunks).numpy(),
                               encoder.encoder(chunks, training=False).numpy(), atol=1e-5)
    # Training still normalises with the batch's statistics, not the moving ones.
    trained = encoder(x, training=True).numpy()
    assert not np.allclose(trained, got[0].numpy(), atol=1e-3)

    # The folded graph runs no op of the BatchNorm layers; the layer-by-layer one does.
    def batchnorm_ops():
        graph = tf.function(lambda v: encoder(v, training=False)).get_concrete_function(
            tf.TensorSpec([None, None, 12, 1])).graph
        blocks = (re.search(r"(block\d)_bn(_\d+)?/", op.name) for op in graph.get_operations())
        return {block.group(1) for block in blocks if block}

    assert not batchnorm_ops()
    with unfolded_batchnorm():
        assert batchnorm_ops() == {"block1", "block2"}
    # Folded, each block's relu runs after its max pool, on a quarter of the elements.
    graph = tf.function(lambda v: encoder(v, training=False)).get_concrete_function(
        tf.TensorSpec([None, None, 12, 1])).graph
    relus = [op for op in graph.get_operations() if op.type == "Relu" and "_relu" in op.name]
    assert len(relus) == 2 and all("_pool" in op.inputs[0].op.name for op in relus)


def test_folded_stack_rejects_a_strided_conv():
    layers = [keras.layers.Conv2D(2, 3, strides=2, padding="same", use_bias=False),
              keras.layers.BatchNormalization()]
    x = tf.zeros([1, 8, 8, 1])
    for layer in layers:
        layer(x if layer is layers[0] else layers[0](x))
    with pytest.raises(ValueError, match="only stride-1"):
        folded_stack(layers, x)


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
