"""The pure-TF polyphase resampler: tone fidelity, aliasing, exactness, shapes, graph modes."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from ser_tf.data.resample import (QUALITY_PRESETS, kaiser_sinc_filter, output_length,
                                  polyphase_filter_bank, resample)

RATIOS = [(48000, 16000), (44100, 16000), (8000, 16000), (22050, 16000), (32000, 16000),
          (16000, 48000), (11025, 16000), (24000, 16000), (16000, 22050)]


def _reduce(rate_in: int, rate_out: int) -> tuple[int, int]:
    g = math.gcd(rate_in, rate_out)
    return rate_out // g, rate_in // g


def _reference(x: np.ndarray, rate_in: int, rate_out: int, quality: str = "hq") -> np.ndarray:
    """Textbook resampler in float64: zero-stuff by L, low-pass with the prototype, keep 1/M.

    Output k is the convolution at up-sampled index k*M, shifted by the filter's centre so
    that the (symmetric) filter adds no delay.
    """
    up, down = _reduce(rate_in, rate_out)
    taps = kaiser_sinc_filter(rate_in, rate_out, quality)
    centre = (len(taps) - 1) // 2
    stuffed = np.zeros(len(x) * up)
    stuffed[::up] = x
    if len(stuffed) * len(taps) < 2e7:
        full = np.convolve(stuffed, taps)
    else:  # same convolution through the FFT (44.1k -> 16k has 60k taps)
        size = len(stuffed) + len(taps) - 1
        nfft = 1 << (size - 1).bit_length()
        full = np.fft.irfft(np.fft.rfft(stuffed, nfft) * np.fft.rfft(taps, nfft), nfft)[:size]
    num_out = -(-len(x) * up // down)
    return full[np.arange(num_out) * down + centre]


def _margin(rate_in: int, rate_out: int, quality: str = "hq") -> int:
    """Output samples at each end that see the zero padding (kernel half-width)."""
    up, down = _reduce(rate_in, rate_out)
    half_width_in = (len(kaiser_sinc_filter(rate_in, rate_out, quality)) - 1) // 2 / up
    return int(math.ceil(half_width_in * up / down)) + 1


def _sine(freq: float, rate: int, num: int, phase: float = 0.3) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(num) / rate + phase)


def _level_db(y: np.ndarray, amplitude: float = 1.0) -> float:
    return 20 * np.log10(np.sqrt(np.mean(y**2)) / (amplitude / np.sqrt(2)) + 1e-30)


@pytest.mark.parametrize("rate_in,rate_out", [(48000, 16000), (44100, 16000), (8000, 16000),
                                              (22050, 16000)])
def test_sine_keeps_frequency_amplitude_and_phase(rate_in, rate_out):
    x = _sine(1000.0, rate_in, rate_in // 2).astype(np.float32)
    y = resample(x, rate_in, rate_out).numpy()
    assert y.shape == (output_length(len(x), rate_in, rate_out),)
    analytic = _sine(1000.0, rate_out, len(y))
    mid = slice(_margin(rate_in, rate_out), len(y) - _margin(rate_in, rate_out))
    # Phase: compared sample by sample with the tone evaluated at the output times, so any
    # delay (tfio's is ~2 ms, i.e. a 0.2 rad phase error at 1 kHz) would fail this.
    assert np.max(np.abs(y[mid] - analytic[mid])) < 2e-5
    assert abs(_level_db(y[mid])) < 0.1
    spectrum = np.abs(np.fft.rfft(y[mid] * np.hanning(len(y[mid]))))
    assert np.argmax(spectrum) * rate_out / len(y[mid]) == pytest.approx(1000.0, abs=20.0)


@pytest.mark.parametrize("rate_in,freq", [(48000, 10000.0), (48000, 8100.0), (44100, 10000.0),
                                          (44100, 19000.0)])
def test_tone_above_new_nyquist_is_removed(rate_in, freq):
    x = _sine(freq, rate_in, rate_in // 4).astype(np.float32)
    mid = slice(100, -100)
    assert _level_db(resample(x, rate_in, 16000).numpy()[mid]) < -90.0
    assert _level_db(resample(x, rate_in, 16000, quality="fast").numpy()[mid]) < -70.0


def test_upsampling_leaves_no_image():
    # 8k -> 16k: a 3 kHz tone must not come with its image at 8 - 3 = 5 kHz.
    y = resample(_sine(3000.0, 8000, 4000).astype(np.float32), 8000, 16000).numpy()[200:-200]
    spectrum = np.abs(np.fft.rfft(y * np.blackman(len(y)))) / (np.sum(np.blackman(len(y))) / 2)
    freqs = np.fft.rfftfreq(len(y), 1 / 16000)
    assert 20 * np.log10(spectrum[freqs > 4000].max()) < -90.0
    assert abs(20 * np.log10(spectrum.max())) < 0.1


def test_constant_signal_stays_constant():
    for rate_in, rate_out in [(48000, 16000), (44100, 16000), (8000, 16000)]:
        y = resample(np.full(3000, 0.25, np.float32), rate_in, rate_out).numpy()
        m = _margin(rate_in, rate_out)
        np.testing.assert_allclose(y[m:-m], 0.25, atol=1e-6)


@pytest.mark.parametrize("rate_in,rate_out", RATIOS)
@pytest.mark.parametrize("method", ["conv", "matmul"])
def test_matches_numpy_reference(rate_in, rate_out, method):
    rng = np.random.default_rng(rate_in + rate_out)
    x = rng.uniform(-1, 1, 1237)
    y = resample(x.astype(np.float32), rate_in, rate_out, method=method).numpy()
    np.testing.assert_allclose(y, _reference(x, rate_in, rate_out), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rate_in,rate_out,blocks", [(48000, 16000, 1), (48000, 16000, 7),
                                                     (44100, 16000, 2), (8000, 16000, 1)])
def test_fast_quality_and_block_sizes_match_reference(rate_in, rate_out, blocks):
    x = np.random.default_rng(0).uniform(-1, 1, 999)
    for quality in QUALITY_PRESETS:
        ref = _reference(x, rate_in, rate_out, quality)
        for method in ("conv", "matmul"):
            y = resample(x.astype(np.float32), rate_in, rate_out, quality=quality,
                         method=method, blocks=blocks)
            np.testing.assert_allclose(y.numpy(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("quality", sorted(QUALITY_PRESETS))
@pytest.mark.parametrize("rate_in,rate_out", [(48000, 16000), (44100, 16000), (8000, 16000)])
def test_prototype_filter_design(rate_in, rate_out, quality):
    taps = kaiser_sinc_filter(rate_in, rate_out, quality)
    up, _ = _reduce(rate_in, rate_out)
    assert len(taps) % 2 == 1
    np.testing.assert_allclose(taps, taps[::-1], atol=1e-15)  # linear phase
    for r in range(up):
        assert taps[r::up].sum() == pytest.approx(1.0, abs=1e-12)
    design = QUALITY_PRESETS[quality]
    fs = up * rate_in
    nfft = 1 << (len(taps) * 8 - 1).bit_length()
    gain = np.abs(np.fft.rfft(taps, nfft)) / up
    freqs = np.fft.rfftfreq(nfft, 1 / fs)
    nyquist = min(rate_in, rate_out) / 2
    passband = 20 * np.log10(gain[freqs <= design.passband * nyquist])
    stopband = 20 * np.log10(gain[freqs >= nyquist].max())
    assert np.ptp(passband) < (1e-3 if quality == "hq" else 1e-2)
    assert stopband < -design.attenuation_db + 2.0
    if quality == "hq":
        assert stopband < -100.0


@pytest.mark.parametrize("rate_in,rate_out", RATIOS + [(7, 3), (3, 7)])
def test_output_length_formula(rate_in, rate_out):
    x = np.zeros(600, np.float32)
    for n in (0, 1, 2, 3, 5, 7, 100, 441, 443, 600):
        expected = math.ceil(Fraction(n * rate_out, rate_in))
        assert output_length(n, rate_in, rate_out) == expected
        y = resample(x[:n], rate_in, rate_out, quality="fast")
        assert y.shape == (expected,)


def test_equal_rates_return_input_unchanged():
    x = tf.random.normal([2, 100])
    assert resample(x, 16000, 16000) is x


def test_leading_batch_axes():
    x = np.random.default_rng(1).standard_normal((2, 3, 2000)).astype(np.float32)
    y = resample(x, 44100, 16000).numpy()
    assert y.shape == (2, 3, output_length(2000, 44100, 16000))
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(y[i, j], resample(x[i, j], 44100, 16000).numpy(),
                                       atol=1e-6)


def test_float64_input_keeps_dtype():
    x = _sine(440.0, 48000, 4800)
    y = resample(x, 48000, 16000)
    assert y.dtype == tf.float64
    np.testing.assert_allclose(y.numpy(), _reference(x, 48000, 16000), atol=1e-10)


def test_inside_tf_function_with_unknown_length():
    fn = tf.function(lambda x: resample(x, 48000, 16000),
                     input_signature=[tf.TensorSpec([None], tf.float32)])
    for n in (4800, 4801, 10):
        x = np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
        np.testing.assert_allclose(fn(x).numpy(), resample(x, 48000, 16000).numpy(),
                                   atol=1e-6)
    batched = tf.function(lambda x: resample(x, 8000, 16000),
                          input_signature=[tf.TensorSpec([None, None], tf.float32)])
    assert batched.get_concrete_function().structured_outputs.shape.as_list() == [None, None]
    assert batched(tf.zeros([3, 101])).shape == (3, 202)


def test_inside_tf_data_map():
    lengths = [4410, 3001, 999]
    ds = tf.data.Dataset.from_generator(
        lambda: (np.random.default_rng(n).uniform(-1, 1, n).astype(np.float32)
                 for n in lengths),
        output_signature=tf.TensorSpec([None], tf.float32))
    ds = ds.map(lambda x: resample(x, 44100, 16000), num_parallel_calls=2)
    assert ds.element_spec.shape.as_list() == [None]
    for n, y in zip(lengths, ds):
        x = np.random.default_rng(n).uniform(-1, 1, n)
        np.testing.assert_allclose(y.numpy(), _reference(x, 44100, 16000), atol=1e-5)


def test_xla_compiles():
    fn = tf.function(lambda x: resample(x, 48000, 16000), jit_compile=True)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 960)).astype(np.float32)
    np.testing.assert_allclose(fn(x).numpy(), resample(x, 48000, 16000).numpy(), atol=1e-5)


def test_static_shape_and_gradient():
    x = tf.Variable(tf.random.normal([4, 480]))
    with tf.GradientTape() as tape:
        y = resample(x, 48000, 16000)
        loss = tf.reduce_sum(y**2)
    assert y.shape == (4, 160)
    grad = tape.gradient(loss, x)
    assert grad is not None and np.isfinite(grad.numpy()).all()


def test_polyphase_bank_layout():
    plan = polyphase_filter_bank(44100, 16000)
    assert plan.outputs % 160 == 0
    assert plan.step % 441 == 0
    assert plan.frame_length % plan.subframe == 0 and plan.step % plan.subframe == 0
    assert plan.bank.shape == (plan.frame_length, plan.outputs)
    assert polyphase_filter_bank(44100, 16000) is plan  # cached


@pytest.mark.parametrize("kwargs,match", [
    (dict(rate_in=0, rate_out=16000), "rate_in must be positive"),
    (dict(rate_in=48000, rate_out=-16000), "rate_out must be positive"),
    (dict(rate_in=48000.0, rate_out=16000), "rate_in must be a Python int"),
    (dict(rate_in=48000, rate_out=16000, quality="best"), "quality must be one of"),
    (dict(rate_in=48000, rate_out=16000, method="fft"), "method must be one of"),
    (dict(rate_in=48000, rate_out=16000, blocks=0), "blocks must be a positive int"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resample(tf.zeros([100]), **kwargs)


def test_bad_waveforms_raise():
    with pytest.raises(ValueError, match="floating-point"):
        resample(tf.zeros([100], tf.int16), 48000, 16000)
    with pytest.raises(ValueError, match="rank >= 1"):
        resample(tf.constant(1.0), 48000, 16000)
    with pytest.raises(ValueError, match="filter bank"):
        resample(tf.zeros([100]), 44100, 16001)
