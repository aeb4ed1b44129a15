"""Black-box attacks: the model is reached only through its outputs, and every query counts.

Three families, after the threat models the SER robustness literature uses:

* **score-based** (:func:`spsa`): the attacker sees the logits and estimates the gradient of
  a margin loss from finite differences along random directions (SPSA, Uesato et al. 2018;
  or NES-style antithetic Gaussian sampling);
* **decision-based** (:func:`hop_skip_jump`): only the predicted label is visible
  (HopSkipJumpAttack, Chen, Jordan and Wainwright 2020);
* **transfer** (:func:`train_substitute`, :func:`transfer_attack`): a local substitute is
  trained on labels from the target (Papernot et al. 2017, the family of the first
  black-box attack on SER, Latif et al.), attacked white-box, and its adversarial examples
  are replayed on the target.

Every attack follows the package's calling convention
``attack(model_fn, x, *, budget, y=None, targeted=False, seed=0, ...) -> x_adv`` (see
:mod:`ser_tf.attacks.whitebox`) and calls the model only through a :class:`QueryCounter`,
forward only: no attack here ever asks for a gradient of the target. Pass your own
``counter=QueryCounter(model_fn)`` to read how many inputs the attack had labelled or scored
(``counter.queries``); per example, that is ``counter.queries / len(x)`` for the score- and
decision-based attacks, which advance all examples together.

Internally the attacks work on flattened NumPy copies of the batch (inputs of any rank are
supported: waveforms ``[B, samples]`` or features ``[B, frames, bins, C]``), draw their
randomness from a ``numpy.random.Generator`` seeded by ``seed`` (so results are
reproducible), and reshape each batch of candidates back to the input's shape before calling
the model. Every result is passed through :func:`ser_tf.attacks.budget.project`, so no
attack leaves its ball or the valid sample range.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from ser_tf.attacks.budget import Budget, epsilon, project

ModelFn = Callable[[tf.Tensor], tf.Tensor]

DEFAULT_CHUNK = 256
# Most candidate values (rows x features) an attack builds at once, about 64 MB of float32.
GROUP_ELEMENTS = 1 << 24
ESTIMATORS = ("spsa", "nes")
UPDATES = ("adam", "sign")
DOMAINS = ("waveform", "features")


class QueryCounter:
    """Wraps a model function and counts the inputs it evaluates.

    Calling the counter returns the logits and adds the number of rows (the leading
    dimension) to :attr:`queries`. Large batches are evaluated in chunks of at most
    ``chunk_size`` rows (one model call each), which bounds memory and does not change the
    count. The counter works eagerly (a Python int); calling it inside ``tf.function`` is an
    error, because a traced call would be counted once however often the graph runs.

    Args:
      model_fn: maps a batch ``[B, ...]`` to logits ``[B, classes]``.
      chunk_size: most rows per model call.

    Attributes:
      queries: total rows evaluated so far.
      calls: number of model calls made.
    """

    def __init__(self, model_fn: ModelFn, chunk_size: int = DEFAULT_CHUNK):
        if not callable(model_fn):
            raise ValueError("QueryCounter needs a callable model_fn")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.model_fn = model_fn
        self.chunk_size = int(chunk_size)
        self.queries = 0
        self.calls = 0

    def __call__(self, x) -> tf.Tensor:
        """Logits ``[B, classes]`` (float32) of the batch ``x``; counts ``B`` queries."""
        if not tf.executing_eagerly():
            raise RuntimeError("QueryCounter counts eagerly; do not call it inside tf.function "
                               "(wrap the model_fn in tf.function instead)")
        x = tf.convert_to_tensor(x, tf.float32)
        if x.shape.rank is None or x.shape.rank < 1:
            raise ValueError(f"expected a batch [B, ...], got shape {x.shape}")
        rows = int(x.shape[0])
        outputs = []
        for start in range(0, rows, self.chunk_size):
            outputs.append(tf.convert_to_tensor(self.model_fn(x[start:start + self.chunk_size]),
                                                tf.float32))
            self.calls += 1
        self.queries += rows
        if not outputs:
            raise ValueError("QueryCounter got an empty batch")
        return outputs[0] if len(outputs) == 1 else tf.concat(outputs, axis=0)

    def labels(self, x) -> tf.Tensor:
        """Decision-only access: the predicted labels ``[B]`` (int32) of ``x``; counts ``B``."""
        return tf.argmax(self(x), axis=-1, output_type=tf.int32)

    def reset(self) -> None:
        """Sets the counts back to zero."""
        self.queries = 0
        self.calls = 0


# --------------------------------------------------------------------------------------------
# Shared helpers (flattened NumPy batches)


def _counter(model_fn: ModelFn, counter: QueryCounter | None) -> QueryCounter:
    if counter is None:
        return QueryCounter(model_fn)
    if not isinstance(counter, QueryCounter):
        raise ValueError(f"counter must be a QueryCounter, got {type(counter).__name__}")
    return counter


def _flatten(x) -> tuple[np.ndarray, tuple[int, ...]]:
    """``x`` as float32 ``[B, D]`` and its shape."""
    x = np.asarray(x.numpy() if isinstance(x, tf.Tensor) else x, np.float32)
    if x.ndim < 2 or x.shape[0] == 0 or x.size == 0:
        raise ValueError(f"expected a non-empty batch [B, ...] of rank >= 2, got {x.shape}")
    return np.ascontiguousarray(x.reshape(len(x), -1)), tuple(x.shape)


def _check_budget(budget: Budget) -> None:
    if not isinstance(budget, Budget):
        raise ValueError(f"budget must be a Budget, got {type(budget).__name__}")


def _radius(x: np.ndarray, budget: Budget) -> np.ndarray:
    """Per-example radius ``[B]`` (float32) in input units."""
    return epsilon(tf.constant(x), budget).numpy().reshape(-1).astype(np.float32)


def _project(x: np.ndarray, x_adv: np.ndarray, budget: Budget) -> np.ndarray:
    # The budget's reductions run over every non-batch axis, so flat rows project exactly as
    # the original shape would.
    return project(tf.constant(x), tf.constant(x_adv), budget).numpy()


def _clip(x: np.ndarray, budget: Budget) -> np.ndarray:
    bounds = budget.clip_range()
    return x if bounds is None else np.clip(x, bounds[0], bounds[1])


def _logits(counter: QueryCounter, rows: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return counter(tf.constant(rows.reshape((len(rows),) + tuple(shape[1:])))).numpy()


def _labels(counter: QueryCounter, rows: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    return counter.labels(tf.constant(rows.reshape((len(rows),) + tuple(shape[1:])))).numpy()


def _resolve_y(y, predictions: np.ndarray, targeted: bool, num_classes: int) -> np.ndarray:
    if y is None:
        if targeted:
            raise ValueError("a targeted attack needs the target labels y")
        return predictions.astype(np.int64)
    y = np.asarray(y.numpy() if isinstance(y, tf.Tensor) else y).reshape(-1)
    if len(y) != len(predictions):
        raise ValueError(f"y has {len(y)} labels for a batch of {len(predictions)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    return y.astype(np.int64)


def _is_adversarial(pred: np.ndarray, y: np.ndarray, targeted: bool) -> np.ndarray:
    return pred == y if targeted else pred != y


def _margin_loss(logits: np.ndarray, y: np.ndarray, targeted: bool) -> np.ndarray:
    """The loss to minimise: ``z_y - max_{j != y} z_j`` (untargeted), reversed if targeted."""
    rows = np.arange(len(logits))
    true = logits[rows, y]
    others = logits.copy()
    others[rows, y] = -np.inf
    best_other = others.max(axis=1)
    return best_other - true if targeted else true - best_other


def _norm(d: np.ndarray, order: float) -> np.ndarray:
    """Per-row L-inf or L2 norm of ``[n, D]`` (float64)."""
    d = d.astype(np.float64)
    return np.abs(d).max(axis=1) if order == np.inf else np.sqrt((d * d).sum(axis=1))


def _groups(count: int, rows_per_example: int, chunk_size: int, dim: int) -> Iterator[slice]:
    """Slices of ``range(count)`` whose candidates are built together: at least one chunk
    of model rows, more while they stay under :data:`GROUP_ELEMENTS` values (the counter
    then splits them into chunks), and at least one example."""
    rows = max(chunk_size, GROUP_ELEMENTS // max(1, dim))
    per = max(1, rows // max(1, rows_per_example))
    for start in range(0, count, per):
        yield slice(start, min(count, start + per))


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value) -> float:
    if not (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Score-based: SPSA / NES


def spsa(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False,
         steps: int = 100, samples: int = 32, delta: float = 0.1, learning_rate: float = 0.1,
         estimator: str = "spsa", update: str = "adam", max_queries: int | None = None,
         seed: int = 0, counter: QueryCounter | None = None) -> tf.Tensor:
    """Score-based attack from finite-difference gradient estimates (SPSA or NES).

    Minimises the margin loss ``z_y - max_{j != y} z_j`` (untargeted; targeted:
    ``max_{j != t} z_j - z_t``) as Uesato et al. (2018) do. Each step draws ``samples``
    random directions ``u`` per example (Rademacher for ``estimator="spsa"``, Gaussian for
    ``"nes"``), evaluates the loss at ``x + c u`` and ``x - c u`` (antithetic pairs, clipped to
    the sample range) and estimates the gradient as the mean of
    ``(L(x + c u) - L(x - c u)) / (2 delta) * u``, where ``c = delta * radius`` is relative to
    each example's radius (for L2 budgets ``u`` is scaled by ``1 / sqrt(D)``, so probes have
    about ``delta`` of the ball's norm). The update is Adam (``update="adam"``) or the sign
    of the estimate, of size ``learning_rate * radius`` per coordinate (L-inf) or normalised
    to ``learning_rate * radius`` in L2 norm (L2 budgets), followed by a projection onto the
    budget. All examples advance together; an example stops at its first successful iterate
    (misclassified, or classified as its target), which is what it returns.

    Queries per example: 1 initial evaluation, then ``2 * samples + 1`` per step (the
    probes and the new iterate), so at most ``1 + steps * (2 * samples + 1)``; with
    ``max_queries`` an example stops before a step would take it past that number.

    Args:
      model_fn: batch ``[B, ...]`` -> logits ``[B, classes]``; called forward only.
      x: the clean batch (waveforms or normalised features).
      budget: the perturbation budget (its norm picks the L-inf or L2 variant).
      y: true labels (untargeted; default: the model's predictions on ``x``) or the target
        labels (``targeted=True``, required).
      targeted: aim for ``y`` instead of away from it.
      steps: most update steps.
      samples: antithetic pairs per step (``2 * samples`` probes).
      delta: probe size relative to the per-example radius.
      learning_rate: step size relative to the per-example radius.
      estimator: ``"spsa"`` (Rademacher directions) or ``"nes"`` (Gaussian directions).
      update: ``"adam"`` (Adam on the estimate, betas 0.9/0.999) or ``"sign"``.
      max_queries: optional per-example query limit.
      seed: seed of the random directions.
      counter: a :class:`QueryCounter` around ``model_fn`` to count with (default: a new one).

    Returns:
      ``x_adv``, float32, the shape of ``x``, inside the budget and the sample range.

    Raises:
      ValueError: unknown estimator or update, targeted without ``y``, or a non-positive
        ``steps``, ``samples``, ``delta``, ``learning_rate`` or ``max_queries``.
    """
    _check_budget(budget)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; choose from {UPDATES}")
    steps = _check_positive_int("steps", steps)
    samples = _check_positive_int("samples", samples)
    delta = _check_positive("delta", delta)
    learning_rate = _check_positive("learning_rate", learning_rate)
    cap = math.inf if max_queries is None else _check_positive_int("max_queries", max_queries)
    if targeted and y is None:
        raise ValueError("a targeted attack needs the target labels y")
    counter = _counter(model_fn, counter)
    rng = np.random.default_rng(seed)

    x, shape = _flatten(x)
    n, dim = x.shape
    radius = _radius(x, budget)
    logits = _logits(counter, x, shape)
    y = _resolve_y(y, logits.argmax(axis=1), targeted, logits.shape[1])
    done = _is_adversarial(logits.argmax(axis=1), y, targeted)
    used = np.ones(n, np.int64)
    per_step = 2 * samples + 1
    l2 = budget.norm != np.inf
    beta1, beta2 = 0.9, 0.999

    current = x.copy()
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t in range(1, steps + 1):
        # Inactive examples never come back, so the active ones share the step count t.
        active = np.flatnonzero(~done & (used + per_step <= cap))
        if not active.size:
            break
        grad = np.empty((len(active), dim), np.float32)
        for part in _groups(len(active), 2 * samples, counter.chunk_size, dim):
            ids = active[part]
            grad[part] = _estimate_gradient(counter, current[ids], y[ids], radius[ids], shape,
                                            budget, samples, delta, estimator, targeted, rng)
        if update == "sign":
            direction = np.sign(grad)
        else:
            m[active] = beta1 * m[active] + (1.0 - beta1) * grad
            v[active] = beta2 * v[active] + (1.0 - beta2) * grad * grad
            m_hat = m[active] / (1.0 - beta1 ** t)
            v_hat = v[active] / (1.0 - beta2 ** t)
            direction = m_hat / (np.sqrt(v_hat) + 1e-8)
        if l2:
            direction = direction / np.maximum(_norm(direction, 2), 1e-12)[:, None]
        step = (learning_rate * radius[active])[:, None] * direction
        candidate = _project(x[active], current[active] - step.astype(np.float32), budget)
        pred = _logits(counter, candidate, shape).argmax(axis=1)
        used[active] += per_step
        current[active] = candidate
        done[active] = _is_adversarial(pred, y[active], targeted)
    return tf.constant(_project(x, current, budget).reshape(shape))


def _estimate_gradient(counter: QueryCounter, xs: np.ndarray, ys: np.ndarray,
                       radius: np.ndarray, shape: Sequence[int], budget: Budget, samples: int,
                       delta: float, estimator: str, targeted: bool,
                       rng: np.random.Generator) -> np.ndarray:
    """Antithetic finite-difference estimate ``[e, D]`` of the margin loss's gradient, in
    loss units per unit of radius."""
    e, dim = xs.shape
    if estimator == "spsa":
        u = rng.integers(0, 2, size=(e, samples, dim), dtype=np.int8).astype(np.float32)
        u = 2.0 * u - 1.0
    else:
        u = rng.standard_normal((e, samples, dim), dtype=np.float32)
    if budget.norm != np.inf:
        u /= np.float32(math.sqrt(dim))
    probe = (delta * radius)[:, None, None].astype(np.float32) * u
    rows = np.concatenate([_clip(xs[:, None] + probe, budget), _clip(xs[:, None] - probe, budget)],
                          axis=1).reshape(e * 2 * samples, dim)
    loss = _margin_loss(_logits(counter, rows, shape), np.repeat(ys, 2 * samples), targeted)
    loss = loss.reshape(e, 2, samples)
    slope = (loss[:, 0] - loss[:, 1]) / (2.0 * delta)
    return np.einsum("es,esd->ed", slope.astype(np.float32), u) / samples


# --------------------------------------------------------------------------------------------
# Decision-based: HopSkipJumpAttack


def hop_skip_jump(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False,
                  max_queries: int = 1000, x_init=None, num_evals: int = 100,
                  max_num_evals: int = 1000, gamma: float = 1.0, init_trials: int = 10,
                  batch_starts: bool = True, max_halvings: int = 20, overshoot: float = 0.02,
                  early_stop: bool = False, seed: int = 0,
                  counter: QueryCounter | None = None) -> tf.Tensor:
    """HopSkipJumpAttack (Chen, Jordan and Wainwright 2020) from predicted labels only.

    A minimum-norm attack in the budget's norm (L2 or L-inf), batched over examples:

    1. *Start*: a point the model already gets wrong (untargeted) or classifies as the
       target. Tried in order: ``x_init`` (checked with one query), up to ``init_trials``
       draws of uniform noise over the sample range (features: over each example's own
       value range), then (``batch_starts``) the nearest other input of the batch whose
       clean prediction, already known, is adversarial for this example. The start is
       blended toward ``x`` by a binary search (tolerance 1e-3).
    2. *Boundary*: binary search between ``x`` and the adversarial point (L2: along the
       segment; L-inf: shrinking an L-inf box around ``x``), to relative tolerance
       ``theta = gamma / D**1.5`` (L2) or ``gamma / D**2`` (L-inf), floored at 2**-20.
    3. *Gradient direction*: ``B_t = min(num_evals * sqrt(t), max_num_evals)`` random
       unit probes of size ``delta_t`` at the boundary point, labelled adversarial or not,
       averaged with a baseline (the paper's estimator); the update direction is the
       normalised estimate (L2) or its sign (L-inf).
    4. *Step*: geometric search from ``dist / sqrt(t)``, halving until the step stays
       adversarial; then back to 2.
    5. *Overshoot*: a point found by binary search is adversarial by a numerical hair (the
       same input evaluated in another batch may flip), so the best point's perturbation
       is scaled by ``1 + overshoot`` (as DeepFool does; never beyond the budget's radius)
       and the result is kept if one more query confirms it is adversarial.

    Queries are counted per example and an example stops when the next iteration would take
    it past ``max_queries``. The best (closest) adversarial point found is returned,
    projected onto the budget: an example whose best point lies outside the ball is pulled
    into it and may no longer fool the model, which is the honest result at that budget.
    An example with no adversarial start is returned unchanged, as is one the model
    already gets wrong (untargeted) or already classifies as its target.

    Args:
      model_fn: batch ``[B, ...]`` -> logits ``[B, classes]``; only its argmax is used.
      x: the clean batch.
      budget: the perturbation budget; its norm is the attack's norm.
      y: true labels (untargeted; default: the model's predictions) or target labels.
      targeted: aim for ``y`` instead of away from it.
      max_queries: per-example query limit (including the initial evaluation).
      x_init: optional starting points ``[B, ...]`` (e.g. utterances of the target class
        for a targeted attack); those not adversarial are ignored.
      num_evals: probes of the first gradient estimate (grows as ``sqrt(t)``).
      max_num_evals: cap on the probes per estimate.
      gamma: the paper's gamma, which sets the binary-search tolerance and probe size.
      init_trials: random-noise draws tried for a start.
      batch_starts: fall back on other inputs of the batch as starting points.
      max_halvings: most halvings of the step-size search per iteration.
      overshoot: relative push of the final point away from the boundary (0: none; one
        query per example is kept back for its check otherwise).
      early_stop: stop an example once its best adversarial point lies inside the budget
        (saves queries; off by default, so the full query budget is spent as in the paper).
      seed: seed of the random draws.
      counter: a :class:`QueryCounter` around ``model_fn`` to count with (default: a new one).

    Returns:
      ``x_adv``, float32, the shape of ``x``, inside the budget and the sample range.

    Raises:
      ValueError: targeted without ``y``, a non-positive ``max_queries``, ``num_evals``,
        ``max_num_evals``, ``gamma`` or ``max_halvings``, or ``x_init`` of the wrong shape.
    """
    _check_budget(budget)
    max_queries = _check_positive_int("max_queries", max_queries)
    num_evals = _check_positive_int("num_evals", num_evals)
    max_num_evals = _check_positive_int("max_num_evals", max_num_evals)
    gamma = _check_positive("gamma", gamma)
    init_trials = _check_positive_int("init_trials", init_trials, minimum=0)
    max_halvings = _check_positive_int("max_halvings", max_halvings)
    if not (math.isfinite(overshoot) and overshoot >= 0):
        raise ValueError(f"overshoot must be a non-negative number, got {overshoot!r}")
    if targeted and y is None:
        raise ValueError("a targeted attack needs the target labels y")
    counter = _counter(model_fn, counter)
    rng = np.random.default_rng(seed)

    x, shape = _flatten(x)
    if x_init is not None:
        x_init, init_shape = _flatten(x_init)
        if init_shape != shape:
            raise ValueError(f"x_init has shape {init_shape}, x has {shape}")
    n, dim = x.shape
    order = budget.norm
    radius = _radius(x, budget)
    bounds = budget.clip_range()
    if bounds is not None:
        low = np.full(n, bounds[0], np.float32)
        high = np.full(n, bounds[1], np.float32)
    else:
        low, high = x.min(axis=1), x.max(axis=1)
    width = np.maximum(high - low, 1e-6)

    logits = _logits(counter, x, shape)
    clean_pred = logits.argmax(axis=1)
    y = _resolve_y(y, clean_pred, targeted, logits.shape[1])
    used = np.ones(n, np.int64)
    # One query per example is kept back for the overshoot check (step 5).
    state = _HSJState(counter, x, y, shape, targeted, used,
                      max_queries - (1 if overshoot > 0 else 0))

    already = _is_adversarial(clean_pred, y, targeted)
    found = already.copy()
    start = x.copy()

    # 1. Starting points: x_init, random noise, other inputs of the batch.
    if x_init is not None:
        ids = state.affordable(np.flatnonzero(~found))
        if ids.size:
            ok = state.decide(ids, x_init[ids])
            start[ids[ok]] = x_init[ids[ok]]
            found[ids[ok]] = True
    for _ in range(init_trials):
        ids = state.affordable(np.flatnonzero(~found))
        if not ids.size:
            break
        noise = rng.uniform(0.0, 1.0, size=(len(ids), dim)).astype(np.float32)
        noise = low[ids, None] + noise * (high - low)[ids, None]
        ok = state.decide(ids, noise)
        start[ids[ok]] = noise[ok]
        found[ids[ok]] = True
    if batch_starts:
        for i in np.flatnonzero(~found):
            others = np.flatnonzero(_is_adversarial(clean_pred, y[i], targeted))
            others = others[others != i]
            if others.size:
                nearest = others[np.argmin(_norm(x[others] - x[i], order))]
                start[i] = x[nearest]
                found[i] = True

    best = x.copy()
    best_dist = np.where(already, 0.0, np.inf)
    live = np.flatnonzero(found & ~already)
    if live.size:
        start[live] = state.blend_search(live, start[live])

    # 2.-4. Boundary search, gradient-direction estimate, geometric step, repeated.
    theta = gamma / (dim ** 1.5 if order != np.inf else dim ** 2)
    searches = int(math.ceil(math.log2(1.0 / max(theta, 2.0 ** -20))))
    current = x.copy()
    dist = np.full(n, np.inf)

    def record(ids: np.ndarray, points: np.ndarray) -> None:
        current[ids] = points
        dist[ids] = _norm(points - x[ids], order)
        better = dist[ids] < best_dist[ids]
        best[ids[better]] = points[better]
        best_dist[ids[better]] = dist[ids][better]

    if live.size:
        record(live, state.boundary_search(live, start[live], order, searches))

    reserve = searches + 5    # queries kept back for the step search and the boundary search
    t = 0
    while True:
        t += 1
        ids = live[state.max_queries - used[live] >= reserve + 1]
        if early_stop:
            ids = ids[best_dist[ids] > radius[ids]]
        if not ids.size:
            break
        wanted = min(int(num_evals * math.sqrt(t)), max_num_evals)
        evals = np.minimum(wanted, state.max_queries - used[ids] - reserve)
        if t == 1:
            probe = 0.1 * width[ids]
        else:
            probe = (math.sqrt(dim) if order != np.inf else dim) * theta * dist[ids]
        probe = np.maximum(probe, 1e-12)
        direction = np.empty((len(ids), dim), np.float32)
        for count in np.unique(evals):
            pick = np.flatnonzero(evals == count)
            for part in _groups(len(pick), int(count), counter.chunk_size, dim):
                rows = pick[part]
                direction[rows] = state.direction(ids[rows], current[ids[rows]], probe[rows],
                                                  int(count), order, budget, rng)
        stepped, moved = state.step_search(ids, current[ids], direction, dist[ids] / math.sqrt(t),
                                           budget, max_halvings, searches)
        if moved.any():
            record(ids[moved], state.boundary_search(ids[moved], stepped[moved], order,
                                                     searches))

    # 5. Overshoot: a boundary point is adversarial by a numerical hair (a re-evaluation in
    # another batch can flip it), so push the best point a little further from x, inside
    # the ball, and keep it when one more query confirms it.
    state.max_queries = max_queries
    inside = (best_dist[live] > 0) & (best_dist[live] < radius[live])
    ids = state.affordable(live[inside])
    if overshoot > 0 and ids.size:
        factor = np.minimum(1.0 + overshoot, radius[ids] / best_dist[ids])[:, None]
        pushed = _clip(x[ids] + (factor * (best[ids] - x[ids])).astype(np.float32), budget)
        pushed = _project(x[ids], pushed, budget)
        ok = state.decide(ids, pushed)
        best[ids[ok]] = pushed[ok]

    return tf.constant(_project(x, best, budget).reshape(shape))


class _HSJState:
    """The decision oracle of :func:`hop_skip_jump` with per-example query accounting."""

    def __init__(self, counter: QueryCounter, x: np.ndarray, y: np.ndarray,
                 shape: Sequence[int], targeted: bool, used: np.ndarray, max_queries: int):
        self.counter = counter
        self.x = x
        self.y = y
        self.shape = shape
        self.targeted = targeted
        self.used = used
        self.max_queries = max_queries

    def affordable(self, ids: np.ndarray, queries: int = 1) -> np.ndarray:
        """The examples among ``ids`` with ``queries`` queries left."""
        return ids[self.used[ids] + queries <= self.max_queries]

    def decide(self, ids: np.ndarray, rows: np.ndarray, per_example: int = 1) -> np.ndarray:
        """Whether each row is adversarial; ``rows`` holds ``per_example`` rows per id."""
        pred = _labels(self.counter, rows, self.shape)
        self.used[ids] += per_example
        return _is_adversarial(pred, np.repeat(self.y[ids], per_example), self.targeted)

    def blend_search(self, ids: np.ndarray, start: np.ndarray, tol: float = 1e-3) -> np.ndarray:
        """Smallest blend ``(1 - a) x + a start`` still adversarial (``a`` to ``tol``)."""
        lo = np.zeros(len(ids))
        hi = np.ones(len(ids))
        for _ in range(int(math.ceil(math.log2(1.0 / tol)))):
            sel = np.flatnonzero(self.used[ids] < self.max_queries)
            if not sel.size:
                break
            mid = (lo[sel] + hi[sel]) / 2.0
            rows = self._blend(self.x[ids[sel]], start[sel], mid)
            ok = self.decide(ids[sel], rows)
            hi[sel] = np.where(ok, mid, hi[sel])
            lo[sel] = np.where(ok, lo[sel], mid)
        return self._blend(self.x[ids], start, hi)

    @staticmethod
    def _blend(x: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        a = alpha[:, None].astype(np.float32)
        return ((1.0 - a) * x + a * target).astype(np.float32)

    def _between(self, x: np.ndarray, adv: np.ndarray, alpha: np.ndarray,
                 order: float) -> np.ndarray:
        if order == np.inf:
            a = alpha[:, None].astype(np.float32)
            return np.clip(adv, x - a, x + a)
        return self._blend(x, adv, alpha)

    def boundary_search(self, ids: np.ndarray, adv: np.ndarray, order: float,
                        searches: int) -> np.ndarray:
        """Binary search from the adversarial ``adv`` toward ``x`` (``searches`` halvings):
        along the segment (L2) or by shrinking an L-inf box around ``x``."""
        x = self.x[ids]
        hi = np.ones(len(ids)) if order != np.inf else _norm(adv - x, np.inf)
        lo = np.zeros(len(ids))
        for _ in range(searches):
            sel = np.flatnonzero(self.used[ids] < self.max_queries)
            if not sel.size:
                break
            mid = (lo[sel] + hi[sel]) / 2.0
            ok = self.decide(ids[sel], self._between(x[sel], adv[sel], mid, order))
            hi[sel] = np.where(ok, mid, hi[sel])
            lo[sel] = np.where(ok, lo[sel], mid)
        return self._between(x, adv, hi, order)

    def direction(self, ids: np.ndarray, points: np.ndarray, probe: np.ndarray, count: int,
                  order: float, budget: Budget, rng: np.random.Generator) -> np.ndarray:
        """The paper's Monte-Carlo estimate of the boundary's normal at ``points``."""
        e, dim = points.shape
        if order == np.inf:
            u = rng.uniform(-1.0, 1.0, size=(e, count, dim)).astype(np.float32)
        else:
            u = rng.standard_normal((e, count, dim), dtype=np.float32)
        u /= np.maximum(np.sqrt((u * u).sum(axis=2, keepdims=True)), 1e-12)
        scale = probe[:, None, None].astype(np.float32)
        rows = _clip(points[:, None] + scale * u, budget)
        u = (rows - points[:, None]) / scale
        sign = self.decide(ids, rows.reshape(e * count, dim), count).reshape(e, count)
        sign = 2.0 * sign.astype(np.float32) - 1.0
        mean = sign.mean(axis=1, keepdims=True)
        # All probes on one side: the mean direction (signed); else subtract the baseline.
        centred = np.where(np.abs(mean) == 1.0, sign, sign - mean)
        grad = np.einsum("ec,ecd->ed", centred, u) / count
        if order == np.inf:
            return np.sign(grad)
        return grad / np.maximum(_norm(grad, 2), 1e-12)[:, None].astype(np.float32)

    def step_search(self, ids: np.ndarray, points: np.ndarray, direction: np.ndarray,
                    size: np.ndarray, budget: Budget, max_halvings: int,
                    reserve: int) -> tuple[np.ndarray, np.ndarray]:
        """Geometric step-size search: halve the step until ``points + step * direction``
        is adversarial. Returns the new points and whether each example moved."""
        out = points.copy()
        moved = np.zeros(len(ids), bool)
        size = size.astype(np.float64).copy()
        for _ in range(max_halvings):
            sel = np.flatnonzero(~moved & (self.used[ids] + 1 + reserve <= self.max_queries))
            if not sel.size:
                break
            cand = _clip(points[sel] + (size[sel, None] * direction[sel]).astype(np.float32),
                         budget)
            ok = self.decide(ids[sel], cand)
            out[sel[ok]] = cand[ok]
            moved[sel[ok]] = True
            size[sel[~ok]] /= 2.0
        return out, moved


# --------------------------------------------------------------------------------------------
# Transfer: Papernot et al.'s substitute training with Jacobian-based augmentation


def train_substitute(oracle_fn: ModelFn, seed_x, *, build_fn: Callable[[], keras.Model],
                     rounds: int = 2, lambda_: float = 0.1, epochs: int = 10,
                     batch_size: int = 32, learning_rate: float = 1e-3,
                     domain: str = "waveform", adapt_normalizer: bool = True, seed: int = 0,
                     counter: QueryCounter | None = None, verbose: bool = False) -> keras.Model:
    """Trains a substitute on the oracle's labels (Papernot et al. 2017).

    The attacker holds unlabelled inputs ``seed_x`` (audio of their own speakers, never the
    test set) and may only ask the oracle for labels. The routine:

    1. labels ``seed_x`` with the oracle (one query each);
    2. builds the substitute with ``build_fn()`` and, when ``adapt_normalizer`` is set and
       the model has a ``normalizer`` and a ``frontend`` (an
       :class:`~ser_tf.models.base.SERModel`), adapts the normaliser on the attacker's seed
       data, ``model.normalizer.adapt([model.frontend(seed_x)])``: the substitute's feature
       statistics come from the attacker's audio only, never from the target;
    3. compiles it (Adam at ``learning_rate``, cross-entropy on logits) and trains it for
       ``epochs`` epochs on the labelled set, shuffled by a seeded generator;
    4. ``rounds`` times: Jacobian-based augmentation, one new point per labelled point,
       ``x + lambda * sign(d F_sub[label] / dx)`` where ``label`` is the oracle's label of
       ``x`` and ``lambda`` is ``lambda_`` times the example's peak for waveforms (results
       clipped to the sample range ``[-1, 1]``) or ``lambda_`` itself for features; the new
       points are labelled by the oracle, added to the set (which doubles), and the
       substitute trains again for ``epochs`` epochs.

    Gradients are taken of the substitute only; the oracle is queried for labels only, so
    ``len(seed_x) * 2**rounds`` queries in all.

    Args:
      oracle_fn: the target, batch -> logits (only the argmax is used).
      seed_x: the attacker's unlabelled inputs ``[N, ...]``.
      build_fn: returns a fresh, built (untrained) Keras model mapping the same inputs to
        logits; seed its weights there for reproducibility.
      rounds: augmentation rounds.
      lambda_: augmentation step (relative to the peak for waveforms).
      epochs: training epochs per round.
      batch_size: training batch size.
      learning_rate: Adam learning rate.
      domain: ``"waveform"`` or ``"features"`` (how ``lambda_`` is scaled and clipped).
      adapt_normalizer: adapt a ``normalizer`` on the seed data (see step 2).
      seed: seed of the shuffling.
      counter: a :class:`QueryCounter` around ``oracle_fn`` (default: a new one).
      verbose: print the training loss and accuracy per round.

    Returns:
      The trained substitute.

    Raises:
      ValueError: bad ``rounds``, ``lambda_``, ``epochs``, ``batch_size``, ``learning_rate``
        or ``domain``.
    """
    rounds = _check_positive_int("rounds", rounds, minimum=0)
    lambda_ = _check_positive("lambda_", lambda_)
    epochs = _check_positive_int("epochs", epochs)
    batch_size = _check_positive_int("batch_size", batch_size)
    learning_rate = _check_positive("learning_rate", learning_rate)
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    if not callable(build_fn):
        raise ValueError("build_fn must be a callable returning a Keras model")
    counter = _counter(oracle_fn, counter)
    rng = np.random.default_rng(seed)

    data = np.asarray(seed_x.numpy() if isinstance(seed_x, tf.Tensor) else seed_x, np.float32)
    if data.ndim < 2 or len(data) == 0:
        raise ValueError(f"seed_x must be a non-empty batch [N, ...], got shape {data.shape}")
    labels = counter.labels(tf.constant(data)).numpy()

    model = build_fn()
    if adapt_normalizer and getattr(model, "normalizer", None) is not None \
            and getattr(model, "frontend", None) is not None:
        model.normalizer.adapt([model.frontend(tf.constant(data[i:i + counter.chunk_size]))
                                for i in range(0, len(data), counter.chunk_size)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    for r in range(rounds + 1):
        if r:
            new = _jacobian_augment(model, data, labels, lambda_, domain, counter.chunk_size)
            new_labels = counter.labels(tf.constant(new)).numpy()
            data = np.concatenate([data, new])
            labels = np.concatenate([labels, new_labels])
        history = _fit(model, data, labels, epochs, batch_size, rng)
        if verbose:
            print(f"substitute round {r}: {len(data)} points, loss {history[0]:.4f}, "
                  f"accuracy {history[1]:.3f}")
    return model


def _fit(model: keras.Model, data: np.ndarray, labels: np.ndarray, epochs: int,
         batch_size: int, rng: np.random.Generator) -> tuple[float, float]:
    """Mini-batch training with our own seeded shuffling; the last batch's loss/accuracy."""
    result = (float("nan"), float("nan"))
    for _ in range(epochs):
        order = rng.permutation(len(data))
        for start in range(0, len(data), batch_size):
            batch = order[start:start + batch_size]
            out = model.train_on_batch(data[batch], labels[batch], return_dict=True)
        result = (float(out["loss"]), float(out.get("accuracy", float("nan"))))
    return result


def _jacobian_augment(model: keras.Model, data: np.ndarray, labels: np.ndarray,
                      lambda_: float, domain: str, chunk_size: int) -> np.ndarray:
    """``x + lambda * sign(d F[label] / dx)`` for every point, on the substitute."""
    out = []
    for start in range(0, len(data), chunk_size):
        xb = tf.constant(data[start:start + chunk_size])
        yb = tf.constant(labels[start:start + chunk_size], tf.int32)
        with tf.GradientTape() as tape:
            tape.watch(xb)
            logits = model(xb, training=False)
            chosen = tf.reduce_sum(tf.gather(logits, yb, axis=1, batch_dims=1))
        sign = tf.sign(tape.gradient(chosen, xb))
        if domain == "waveform":
            axes = list(range(1, len(xb.shape)))
            step = lambda_ * tf.reduce_max(tf.abs(xb), axis=axes, keepdims=True)
            out.append(tf.clip_by_value(xb + step * sign, -1.0, 1.0).numpy())
        else:
            out.append((xb + lambda_ * sign).numpy())
    return np.concatenate(out).astype(np.float32)


def transfer_attack(target_fn: ModelFn, substitute: ModelFn, x, *, budget: Budget, y=None,
                    attack_fn: Callable[..., tf.Tensor], counter: QueryCounter | None = None,
                    **kwargs) -> tf.Tensor:
    """Crafts adversarial examples on the substitute, to be replayed on the target.

    Runs ``attack_fn(substitute, x, budget=budget, y=y, **kwargs)`` (any white-box attack of
    the package's convention, e.g. PGD) and projects the result onto the budget. The target
    is queried only when ``y`` is None, to label ``x`` (one query each; counted), since the
    untargeted default is the target's own prediction; with ``y`` given the attack costs
    no queries beyond those spent training the substitute.

    Args:
      target_fn: the target, batch -> logits (labels only, and only when ``y`` is None).
      substitute: the attacker's model (e.g. from :func:`train_substitute`).
      x: the clean batch.
      budget: the perturbation budget.
      y: true labels (untargeted), target labels (with ``targeted=True`` in ``kwargs``), or
        None: the target's predictions.
      attack_fn: the white-box attack run on the substitute.
      counter: a :class:`QueryCounter` around ``target_fn`` (default: a new one).
      **kwargs: more options for ``attack_fn`` (``targeted``, ``steps``, ...).

    Returns:
      ``x_adv``, float32, the shape of ``x``, inside the budget and the sample range.

    Raises:
      ValueError: ``attack_fn`` not callable, or a targeted attack without ``y``.
    """
    _check_budget(budget)
    if not callable(attack_fn):
        raise ValueError("attack_fn must be a white-box attack function")
    x = tf.convert_to_tensor(x, tf.float32)
    if y is None:
        if kwargs.get("targeted", False):
            raise ValueError("a targeted attack needs the target labels y")
        y = _counter(target_fn, counter).labels(x)
    x_adv = attack_fn(substitute, x, budget=budget, y=y, **kwargs)
    return project(x, tf.convert_to_tensor(x_adv, tf.float32), budget)
