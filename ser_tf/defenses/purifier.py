"""The GAN defense: a purifier in front of the classifier, and the attacks that adapt to it.

After Latif, Rana and Qadir (2018): a generator, the *purifier*, maps the classifier's
input features, adversarial ones included, back towards clean speech features; it is
trained against a discriminator, with a reconstruction term, and then sits inside the
model (:attr:`ser_tf.models.SERModel.purifier`, part of ``classify``), so that the saved
``model.keras``, ``ser-attack`` and every exported artifact see one model.

``ser-train --trainer=purifier`` first trains and selects the classifier exactly as the
standard trainer does (or takes it from an already trained run of the same split,
``--purifier_classifier_from``), then trains the purifier with the classifier frozen
(:class:`PurifierTrainer`, resumable from ``purifier/ckpt``):

* inputs: normalised features of training crops, a ``1 - clean_share`` share of them made
  adversarial by PGD against the classifier alone, at budgets cycled from ``budgets``;
* the purifier (a residual stack of dilated 3x3 convolutions, any number of frames) is
  trained to minimise ``reconstruction_weight * L1(P(x), clean)`` plus the least-squares
  GAN loss of a patch discriminator that tells clean features from purified ones, plus
  ``classification_weight`` times the frozen classifier's cross-entropy on ``P(x)`` (a
  representation-guided term, as in Liao et al. 2018; 0 turns it off).

A purifier is judged honestly only by attacks that know it is there. The purifier is
differentiable and deterministic, so a white-box attack through the whole model (which
``ser-attack`` runs by default) already adapts to it; ``model(x, bpda=True)`` is the BPDA
model (Athalye et al. 2018) whose backward pass treats the purifier as the identity, for
when its own gradient is uninformative (``ser-attack --bpda``). Nothing in the model is
random at inference, so expectation over transformation adds nothing here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from ser_tf.attacks import whitebox
from ser_tf.attacks.budget import Budget
from ser_tf.data.pipeline import training_dataset
from ser_tf.defenses.gan import AdversarialPair
from ser_tf.evaluation.report import png_to_tensor, spectrograms_png
from ser_tf.training import distribute
from ser_tf.training.standard import FoldTrainer, load_fold_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PurifierConfig:
    """The purifier and how it is trained (filled from flags by the app).

    Attributes:
      width: filters of the purifier's and discriminator's conv layers.
      steps: purifier updates.
      batch_size: training crops per step.
      learning_rate: Adam step of both networks (betas 0.5, 0.999).
      budgets: waveform budgets of the adversarial training inputs, cycled per step.
      attack_steps: PGD steps crafting them (against the classifier alone).
      clean_share: share of each batch left clean (the purifier must keep clean speech).
      reconstruction_weight: weight of the L1 distance to the clean features.
      adversarial_weight: weight of the least-squares GAN loss.
      classification_weight: weight of the frozen classifier's cross-entropy on the
        purified features (0: a purely generative purifier).
      checkpoint_every: steps between checkpoints and TensorBoard images.
      classifier_from: a trained run's workdir whose classifier (``FOLD/model.keras``, or
        ``model.keras`` for a single split) the purifier is put in front of, instead of
        training one first. Its test speakers must be this fold's; it must have no
        purifier and the same architecture, classes and sample rate.
    """

    width: int = 32
    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 2e-4
    budgets: Sequence[Budget] = (Budget("linf_db", -50.0), Budget("linf_db", -40.0),
                                 Budget("linf_db", -30.0))
    attack_steps: int = 10
    clean_share: float = 0.5
    reconstruction_weight: float = 10.0
    adversarial_weight: float = 1.0
    classification_weight: float = 1.0
    checkpoint_every: int = 250
    classifier_from: str = ""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.attack_steps < 1 or self.width < 1:
            raise ValueError("purifier steps, batch_size, attack_steps and width must be >= 1")
        if not self.budgets or any(b.domain != "waveform" for b in self.budgets):
            raise ValueError("the purifier's training budgets must be waveform budgets "
                             "(linf_db or snr_db)")
        if not 0.0 <= self.clean_share < 1.0:
            raise ValueError(f"clean_share must be in [0, 1), got {self.clean_share}")
        if min(self.reconstruction_weight, self.adversarial_weight,
               self.classification_weight) < 0:
            raise ValueError("loss weights must be >= 0")


def build_purifier(bins: int, channels: int, width: int = 32) -> keras.Model:
    """``[B, frames, bins, C] -> [B, frames, bins, C]``: the input plus a correction from a
    stack of dilated 3x3 convolutions (any number of frames; built-in TFLite ops)."""
    features = keras.Input((None, bins, channels), name="features")
    h = features
    for k, rate in enumerate((1, 2, 4, 1)):
        h = keras.layers.Conv2D(width, 3, padding="same", dilation_rate=rate,
                                name=f"purifier_conv{k}")(h)
        h = keras.layers.ELU(name=f"purifier_act{k}")(h)  # see build_discriminator
    correction = keras.layers.Conv2D(channels, 3, padding="same", name="purifier_out",
                                     kernel_initializer="zeros")(h)
    out = keras.layers.Add(name="purified")([features, correction])
    return keras.Model(features, out, name="purifier")


def build_discriminator(bins: int, channels: int, width: int = 32) -> keras.Model:
    """A patch discriminator: ``[B, frames, bins, C]`` -> a realness score per patch."""
    features = keras.Input((None, bins, channels), name="features")
    h = features
    for k, filters in enumerate((width, width * 2, width * 4)):
        h = keras.layers.Conv2D(filters, 4, strides=2, padding="same", name=f"conv{k}")(h)
        # ELU, not LeakyReLU: grappler's remapper fuses conv + bias + LeakyRelu and then
        # fails (with a logged error) on the two discriminator passes of one tape.
        h = keras.layers.ELU(name=f"act{k}")(h)
    score = keras.layers.Conv2D(1, 3, padding="same", name="score")(h)
    return keras.Model(features, score, name="discriminator")


class PurifierGAN(AdversarialPair):
    """Trains a purifier for a frozen SERModel (see the module docstring).

    Args:
      model: the trained SERModel (its purifier must be None while this trains).
      config: sizes, losses and budgets.
      workdir: checkpoints go to ``workdir/ckpt`` (None: none).
      seed: initialisation seed.
      resume_from: the folder whose ``ckpt/`` to resume from (default ``workdir``).
    """

    def __init__(self, model, config: PurifierConfig, workdir: str | None = None,
                 seed: int = 0, resume_from: str | None = None):
        if model.purifier is not None:
            raise ValueError("the model already has a purifier")
        self.model, self.config = model, config
        shape = model.frontend.compute_output_shape((None, model.segment_samples))
        bins, channels = int(shape[2]), int(shape[3])
        keras.utils.set_random_seed(seed)
        self.purifier = build_purifier(bins, channels, config.width)
        self.discriminator = build_discriminator(bins, channels, config.width)
        self.p_opt = keras.optimizers.Adam(config.learning_rate, beta_1=0.5)
        self.d_opt = keras.optimizers.Adam(config.learning_rate, beta_1=0.5)
        self.p_opt.build(self.purifier.trainable_variables)
        self.d_opt.build(self.discriminator.trainable_variables)
        self.steps_total, self.checkpoint_every = config.steps, config.checkpoint_every
        self._checkpoint(workdir, resume_from, purifier=self.purifier,
                         discriminator=self.discriminator, p_opt=self.p_opt, d_opt=self.d_opt)
        # One compiled step per budget (the budget is part of the traced attack).
        self._steps = {b: self._compile(self._make_step(b)) for b in config.budgets}

    def _make_step(self, budget: Budget):
        cfg, model = self.config, self.model

        def target(v):
            return model(v, training=False)

        def step(x, y):
            y = tf.cast(y, tf.int32)
            n_adv = tf.cast(tf.round((1.0 - cfg.clean_share) * tf.cast(tf.shape(y)[0],
                                                                       tf.float32)), tf.int32)
            adv = whitebox.pgd(target, x[:n_adv], budget=budget, y=y[:n_adv],
                               steps=cfg.attack_steps)
            inputs = model.features(tf.concat([adv, x[n_adv:]], 0))
            clean = model.features(x)
            with tf.GradientTape() as d_tape:
                purified = self.purifier(inputs, training=True)
                d_real = self.discriminator(clean, training=True)
                d_fake = self.discriminator(purified, training=True)
                d_loss = (tf.reduce_mean(tf.square(d_real - 1.0))
                          + tf.reduce_mean(tf.square(d_fake)))
            distribute.minimize(self.d_opt, d_tape, d_loss,
                                self.discriminator.trainable_variables)
            with tf.GradientTape() as p_tape:
                purified = self.purifier(inputs, training=True)
                reconstruction = tf.reduce_mean(tf.abs(purified - clean))
                fooling = tf.reduce_mean(tf.square(
                    self.discriminator(purified, training=False) - 1.0))
                xent = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    y, model.classifier(purified, training=False)))
                p_loss = (cfg.reconstruction_weight * reconstruction
                          + cfg.adversarial_weight * fooling
                          + cfg.classification_weight * xent)
            distribute.minimize(self.p_opt, p_tape, p_loss, self.purifier.trainable_variables)
            return {"purifier_loss": p_loss, "discriminator_loss": d_loss,
                    "reconstruction_l1": reconstruction, "gan_loss": fooling,
                    "classifier_xent": xent}

        return step

    desc, postfix = "purifier", "reconstruction_l1"

    def train_step(self, step: int, batches) -> tuple[dict, tuple]:
        """One step on a ``(waveforms, labels)`` batch, at the step's budget."""
        x, y = next(batches)
        budget = self.config.budgets[step % len(self.config.budgets)]
        stats = self._steps[budget](x, y)
        x, y = distribute.first_replica(x), distribute.first_replica(y)
        return stats, (x[:2], y[:2])

    def write_images(self, writer, step: int, x: tf.Tensor, y: tf.Tensor) -> None:
        """Clean, adversarial (PGD at the largest budget) and purified features."""
        budget = max(self.config.budgets, key=lambda b: b.radius)
        adv = whitebox.pgd(lambda v: self.model(v, training=False), x, budget=budget,
                           y=tf.cast(y, tf.int32), steps=self.config.attack_steps)
        clean, attacked = self.model.features(x), self.model.features(adv)
        purified = self.purifier(attacked, training=False)
        grid = np.concatenate([clean.numpy(), attacked.numpy(), purified.numpy()])[..., 0]
        n = len(x)
        titles = ["clean"] * n + [f"PGD {budget.label}"] * n + ["purified"] * n
        with writer.as_default(step=step):
            tf.summary.image("clean_adversarial_purified",
                             png_to_tensor(spectrograms_png(grid, titles)))


class PurifierTrainer(FoldTrainer):
    """A fold trained as standard, then given a GAN purifier (see the module docstring)."""

    def __init__(self, *args, purifier: PurifierConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.purifier_cfg = purifier
        self.purifier_report: dict = {}

    method_name = "the purifier defense"
    supports_speaker_norm = False

    def build(self) -> None:
        if self.purifier_cfg.classifier_from and self.cfg.refit:
            raise ValueError("--purifier_classifier_from takes a trained classifier as it is; "
                             "--refit would train another one")
        super().build()

    def train(self, start: int) -> None:
        """Trains the classifier as the standard trainer does or, with ``classifier_from``,
        takes the weights of that run's classifier as the one "epoch" (validated and
        selected on like any other)."""
        if not self.purifier_cfg.classifier_from:
            super().train(start)
            return
        if start > 0:  # resumed: the loaded classifier is already the checkpoint
            return
        self._epoch_start = time.time()
        source = load_fold_model(self.purifier_cfg.classifier_from, self.fold.name,
                                 self.fold.test_speakers)

        def signature(model) -> str:  # JSON: a loaded config has lists for tuples
            return json.dumps([model.labels, model.sample_rate, model.classifier.get_config(),
                               model.frontend.get_config()], sort_keys=True, default=str)

        if source.purifier is not None or signature(source) != signature(self.model):
            raise ValueError(f"{self.purifier_cfg.classifier_from}: its classifier is not the "
                             "one these flags build (architecture, frontend, classes or "
                             "sample rate differ, or it has a purifier already)")
        self.model.set_weights(source.get_weights())
        log.info("%s: classifier taken from %s", self.fold.name,
                 self.purifier_cfg.classifier_from)
        self.end_epoch(0, {})

    def finalize(self) -> None:
        """Trains the purifier for the selected classifier and puts it into the model."""
        root = os.path.join(self.workdir, "purifier")
        distribute.check_batch(self.purifier_cfg.batch_size, "--purifier_batch_size")
        val_before = self.evaluate(self.fold.val, "validating")[0] if self.fold.val else {}
        gan = PurifierGAN(self.model, self.purifier_cfg, workdir=root, seed=self.cfg.seed,
                          resume_from=os.path.join(self.chief_workdir, "purifier"))
        data = training_dataset(self.corpus, self.fold.train, self.labels,
                                segment_samples=self.segment,
                                batch_size=self.purifier_cfg.batch_size, seed=self.cfg.seed,
                                augment=self.cfg.augment, pad_mode=self.cfg.pad_mode,
                                drop_remainder=True).repeat()
        writer = tf.summary.create_file_writer(os.path.join(self.workdir, "tb", "purifier"))
        gan.fit(data, writer=writer, progress=self.verbose == 1)
        writer.flush()
        self.model = self.model.with_purifier(gan.purifier)
        # The compiled forward pass was traced without the purifier.
        self.forward = tf.function(lambda x: self.model(x, training=False),
                                   reduce_retracing=True)
        val_after = self.evaluate(self.fold.val, "validating")[0] if self.fold.val else {}
        self.purifier_report = {
            "val_uar_without_purifier": val_before.get("uar"),
            "val_uar_with_purifier": val_after.get("uar"),
        }
        if self.fold.val:
            log.info("%s purifier: validation UAR %.3f without, %.3f with", self.fold.name,
                     val_before["uar"], val_after["uar"])

    def describe(self) -> dict:
        cfg = dataclasses.asdict(self.purifier_cfg)
        cfg["budgets"] = [b.to_dict() for b in self.purifier_cfg.budgets]
        return {"purifier": {"config": cfg, **self.purifier_report}}

    def hparams(self) -> dict:
        cfg = {f"purifier_{k}": v for k, v in dataclasses.asdict(self.purifier_cfg).items()
               if k != "budgets"}
        cfg["purifier_budgets"] = ",".join(b.label for b in self.purifier_cfg.budgets)
        return {**super().hparams(), **cfg}
