"""Frontend layers against NumPy references, and their serialization round trip."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from ser_tf.frontend import (MAX_BLOCK_WEIGHTS, FeatureNormalization, InputNoise,
                             LogMelFrontend, SpecAugment, automatic_gradients, blocked_matmul,
                             dct_matrix, deltas, frame_signal, frame_time, mel_filterbank,
                             projection_blocks, stft)
from ser_tf.models.layers import ChunkEncoder


def _numpy_logmel(x: np.ndarray, layer: LogMelFrontend) -> np.ndarray:
    """Independent reference: frame, periodic Hann, rfft power, mel matrix from TF, log."""
    n, hop, nfft = layer.frame_length, layer.frame_step, layer.fft_length
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
    frames = np.stack([x[s:s + n] for s in range(0, len(x) - n + 1, hop)])
    power = np.abs(np.fft.rfft(frames * window, nfft)) ** 2
    mel = tf.signal.linear_to_mel_weight_matrix(layer.n_mels, nfft // 2 + 1, layer.sample_rate,
                                                layer.fmin, layer.fmax).numpy()
    return np.log(power @ mel + layer.log_floor)


def test_mel_filterbank_matches_tf():
    ours = mel_filterbank(40, 512, 16000, 20.0, 8000.0)
    ref = tf.signal.linear_to_mel_weight_matrix(40, 257, 16000, 20.0, 8000.0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("matrix", [mel_filterbank(64, 512, 16000, 20.0, 8000.0),
                                    mel_filterbank(40, 256, 8000, 0.0, 4000.0),
                                    dct_matrix(64, 20)])
def test_projection_blocks_cover_every_weight_and_stay_small(matrix):
    blocks = projection_blocks(matrix)
    cols = [c for c0, c1, _, _ in blocks for c in range(c0, c1)]
    assert cols == list(range(matrix.shape[1]))
    covered = np.zeros_like(matrix, bool)
    for c0, c1, r0, r1 in blocks:
        assert (r1 - r0) * (c1 - c0) <= MAX_BLOCK_WEIGHTS or c1 - c0 == 1
        covered[r0:r1, c0:c1] = True
    assert not (matrix != 0)[~covered].any()  # no nonzero weight is skipped
    x = np.random.default_rng(0).random((3, matrix.shape[0])).astype(np.float32)
    np.testing.assert_allclose(blocked_matmul(x, matrix, blocks).numpy(), x @ matrix,
                               rtol=1e-5, atol=1e-6)
    # Any leading shape: a batch of one utterance's frames, and unknown sizes in a graph,
    # where the result keeps the static shape it can.
    frames = np.random.default_rng(1).random((1, 7, matrix.shape[0])).astype(np.float32)
    np.testing.assert_allclose(blocked_matmul(frames, matrix, blocks).numpy(),
                               frames @ matrix, rtol=1e-5, atol=1e-6)
    traced = tf.function(lambda v: blocked_matmul(v, matrix, blocks)).get_concrete_function(
        tf.TensorSpec([None, None, matrix.shape[0]], tf.float32))
    assert traced.structured_outputs.shape.as_list() == [None, None, matrix.shape[1]]


def test_logmel_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    layer = LogMelFrontend(16000, n_mels=40)
    got = layer(x[None])[0, ..., 0].numpy()
    ref = _numpy_logmel(x.astype(np.float64), layer)
    assert got.shape == ref.shape == (layer.num_frames(16000), 40)
    np.testing.assert_allclose(got, ref, atol=2e-3, rtol=1e-3)


def test_mfcc_is_orthonormal_dct_of_logmel():
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal((2, 8000))).astype(np.float32)
    logmel = LogMelFrontend(16000, n_mels=32)(x)[..., 0].numpy()
    mfcc = LogMelFrontend(16000, n_mels=32, n_mfcc=13)(x)[..., 0].numpy()
    n = np.arange(32)
    basis = np.array([np.cos(np.pi * k * (2 * n + 1) / 64) for k in range(13)])
    scale = np.full(13, np.sqrt(2 / 32))
    scale[0] = np.sqrt(1 / 32)
    np.testing.assert_allclose(mfcc, (logmel @ basis.T) * scale, atol=1e-3)


def test_deltas_match_htk_formula():
    rng = np.random.default_rng(2)
    c = rng.standard_normal((1, 10, 3)).astype(np.float32)
    padded = np.concatenate([c[:, :1], c[:, :1], c, c[:, -1:], c[:, -1:]], axis=1)
    ref = sum(k * (padded[:, 2 + k:12 + k] - padded[:, 2 - k:12 - k]) for k in (1, 2)) / 10.0
    np.testing.assert_allclose(deltas(tf.constant(c)).numpy(), ref, atol=1e-6)
    out = LogMelFrontend(16000, n_mels=20, use_deltas=True)(np.zeros((1, 4000), np.float32))
    assert out.shape[-1] == 3


@pytest.mark.parametrize("frame_length, frame_step, samples", [
    (400, 160, 16037),  # subframes of 80; the length not a whole number of them
    (400, 160, 16000),  # a whole number of subframes
    (400, 160, 400),    # exactly one frame
    (256, 128, 1000),   # frame = two hops
    (401, 160, 5000),   # coprime: subframes of one sample
    (300, 310, 2000),   # hops longer than the frame
    (320, 320, 1000),   # frames side by side: the subframes themselves
])
def test_frame_signal_is_tf_signal_frame(frame_length, frame_step, samples):
    x = np.random.default_rng(5).standard_normal((3, samples)).astype(np.float32)
    want = tf.signal.frame(x, frame_length, frame_step).numpy()
    # Static length (what a fixed-length export traces) and unknown lengths (a tf.data map).
    static = frame_signal(tf.constant(x), frame_length, frame_step)
    assert static.shape == want.shape
    np.testing.assert_array_equal(static.numpy(), want)
    dynamic = tf.function(lambda v: frame_signal(v, frame_length, frame_step),
                          input_signature=[tf.TensorSpec([None, None], tf.float32)])
    assert dynamic.get_concrete_function().structured_outputs.shape.as_list() == [
        None, None, frame_length]
    np.testing.assert_array_equal(dynamic(x).numpy(), want)


@pytest.mark.parametrize("frame_length, frame_step, time", [
    (32, 16, 198),  # the default CNN-LSTM's chunks: half-overlapping
    (32, 32, 198),  # side by side, the time not a whole number of chunks
    (10, 4, 10),    # exactly one chunk
    (8, 12, 50),    # gaps between chunks
])
def test_frame_time_is_tf_signal_frame_on_axis_1_and_so_is_its_gradient(
        frame_length, frame_step, time):
    x = tf.constant(np.random.default_rng(6).standard_normal((2, time, 5, 3)), tf.float32)
    want = tf.signal.frame(x, frame_length, frame_step, axis=1)
    weights = tf.constant(np.random.default_rng(7).standard_normal(want.shape), tf.float32)

    def value_and_gradient(frame, v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            frames = frame(v)
            loss = tf.reduce_sum(frames * weights)
        return frames, tape.gradient(loss, v)

    want, want_grad = value_and_gradient(
        lambda v: tf.signal.frame(v, frame_length, frame_step, axis=1), x)
    ours = lambda v: frame_time(v, frame_length, frame_step)  # noqa: E731
    static, static_grad = value_and_gradient(ours, x)
    assert static.shape == want.shape
    np.testing.assert_array_equal(static.numpy(), want.numpy())
    np.testing.assert_allclose(static_grad.numpy(), want_grad.numpy(), atol=1e-5)
    dynamic = tf.function(lambda v: value_and_gradient(ours, v),
                          input_signature=[tf.TensorSpec([None, None, 5, 3], tf.float32)])
    assert dynamic.get_concrete_function().structured_outputs[0].shape.as_list() == [
        None, None, frame_length, 5, 3]
    frames, grad = dynamic(x)
    np.testing.assert_array_equal(frames.numpy(), want.numpy())
    np.testing.assert_allclose(grad.numpy(), want_grad.numpy(), atol=1e-5)


def test_frontend_handles_short_input_and_is_differentiable():
    layer = LogMelFrontend(16000)
    assert layer(tf.zeros([2, 10]))[0].shape[0] == 1
    x = tf.Variable(tf.random.normal([1, 4000]) * 0.1)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(x))
    g = tape.gradient(y, x)
    assert g is not None and np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0)


def _autodiff_gradient(fn, x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = fn(x)
        loss = tf.reduce_sum(out * weights)
    return out.numpy(), tape.gradient(loss, x).numpy()


@pytest.mark.parametrize("rate, frame_ms, hop_ms, samples", [
    (16000, 25.0, 10.0, 16037),  # 400-sample frames in a 512 FFT; trailing samples unused
    (8000, 32.0, 16.0, 4096),    # frame = FFT length, half overlap
    (16000, 25.0, 10.0, 400),    # a single frame
    (16000, 25.0, 18.75, 5000),  # two 300-sample hops pass the 512 FFT
])
def test_log_mel_value_and_written_gradient_match_automatic_differentiation(
        rate, frame_ms, hop_ms, samples):
    layer = LogMelFrontend(rate, frame_ms=frame_ms, hop_ms=hop_ms, n_mels=40)
    n, hop = layer.frame_length, layer.frame_step
    rng = np.random.default_rng(3)
    x = (0.1 * rng.standard_normal((2, samples))).astype(np.float32)
    g = rng.standard_normal((2, layer.num_frames(samples), 40, 1)).astype(np.float32)

    def reference(v):
        with automatic_gradients():
            return layer(v)

    want_f, want_g = _autodiff_gradient(reference, x, g)
    got_f, got_g = _autodiff_gradient(layer, x, g)
    np.testing.assert_array_equal(got_f, want_f)
    assert got_g.shape == x.shape
    np.testing.assert_allclose(got_g, want_g, atol=1e-5 * np.abs(want_g).max())
    if samples > n:  # samples after the last frame get no gradient
        last = (layer.num_frames(samples) - 1) * hop + n
        assert not got_g[:, last:].any() and got_g[:, :last].any()


def test_stft_is_tf_signal_stft():
    rng = np.random.default_rng(6)
    x = (0.1 * rng.standard_normal((2, 3000))).astype(np.float32)
    want = tf.signal.stft(x, 400, 160, 512, pad_end=False).numpy()
    got = stft(x, 400, 160, 512).numpy()
    assert got.shape == want.shape == (2, 17, 257)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_written_gradient_compiles_once_per_shape_for_eager_callers():
    """Eager callers (an attack library running the model eagerly) reuse the compiled
    backward pass: one trace per input shape, not one per call."""
    layer = LogMelFrontend(16000, n_mels=24)
    rng = np.random.default_rng(7)
    for samples in (4000, 4000, 4000, 6000, 6000):
        x = tf.constant((0.1 * rng.standard_normal((2, samples))).astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x))
        assert np.all(np.isfinite(tape.gradient(loss, x).numpy()))
    assert layer._log_mel_gradient._compiled.experimental_get_tracing_count() == 2


def test_blocked_matmul_gradient_is_the_dense_products():
    matrix = mel_filterbank(64, 512, 16000, 20.0, 8000.0)
    rng = np.random.default_rng(4)
    x = rng.random((2, 7, 257)).astype(np.float32)
    g = rng.standard_normal((2, 7, 64)).astype(np.float32)
    _, got = _autodiff_gradient(lambda v: blocked_matmul(v, matrix, projection_blocks(matrix)),
                                x, g)
    _, want = _autodiff_gradient(lambda v: tf.matmul(v, tf.constant(matrix)), x, g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_frontend_gradient_in_a_compiled_function_is_the_automatic_one():
    layer = LogMelFrontend(16000, n_mels=40, n_mfcc=13, use_deltas=True)
    x = tf.constant((0.1 * np.random.default_rng(5).standard_normal((2, 8000)))
                    .astype(np.float32))

    def gradient():
        @tf.function
        def grad(v):
            with tf.GradientTape() as tape:
                tape.watch(v)
                loss = tf.reduce_sum(tf.sin(layer(v)))
            return tape.gradient(loss, v)
        return grad

    written = gradient()(x).numpy()
    with automatic_gradients():
        automatic = gradient()(x).numpy()  # traced inside: TF's own gradients
    np.testing.assert_allclose(written, automatic, atol=1e-4 * np.abs(automatic).max())


def test_feature_normalization_adapt_and_per_utterance():
    rng = np.random.default_rng(3)
    batches = [rng.normal(5.0, 2.0, (4, 30, 8, 1)).astype(np.float32) for _ in range(3)]
    norm = FeatureNormalization()
    norm.adapt(batches)
    out = np.concatenate([norm(b).numpy() for b in batches])
    np.testing.assert_allclose(out.mean(axis=(0, 1)), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1)), 1.0, atol=1e-3)
    cmn = FeatureNormalization(per_utterance=True)
    shifted = [b + rng.normal(0, 3, (4, 1, 8, 1)).astype(np.float32) for b in batches]
    cmn.adapt(shifted)
    y = cmn(shifted[0]).numpy()
    np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-4)
    with pytest.raises(ValueError, match="no data"):
        FeatureNormalization().adapt([])


def test_specaugment_only_when_training():
    aug = SpecAugment(freq_masks=2, freq_width=4, time_masks=2, time_width=5, seed=0)
    x = tf.ones([3, 50, 16, 1])
    np.testing.assert_array_equal(aug(x, training=False), x)
    y = aug(x, training=True).numpy()
    assert 0 < (y == 0).mean() < 0.6
    assert not np.array_equal(y[0], y[1])


def test_input_noise_is_white_gaussian_at_its_level_below_each_peak_in_every_mode():
    layer = InputNoise(level_db=-30.0, seed=3)
    x = np.zeros((2, 40000), np.float32)
    x[0, 7], x[1, 11] = 0.5, -0.1
    noise = layer(x).numpy() - x
    np.testing.assert_allclose(noise.std(axis=1), [0.5 * 10 ** -1.5, 0.1 * 10 ** -1.5],
                               rtol=0.03)
    np.testing.assert_allclose(noise.mean(axis=1), 0.0, atol=2e-4)
    # White: neighbouring samples are uncorrelated.
    lag1 = np.corrcoef(noise[0, :-1], noise[0, 1:])[0, 1]
    assert abs(lag1) < 0.03
    # Fresh noise on every call, in inference as in training; silence stays silent.
    again = layer(x, training=False).numpy() - x
    assert not np.allclose(noise, again)
    assert np.all(layer(np.zeros((1, 100), np.float32)).numpy() == 0.0)
    with pytest.raises(ValueError, match="negative"):
        InputNoise(level_db=0.0)
    with pytest.raises(ValueError, match="draws"):
        InputNoise(level_db=-30.0, draws=0)


@pytest.mark.parametrize("layer", [
    LogMelFrontend(8000, frame_ms=32, hop_ms=8, n_mels=24, n_mfcc=12, use_deltas=True),
    SpecAugment(1, 3, 1, 4, seed=5),
    InputNoise(-34.0, draws=4, seed=2),
    FeatureNormalization(per_utterance=True, epsilon=1e-3),
    ChunkEncoder(chunk_frames=10, hop_frames=5, filters=(4, 8), kernel_sizes=(3, 3), units=6,
                 dropout=0.1),
])
def test_layer_config_round_trip(layer):
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
