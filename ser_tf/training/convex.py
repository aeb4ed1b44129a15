"""Convex head fit: the functionals model's linear head as L2-regularised softmax regression.

``ser-train --trainer=convex --model=functionals`` trains nothing by gradient steps. The
functionals model is a fixed, differentiable feature extractor (frontend, normaliser,
:class:`~ser_tf.models.layers.UtteranceStatistics`) followed by a standardiser (its
``functionals_bn`` layer) and one dense layer (``logits``). With the extractor fixed, the
head's best weights are the solution of a convex problem, the classical recipe of
functionals-based SER (openSMILE features and a linear classifier):

1. every training utterance's functionals, averaged over its evaluation windows (the head
   is affine, so this is exactly the utterance logits the evaluation averages), or of the
   whole utterance with ``--eval_whole`` (no loop padding: on EmoDB that is worth about
   0.05 of strict LOSO UAR, see BENCHMARKS.md);
2. the standardiser set to their mean and variance;
3. for each regularisation strength ``C`` of a path from strong to weak, the head fitted to
   the optimum of ``C * sum_i s_i * xent_i + |W|^2 / 2`` (``s_i`` the balanced class
   weight, the intercept unpenalised; scikit-learn's ``LogisticRegression`` convention)
   by L-BFGS, from the previous point's solution.

Each point of the path is one "epoch" of the standard trainer's bookkeeping: it is
validated on the validation speakers, logged, checkpointed and selected on exactly as an
epoch is, so resume, ``--refit`` (which refits on training + validation speakers at the
selected point), outputs and TensorBoard are those of every other trainer. Early
stopping's epoch count, chosen on two validation speakers, is a noisy regulariser for this
model; the path's points are few and each is a converged solution.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from ser_tf.evaluation.predict import predict_utterances
from ser_tf.training.standard import FoldTrainer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConvexConfig:
    """The regularisation path (filled from flags by the app).

    Attributes:
      c_values: inverse regularisation strengths, tried in increasing order.
      max_iterations: L-BFGS iterations per point at most.
      tolerance: stop when the gradient's largest absolute entry falls below this.
    """

    c_values: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    max_iterations: int = 5000
    tolerance: float = 1e-6

    def __post_init__(self):
        values = tuple(float(c) for c in self.c_values)
        if not values or min(values) <= 0 or list(values) != sorted(set(values)):
            raise ValueError(f"convex C values must be positive and increasing, got "
                             f"{list(self.c_values)}")
        object.__setattr__(self, "c_values", values)
        if self.max_iterations < 1 or self.tolerance <= 0:
            raise ValueError("max_iterations must be >= 1 and tolerance > 0")


@dataclasses.dataclass
class SoftmaxFit:
    """A fitted head: ``logits = z @ weights + bias``."""

    weights: np.ndarray
    bias: np.ndarray
    objective: float
    gradient_max: float
    iterations: int


def _objective(theta: np.ndarray, z: np.ndarray, onehot: np.ndarray, s: np.ndarray,
               c: float) -> tuple[float, np.ndarray]:
    d, k = z.shape[1], onehot.shape[1]
    w, b = theta[:d * k].reshape(d, k), theta[d * k:]
    logits = z @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    # Divided by c * sum(s): the weighted mean cross-entropy plus the penalty, so that
    # the gradient tolerance means the same at every point of the path.
    total = float(s.sum())
    penalty = 1.0 / (c * total)
    f = float(-(s * (onehot * log_p).sum(axis=1)).sum()) / total + 0.5 * penalty * float(
        (w * w).sum())
    g_logits = s[:, None] * (np.exp(log_p) - onehot) / total
    grad = np.concatenate([(z.T @ g_logits + penalty * w).ravel(), g_logits.sum(axis=0)])
    return f, grad


def fit_softmax_regression(z: np.ndarray, y: np.ndarray, num_classes: int, c: float, *,
                           sample_weight: np.ndarray | None = None,
                           init: SoftmaxFit | None = None, max_iterations: int = 2000,
                           tolerance: float = 1e-6, memory: int = 10) -> SoftmaxFit:
    """Minimises ``c * sum_i s_i * xent(z_i @ W + b, y_i) + |W|^2 / 2`` by L-BFGS.

    It works on that objective divided by ``c * sum_i s_i`` (the weighted mean
    cross-entropy plus ``|W|^2 / (2 c sum_i s_i)``): ``objective`` and the gradient
    ``tolerance`` are on that scale. The problem is strictly convex in ``W`` (and convex in
    ``b``), so the result does not depend on ``init`` beyond the tolerance; a warm start
    only saves iterations.

    Args:
      z: ``[n, d]`` inputs (standardised functionals).
      y: ``[n]`` class indices.
      num_classes: number of classes ``k``.
      c: inverse regularisation strength.
      sample_weight: ``s``, ``[n]`` (ones when None).
      init: a previous solution to start from.
      max_iterations: iterations at most.
      tolerance: stop when ``max |gradient|`` is below it.
      memory: L-BFGS history length.

    Returns:
      The solution, its objective and gradient, and the iterations used.
    """
    z = np.asarray(z, np.float64)
    n, d = z.shape
    onehot = np.eye(num_classes)[np.asarray(y, np.int64)]
    s = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    theta = (np.zeros(d * num_classes + num_classes) if init is None else
             np.concatenate([init.weights.ravel(), init.bias]).astype(np.float64))
    f, g = _objective(theta, z, onehot, s, c)
    history: list[tuple[np.ndarray, np.ndarray]] = []
    iterations = 0
    while iterations < max_iterations and np.abs(g).max() > tolerance:
        iterations += 1
        # Two-loop recursion: the quasi-Newton direction from the stored curvature pairs.
        q, alphas = g.copy(), []
        for s_k, y_k in reversed(history):
            a = (s_k @ q) / (y_k @ s_k)
            alphas.append(a)
            q -= a * y_k
        if history:
            s_k, y_k = history[-1]
            q *= (s_k @ y_k) / (y_k @ y_k)
        else:
            q /= max(1.0, float(np.abs(g).max()))
        for (s_k, y_k), a in zip(history, reversed(alphas)):
            q += s_k * (a - (y_k @ q) / (y_k @ s_k))
        direction = -q
        slope = float(g @ direction)
        if slope >= 0:  # not a descent direction: restart from steepest descent
            history.clear()
            direction, slope = -g, -float(g @ g)
        step = 1.0
        while True:  # backtracking (Armijo) line search
            f_new, g_new = _objective(theta + step * direction, z, onehot, s, c)
            if f_new <= f + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        if not f_new < f:  # no decrease left that float64 can see: converged
            break
        s_k, y_k = step * direction, g_new - g
        if s_k @ y_k > 1e-12:
            history.append((s_k, y_k))
            del history[:-memory]
        theta, f, g = theta + s_k, f_new, g_new
    k = num_classes
    return SoftmaxFit(theta[:d * k].reshape(d, k).astype(np.float32),
                      theta[d * k:].astype(np.float32), f, float(np.abs(g).max()), iterations)


class ConvexTrainer(FoldTrainer):
    """A fold of the functionals model whose head is fitted along a regularisation path
    (see the module docstring)."""

    def __init__(self, *args, convex: ConvexConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.convex = convex
        self._solution: SoftmaxFit | None = None

    method_name = "the convex head fit"
    supports_mixup = False

    def build(self) -> None:
        super().build()
        names = [layer.name for layer in self.model.classifier.layers]
        if names[-4:] != ["functionals", "functionals_bn", "functionals_dropout", "logits"]:
            raise ValueError("--trainer=convex fits the head of --model=functionals (its "
                             f"classifier ends in {names[-4:]})")
        stats = self.model.classifier.get_layer("functionals")
        self._functionals = tf.function(lambda w: stats(self.model.features(w)),
                                        reduce_retracing=True)

    def utterance_functionals(self, indices: Sequence[int]) -> np.ndarray:
        """``[len(indices), D]``: each utterance's functionals, averaged over its windows
        (or of the whole utterance, with ``eval_whole``)."""
        ds, n_win = self.evaluation_inputs(indices)
        return predict_utterances(self._functionals, ds, len(indices), n_win,
                                  progress=self.verbose == 1, desc="functionals")

    def train(self, start: int) -> None:
        """Fits the path's points from ``start`` on, each from the previous one's solution
        (without validation speakers the last point is kept, as the last epoch is)."""
        points = min(self.cfg.epochs, len(self.convex.c_values))
        self._epoch_start = time.time()
        x = self.utterance_functionals(self.fold.train)
        y = self.labels[np.asarray(self.fold.train)]
        bn = self.model.classifier.get_layer("functionals_bn")
        mean, var = x.mean(axis=0), x.var(axis=0)
        bn.set_weights([np.ones_like(mean), np.zeros_like(mean), mean, var])
        # The standardised functionals the head sees: the layer itself computes them.
        z = bn(tf.constant(x, tf.float32), training=False).numpy()
        weights = self.loss_weights()[y]
        dense = self.model.classifier.get_layer("logits")
        for epoch in range(start, points):
            c = self.convex.c_values[epoch]
            self._solution = fit_softmax_regression(
                z, y, len(self.classes), c, sample_weight=weights, init=self._solution,
                max_iterations=self.convex.max_iterations, tolerance=self.convex.tolerance)
            dense.set_weights([self._solution.weights, self._solution.bias])
            logits = z @ self._solution.weights + self._solution.bias
            train_acc = float(np.mean(logits.argmax(axis=1) == y))
            log.info("%s: C %g, L-BFGS %d iterations, objective %.4f, max |gradient| %.1e",
                     self.fold.name, c, self._solution.iterations, self._solution.objective,
                     self._solution.gradient_max)
            self.end_epoch(epoch, {"loss": self._solution.objective,
                                   "accuracy": train_acc, "c": c,
                                   "lbfgs_iterations": float(self._solution.iterations),
                                   "gradient_max": self._solution.gradient_max})
            self._epoch_start = time.time()
            if self.should_stop():
                break

    def describe(self) -> dict:
        chosen = self.state["history"][self.state["best_epoch"]]["c"]
        return {"convex": {**dataclasses.asdict(self.convex), "c": chosen}}

    def hparams(self) -> dict:
        return {**super().hparams(), "convex_c_values": str(list(self.convex.c_values))}
