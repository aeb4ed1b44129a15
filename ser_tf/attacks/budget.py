"""Perturbation budgets that mean something for audio, and what an attack achieved.

A :class:`Budget` is a norm ball around each input, sized per example:

* ``linf_db`` (waveform): every sample may move by at most ``10**(dB/20)`` times the
  utterance's own peak, e.g. -40 dB allows 1% of the peak. Loud and quiet utterances get
  the same audibility, which an absolute epsilon would not give them.
* ``snr_db`` (waveform): the perturbation's energy is at least ``dB`` below the utterance's,
  i.e. ``||delta||_2 <= ||x||_2 * 10**(-dB/20)``.
* ``linf`` and ``l2`` (features): absolute radii in normalised-feature units (the
  classifier's standardised log-mel input), as the published feature-domain SER
  evaluations used.

Waveform attacks also keep every sample inside the valid range ``[-1, 1]``.

The attacks work in a *scaled* space: each example is divided by its reference scale (peak
or L2 norm), so that one scalar radius serves the whole batch and CleverHans, which takes
scalar epsilons, can be used unchanged (see :func:`scaled_problem`). :func:`project` is the
last word: it puts any candidate back inside the ball and the sample range, so no attack
can exceed its budget by construction, and :func:`achieved` measures what was used.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import tensorflow as tf

KINDS = ("linf_db", "snr_db", "linf", "l2")
WAVEFORM_KINDS = ("linf_db", "snr_db")
SAMPLE_RANGE = (-1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Budget:
    """A per-example perturbation bound.

    Attributes:
      kind: one of :data:`KINDS`.
      value: dB relative to the peak (``linf_db``, e.g. -40), SNR in dB (``snr_db``, e.g.
        30), or a radius in normalised-feature units (``linf``, ``l2``).
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; choose from {KINDS}")
        if not math.isfinite(self.value):
            raise ValueError(f"budget value must be finite, got {self.value}")
        if self.kind in ("linf", "l2") and self.value <= 0:
            raise ValueError(f"a {self.kind} radius must be positive, got {self.value}")

    @classmethod
    def parse(cls, spec: str) -> "Budget":
        """``"linf_db:-40"``, ``"snr_db:30"``, ``"linf:0.5"`` or ``"l2:10"``."""
        kind, sep, value = spec.partition(":")
        if not sep:
            raise ValueError(f"budget {spec!r} is not KIND:VALUE (kinds: {KINDS})")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"budget {spec!r}: {value!r} is not a number") from None
        return cls(kind.strip(), number)

    @property
    def domain(self) -> str:
        """``waveform`` or ``features``."""
        return "waveform" if self.kind in WAVEFORM_KINDS else "features"

    @property
    def norm(self) -> float:
        """The norm order as CleverHans spells it (``np.inf`` or 2)."""
        return np.inf if self.kind in ("linf_db", "linf") else 2

    @property
    def radius(self) -> float:
        """The ball's radius in the scaled space (per unit of reference scale)."""
        if self.kind == "linf_db":
            return 10.0 ** (self.value / 20.0)
        if self.kind == "snr_db":
            return 10.0 ** (-self.value / 20.0)
        return float(self.value)

    @property
    def label(self) -> str:
        """Short text for plots and logs, e.g. ``-40 dB`` or ``SNR 30 dB``."""
        if self.kind == "linf_db":
            return f"{self.value:g} dB"
        if self.kind == "snr_db":
            return f"SNR {self.value:g} dB"
        return f"{self.kind} {self.value:g}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": float(self.value), "norm": self.norm_name,
                "domain": self.domain}

    @property
    def norm_name(self) -> str:
        return "linf" if self.norm == np.inf else "l2"

    def clip_range(self) -> tuple[float, float] | None:
        """Valid input range: ``[-1, 1]`` for waveforms, unbounded for features."""
        return SAMPLE_RANGE if self.domain == "waveform" else None


def _reduce_axes(x: tf.Tensor) -> list[int]:
    return list(range(1, len(x.shape)))


def reference_scale(x: tf.Tensor, budget: Budget) -> tf.Tensor:
    """Per-example scale ``[B, 1, ...]`` the radius is relative to (peak, L2 norm or 1)."""
    x = tf.convert_to_tensor(x, tf.float32)
    axes = _reduce_axes(x)
    if budget.kind == "linf_db":
        scale = tf.reduce_max(tf.abs(x), axis=axes, keepdims=True)
    elif budget.kind == "snr_db":
        scale = tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=True))
    else:
        return tf.ones([tf.shape(x)[0]] + [1] * len(axes), x.dtype)
    # A silent input gets a tiny but nonzero ball instead of a division by zero.
    return tf.maximum(scale, 1e-8)


def epsilon(x: tf.Tensor, budget: Budget) -> tf.Tensor:
    """Per-example radius ``[B, 1, ...]`` in input units."""
    return budget.radius * reference_scale(x, budget)


def radius_used(x: tf.Tensor, x_adv: tf.Tensor, budget: Budget) -> tf.Tensor:
    """Per-example ``[B]`` share of ``budget``'s radius the perturbation uses: its norm
    (the budget's) over :func:`epsilon`. At most 1 inside the ball; an iterative L-inf
    attack with sign steps reaches 1 on almost every example."""
    x = tf.convert_to_tensor(x, tf.float32)
    delta = tf.convert_to_tensor(x_adv, tf.float32) - x
    axes = _reduce_axes(x)
    if budget.norm == np.inf:
        norm = tf.reduce_max(tf.abs(delta), axis=axes)
    else:
        norm = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=axes))
    return norm / tf.reshape(epsilon(x, budget), [-1])


def project(x: tf.Tensor, x_adv: tf.Tensor, budget: Budget) -> tf.Tensor:
    """Puts ``x_adv`` inside the budget's ball around ``x`` and inside the sample range."""
    x = tf.convert_to_tensor(x, tf.float32)
    delta = tf.convert_to_tensor(x_adv, tf.float32) - x
    eps = epsilon(x, budget)
    if budget.norm == np.inf:
        delta = tf.clip_by_value(delta, -eps, eps)
    else:
        norm = tf.sqrt(tf.reduce_sum(tf.square(delta), axis=_reduce_axes(x), keepdims=True))
        delta = delta * tf.minimum(1.0, eps / tf.maximum(norm, 1e-12))
    out = x + delta
    bounds = budget.clip_range()
    if bounds is not None:
        out = tf.clip_by_value(out, *bounds)
    return out


@dataclasses.dataclass
class ScaledProblem:
    """An attack problem in the scaled space where the budget is one scalar radius.

    Attributes:
      z: the inputs divided by their reference scale.
      model_fn: logits of a scaled input (rescales, then calls the model).
      eps: the scalar radius (:attr:`Budget.radius`).
      clip_min, clip_max: per-example sample range in the scaled space (None for features).
      scale: the per-example reference scale.
    """

    z: tf.Tensor
    model_fn: Callable[[tf.Tensor], tf.Tensor]
    eps: float
    clip_min: tf.Tensor | None
    clip_max: tf.Tensor | None
    scale: tf.Tensor

    def unscale(self, z_adv: tf.Tensor) -> tf.Tensor:
        return z_adv * self.scale


def scaled_problem(model_fn: Callable[[tf.Tensor], tf.Tensor], x: tf.Tensor,
                   budget: Budget) -> ScaledProblem:
    """Rewrites ``(model_fn, x, budget)`` so that the radius is the same for every example."""
    x = tf.convert_to_tensor(x, tf.float32)
    scale = reference_scale(x, budget)
    bounds = budget.clip_range()
    clip_min = clip_max = None
    if bounds is not None:
        clip_min, clip_max = bounds[0] / scale, bounds[1] / scale
    return ScaledProblem(z=x / scale, model_fn=lambda z: model_fn(z * scale),
                         eps=budget.radius, clip_min=clip_min, clip_max=clip_max,
                         scale=scale)


def achieved(x: np.ndarray, x_adv: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example perturbation actually used.

    Returns:
      ``linf`` and ``l2`` (absolute), ``linf_db`` (max |delta| relative to the peak of
      ``x``, dB; -inf for no change) and ``snr_db`` (energy of ``x`` over energy of the
      perturbation, dB; +inf for no change), each ``[B]`` float64.
    """
    x = np.asarray(x, np.float64)
    delta = np.asarray(x_adv, np.float64) - x
    flat_x = x.reshape(len(x), -1)
    flat_d = delta.reshape(len(x), -1)
    linf = np.abs(flat_d).max(axis=1)
    l2 = np.sqrt((flat_d ** 2).sum(axis=1))
    peak = np.abs(flat_x).max(axis=1)
    energy = (flat_x ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        linf_db = 20.0 * np.log10(linf / peak)
        snr_db = 10.0 * np.log10(energy / (l2 ** 2))
    return {"linf": linf, "l2": l2, "linf_db": linf_db, "snr_db": snr_db}
