"""Building-block layers shared by the classifiers."""

from __future__ import annotations

import contextlib
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ser_tf.frontend import dct_matrix, deltas, frame_time, written_gradients

# Input channels up to which a stride-1 "same" conv's input gradient is computed as a
# depthwise conv (see conv2d_same): on a 1-channel spectrogram that takes 0.35-0.6x the time
# of TensorFlow's Conv2DBackpropInput on CPU (8-16 filters, BUILD.md).
DEPTHWISE_GRADIENT_CHANNELS = 4
# Whether ChunkEncoders traced now fold their BatchNorms at inference (see unfolded_batchnorm).
_fold_batchnorm = True


@contextlib.contextmanager
def unfolded_batchnorm():
    """ChunkEncoders traced (or run eagerly) inside call their conv stack layer by layer at
    inference instead of :func:`folded_stack`; the values are the same up to float
    rounding. For benchmarks and tests that compare the two."""
    global _fold_batchnorm
    saved, _fold_batchnorm = _fold_batchnorm, False
    try:
        yield
    finally:
        _fold_batchnorm = saved


def conv_block(filters: int, kernel: int, pool: tuple[int, int], name: str) -> list:
    """Conv2D (no bias) -> BatchNorm -> ReLU -> MaxPool, as a list of layers."""
    return [
        keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False,
                            name=f"{name}_conv"),
        # Momentum 0.9: SER corpora give few steps per epoch, and with the default 0.99 the
        # moving statistics used at evaluation lag far behind the weights for many epochs.
        keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn"),
        keras.layers.Activation("relu", name=f"{name}_relu"),
        keras.layers.MaxPooling2D(pool, padding="same", name=f"{name}_pool"),
    ]


def conv2d_same(x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Stride-1, "same"-padded ``tf.nn.conv2d`` whose input gradient, for kernels of odd
    size over few input channels, is written out.

    The input gradient of a stride-1 "same" conv with an odd kernel is the correlation of
    the output gradient with the spatially flipped kernel. TensorFlow's
    ``Conv2DBackpropInput`` computes it as a conv with ``C_in`` output channels, which on
    CPU is slow when ``C_in`` is 1 (the spectrogram). Written out, it is one depthwise conv
    of the output gradient (multiplier ``C_in``) and a sum over the ``C_out`` groups: the
    same values, and the waveform attacks' gradient pass through the CNN-LSTM is cheaper.
    The kernel gradient stays ``Conv2DBackpropFilter`` (graphs that only need the input
    gradient prune it). First-order only.
    """
    kh, kw, c_in, c_out = kernel.shape
    if (not written_gradients() or c_in is None or c_in > DEPTHWISE_GRADIENT_CHANNELS
            or kh % 2 == 0 or kw % 2 == 0):
        return tf.nn.conv2d(x, kernel, 1, "SAME")

    group_sum = tf.constant(np.tile(np.eye(c_in, dtype=np.float32), (c_out, 1)))

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(g):
            flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
            per_group = tf.nn.depthwise_conv2d(g, flipped, [1, 1, 1, 1], "SAME")
            # The sum over the C_out groups (channel c * C_in + j goes to j) as a matmul
            # with a 0/1 matrix: on CPU, 0.85x the time of reduce_sum over a reshape.
            dx = tf.reshape(tf.reshape(per_group, [-1, c_out * c_in]) @ group_sum,
                            tf.concat([tf.shape(per_group)[:-1], [c_in]], 0))
            dk = tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(kernel), out_backprop=g, strides=[1, 1, 1, 1],
                padding="SAME")
            return dx, dk

        return tf.nn.conv2d(x, kernel, 1, "SAME"), grad

    return conv(x, kernel)


def max_pool_same(x: tf.Tensor, layer: keras.layers.MaxPooling2D) -> tf.Tensor:
    """``layer(x)`` for a channels-last MaxPooling2D whose windows tile ``x`` exactly (stride
    = pool size, static height and width divisible by it), with the input gradient written
    out; any other pooling is ``layer(x)`` itself.

    TensorFlow's own gradient is a MaxPoolGrad, which oneDNN's graph rewrite replaces with
    its fast kernel only when it can pair it with the forward pool. Inside a compiled PGD
    loop it failed to in about one trace of three (the cause is in TensorFlow's rewrite
    pass, not found), and the plain kernel took 85 ms against 9 ms on the default CNN-LSTM's
    first block: the whole attack ran 1.5 times slower for the life of that trace. Written
    out, the gradient is one XLA-fused kernel (:func:`_max_pool_gradient`) that routes each
    window's gradient to its first maximum in row-major order, as both of TensorFlow's
    kernels do: the same values, a little slower than oneDNN's kernel (about 1.3x on that
    block) and never 10x slower. First-order only.
    """
    pool, strides = tuple(layer.pool_size), tuple(layer.strides)
    height, width = x.shape[1], x.shape[2]
    if (not written_gradients() or pool != strides or layer.data_format != "channels_last"
            or height is None or width is None or height % pool[0] or width % pool[1]):
        return layer(x)

    @tf.custom_gradient
    def pooled(x):
        y = tf.nn.max_pool2d(x, pool, pool, "VALID")
        return y, lambda g: _max_pool_gradient(x, y, g, pool)

    return pooled(x)


@tf.function(jit_compile=True)
def _max_pool_gradient(x: tf.Tensor, y: tf.Tensor, g: tf.Tensor,
                       pool: tuple[int, int]) -> tf.Tensor:
    """Input gradient of a max pool whose windows tile ``x`` (``[B, H, W, C]``, pooled
    ``y`` and its gradient ``g``, ``[B, H/ph, W/pw, C]``): in each window, ``g`` goes to the
    first element, in row-major order, that equals the window's maximum."""
    ph, pw = pool
    _, height, width, channels = x.shape
    windows = tf.reshape(x, [-1, height // ph, ph, width // pw, pw, channels])
    taken = tf.zeros_like(y, tf.bool)
    zeros = tf.zeros_like(g)
    rows = []
    for i in range(ph):
        row = []
        for j in range(pw):
            first = tf.logical_and(tf.equal(windows[:, :, i, :, j, :], y),
                                   tf.logical_not(taken))
            taken = tf.logical_or(taken, first)
            row.append(tf.where(first, g, zeros))
        rows.append(tf.stack(row, axis=3))
    return tf.reshape(tf.stack(rows, axis=2), tf.shape(x))


def folded_stack(layers: Sequence[keras.layers.Layer], x: tf.Tensor) -> tf.Tensor:
    """Runs ``layers`` (:func:`conv_block` stacks and what follows them) at inference, each
    Conv2D -> BatchNormalization pair as one conv.

    At inference a BatchNorm is an affine map per channel, ``scale * z + shift`` with
    ``scale = gamma / sqrt(moving_var + eps)`` and ``shift = beta - moving_mean * scale``,
    so ``bn(conv(x, K))`` is ``conv(x, K * scale) + shift``: no batch-norm op forward and
    no batch-norm gradient backward (the waveform attacks' gradient pass). The outputs and
    gradients are those of the layers called in turn, up to float rounding (max pools go
    through :func:`max_pool_same`, whose gradient is written out); the ops keep the layers'
    names, which the int8 TFLite export matches (``FLOAT_BLOCKS``). A relu followed by a max
    pool runs as the pool, then the relu: relu is monotone, so the values and gradients are
    the same, and the relu and its gradient touch a quarter of the elements (in the EmoDB
    CNN-LSTM's attack gradient, 1.0 ms of relu-gradient kernel time became 0.4 ms). Convs
    must be stride-1, "same" and undilated, as :func:`conv_block` makes them; other layers
    are called with ``training=False``.
    """
    layers = list(layers)
    i = 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1] if i + 1 < len(layers) else None
        if (isinstance(layer, keras.layers.Activation)
                and layer.activation is keras.activations.relu
                and isinstance(following, keras.layers.MaxPooling2D)):
            with tf.name_scope(following.name):
                x = max_pool_same(x, following)
            with tf.name_scope(layer.name):
                x = tf.nn.relu(x)
            i += 2
            continue
        if isinstance(layer, keras.layers.MaxPooling2D):
            with tf.name_scope(layer.name):
                x = max_pool_same(x, layer)
            i += 1
            continue
        if not (isinstance(layer, keras.layers.Conv2D)
                and isinstance(following, keras.layers.BatchNormalization)):
            x = layer(x, training=False)
            i += 1
            continue
        bn = following
        if (tuple(layer.strides) != (1, 1) or layer.padding != "same"
                or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1
                or layer.data_format != "channels_last" or bn.axis not in (-1, 3)):
            raise ValueError(f"cannot fold {bn.name} into {layer.name}: only stride-1, "
                             "'same', undilated channels-last convs, normalised per channel")
        scale = tf.math.rsqrt(tf.convert_to_tensor(bn.moving_variance) + bn.epsilon)
        if bn.scale:
            scale *= tf.convert_to_tensor(bn.gamma)
        shift = -tf.convert_to_tensor(bn.moving_mean) * scale
        if bn.center:
            shift += tf.convert_to_tensor(bn.beta)
        if layer.use_bias:
            shift += tf.convert_to_tensor(layer.bias) * scale
        with tf.name_scope(layer.name):
            kernel = tf.convert_to_tensor(layer.kernel) * scale
            x = layer.activation(tf.nn.bias_add(conv2d_same(x, kernel), shift))
        i += 2
    return x


@keras.saving.register_keras_serializable(package="ser_tf")
class ChunkEncoder(keras.layers.Layer):
    """Cut a feature map into time chunks and encode each chunk with the same conv stack.

    ``[batch, frames, bins, C]`` -> ``[batch, chunks, units]``. This is the
    TimeDistributed conv stage of the CNN-LSTM SER models, done as one batched conv over
    ``batch * chunks`` images (a reshape, not a per-step loop, so it is fast and exports to
    TFLite built-ins; the chunks are cut by :func:`ser_tf.frontend.frame_time`, whose
    gradient is a gather or a reshape). Inputs shorter than one chunk are zero-padded to
    one chunk. At inference the conv stack runs with its BatchNorms folded into the convs
    (:func:`folded_stack`), the first conv's input gradient written out (:func:`conv2d_same`).

    Args:
      chunk_frames: frames per chunk.
      hop_frames: frames between chunk starts (``< chunk_frames`` overlaps chunks).
      filters: conv filters per block; each block halves time and frequency.
      kernel_sizes: kernel per block (defaults to 5 for the first block, 3 after).
      units: size of each chunk's embedding (a Dense after flattening the last block).
      dropout: dropout before the embedding.
    """

    def __init__(self, chunk_frames: int = 32, hop_frames: int = 16,
                 filters: Sequence[int] = (16, 32, 64), kernel_sizes: Sequence[int] = (),
                 units: int = 128, dropout: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        if chunk_frames < 1 or hop_frames < 1:
            raise ValueError("chunk_frames and hop_frames must be positive")
        self.chunk_frames = int(chunk_frames)
        self.hop_frames = int(hop_frames)
        self.filters = [int(f) for f in filters]
        self.kernel_sizes = [int(k) for k in kernel_sizes] or [5] + [3] * (len(filters) - 1)
        if len(self.kernel_sizes) != len(self.filters):
            raise ValueError("kernel_sizes must have one entry per conv block")
        self.units = int(units)
        self.dropout = float(dropout)
        stack = []
        for i, (f, k) in enumerate(zip(self.filters, self.kernel_sizes)):
            stack += conv_block(f, k, (2, 2), name=f"block{i + 1}")
        stack += [keras.layers.Flatten(name="flatten"),
                  keras.layers.Dropout(self.dropout, name="dropout"),
                  keras.layers.Dense(self.units, activation="relu", name="embed")]
        self.encoder = keras.Sequential(stack, name="chunk_conv")

    def build(self, input_shape):
        self.encoder.build((None, self.chunk_frames) + tuple(input_shape[2:]))
        super().build(input_shape)

    def call(self, features: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        frames = features.shape[1]
        if frames is None:
            short = tf.maximum(0, self.chunk_frames - tf.shape(features)[1])
            features = tf.pad(features, [[0, 0], [0, short], [0, 0], [0, 0]])
        elif frames < self.chunk_frames:
            features = tf.pad(features, [[0, 0], [0, self.chunk_frames - frames], [0, 0],
                                         [0, 0]])
        chunks = frame_time(features, self.chunk_frames, self.hop_frames)
        shape = tf.shape(chunks)
        n = shape[1]
        flat = tf.reshape(chunks, [-1, self.chunk_frames] + features.shape[2:].as_list())
        if training or not _fold_batchnorm:
            encoded = self.encoder(flat, training=training)
        else:
            encoded = folded_stack(self.encoder.layers, flat)
        return tf.reshape(encoded, [shape[0], n, self.units])

    def compute_output_shape(self, input_shape):
        frames = input_shape[1]
        chunks = None
        if frames is not None:
            chunks = 1 + max(0, frames - self.chunk_frames) // self.hop_frames
        return (input_shape[0], chunks, self.units)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(chunk_frames=self.chunk_frames, hop_frames=self.hop_frames,
                      filters=self.filters, kernel_sizes=self.kernel_sizes, units=self.units,
                      dropout=self.dropout)
        return config


STATISTICS = ("mean", "std", "min", "max", "p10", "p50", "p90", "iqr", "skew", "kurtosis",
              "slope")
# Frame-level descriptors, in output order: the static channel's bins ("spectrum"), the
# frame's mean level, cepstra (a DCT of the bins), their deltas and delta-deltas, and the
# spectral flux (RMS change of the bins from the previous frame).
DESCRIPTORS = ("spectrum", "level", "cepstra", "deltas", "delta_deltas", "flux")
# The layer's default set, kept as it was first saved so that older models load unchanged;
# ModelConfig asks for all of DESCRIPTORS.
BASE_DESCRIPTORS = ("spectrum", "level", "cepstra", "deltas")


@keras.saving.register_keras_serializable(package="ser_tf")
class UtteranceStatistics(keras.layers.Layer):
    """Statistical functionals over time of frame-level descriptors (openSMILE-style).

    ``[batch, frames, bins, C]`` normalised features -> ``[batch, D]``. The frame-level
    descriptors (:data:`DESCRIPTORS`) are the static channel's ``bins`` values, the
    frame's mean level, ``n_cepstra`` cepstral coefficients (an orthonormal DCT of the
    bins), their regression deltas and delta-deltas, and the spectral flux; each is
    summarised over time by every statistic in ``statistics``. Utterance-level functionals
    of spectral and cepstral descriptors are what the strongest classical SER systems
    classify (ComParE feature sets with a linear SVM); computed here from the model's own
    features, they are differentiable end to end (percentiles through ``tf.sort``), so
    waveform attacks see the true gradient.

    Args:
      n_cepstra: cepstral coefficients (the cepstral descriptors need at least one).
      statistics: names from :data:`STATISTICS`.
      descriptors: names from :data:`DESCRIPTORS`.
    """

    def __init__(self, n_cepstra: int = 20, statistics: Sequence[str] = STATISTICS,
                 descriptors: Sequence[str] = BASE_DESCRIPTORS, **kwargs):
        super().__init__(**kwargs)
        for name, given, known in (("statistics", statistics, STATISTICS),
                                   ("descriptors", descriptors, DESCRIPTORS)):
            unknown = sorted(set(given) - set(known))
            if unknown or not given:
                raise ValueError(f"unknown {name} {unknown}; choose from {known}")
        self.n_cepstra = int(n_cepstra)
        self.statistics = [str(s) for s in statistics]
        self.descriptor_names = [d for d in DESCRIPTORS if d in set(descriptors)]
        cepstral = {"cepstra", "deltas", "delta_deltas"} & set(self.descriptor_names)
        if cepstral and self.n_cepstra < 1:
            raise ValueError(f"descriptors {sorted(cepstral)} need n_cepstra >= 1")

    def build(self, input_shape):
        bins = input_shape[2]
        if bins is None:
            raise ValueError(f"bins must be known, got input shape {input_shape}")
        if self.n_cepstra > bins:
            raise ValueError(f"n_cepstra={self.n_cepstra} exceeds the {bins} feature bins")
        self._dct = tf.constant(dct_matrix(bins, self.n_cepstra)) if self.n_cepstra else None
        super().build(input_shape)

    def descriptors(self, features: tf.Tensor) -> tf.Tensor:
        """Frame-level descriptors ``[batch, frames, D0]`` from ``[batch, frames, bins, C]``."""
        static = features[..., 0]
        wanted = set(self.descriptor_names)
        parts = []
        if "spectrum" in wanted:
            parts.append(static)
        if "level" in wanted:
            parts.append(tf.reduce_mean(static, axis=-1, keepdims=True))
        if wanted & {"cepstra", "deltas", "delta_deltas"}:
            cepstra = tf.matmul(static, self._dct)
            d1 = deltas(cepstra)
            parts += [c for name, c in (("cepstra", cepstra), ("deltas", d1)) if name in wanted]
            if "delta_deltas" in wanted:
                parts.append(deltas(d1))
        if "flux" in wanted:
            change = static - tf.concat([static[:, :1], static[:, :-1]], axis=1)
            # The epsilon keeps the square root's gradient finite on a repeated frame.
            parts.append(tf.sqrt(tf.reduce_mean(change ** 2, axis=-1, keepdims=True) + 1e-6))
        return tf.concat(parts, axis=-1)

    def call(self, features: tf.Tensor) -> tf.Tensor:
        x = self.descriptors(features)
        frames = tf.cast(tf.shape(x)[1], x.dtype)
        mean = tf.reduce_mean(x, axis=1)
        centered = x - mean[:, None]
        var = tf.reduce_mean(centered ** 2, axis=1)
        std = tf.sqrt(var + 1e-6)
        z = centered / std[:, None]
        ordered = tf.sort(x, axis=1)

        def percentile(q: float) -> tf.Tensor:
            index = tf.cast(tf.round(q * (frames - 1.0)), tf.int32)
            return tf.gather(ordered, index, axis=1)

        t = tf.range(frames, dtype=x.dtype)
        t = (t - tf.reduce_mean(t)) / tf.maximum(tf.math.reduce_std(t), 1.0)
        values = {
            "mean": lambda: mean,
            "std": lambda: std,
            "min": lambda: ordered[:, 0],
            "max": lambda: ordered[:, -1],
            "p10": lambda: percentile(0.1),
            "p50": lambda: percentile(0.5),
            "p90": lambda: percentile(0.9),
            "iqr": lambda: percentile(0.75) - percentile(0.25),
            # Higher moments of standardised values, squashed so that a near-constant
            # descriptor (std ~ 0) cannot produce huge inputs.
            "skew": lambda: tf.tanh(tf.reduce_mean(z ** 3, axis=1) / 3.0),
            "kurtosis": lambda: tf.tanh((tf.reduce_mean(z ** 4, axis=1) - 3.0) / 10.0),
            "slope": lambda: tf.reduce_mean(centered * t[None, :, None], axis=1),
        }
        return tf.concat([values[name]() for name in self.statistics], axis=-1)

    def output_size(self, bins: int) -> int:
        """Length of the output vector for ``bins`` feature bins."""
        sizes = {"spectrum": bins, "level": 1, "cepstra": self.n_cepstra,
                 "deltas": self.n_cepstra, "delta_deltas": self.n_cepstra, "flux": 1}
        return sum(sizes[d] for d in self.descriptor_names) * len(self.statistics)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_size(input_shape[2]))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(n_cepstra=self.n_cepstra, statistics=self.statistics,
                      descriptors=self.descriptor_names)
        return config
