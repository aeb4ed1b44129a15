"""Feature frontend: waveform -> (log-mel | MFCC) [+ deltas] as serializable Keras layers.

The frontend lives inside the model (DESIGN.md, convention 3): one graph serves training,
waveform-domain attacks (gradients flow from the logits back to the samples) and export.
Every layer here is built from differentiable TensorFlow ops (``tf.signal``'s FFTs,
gathers, small matrix products) that map onto TFLite built-in ops.

Shapes: waveforms are ``[batch, samples]`` float32; features are
``[batch, frames, bins, channels]`` where channels is 1, or 3 with deltas (static, delta,
delta-delta), so 2-D conv classifiers take them as images.
"""

from __future__ import annotations

import contextlib
import math

import keras
import numpy as np
import tensorflow as tf

_PACKAGE = "ser_tf"

# Whether models traced now use the written-out gradients (see automatic_gradients).
_written_gradients = True


def written_gradients() -> bool:
    """True unless inside :func:`automatic_gradients`."""
    return _written_gradients


@contextlib.contextmanager
def automatic_gradients():
    """Models traced (or run eagerly) inside use TensorFlow's automatic gradients instead
    of the written-out ones (the frontend's log-mel, :class:`LogMelGradient`, and
    :func:`blocked_matmul`; the first conv and the max pools of
    :class:`ser_tf.models.layers.ChunkEncoder`); the values are the same. For benchmarks
    and tests that compare the two."""
    global _written_gradients
    saved, _written_gradients = _written_gradients, False
    try:
        yield
    finally:
        _written_gradients = saved


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """HTK mel scale (the one ``tf.signal.linear_to_mel_weight_matrix`` uses)."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def mel_filterbank(n_mels: int, fft_length: int, sample_rate: int, fmin: float,
                   fmax: float) -> np.ndarray:
    """Triangular mel filterbank, ``[fft_length // 2 + 1, n_mels]`` float32.

    Matches ``tf.signal.linear_to_mel_weight_matrix`` (HTK mel, the DC bin excluded) but is
    computed once in NumPy, so the layer holds a constant instead of rebuilding it per call.

    Args:
      n_mels: number of mel bands.
      fft_length: FFT size; the spectrum has ``fft_length // 2 + 1`` bins.
      sample_rate: sample rate in Hz.
      fmin: lower edge of the first band in Hz.
      fmax: upper edge of the last band in Hz (at most ``sample_rate / 2``).

    Returns:
      The weight matrix.
    """
    n_bins = fft_length // 2 + 1
    freqs = np.linspace(0.0, sample_rate / 2.0, n_bins)[1:]
    mel = _hz_to_mel(freqs)
    edges = np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    up = (mel[:, None] - lower[None, :]) / (center - lower)[None, :]
    down = (upper[None, :] - mel[:, None]) / (upper - center)[None, :]
    weights = np.maximum(0.0, np.minimum(up, down))
    return np.pad(weights, [[1, 0], [0, 0]]).astype(np.float32)


def dct_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``[n_in, n_out]`` (what ``tf.signal.mfccs_from_log_mel_...``
    computes), as a constant so MFCCs are one matmul (a TFLite built-in)."""
    k = np.arange(n_out)[None, :]
    n = np.arange(n_in)[:, None]
    mat = np.cos(np.pi / n_in * (n + 0.5) * k) * math.sqrt(2.0 / n_in)
    mat[:, 0] *= 1.0 / math.sqrt(2.0)
    return mat.astype(np.float32)


def deltas(features: tf.Tensor, width: int = 2) -> tf.Tensor:
    """Regression deltas along the time axis (axis 1), edges replicated.

    ``d[t] = sum_{n=1..N} n (c[t+n] - c[t-n]) / (2 sum n^2)``, the HTK formula.

    Args:
      features: ``[batch, frames, bins]``.
      width: N, frames each side.

    Returns:
      Tensor of the same shape.
    """
    padded = tf.concat([tf.repeat(features[:, :1], width, axis=1), features,
                        tf.repeat(features[:, -1:], width, axis=1)], axis=1)
    frames = tf.shape(features)[1]
    denom = 2.0 * sum(n * n for n in range(1, width + 1))
    out = tf.zeros_like(features)
    for n in range(1, width + 1):
        ahead = padded[:, width + n:width + n + frames]
        behind = padded[:, width - n:width - n + frames]
        out += float(n) * (ahead - behind)
    return out / denom


# Largest weight block of a projection (see ``projection_blocks``): TFLite's weight
# quantizers leave constant weights with fewer than 1024 elements in float.
MAX_BLOCK_WEIGHTS = 1023


def projection_blocks(matrix: np.ndarray, max_weights: int = MAX_BLOCK_WEIGHTS
                      ) -> list[tuple[int, int, int, int]]:
    """Splits a projection ``x @ matrix`` into column blocks over their nonzero rows.

    A mel filterbank is banded: each band reads a few neighbouring FFT bins, so computing it
    as a few ``x[..., r0:r1] @ matrix[r0:r1, c0:c1]`` blocks does about a quarter of the
    multiply-adds of the dense product (the zeros are skipped) with the same result. Blocks
    stay below ``max_weights`` elements, so a quantizing TFLite conversion (dynamic-range,
    int8) keeps the frontend in float: quantizing the power spectrum's huge dynamic range
    to 8 bits destroys the log-mel features (DESIGN.md), while the classifier after them
    quantizes well.

    Args:
      matrix: ``[rows, cols]`` weights.
      max_weights: the most elements in one block (a single column is never split).

    Returns:
      ``(col_start, col_stop, row_start, row_stop)`` per block, covering every column in
      order.
    """
    nonzero = matrix != 0

    def span(c0: int, c1: int) -> tuple[int, int]:
        r = np.flatnonzero(nonzero[:, c0:c1].any(axis=1))
        return (int(r[0]), int(r[-1]) + 1) if r.size else (0, 1)  # all-zero columns

    blocks, c0, n = [], 0, matrix.shape[1]
    while c0 < n:
        c1 = c0 + 1
        while c1 < n:
            r0, r1 = span(c0, c1 + 1)
            if (r1 - r0) * (c1 + 1 - c0) > max_weights:
                break
            c1 += 1
        blocks.append((c0, c1) + span(c0, c1))
        c0 = c1
    return blocks


def blocked_matmul(x: tf.Tensor, matrix: np.ndarray,
                   blocks: list[tuple[int, int, int, int]]) -> tf.Tensor:
    """``x @ matrix`` computed block by block (see :func:`projection_blocks`).

    The gradient is one dense ``g @ matrix.T``: the automatic one would pad every block's
    input gradient back to the full width and add them up.
    """
    rows, cols = matrix.shape
    x = tf.convert_to_tensor(x)

    def product(x):
        # The blocks multiply a 2-D view of ``x``. Column slices of a rank-3 ``x`` sent to
        # tf.matmul as they are (a broadcasting batch matmul) made the whole log-mel of one
        # utterance (a batch of one, as the tf.data pipeline computes it) take twice the CPU
        # time: 1.9 ms against 0.8 ms per EmoDB file (make bench, pipeline part). tf.slice
        # rather than [] indexing: every graph node counts again each time a tf.data
        # iterator instantiates its map function (see frame_signal).
        flat = tf.reshape(x, [-1, rows])
        parts = [tf.matmul(tf.slice(flat, [0, r0], [-1, r1 - r0]),
                           tf.constant(matrix[r0:r1, c0:c1]))
                 for c0, c1, r0, r1 in blocks]
        out = parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)
        out = tf.reshape(out, tf.concat([tf.shape(x)[:-1], [cols]], axis=0))
        out.set_shape(x.shape[:-1].concatenate([cols]))
        return out

    if not _written_gradients:
        return product(x)

    @tf.custom_gradient
    def with_gradient(x):
        def grad(g):
            return tf.matmul(g, tf.constant(matrix), transpose_b=True)

        return product(x), grad

    return with_gradient(x)


def frame_signal(signal: tf.Tensor, frame_length: int, frame_step: int) -> tf.Tensor:
    """``[batch, samples]`` -> ``[batch, frames, frame_length]``: the frames of
    ``tf.signal.frame(signal, frame_length, frame_step)`` (not centred, no end padding; the
    signal at least one frame long), built from fewer graph nodes.

    Like ``tf.signal.frame``, it cuts the signal into subframes of
    ``gcd(frame_length, frame_step)`` samples and gathers each frame's subframes; only the
    shape handling differs. Written for rank 2, it takes a fraction of the general
    function's nodes (any rank, any axis), and node count is what a tf.data pipeline pays
    for on every pass: each new iterator instantiates its map functions again, running
    Grappler over every node. With a static length every shape is a Python int, so a
    fixed-length export (TFLite) gets constant shapes and gather indices, and no slice
    unless the length is not a whole number of subframes. Frames that neither overlap nor
    leave gaps (``frame_length == frame_step``) are the subframes themselves: no gather, and
    the gradient is a reshape.
    """
    sub = math.gcd(frame_length, frame_step)
    per_frame, per_hop = frame_length // sub, frame_step // sub
    samples = signal.shape[1]
    if samples is not None:
        count = 1 + (samples - frame_length) // frame_step
        if samples % sub:
            # tf.slice, not a strided slice: its gradient (a pad) costs half as much.
            signal = tf.slice(signal, [0, 0], [-1, samples - samples % sub])
        subframes = tf.reshape(signal, [-1, samples // sub, sub])
        if frame_length == frame_step:
            return subframes
        index = np.arange(count)[:, None] * per_hop + np.arange(per_frame)
        return tf.reshape(tf.gather(subframes, index.astype(np.int32), axis=1),
                          [-1, count, frame_length])
    batch, length = tf.unstack(tf.shape(signal))
    count = 1 + (length - frame_length) // frame_step
    whole = length // sub
    subframes = tf.reshape(tf.slice(signal, [0, 0], tf.stack([-1, whole * sub])),
                           tf.stack([batch, whole, sub]))
    if frame_length == frame_step:
        subframes.set_shape([signal.shape[0], None, frame_length])
        return subframes
    index = tf.range(count)[:, None] * per_hop + np.arange(per_frame, dtype=np.int32)
    frames = tf.reshape(tf.gather(subframes, index, axis=1),
                        tf.stack([batch, count, frame_length]))
    frames.set_shape([signal.shape[0], None, frame_length])
    return frames


def frame_time(features: tf.Tensor, frame_length: int, frame_step: int) -> tf.Tensor:
    """``[batch, time, ...]`` -> ``[batch, frames, frame_length, ...]``: the frames of
    ``tf.signal.frame(features, frame_length, frame_step, axis=1)`` (at least one frame
    long; the trailing dimensions known).

    A frame of ``frame_length`` time steps is ``frame_length * D`` contiguous values of the
    features flattened to ``[batch, time * D]`` (``D`` the product of the trailing
    dimensions), so this is :func:`frame_signal` on that flat signal. Its gradient is a
    gather's (or, for frames that neither overlap nor leave gaps, a reshape), where
    ``tf.signal.frame``'s is a strided-slice gradient that cost a CNN-LSTM's
    forward-and-backward pass about 6% of its time.
    """
    trailing = features.shape[2:].as_list()
    if any(d is None for d in trailing):
        raise ValueError(f"frame_time needs known trailing dimensions, got {features.shape}")
    depth = int(np.prod(trailing, dtype=np.int64))
    time = features.shape[1]
    flat = tf.reshape(features, [-1, time * depth] if time is not None
                      else tf.stack([tf.shape(features)[0], -1]))
    frames = frame_signal(flat, frame_length * depth, frame_step * depth)
    # frame_signal knows the frame count statically when the length is static.
    count = frames.shape[1] if frames.shape[1] is not None else tf.shape(frames)[1]
    return tf.reshape(frames, [-1, count, frame_length] + trailing)


def hann_window(frame_length: int) -> np.ndarray:
    """The periodic Hann window (``tf.signal.hann_window``'s), as a NumPy constant."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(frame_length) / frame_length)
            ).astype(np.float32)


def stft(waveform: tf.Tensor, frame_length: int, frame_step: int,
         fft_length: int) -> tf.Tensor:
    """STFT of ``[batch, samples]`` waveforms (periodic Hann window, frames not centred; at
    least one frame long): ``[batch, frames, fft_length // 2 + 1]`` complex64.

    :func:`frame_signal`, the window and ``tf.signal.rfft``: what TFLite converts to
    built-in ops, RFFT2D among them.
    """
    return tf.signal.rfft(frame_signal(waveform, frame_length, frame_step)
                          * hann_window(frame_length), [fft_length])


def _power(spec: tf.Tensor) -> tf.Tensor:
    """``|spec|^2``, elementwise."""
    return tf.square(tf.math.real(spec)) + tf.square(tf.math.imag(spec))


class LogMelGradient:
    """The input gradient of ``log(|STFT(x)|^2 @ mel + floor)``, written out and compiled.

    TensorFlow's automatic gradient goes through the RFFT's generic gradient and the
    framing's gather, and costs twice the forward pass. With ``S = rfft(w * frame)``,
    ``P = |S|^2``, ``E = P @ mel + floor`` and ``dL/dlog(E) = g``, the chain rule gives
    ``dL/dP = (g / E) @ mel.T`` and, per frame, ``dL/dframe = w * N * irfft(c * dL/dP *
    S)[:frame_length]`` (``N`` the FFT length, ``c`` 2 at the DC and Nyquist bins and 1
    elsewhere); the frames' gradients overlap-add onto the samples (:func:`_overlap_add`).

    The whole backward pass is one XLA-compiled function: left to TensorFlow's executor, its
    elementwise steps (the division, the complex products, the windowing and the shifted
    adds) each made a full pass over the batch's spectra, and took more time than the
    inverse FFT itself. One instance per frontend holds the compiled function, so eager
    callers (an attack library calling the model eagerly) compile it once per input shape,
    not once per call. First-order only (the gradient's own gradient is not derived).

    Args:
      mel: the ``[fft_length // 2 + 1, n_mels]`` mel filterbank.
      frame_length, frame_step, fft_length: the STFT's.
    """

    def __init__(self, mel: np.ndarray, frame_length: int, frame_step: int,
                 fft_length: int):
        edges = np.ones(fft_length // 2 + 1, np.float32)
        edges[0] = edges[-1] = 2.0
        # mel.T with the DC and Nyquist doubling folded in: one matmul gives c * dL/dP.
        self._projection = (mel.T * edges[None, :]).astype(np.float32)
        # N times the window, zero beyond the frame: the frames' gradients are windowed and
        # overlap-added in hop-sized pieces (see _overlap_add).
        self._window = np.zeros(-(-frame_length // frame_step) * frame_step, np.float32)
        self._window[:frame_length] = fft_length * hann_window(frame_length)
        self._frame_step = frame_step
        self._fft_length = fft_length
        self._compiled = tf.function(self._backward, jit_compile=True, autograph=False)

    def _backward(self, g: tf.Tensor, energy: tf.Tensor, spec: tf.Tensor) -> tf.Tensor:
        bins = self._projection.shape[1]
        per_bin = tf.reshape(tf.reshape(g / energy, [-1, g.shape[-1]]) @ self._projection,
                             tf.concat([tf.shape(g)[:-1], [bins]], 0))
        z = tf.complex(per_bin * tf.math.real(spec), per_bin * tf.math.imag(spec))
        frames = tf.signal.irfft(z, [self._fft_length])
        return _overlap_add(frames, self._window, self._frame_step)

    def __call__(self, g: tf.Tensor, energy: tf.Tensor, spec: tf.Tensor,
                 num_samples: tf.Tensor) -> tf.Tensor:
        """``dL/dx [batch, num_samples]`` from ``g = dL/dlog(E)`` and the forward pass's ``E``
        and ``S`` (``[batch, frames, n_mels]``, ``[batch, frames, bins]``)."""
        return _fit_length(self._compiled(g, energy, spec), num_samples)


def _overlap_add(frames: tf.Tensor, window: np.ndarray, frame_step: int) -> tf.Tensor:
    """``overlap_and_add(frames[..., :len] * window[:len], frame_step)``, where ``window``
    is zero past the frame length and ``k * frame_step`` long (``k`` frames overlap each
    sample): the windowed frames are cut into ``k`` hop-sized pieces, and piece ``j`` of
    every frame lands ``j`` hops later, so the sum is ``k`` shifted adds. Cheaper than
    ``tf.signal.overlap_and_add`` plus a separate slice and product, and exact.
    ``frames [B, F, L]`` -> ``[B, (F + k - 1) * frame_step]``."""
    pieces_n = len(window) // frame_step
    if frames.shape[-1] < len(window):  # hops so long that k hops pass the FFT length
        frames = tf.pad(frames, [[0, 0], [0, 0], [0, len(window) - frames.shape[-1]]])
    batch, count = tf.shape(frames)[0], tf.shape(frames)[1]
    windowed = frames[..., :len(window)] * tf.constant(window)
    pieces = tf.reshape(windowed, [batch, count, pieces_n, frame_step])
    total = None
    for j in range(pieces_n):
        shifted = tf.pad(pieces[:, :, j], [[0, 0], [j, pieces_n - 1 - j], [0, 0]])
        total = shifted if total is None else total + shifted
    return tf.reshape(total, [batch, (count + pieces_n - 1) * frame_step])


def _fit_length(samples: tf.Tensor, num_samples: tf.Tensor) -> tf.Tensor:
    """``samples [B, n]`` zero-padded or cut to ``num_samples`` columns (samples no frame
    covers get no gradient; columns past the signal are the window's zeros)."""
    covered = tf.shape(samples)[1]
    return tf.pad(samples, [[0, 0], [0, tf.maximum(0, num_samples - covered)]]
                  )[:, :num_samples]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LogMelFrontend(keras.layers.Layer):
    """Waveform ``[batch, samples]`` -> log-mel or MFCC features ``[batch, frames, bins, C]``.

    STFT with a periodic Hann window (:func:`stft`: the frames of ``tf.signal.stft`` in
    fewer graph nodes, not centred: frame ``t`` covers samples ``[t * hop, t * hop +
    win)``), power spectrum, mel filterbank, natural log with an additive floor (the
    gradient of these four to the samples is written out and compiled for fast waveform
    attacks, :class:`LogMelGradient`), optionally a DCT to MFCCs, optionally delta and
    delta-delta as extra channels. Clips shorter than one frame are zero-padded to one
    frame. The mel and DCT projections run as small blocks (:func:`projection_blocks`):
    fewer multiply-adds, and quantized TFLite exports keep them in float.

    Args:
      sample_rate: input sample rate in Hz.
      frame_ms: analysis window length in milliseconds.
      hop_ms: hop between frames in milliseconds.
      n_mels: number of mel bands.
      fmin: lowest mel edge in Hz.
      fmax: highest mel edge in Hz (None: Nyquist).
      n_mfcc: 0 for log-mel features, else the number of MFCCs to keep.
      use_deltas: append delta and delta-delta channels.
      log_floor: added to the mel power before the log; bounds the gradient near silence.
    """

    def __init__(self, sample_rate: int = 16000, frame_ms: float = 25.0, hop_ms: float = 10.0,
                 n_mels: int = 64, fmin: float = 20.0, fmax: float | None = None,
                 n_mfcc: int = 0, use_deltas: bool = False, log_floor: float = 1e-6,
                 **kwargs):
        super().__init__(**kwargs)
        fmax = float(fmax) if fmax else sample_rate / 2.0
        if not 0 <= fmin < fmax <= sample_rate / 2.0:
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={fmin}, "
                             f"fmax={fmax}, sample_rate={sample_rate}")
        if n_mfcc < 0 or n_mfcc > n_mels:
            raise ValueError(f"n_mfcc must be in [0, n_mels={n_mels}], got {n_mfcc}")
        self.sample_rate = int(sample_rate)
        self.frame_ms = float(frame_ms)
        self.hop_ms = float(hop_ms)
        self.n_mels = int(n_mels)
        self.fmin = float(fmin)
        self.fmax = fmax
        self.n_mfcc = int(n_mfcc)
        self.use_deltas = bool(use_deltas)
        self.log_floor = float(log_floor)
        self.frame_length = int(round(self.sample_rate * self.frame_ms / 1000.0))
        self.frame_step = int(round(self.sample_rate * self.hop_ms / 1000.0))
        if self.frame_length < 2 or self.frame_step < 1:
            raise ValueError("frame_ms and hop_ms are too short for this sample rate")
        self.fft_length = 1 << (self.frame_length - 1).bit_length()
        self._mel = mel_filterbank(self.n_mels, self.fft_length, self.sample_rate, self.fmin,
                                   self.fmax)
        self._mel_blocks = projection_blocks(self._mel)
        self._dct = dct_matrix(self.n_mels, self.n_mfcc) if self.n_mfcc else None
        self._dct_blocks = projection_blocks(self._dct) if self.n_mfcc else None
        self._log_mel_gradient = LogMelGradient(self._mel, self.frame_length,
                                                self.frame_step, self.fft_length)

    def _log_mel(self, waveform: tf.Tensor) -> tf.Tensor:
        """``[batch, samples]`` -> ``[batch, frames, n_mels]`` log-mel energies, with the
        written-out gradient of :class:`LogMelGradient` (TensorFlow's own inside
        :func:`automatic_gradients`). The forward ops are the same either way."""
        def forward(x):
            spec = stft(x, self.frame_length, self.frame_step, self.fft_length)
            return spec, blocked_matmul(_power(spec), self._mel, self._mel_blocks) + self.log_floor

        if not _written_gradients:
            return tf.math.log(forward(waveform)[1])

        @tf.custom_gradient
        def log_mel(x):
            spec, energy = forward(x)

            def grad(g):
                return self._log_mel_gradient(g, energy, spec, tf.shape(x)[-1])

            return tf.math.log(energy), grad

        return log_mel(waveform)

    @property
    def bins(self) -> int:
        """Feature bins per frame (mel bands or MFCCs)."""
        return self.n_mfcc or self.n_mels

    @property
    def channels(self) -> int:
        """Feature channels: 1, or 3 with deltas."""
        return 3 if self.use_deltas else 1

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of ``num_samples`` samples."""
        return 1 + max(0, num_samples - self.frame_length) // self.frame_step

    def call(self, waveform: tf.Tensor) -> tf.Tensor:
        waveform = tf.convert_to_tensor(waveform, tf.float32)
        samples = waveform.shape[-1]
        if samples is None or samples < self.frame_length:  # pad short clips to one frame
            short = tf.maximum(0, self.frame_length - tf.shape(waveform)[-1])
            waveform = tf.pad(waveform, [[0, 0], [0, short]])
        feats = self._log_mel(waveform)
        if self._dct is not None:
            feats = blocked_matmul(feats, self._dct, self._dct_blocks)
        if self.use_deltas:
            d1 = deltas(feats)
            return tf.stack([feats, d1, deltas(d1)], axis=-1)
        return tf.expand_dims(feats, -1)

    def compute_output_shape(self, input_shape):
        n = input_shape[-1]
        frames = None if n is None else self.num_frames(n)
        return (input_shape[0], frames, self.bins, self.channels)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(sample_rate=self.sample_rate, frame_ms=self.frame_ms, hop_ms=self.hop_ms,
                      n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax, n_mfcc=self.n_mfcc,
                      use_deltas=self.use_deltas, log_floor=self.log_floor)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeatureNormalization(keras.layers.Layer):
    """Standardise features per (bin, channel) with statistics learned from training data.

    The statistics are non-trainable weights, so they are saved in the model and travel to
    every export. :meth:`adapt` computes them from a dataset of feature batches in one
    streaming pass (float64 sums), touching only the data it is given: pass the training
    split only (nothing learned from the test speakers).

    With ``per_utterance=True`` each utterance's own mean over time is subtracted first
    (cepstral mean normalisation, computed from that utterance alone, so still strictly
    speaker-independent); the global statistics then describe the mean-removed features.

    Args:
      per_utterance: subtract each utterance's time-mean before global standardisation.
      epsilon: variance floor.
    """

    def __init__(self, per_utterance: bool = False, epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.per_utterance = bool(per_utterance)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        shape = tuple(input_shape[2:])
        if any(d is None for d in shape):
            raise ValueError(f"bins and channels must be known, got input shape {input_shape}")
        self.mean = self.add_weight(name="mean", shape=shape, initializer="zeros",
                                    trainable=False)
        self.variance = self.add_weight(name="variance", shape=shape, initializer="ones",
                                        trainable=False)
        super().build(input_shape)

    def _center(self, features: tf.Tensor) -> tf.Tensor:
        if self.per_utterance:
            features = features - tf.reduce_mean(features, axis=1, keepdims=True)
        return features

    def adapt(self, feature_batches) -> None:
        """Learn mean and variance from an iterable of ``[batch, frames, bins, C]`` tensors."""
        total, total_sq, count = None, None, 0
        for batch in feature_batches:
            batch = self._center(tf.convert_to_tensor(batch, tf.float32))
            if not self.built:
                self.build(batch.shape)
            flat = tf.cast(tf.reshape(batch, [-1] + list(batch.shape[2:])), tf.float64)
            s, s2 = tf.reduce_sum(flat, 0).numpy(), tf.reduce_sum(flat ** 2, 0).numpy()
            total = s if total is None else total + s
            total_sq = s2 if total_sq is None else total_sq + s2
            count += int(flat.shape[0])
        if not count:
            raise ValueError("FeatureNormalization.adapt got no data")
        mean = total / count
        self.mean.assign(mean.astype(np.float32))
        self.variance.assign(np.maximum(total_sq / count - mean ** 2, 0.0).astype(np.float32))

    def call(self, features: tf.Tensor, mean: tf.Tensor | None = None,
             variance: tf.Tensor | None = None) -> tf.Tensor:
        """Standardises ``features``; ``mean``/``variance`` (``[batch, bins, C]``), when given,
        replace the learned statistics per example (per-speaker normalisation)."""
        if mean is not None:
            return ((features - mean[:, None]) * tf.math.rsqrt(variance[:, None] + self.epsilon))
        features = self._center(features)
        return (features - self.mean) * tf.math.rsqrt(self.variance + self.epsilon)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(per_utterance=self.per_utterance, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SpecAugment(keras.layers.Layer):
    """SpecAugment-style frequency and time masking, active only with ``training=True``.

    Masks are set to zero, the mean of standardised features, so apply this after
    :class:`FeatureNormalization`. Each example gets its own random masks.

    Args:
      freq_masks: number of frequency masks per example.
      freq_width: maximum width of a frequency mask, in bins.
      time_masks: number of time masks per example.
      time_width: maximum width of a time mask, in frames.
    """

    def __init__(self, freq_masks: int = 2, freq_width: int = 8, time_masks: int = 2,
                 time_width: int = 20, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.freq_masks = int(freq_masks)
        self.freq_width = int(freq_width)
        self.time_masks = int(time_masks)
        self.time_width = int(time_width)
        self.seed = seed
        self._rng = keras.random.SeedGenerator(seed)

    def _mask(self, shape: tf.Tensor, axis_len: tf.Tensor, count: int, width: int,
              axis: int) -> tf.Tensor:
        """A ``[batch, 1 or len, 1 or len, 1]`` keep-mask with ``count`` bands per example."""
        batch = shape[0]
        keep = tf.ones([batch, axis_len], tf.float32)
        pos = tf.range(axis_len)[None, :]
        for _ in range(count):
            w = tf.cast(keras.random.uniform([batch, 1], 0, width + 1, seed=self._rng), tf.int32)
            start_max = tf.cast(tf.maximum(axis_len - w, 1), tf.float32)
            start = tf.cast(keras.random.uniform([batch, 1], seed=self._rng) * start_max,
                            tf.int32)
            band = tf.logical_and(pos >= start, pos < start + w)
            keep *= 1.0 - tf.cast(band, tf.float32)
        return keep[:, :, None, None] if axis == 1 else keep[:, None, :, None]

    def call(self, features: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        if not training or (self.freq_masks == 0 and self.time_masks == 0):
            return features
        shape = tf.shape(features)
        mask = self._mask(shape, shape[1], self.time_masks, self.time_width, axis=1)
        mask = mask * self._mask(shape, shape[2], self.freq_masks, self.freq_width, axis=2)
        return features * mask

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(freq_masks=self.freq_masks, freq_width=self.freq_width,
                      time_masks=self.time_masks, time_width=self.time_width, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class InputNoise(keras.layers.Layer):
    """Gaussian noise added to each waveform at a level relative to its own peak, in
    training *and* at inference: the randomized input defense (Gaussian augmentation with
    noise kept at test time, as in randomized smoothing, Cohen et al. 2019).

    The noise of example ``i`` has standard deviation ``10 ** (level_db / 20) * max|x_i|``,
    the same scale as the attacks' L-inf budgets (dB below each utterance's peak): a level
    above the attack budget fills the quiet spectral cells that a perturbation would
    otherwise own with noise the model was trained on. (On EmoDB that is no defense on its
    own; see BENCHMARKS.md.) The scale is differentiated like everything else (an attacker
    who moves the peak moves the noise). A model with this layer is random:
    :class:`ser_tf.models.SERModel` averages the logits of ``draws`` noise draws at
    inference, and it can only be judged by attacks that average gradients over draws
    too (expectation over transformation, ``ser-attack --eot``).

    Args:
      level_db: noise standard deviation in dB relative to each waveform's peak.
      draws: noise draws whose logits the model averages at inference (training uses one
        draw per example).
      seed: op-level seed of the noise.

    The noise is a stateful ``tf.random.normal``, which TFLite runs as its built-in
    RANDOM_STANDARD_NORMAL, so exported models stay random too. TensorFlow's seeding rules
    apply: every call of one traced function draws anew, but two functions traced under
    the same global seed (``tf.random.set_seed``) start from the same draws.
    """

    def __init__(self, level_db: float = -30.0, draws: int = 1, seed: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if not level_db < 0:
            raise ValueError(f"level_db must be negative (dB below each waveform's peak), "
                             f"got {level_db}")
        if draws < 1:
            raise ValueError(f"draws must be at least 1, got {draws}")
        self.level_db = float(level_db)
        self.draws = int(draws)
        self.seed = seed

    @property
    def scale(self) -> float:
        """Noise standard deviation per unit of peak amplitude."""
        return 10.0 ** (self.level_db / 20.0)

    def call(self, waveform: tf.Tensor) -> tf.Tensor:
        waveform = tf.convert_to_tensor(waveform, tf.float32)
        peak = tf.reduce_max(tf.abs(waveform), axis=-1, keepdims=True)
        noise = tf.random.normal(tf.shape(waveform), seed=self.seed)
        return waveform + (self.scale * peak) * noise

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(level_db=self.level_db, draws=self.draws, seed=self.seed)
        return config
