"""Adversarial training: PGD (Madry), fast FGSM with a random start (Wong), and TRADES.

``ser-train --trainer=adversarial`` trains a fold exactly as the standard trainer does
(same data, schedule, checkpoints, resume, outputs; :class:`AdversarialTrainer` is a
:class:`~ser_tf.training.standard.FoldTrainer`), but each training step first crafts
adversarial examples against the current model with the project's own attacks
(:func:`ser_tf.attacks.whitebox.pgd`) and trains on them:

* ``pgd``: Madry et al. (2018): ``steps`` projected gradient steps from a random start;
  a ``ratio`` share of each batch is replaced by its adversarial version (the published
  SER defenses mixed 60% adversarial examples; 1.0 is Madry's min-max).
* ``fast``: Wong et al. (2020): one signed step of 1.25 radii from a uniform random start,
  projected back: about two passes per example instead of ``steps + 1``.
* ``trades``: Zhang et al. (2019): the loss is the clean cross-entropy plus
  ``beta * KL(p(x) || p(x'))``, where ``x'`` maximises that KL divergence in the ball
  (PGD on soft labels). Every example gets its adversarial twin (``ratio`` is unused).

The examples are crafted in the waveform domain by default: through the model's own
differentiable frontend, under a budget relative to each training crop's peak (the budget
ser-attack evaluates). ``domain="features"`` crafts on the classifier's normalised log-mel
input instead, as the published feature-domain defenses did. The attack sees the model in
inference mode (no dropout or SpecAugment, batch-norm moving statistics): the model as it
will be attacked.

With ``awp_gamma > 0`` every method also perturbs the weights (adversarial weight
perturbation, Wu et al. 2020): before each update the multi-dimensional weights (conv,
dense and LSTM kernels) take one ascent step on the batch loss, layer by layer
``v = gamma * ||w|| * g / ||g||``, the update's gradient is taken at ``w + v`` and applied
to ``w``. It flattens the robust loss landscape around the weights, which in image
classification narrowed the gap between training and test robustness. It costs one more
forward and backward pass per step.

The budget warms up: over the first ``warmup_epochs`` epochs its radius grows linearly
to the full budget (in amplitude, so -40 dB starts near -50 dB), which keeps early
training from collapsing onto a constant prediction. After every epoch the trainer attacks
the validation speakers' central clips with PGD at the full budget and selects the model
on ``(1 - robust_weight) * clean UAR + robust_weight * robust UAR``; both go to
TensorBoard and the epoch history beside the training-batch clean and adversarial
accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ser_tf.attacks import whitebox
from ser_tf.attacks.budget import Budget, radius_used
from ser_tf.data.pipeline import central_clips
from ser_tf.evaluation.metrics import classification_metrics
from ser_tf.training import distribute
from ser_tf.training.standard import FoldTrainer, TrainingSteps

log = logging.getLogger(__name__)

METHODS = ("pgd", "fast", "trades")


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    """How to train adversarially (filled from flags by the app).

    Attributes:
      method: ``pgd``, ``fast`` or ``trades``.
      domain: ``waveform`` (through the frontend) or ``features`` (normalised log-mel).
      budget: the perturbation bound, of the domain's kinds (``linf_db``/``snr_db`` for
        waveforms, ``linf``/``l2`` for features).
      steps: attack steps of ``pgd`` and of TRADES' inner maximisation (``fast``: one).
      step_size: step as a fraction of the radius (default: ``2.5 / steps``; ``fast``
        1.25).
      ratio: share of each batch replaced by adversarial examples (``pgd``, ``fast``).
      trades_beta: weight of TRADES' robustness term.
      warmup_epochs: epochs over which the radius grows linearly to the full budget.
      robust_weight: weight of the robust validation UAR in the model-selection score.
      val_steps: PGD steps of the per-epoch validation attack.
      val_eot: on a random model (one with input noise), the validation attack follows
        the gradient of the logits averaged over this many draws (expectation over
        transformation), so that selection and the logged robust UAR answer the adaptive
        attack ``ser-attack --eot`` mounts, not a one-draw PGD that the noise partly
        blinds. Each draw costs one more forward and backward pass per validation step.
        Ignored on deterministic models.
      awp_gamma: relative size of the adversarial weight perturbation (0: none; Wu et
        al. used 5e-3 for L-inf PGD-AT).
    """

    method: str = "pgd"
    domain: str = "waveform"
    budget: Budget = Budget("linf_db", -40.0)
    steps: int = 10
    step_size: float | None = None
    ratio: float = 0.6
    trades_beta: float = 6.0
    warmup_epochs: int = 5
    robust_weight: float = 0.5
    val_steps: int = 10
    val_eot: int = 4
    awp_gamma: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown adversarial training method {self.method!r}; "
                             f"choose from {METHODS}")
        if self.budget.domain != self.domain:
            kinds = "linf_db or snr_db" if self.domain == "waveform" else "linf or l2"
            raise ValueError(f"budget {self.budget.kind} is a {self.budget.domain} budget; "
                             f"the {self.domain} domain needs {kinds}")
        if self.steps < 1 or self.val_steps < 1 or self.val_eot < 1:
            raise ValueError(f"steps, val_steps and val_eot must be >= 1, got {self.steps}, "
                             f"{self.val_steps}, {self.val_eot}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"the adversarial ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.robust_weight <= 1.0:
            raise ValueError(f"robust_weight must be in [0, 1], got {self.robust_weight}")
        if self.warmup_epochs < 0 or self.trades_beta < 0:
            raise ValueError("warmup_epochs and trades_beta must be >= 0")
        if not 0.0 <= self.awp_gamma < 1.0:
            raise ValueError(f"awp_gamma must be in [0, 1), got {self.awp_gamma}")

    @property
    def attack_steps(self) -> int:
        """Gradient steps per crafted example."""
        return 1 if self.method == "fast" else self.steps

    @property
    def fraction(self) -> float:
        """Step size as a fraction of the radius."""
        if self.step_size is not None:
            return float(self.step_size)
        return 1.25 if self.method == "fast" else min(1.0, 2.5 / self.steps)

    def budget_at(self, epoch: int) -> Budget:
        """The budget of (0-based) ``epoch``: the radius ramps up linearly over the warm-up."""
        if epoch >= self.warmup_epochs:
            return self.budget
        fraction = (epoch + 1) / (self.warmup_epochs + 1)
        db = 20.0 * math.log10(fraction)
        kind, value = self.budget.kind, self.budget.value
        if kind == "linf_db":
            return Budget(kind, value + db)
        if kind == "snr_db":
            return Budget(kind, value - db)
        return Budget(kind, value * fraction)


def craft_examples(model, x: tf.Tensor, y: tf.Tensor, config: AdversarialConfig,
                   budget: Budget) -> tf.Tensor:
    """Training examples crafted against ``model`` in inference mode, no gradient to its
    weights.

    Args:
      model: the SERModel being trained.
      x: waveforms, or normalised features in the features domain.
      y: class indices, or (TRADES) the clean class probabilities.
      config: the method (steps, step size, domain).
      budget: the budget of the current epoch.

    Returns:
      The adversarial batch, shaped like ``x``.
    """
    if config.domain == "waveform":
        def target(v):
            return model(v, training=False)
    else:
        def target(v):
            return model.classify(v, training=False)
    adv = whitebox.pgd(target, x, budget=budget, y=y, steps=config.attack_steps,
                       step_size=config.fraction, random_start=True,
                       soft_labels=config.method == "trades")
    return tf.stop_gradient(adv)


def compiled_crafter(model, config: AdversarialConfig, budget: Budget):
    """:func:`craft_examples` at ``budget`` as its own tf.function: AutoGraph then turns the
    attack's loop into a graph loop inside Keras' train function (which it does not
    convert); it is inlined when the train step is traced. Make a new one per budget."""
    return tf.function(lambda x, y: craft_examples(model, x, y, config, budget))


class BudgetSchedule(keras.callbacks.Callback):
    """Sets the training steps' budget at the start of every epoch (the warm-up)."""

    def __init__(self, steps: keras.Model, config: AdversarialConfig):
        super().__init__()
        self.steps, self.config = steps, config

    def on_epoch_begin(self, epoch, logs=None):
        self.steps.set_budget(self.config.budget_at(epoch))


class WeightPerturbation:
    """Adversarial weight perturbation (Wu et al. 2020) of a model's kernels.

    :meth:`ascend` moves every multi-dimensional trainable weight ``w`` (conv, dense and
    LSTM kernels; biases and batch-norm scales stay) by ``gamma * ||w|| * g / ||g||``,
    ``g`` the gradient of the batch loss, and returns the weights as they were;
    :meth:`restore` puts them back exactly. The ascent pass runs the model in training
    mode; the non-trainable state it updates (batch-norm moving statistics, random-number
    generator states) is set back, so it leaves no trace besides the perturbation: each
    step moves the statistics once, as without AWP, and the update's pass draws the same
    dropout and SpecAugment masks as the ascent (a random model's input noise is drawn
    anew: it comes from TF's global generator). One replica only: the ascent direction
    would need the gradients of the whole global batch.

    Args:
      model: the model whose kernels are perturbed.
      gamma: the perturbation's size relative to each kernel's norm.
    """

    def __init__(self, model: keras.Model, gamma: float):
        if distribute.current().num_replicas_in_sync > 1:
            raise ValueError("adversarial weight perturbation (awp_gamma > 0) runs on one "
                             "replica; use --strategy=default")
        self.gamma = float(gamma)
        self.weights = [v for v in model.trainable_variables if len(v.shape) >= 2]
        self.state = list(model.non_trainable_variables)

    def ascend(self, loss_fn) -> list[tf.Tensor]:
        """Perturbs the kernels along the gradient of ``loss_fn()`` (a scalar)."""
        originals = [tf.identity(v) for v in self.weights]
        state = [tf.identity(v) for v in self.state]
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, self.weights)
        for v, w, g in zip(self.weights, originals, grads):
            if g is not None:
                v.assign_add(self.gamma * tf.norm(w) * g / (tf.norm(g) + 1e-12))
        for v, value in zip(self.state, state):
            v.assign(value)
        return originals

    def restore(self, originals: Sequence[tf.Tensor]) -> None:
        """Sets the kernels back to ``originals`` (from :meth:`ascend`)."""
        for v, w in zip(self.weights, originals):
            v.assign(w)


class AdversarialSteps(TrainingSteps):
    """The training steps of adversarial training (see :class:`TrainingSteps`).

    Reported per epoch: ``loss``, ``accuracy`` (the clean examples of the batches; for
    TRADES every clean example; absent when every example is adversarial),
    ``adv_accuracy`` (the adversarial ones) and ``adv_radius_used`` (the mean share of the
    epoch's budget radius the crafted perturbations use: about 1 for PGD; it checks that
    the examples were crafted at the budget the history names). With AWP the batch
    accuracies are those of the perturbed weights the update's gradient is taken at.
    """

    def __init__(self, model, config: AdversarialConfig, **kwargs):
        super().__init__(model, name="adversarial_steps", **kwargs)
        self.config = config
        self.budget = config.budget_at(0)
        self._craft = compiled_crafter(self.ser, self.config, self.budget)
        self.adv_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")
        self.radius_used = keras.metrics.Mean(name="adv_radius_used")
        self.awp = WeightPerturbation(self.ser, config.awp_gamma) if config.awp_gamma else None

    @property
    def metrics(self):
        if self.config.method != "trades" and self.config.ratio >= 1.0:
            return [self.loss_tracker, self.adv_accuracy, self.radius_used]
        return [*super().metrics, self.adv_accuracy, self.radius_used]

    def set_budget(self, budget: Budget) -> None:
        """Changes the training budget (the step function is traced again for it)."""
        if budget != self.budget:
            self.budget = budget
            self._craft = compiled_crafter(self.ser, self.config, self.budget)
            self.retrace()

    def _inputs(self, x: tf.Tensor) -> tf.Tensor:
        """What the attack perturbs: the waveform, or its normalised features."""
        return x if self.config.domain == "waveform" else self.ser.features(x)

    def _logits(self, v: tf.Tensor) -> tf.Tensor:
        if self.config.domain == "waveform":
            return self.ser(v, training=True)
        return self.ser.classify(v, training=True)

    def train_step(self, data):
        x, y, w = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.cast(y, tf.int32)
        w = tf.ones(tf.shape(y), tf.float32) if w is None else tf.cast(w, tf.float32)
        batch = tf.cast(tf.shape(y)[0], tf.float32)
        cfg = self.config
        if cfg.method == "trades":
            clean_inputs = self._inputs(x)
            p_clean = tf.nn.softmax(self.ser.classify(clean_inputs, training=False)
                                    if cfg.domain == "features"
                                    else self.ser(x, training=False))
            adv = self._craft(clean_inputs, tf.stop_gradient(p_clean))
            self.radius_used.update_state(radius_used(clean_inputs, adv, self.budget))

            def batch_loss():
                # One pass over both halves: batch normalisation sees one batch.
                logits_clean, logits_adv = tf.split(
                    self._logits(tf.concat([clean_inputs, adv], 0)), 2)
                xent = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits_clean)
                log_p = tf.nn.log_softmax(logits_clean)
                kl = tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(logits_adv)), -1)
                return tf.reduce_sum(w * (xent + cfg.trades_beta * kl)) / batch, (
                    (y, logits_clean), (y, logits_adv))
        else:
            n_adv = tf.cast(tf.round(cfg.ratio * batch), tf.int32)
            attacked = self._inputs(x[:n_adv])
            adv = self._craft(attacked, y[:n_adv])
            self.radius_used.update_state(radius_used(attacked, adv, self.budget))
            inputs = tf.concat([adv, self._inputs(x[n_adv:])], 0)

            def batch_loss():
                logits = self._logits(inputs)
                xent = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
                return tf.reduce_sum(w * xent) / batch, (
                    (y[n_adv:], logits[n_adv:]), (y[:n_adv], logits[:n_adv]))
        originals = None
        if self.awp is not None:
            originals = self.awp.ascend(lambda: batch_loss()[0])
        with tf.GradientTape() as tape:
            loss, (clean, adversarial) = batch_loss()
        self.clean_accuracy.update_state(*clean)
        self.adv_accuracy.update_state(*adversarial)
        distribute.minimize(self.optimizer, tape, loss, self.ser.trainable_variables,
                            before_update=(None if originals is None
                                           else lambda: self.awp.restore(originals)))
        self.loss_tracker.update_state(loss)
        return {m.name: m.result() for m in self.metrics}


class RobustSelection:
    """Robust model selection for a :class:`FoldTrainer` that trains adversarially.

    Mixed in before ``FoldTrainer``: after every epoch, besides the clean validation UAR,
    the validation speakers' central clips are attacked with PGD (``val_steps`` steps) at
    the full training budget (through ``val_eot`` draws averaged where the model is
    random), and the model is selected on ``(1 - robust_weight) * clean
    UAR + robust_weight * robust UAR``; both go to TensorBoard and the epoch history.
    Subclasses say which :class:`AdversarialConfig` applies (``robust_config``); with none,
    selection stays on the clean validation UAR.
    """

    _val_clips: tuple[np.ndarray, np.ndarray] | None = None

    def robust_config(self) -> AdversarialConfig | None:
        raise NotImplementedError

    def build(self) -> None:
        super().build()
        self.val_attack = tf.function(self._attack_batch, reduce_retracing=True)

    def _attack_batch(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Predictions under validation PGD at the full budget (true labels)."""
        cfg = self.robust_config()
        if cfg.domain == "waveform":
            def target(v):
                return self.model(v, training=False)
            inputs = x
        else:
            def target(v):
                return self.model.classify(v, training=False)
            inputs = self.model.features(x)
        attacked = target
        if getattr(self.model, "random", False):
            attacked = whitebox.expectation_over_transformation(target, cfg.val_eot)
        adv = whitebox.pgd(attacked, inputs, budget=cfg.budget, y=y, steps=cfg.val_steps)
        return tf.argmax(target(adv), -1, output_type=tf.int32)

    def robust_predictions(self, indices: Sequence[int], batch_size: int = 32) -> np.ndarray:
        """Predictions on the central clips of ``indices`` under validation PGD."""
        if self._val_clips is None or len(self._val_clips[0]) != len(indices):
            clips = central_clips(self.corpus, indices, segment_samples=self.segment,
                                  pad_mode=self.cfg.pad_mode)
            self._val_clips = (clips, self.labels[np.asarray(indices)])
        clips, y = self._val_clips
        preds = []
        for start in range(0, len(clips), batch_size):
            xb, yb = clips[start:start + batch_size], y[start:start + batch_size]
            n = len(xb)
            if n < batch_size <= len(clips):  # one traced shape: pad the last batch
                xb = np.concatenate([xb, clips[:batch_size - n]])
                yb = np.concatenate([yb, y[:batch_size - n]])
            preds.append(self.val_attack(tf.constant(xb), tf.constant(yb)).numpy()[:n])
        return np.concatenate(preds)

    def validate(self, epoch: int, logs: dict) -> tuple[float, dict, dict]:
        score, val, extra = super().validate(epoch, logs)
        cfg = self.robust_config()
        if cfg is None:
            return score, val, extra
        extra = {**extra, "budget": self.steps.budget.label}
        if not self.fold.val:
            return score, val, extra
        y = self.labels[np.asarray(self.fold.val)]
        robust = classification_metrics(y, self.robust_predictions(self.fold.val),
                                        self.classes)
        w = cfg.robust_weight
        score = (1.0 - w) * val["uar"] + w * robust["uar"]
        extra.update(val_robust_uar=robust["uar"], val_robust_accuracy=robust["accuracy"])
        with self.val_writer.as_default(step=epoch + 1):
            eot = (f", EOT over {cfg.val_eot} draws"
                   if getattr(self.model, "random", False) and cfg.val_eot > 1 else "")
            tf.summary.scalar("epoch_robust_uar", robust["uar"],
                              description=f"PGD-{cfg.val_steps} at "
                                          f"{cfg.budget.label}{eot}, central clips")
            tf.summary.scalar("epoch_robust_accuracy", robust["accuracy"])
        return score, val, extra


class AdversarialTrainer(RobustSelection, FoldTrainer):
    """A fold trained adversarially (see the module docstring)."""

    def __init__(self, *args, adversarial: AdversarialConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.adversarial = adversarial

    method_name = "adversarial training"
    supports_mixup = False
    supports_speaker_norm = False

    def robust_config(self) -> AdversarialConfig:
        return self.adversarial

    def restore(self) -> bool:
        resumed = super().restore()
        # The crafter of the resumed epoch's budget (not only its label).
        self.steps.set_budget(self.adversarial.budget_at(self.state["epoch"]))
        return resumed

    def make_steps(self) -> TrainingSteps:
        return AdversarialSteps(self.model, self.adversarial)

    def callbacks(self) -> list[keras.callbacks.Callback]:
        return [BudgetSchedule(self.steps, self.adversarial)]

    def describe(self) -> dict:
        return {"adversarial_training": {**dataclasses.asdict(self.adversarial),
                                         "budget": self.adversarial.budget.to_dict()}}

    def hparams(self) -> dict:
        adv = {f"adv_{k}": v for k, v in dataclasses.asdict(self.adversarial).items()
               if k != "budget"}
        adv["adv_budget"] = self.adversarial.budget.label
        return {**super().hparams(), **adv}
