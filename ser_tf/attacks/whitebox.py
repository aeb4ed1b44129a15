"""White-box attacks: CleverHans where it works under Keras 3, our own CW-L2 where it does not.

Every attack has the same calling convention::

    x_adv = attack(model_fn, x, *, budget, y=None, targeted=False, **options)

``model_fn`` maps a batch (waveforms ``[B, samples]`` or normalised features
``[B, frames, bins, C]``; any rank) to logits. ``budget`` is a
:class:`ser_tf.attacks.budget.Budget`; its norm (L-inf or L2) is the attack's norm, and
its radius is per example (relative to each utterance's peak or energy for waveforms). ``y``
holds the true labels for an untargeted attack (default: the model's own predictions, to
avoid label leaking) or the target labels when ``targeted=True``.

The gradient attacks (FGSM/FGM, BIM, PGD, MIM) are built from CleverHans 4.0's TF2 pieces
(its fast gradient step, gradient, linear-step and ball-projection functions), run in the
budget's scaled space (:func:`ser_tf.attacks.budget.scaled_problem`), where one scalar
epsilon serves every example, as CleverHans requires; L-inf PGD and BIM take the same steps
in input units, with the step and its projections fused into one XLA kernel
(:func:`_projected_gradient_steps`). The iterations are a graph loop
(``tf.range``) rather than CleverHans' Python loop, which unrolls ``steps`` copies of the
model's gradient into the graph: the same algorithm, step for step, but traced once, so a
compiled PGD-10 starts in a couple of seconds instead of twenty. CleverHans' Carlini-Wagner
L2 does not run under Keras 3 (DESIGN.md), so :func:`carlini_wagner_l2` is written here:
batched, for inputs of any rank. Every result goes through
:func:`ser_tf.attacks.budget.project`, so no attack leaves its ball or the valid sample
range.

Wrap calls in ``tf.function`` for speed (the runner does); they also run eagerly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf
from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
from cleverhans.tf2.utils import clip_eta, compute_gradient, optimize_linear, random_lp_vector

from ser_tf.attacks.budget import Budget, project, scaled_problem
from ser_tf.models.base import mean_over_copies

ModelFn = Callable[[tf.Tensor], tf.Tensor]


def expectation_over_transformation(model_fn: ModelFn, samples: int) -> ModelFn:
    """``model_fn`` averaged over ``samples`` calls: for attacking a random model.

    Expectation over transformation (EOT; Athalye et al. 2018): each input is repeated
    ``samples`` times in one batch, so a random model (e.g. one with
    :class:`ser_tf.frontend.InputNoise`) draws its randomness independently for each
    copy, and the copies' logits are averaged. Any attack handed the result follows the
    gradient of the averaged logits, a ``samples``-draw estimate of the expected model,
    instead of the gradient of one draw. The batch the model sees is ``samples`` times
    larger: lower the attack's batch size if memory runs short.

    Args:
      model_fn: inputs ``[B, ...]`` -> logits ``[B, classes]``.
      samples: copies per input (1: ``model_fn`` itself).

    Returns:
      inputs ``[B, ...]`` -> averaged logits ``[B, classes]``.
    """
    if samples < 1:
        raise ValueError(f"EOT needs at least one sample, got {samples}")
    if samples == 1:
        return model_fn
    return lambda x: mean_over_copies(model_fn, x, samples)


def concurrent_halves(model_fn: ModelFn) -> ModelFn:
    """``model_fn`` called on the two halves of each batch, the logits concatenated.

    Inside a graph the halves' forward and backward passes share no op, so TensorFlow's
    executor runs them side by side: on a 2-core CPU, where one pass over a batch of 32
    leaves a core idle part of the time (the LSTM's short steps, the FFTs and the small
    convs do not split across cores), a compiled PGD-10 on the EmoDB CNN-LSTM runs about
    1.1x faster (BENCHMARKS.md, attack throughput). The values are the model's: each
    example's logits come from one call on a batch holding it.

    A batch whose size is known when traced is cut with ``tf.split`` (its gradient is a
    concat; a batch of one goes through whole). One of unknown size (the runner's last,
    smaller batch) is cut into two slices that overlap by one example when the size is odd,
    whose logits (and gradient) then come from the first half only: no call ever gets an
    empty batch. Slices cost a little more than a split backward (their gradients are
    padded back to the whole batch).

    On a GPU the halves would queue on one stream and only add launches: the white-box
    attacks split batches on CPU-only machines (:func:`_prepare`).
    """
    def halves(x):
        x = tf.convert_to_tensor(x)
        n = x.shape[0]
        if n is not None:
            if n < 2:
                return model_fn(x)
            return tf.concat([model_fn(part) for part in tf.split(x, [(n + 1) // 2, n // 2])],
                             axis=0)
        n = tf.shape(x)[0]
        h = (n + 1) // 2
        return tf.concat([model_fn(x[:h]), model_fn(x[n - h:])[2 * h - n:]], axis=0)

    return halves


def _split_batches() -> bool:
    """Whether the white-box attacks run batches as :func:`concurrent_halves`: on machines
    without a GPU."""
    return not tf.config.list_physical_devices("GPU")


def _labels(model_fn: ModelFn, x: tf.Tensor, y, targeted: bool,
            soft: bool = False) -> tf.Tensor:
    if soft:
        if y is None:
            raise ValueError("soft labels need y: class probabilities [batch, classes]")
        return tf.convert_to_tensor(y, tf.float32)
    if y is None:
        if targeted:
            raise ValueError("a targeted attack needs the target labels y")
        return tf.argmax(model_fn(x), axis=-1, output_type=tf.int32)
    return tf.cast(tf.convert_to_tensor(y), tf.int32)


def _prepare(model_fn: ModelFn, x, y, targeted: bool, budget: Budget, soft: bool = False):
    """The inputs as float32, the labels, the budget's scaled problem, and the model_fn the
    attack calls (:func:`concurrent_halves` on a CPU-only machine)."""
    if _split_batches():
        model_fn = concurrent_halves(model_fn)
    x = tf.convert_to_tensor(x, tf.float32)
    y = _labels(model_fn, x, y, targeted, soft)
    return x, y, scaled_problem(model_fn, x, budget), model_fn


def _loss(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)


def fgm(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False) -> tf.Tensor:
    """Fast gradient method (Goodfellow et al. 2015): one step of the budget's size.

    With an L-inf budget this is FGSM (the sign of the gradient); with an L2 budget, FGM
    (the normalised gradient).
    """
    x, y, p, model_fn = _prepare(model_fn, x, y, targeted, budget)
    z_adv = fast_gradient_method(p.model_fn, p.z, p.eps, budget.norm, clip_min=p.clip_min,
                                 clip_max=p.clip_max, y=y, targeted=targeted)
    return project(x, p.unscale(z_adv), budget)


def fgsm(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False) -> tf.Tensor:
    """FGSM: :func:`fgm` under an L-inf budget (an L2 budget is an error: use ``fgm``)."""
    if budget.norm != np.inf:
        raise ValueError(f"fgsm is the L-inf attack; budget {budget.kind} is L2 (use fgm)")
    return fgm(model_fn, x, budget=budget, y=y, targeted=targeted)


def pgd(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False,
        steps: int = 10, step_size: float | None = None, random_start: bool = True,
        restarts: int = 1, soft_labels: bool = False) -> tf.Tensor:
    """Projected gradient descent (Madry et al. 2018), L-inf or L2 after the budget.

    One step with a random start and ``step_size=1.25`` is the "fast" FGSM of Wong et al.
    (2020); soft labels give TRADES' inner maximisation (Zhang et al. 2019).

    Args:
      model_fn, x, budget, y, targeted: see the module docstring.
      steps: gradient steps per run.
      step_size: step as a fraction of the radius (default ``2.5 / steps``, Madry's rule,
        at most 1); up to 2 (a single step larger than the radius is then projected back).
      random_start: start from a uniform point of the ball (BIM when False).
      restarts: independent random starts; per example the most successful run is kept
        (a misclassification, else the highest loss). Hard labels only.
      soft_labels: ``y`` holds class probabilities ``[batch, classes]`` (required) and the
        attack maximises the cross-entropy to them, i.e. the KL divergence of the model's
        prediction from ``y`` plus a constant (minimises it when ``targeted``).

    Returns:
      The adversarial batch, shaped like ``x``.
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
    if soft_labels and restarts > 1:
        raise ValueError("restarts pick the most successful run by its hard label: use "
                         "restarts=1 with soft labels")
    x, y, p, model_fn = _prepare(model_fn, x, y, targeted, budget, soft_labels)
    fraction = min(1.0, 2.5 / steps) if step_size is None else float(step_size)
    if not 0.0 < fraction <= 2.0:
        raise ValueError(f"step_size must be in (0, 2] of the radius, got {step_size}")
    loss_fn = tf.nn.softmax_cross_entropy_with_logits if soft_labels else None
    best, best_score = None, None
    # The random starts draw from TF's global generator: tf.random.set_seed makes them
    # reproducible.
    for _ in range(restarts):
        adv = project(x, _projected_gradient_steps(model_fn, x, p, y, targeted, budget,
                                                   steps, fraction * p.eps, random_start,
                                                   loss_fn), budget)
        if restarts == 1:
            return adv
        score = _success_score(model_fn(adv), y, targeted)
        if best is None:
            best, best_score = adv, score
        else:
            better = score > best_score
            mask = tf.reshape(better, [-1] + [1] * (len(x.shape) - 1))
            best = tf.where(mask, adv, best)
            best_score = tf.where(better, score, best_score)
    return best


def _clip(z: tf.Tensor, p) -> tf.Tensor:
    if p.clip_min is None:
        return z
    return tf.clip_by_value(z, p.clip_min, p.clip_max)


def _projected_gradient_steps(model_fn: ModelFn, x: tf.Tensor, p, y: tf.Tensor,
                              targeted: bool, budget: Budget, steps: int, eps_iter: float,
                              random_start: bool,
                              loss_fn: Callable | None = None) -> tf.Tensor:
    """CleverHans' PGD (Madry et al.; BIM without the random start), iterated in a graph
    loop: a random point of the ball, then ``steps`` fast-gradient steps, each projected
    back onto the ball and the sample range. ``loss_fn(labels=, logits=)`` is the loss the
    steps ascend (default: sparse cross-entropy). Returns the adversarial batch in input
    units.

    Under an L-inf budget the steps run in input units rather than the scaled space: the
    sign of the gradient and the box projections commute with a positive per-example scale,
    so each step is CleverHans' step scaled back (equal up to float rounding), and the
    model's gradient needs no rescaling on the way in and out. The gradient is CleverHans'
    ``compute_gradient``; the step and both projections are :func:`_linf_step`, one fused
    kernel.
    """
    z = p.z
    if random_start:
        eta = clip_eta(random_lp_vector(tf.shape(z), budget.norm,
                                        tf.cast(p.eps, z.dtype), dtype=z.dtype),
                       budget.norm, p.eps)
    else:
        eta = tf.zeros_like(z)
    adv = _clip(z + eta, p)
    if budget.norm == np.inf:
        loss_fn = loss_fn or tf.nn.sparse_softmax_cross_entropy_with_logits
        low, high = budget.clip_range() or (-np.inf, np.inf)
        step, radius = eps_iter * p.scale, p.eps * p.scale
        adv = p.unscale(adv)
        # CleverHans' compute_gradient is a tf.function keyed on its Python arguments: a
        # fresh closure makes it trace the model here, in the caller's context (XLA, a
        # distribution strategy, ...), rather than reuse an earlier trace of the same model.
        fresh_model_fn = lambda a: model_fn(a)  # noqa: E731
        for _ in tf.range(steps):
            grad = compute_gradient(fresh_model_fn, loss_fn, adv, y, targeted)
            adv = _linf_step(adv, grad, x, step, radius, low, high)
        return adv
    for _ in tf.range(steps):
        adv = fast_gradient_method(p.model_fn, adv, eps_iter, budget.norm, loss_fn=loss_fn,
                                   clip_min=p.clip_min, clip_max=p.clip_max, y=y,
                                   targeted=targeted)
        adv = _clip(z + clip_eta(adv - z, budget.norm, p.eps), p)
    return p.unscale(adv)


@tf.function(jit_compile=True)
def _linf_step(adv: tf.Tensor, grad: tf.Tensor, x: tf.Tensor, step: tf.Tensor,
               radius: tf.Tensor, low: float, high: float) -> tf.Tensor:
    """One L-inf PGD step: CleverHans' fast-gradient step (``adv + step * sign(grad)``,
    clipped to the sample range), then the projection onto the ball of ``radius`` around
    ``x`` and the range, with per-example ``step`` and ``radius`` ``[B, 1, ...]``.

    Compiled by XLA into one elementwise kernel: unfused, these are about ten passes over
    the batch, which cost a PGD step on a small CNN-LSTM about 5% on top of the model's own
    gradient. The sign, the product by +-step and the clips are exact, so fusing changes
    no result.
    """
    adv = tf.clip_by_value(adv + step * tf.sign(grad), low, high)
    return tf.clip_by_value(x + tf.clip_by_value(adv - x, -radius, radius), low, high)


def _success_score(logits: tf.Tensor, y: tf.Tensor, targeted: bool) -> tf.Tensor:
    """Higher is a better adversarial: success first, then the attack's loss."""
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    loss = _loss(logits, y)
    if targeted:
        return tf.where(pred == y, 1e6, 0.0) - loss
    return tf.where(pred != y, 1e6, 0.0) + loss


def bim(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False,
        steps: int = 10, step_size: float | None = None) -> tf.Tensor:
    """Basic iterative method (Kurakin et al. 2017): PGD from the clean input."""
    return pgd(model_fn, x, budget=budget, y=y, targeted=targeted, steps=steps,
               step_size=step_size, random_start=False)


def mim(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False,
        steps: int = 10, step_size: float | None = None, decay: float = 1.0) -> tf.Tensor:
    """Momentum iterative method (Dong et al. 2018); ``step_size`` defaults to 1/steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x, y, p, model_fn = _prepare(model_fn, x, y, targeted, budget)
    fraction = 1.0 / steps if step_size is None else float(step_size)
    eps_iter = fraction * p.eps
    loss_fn = tf.nn.sparse_softmax_cross_entropy_with_logits
    axes = list(range(1, len(x.shape)))
    # CleverHans' MIM step for step (L1-normalised gradient into a decaying momentum, a
    # linear step along it, projection onto the ball and range), in a graph loop.
    z = p.z
    adv = z
    momentum = tf.zeros_like(z)
    for _ in tf.range(steps):
        grad = compute_gradient(p.model_fn, loss_fn, adv, y, targeted)
        grad = grad / tf.maximum(1e-12, tf.reduce_mean(tf.abs(grad), axes, keepdims=True))
        momentum = decay * momentum + grad
        adv = adv + optimize_linear(momentum, eps_iter, budget.norm)
        adv = _clip(z + clip_eta(adv - z, budget.norm, p.eps), p)
    return project(x, p.unscale(adv), budget)


def carlini_wagner_l2(model_fn: ModelFn, x, *, budget: Budget, y=None, targeted: bool = False,
                      confidence: float = 0.0, steps: int = 100, search_steps: int = 5,
                      initial_const: float = 1.0, learning_rate: float = 0.05,
                      abort_early: bool = True) -> tf.Tensor:
    """Carlini-Wagner L2 (2017): the smallest L2 perturbation that fools, batched.

    Minimises ``d(x') + c * f(x')`` per example with Adam, where ``d`` is the squared L2
    distance measured in units of the budget's radius (1.0 at the edge of the ball) and
    ``f`` the margin loss ``max(Z_y - max_{j != y} Z_j + confidence, 0)`` (for a targeted
    attack, ``max(max_{j != t} Z_j - Z_t + confidence, 0)``). A per-example binary search
    over ``c`` keeps the smallest successful perturbation. The perturbation is optimised
    directly; the sample range is enforced by clipping inside the objective (waveforms
    sit far from full scale, so a change of variables buys nothing here).

    The result is the smallest adversarial found, projected onto the budget: an example
    whose smallest adversarial lies outside the ball comes back at the ball's edge (where
    it may no longer fool the model), one with no adversarial found comes back unchanged.

    Args:
      model_fn, x, budget, y, targeted: see the module docstring (an L2 budget).
      confidence: margin ``kappa`` the adversarial must clear.
      steps: Adam steps per binary-search step.
      search_steps: binary-search steps over ``c``.
      initial_const: the first ``c``.
      learning_rate: Adam step, as a fraction of the radius per ``sqrt(dim)`` (the size of
        one coordinate of a perturbation spread evenly to the ball's edge).
      abort_early: stop a search step once the objective stops improving.

    Returns:
      The adversarial batch, shaped like ``x``.
    """
    if budget.norm != 2:
        raise ValueError(f"carlini_wagner_l2 needs an L2 budget (snr_db or l2), got "
                         f"{budget.kind}")
    if steps < 1 or search_steps < 1:
        raise ValueError(f"steps and search_steps must be >= 1, got {steps}, {search_steps}")
    x, y, p, model_fn = _prepare(model_fn, x, y, targeted, budget)
    batch = tf.shape(x)[0]
    axes = list(range(1, len(x.shape)))
    dim = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32)
    lr = learning_rate * p.eps / tf.sqrt(dim)
    one_hot = tf.one_hot(y, tf.shape(model_fn(x))[-1])

    def objective(delta, const):
        z_adv = p.z + delta
        if p.clip_min is not None:
            z_adv = tf.clip_by_value(z_adv, p.clip_min, p.clip_max)
        logits = p.model_fn(z_adv)
        own = tf.reduce_sum(one_hot * logits, axis=-1)
        other = tf.reduce_max(logits - 1e9 * one_hot, axis=-1)
        margin = (other - own) if targeted else (own - other)
        f = tf.maximum(margin + confidence, 0.0)
        dist = tf.reduce_sum(tf.square(z_adv - p.z), axis=axes) / (p.eps ** 2)
        pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
        success = (pred == y) if targeted else (pred != y)
        if confidence > 0:
            success = success & (margin + confidence <= 0.0)
        return dist + const * f, dist, success, z_adv

    const = tf.fill([batch], tf.cast(initial_const, tf.float32))
    lower = tf.zeros([batch])
    upper = tf.fill([batch], np.inf)
    best_dist = tf.fill([batch], np.inf)
    best_z = p.z
    expand = [-1] + [1] * (len(x.shape) - 1)
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    for _ in range(search_steps):
        delta = tf.zeros_like(p.z)
        m = tf.zeros_like(p.z)
        v = tf.zeros_like(p.z)
        found = tf.zeros([batch], tf.bool)
        previous = tf.fill([batch], np.inf)
        for step in tf.range(1, steps + 1):
            with tf.GradientTape() as tape:
                tape.watch(delta)
                loss, dist, success, z_adv = objective(delta, const)
                total = tf.reduce_sum(loss)
            grad = tape.gradient(total, delta)
            improved = success & (dist < best_dist)
            best_dist = tf.where(improved, dist, best_dist)
            best_z = tf.where(tf.reshape(improved, expand), z_adv, best_z)
            found = found | success
            t = tf.cast(step, tf.float32)
            m = beta1 * m + (1.0 - beta1) * grad
            v = beta2 * v + (1.0 - beta2) * tf.square(grad)
            m_hat = m / (1.0 - beta1 ** t)
            v_hat = v / (1.0 - beta2 ** t)
            delta = delta - lr * m_hat / (tf.sqrt(v_hat) + adam_eps)
            if abort_early and step % max(1, steps // 10) == 0:
                # Stop this search step once no example's objective improved by 0.01%.
                if tf.reduce_all(loss > previous * 0.9999):
                    break
                previous = loss
        upper = tf.where(found, tf.minimum(upper, const), upper)
        lower = tf.where(found, lower, tf.maximum(lower, const))
        const = tf.where(tf.math.is_finite(upper), (lower + upper) / 2.0, const * 10.0)
    # Examples with no adversarial found, and those already misclassified (found at
    # distance 0), come back exactly as they were.
    changed = tf.reshape(tf.math.is_finite(best_dist) & (best_dist > 0), expand)
    return tf.where(changed, project(x, p.unscale(best_z), budget), x)
