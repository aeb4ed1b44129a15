"""GAN-augmented training: a class-conditional WGAN-GP on log-mel features, mixed into training.

``ser-train --trainer=gan`` trains a fold in two stages, both in the fold's workdir and both
resumable:

1. A class-conditional Wasserstein GAN with gradient penalty (Gulrajani et al. 2017) learns
   the fold's *training* speakers' normalised log-mel feature maps (one training crop each,
   the classifier's own input: the model's frontend and normaliser, adapted on the training
   split first). The generator maps noise and an emotion to a ``[frames, bins, C]`` map
   (transposed-conv upsampling); the critic is a strided conv net with a projection
   conditioning (Miyato and Koyama 2018). ``critic_steps`` critic updates per generator
   update; checkpoints in ``gan/`` every ``checkpoint_every`` generator steps, TensorBoard
   (``tb/gan``) gets both losses, the gradient penalty and generated spectrograms per emotion.
2. The SER model trains as the standard trainer does, but every batch of real crops is
   joined by ``ratio * batch`` generated feature maps with uniformly drawn emotions, fed to
   the classifier directly (they are features, not audio); optionally the real crops are
   also attacked as in adversarial training (``adversarial``), so that generated and
   adversarial examples train together.

The generator's quality is measured after stage 1 (:func:`gan_quality`, into
``metrics.json`` under ``gan``): a real-data probe (a softmax regression on each map's
per-bin mean and standard deviation over time, fitted on the training speakers' real
crops) classifies generated maps of every emotion, beside its accuracy on real held-out
maps; and the Frechet distance between the Gaussians of those statistics for generated and
held-out real maps, beside the same distance between real training and held-out maps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from ser_tf.attacks.budget import Budget
from ser_tf.data.pipeline import central_clips, training_dataset
from ser_tf.defenses.adversarial import (AdversarialConfig, BudgetSchedule, RobustSelection,
                                         compiled_crafter)
from ser_tf.evaluation.report import png_to_tensor, spectrograms_png
from ser_tf.training import distribute
from ser_tf.training.standard import FoldTrainer, TrainingSteps
from ser_tf.workdir import write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """The conditional GAN and how its samples join training (filled from flags).

    Attributes:
      latent_dim: noise dimensions.
      width: filters of the generator's last and the critic's first conv layer (doubling
        towards the narrow end).
      steps: generator updates.
      critic_steps: critic updates per generator update.
      gp_weight: gradient-penalty weight.
      learning_rate: Adam step of both networks (betas 0.5, 0.9).
      batch_size: real maps per critic step.
      ratio: generated maps per real crop in classifier training.
      checkpoint_every: generator steps between checkpoints and TensorBoard images.
      adversarial: also replace part of each real batch by adversarial examples (as
        ``ser-train --trainer=adversarial`` does), or None.
    """

    latent_dim: int = 64
    width: int = 32
    steps: int = 2000
    critic_steps: int = 3
    gp_weight: float = 10.0
    learning_rate: float = 2e-4
    batch_size: int = 32
    ratio: float = 0.5
    checkpoint_every: int = 250
    adversarial: AdversarialConfig | None = None

    def __post_init__(self):
        if self.steps < 1 or self.critic_steps < 1 or self.batch_size < 1:
            raise ValueError("GAN steps, critic_steps and batch_size must be >= 1")
        if self.ratio < 0:
            raise ValueError(f"the generated-sample ratio must be >= 0, got {self.ratio}")
        if self.latent_dim < 1 or self.width < 1:
            raise ValueError("latent_dim and width must be >= 1")
        if self.adversarial is not None and self.adversarial.awp_gamma:
            raise ValueError("adversarial weight perturbation (awp_gamma) is a "
                             "--trainer=adversarial option; GAN-augmented training does not "
                             "perturb weights")
        if self.adversarial is not None and self.adversarial.method == "trades":
            raise ValueError("GAN-augmented training mixes in pgd or fast adversarial "
                             "examples; TRADES is a loss of its own (use "
                             "--trainer=adversarial)")


def _upsampled(size: int) -> int:
    return int(math.ceil(size / 8))


def build_generator(frames: int, bins: int, channels: int, num_classes: int,
                    latent_dim: int = 64, width: int = 32) -> keras.Model:
    """``(noise [B, latent_dim], label [B]) -> feature maps [B, frames, bins, channels]``."""
    f0, b0 = _upsampled(frames), _upsampled(bins)
    noise = keras.Input((latent_dim,), name="noise")
    label = keras.Input((), dtype="int32", name="label")
    embedded = keras.layers.Embedding(num_classes, latent_dim, name="label_embedding")(label)
    h = keras.layers.Concatenate(name="condition")([noise, embedded])
    h = keras.layers.Dense(f0 * b0 * width * 4, name="project")(h)
    h = keras.layers.Reshape((f0, b0, width * 4))(h)
    for k, filters in enumerate((width * 4, width * 2, width)):
        h = keras.layers.UpSampling2D(2, name=f"up{k}")(h)
        h = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{k}")(h)
        h = keras.layers.BatchNormalization(name=f"bn{k}")(h)
        h = keras.layers.LeakyReLU(0.2, name=f"act{k}")(h)
    h = keras.layers.Conv2D(channels, 3, padding="same", name="out")(h)
    out = keras.layers.Cropping2D(((0, 8 * f0 - frames), (0, 8 * b0 - bins)), name="crop")(h)
    return keras.Model([noise, label], out, name="generator")


class _Projection(keras.layers.Layer):
    """Projection conditioning: ``<embed(label), h>`` added to the critic's score."""

    def __init__(self, num_classes: int, units: int, **kwargs):
        super().__init__(**kwargs)
        self.embedding = keras.layers.Embedding(num_classes, units)

    def call(self, h, label):
        return tf.reduce_sum(self.embedding(label) * h, axis=-1, keepdims=True)


def build_critic(frames: int, bins: int, channels: int, num_classes: int,
                 width: int = 32) -> keras.Model:
    """``(feature maps, label) -> score [B, 1]`` (unbounded: a Wasserstein critic)."""
    maps = keras.Input((frames, bins, channels), name="features")
    label = keras.Input((), dtype="int32", name="label")
    h = maps
    for k, filters in enumerate((width, width * 2, width * 4)):
        h = keras.layers.Conv2D(filters, 4, strides=2, padding="same", name=f"conv{k}")(h)
        # ELU, not LeakyReLU: grappler's remapper fuses conv + bias + LeakyRelu and then
        # fails (with a logged error) on the gradient-penalty's double backward pass.
        h = keras.layers.ELU(name=f"act{k}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    score = keras.layers.Add(name="score")([
        keras.layers.Dense(1, name="linear")(h),
        _Projection(num_classes, width * 4, name="projection")(h, label)])
    return keras.Model([maps, label], score, name="critic")


class AdversarialPair:
    """Two networks trained against each other step by step (a GAN's generator and critic,
    the purifier and its discriminator): a step counter and optimizers checkpointed
    together (resumable), losses to TensorBoard, images at every checkpoint.

    Subclasses build their networks and optimizers (in the distribution strategy's scope),
    call :meth:`_checkpoint`, compile their updates with :meth:`_compile`, and implement
    :meth:`train_step` and :meth:`write_images`. Under a strategy with several replicas
    the batches are split over them and every update runs on each replica
    (:func:`~ser_tf.training.distribute.minimize` makes the summed gradients those of
    the global batch).
    """

    steps_total: int
    checkpoint_every: int
    desc = "GAN"
    postfix = ""

    def _checkpoint(self, workdir: str | None, resume_from: str | None = None,
                    **objects) -> None:
        """Creates the step counter and the checkpoint of ``objects``, written under
        ``workdir/ckpt``; restores the one under ``resume_from/ckpt`` (default
        ``workdir``; other workers than the chief resume from the chief's) if it exists."""
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.manager = None
        if workdir is not None:
            ckpt = tf.train.Checkpoint(step=self.step, **objects)
            self.manager = tf.train.CheckpointManager(ckpt, os.path.join(workdir, "ckpt"),
                                                      max_to_keep=1)
            latest = tf.train.latest_checkpoint(os.path.join(resume_from or workdir, "ckpt"))
            if latest:
                ckpt.read(latest).assert_existing_objects_matched()

    @staticmethod
    def _compile(update):
        """``update`` as one compiled step: on every replica with its share of the batch
        (arguments from a distributed dataset), the returned losses averaged over them."""
        strategy = distribute.current()
        if strategy.num_replicas_in_sync == 1:
            return tf.function(update)

        def replicated(*args):
            out = strategy.run(update, args=args)
            return tf.nest.map_structure(
                lambda v: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None), out)

        return tf.function(replicated)

    def train_step(self, step: int, batches) -> tuple[dict, tuple]:
        """One step (number ``step``) on batches drawn from the iterator ``batches``;
        returns its losses and what :meth:`write_images` needs."""
        raise NotImplementedError

    def write_images(self, writer, step: int, *inputs) -> None:
        """TensorBoard images at a checkpoint."""
        raise NotImplementedError

    def fit(self, data: tf.data.Dataset, *, writer=None, progress: bool = True) -> None:
        """Trains up to ``steps_total`` steps on the endless dataset ``data``, resuming from
        the checkpoint; losses every 25 steps, checkpoint and images every
        ``checkpoint_every`` and at the end."""
        start = int(self.step.numpy())
        if start >= self.steps_total:
            return
        batches = iter(distribute.distributed(data))
        bar = tqdm(total=self.steps_total, initial=start, desc=self.desc, unit="step",
                   disable=not progress)
        for step in range(start, self.steps_total):
            stats, inputs = self.train_step(step, batches)
            self.step.assign(step + 1)
            bar.update(1)
            last = step + 1 == self.steps_total
            if writer is not None and (step % 25 == 0 or last):
                with writer.as_default(step=step + 1):
                    for name, value in stats.items():
                        tf.summary.scalar(name, value)
            if (step + 1) % self.checkpoint_every == 0 or last:
                if self.manager is not None:
                    self.manager.save(checkpoint_number=step + 1)
                if writer is not None:
                    self.write_images(writer, step + 1, *inputs)
                if self.postfix:
                    bar.set_postfix({self.postfix: f"{float(stats[self.postfix]):.3f}"})
        bar.close()


class ConditionalWGAN(AdversarialPair):
    """A class-conditional WGAN-GP over feature maps, trained step by step, checkpointed.

    Args:
      feature_shape: ``(frames, bins, channels)``.
      num_classes: emotions.
      config: sizes and optimisation.
      workdir: where checkpoints (``ckpt/``) go (None: no checkpoints).
      seed: weight initialisation seed.
      resume_from: the folder whose ``ckpt/`` to resume from (default ``workdir``).
    """

    def __init__(self, feature_shape: Sequence[int], num_classes: int, config: GANConfig,
                 workdir: str | None = None, seed: int = 0, resume_from: str | None = None):
        frames, bins, channels = feature_shape
        keras.utils.set_random_seed(seed)
        self.config, self.num_classes = config, num_classes
        self.generator = build_generator(frames, bins, channels, num_classes,
                                         config.latent_dim, config.width)
        self.critic = build_critic(frames, bins, channels, num_classes, config.width)
        self.g_opt = keras.optimizers.Adam(config.learning_rate, beta_1=0.5, beta_2=0.9)
        self.d_opt = keras.optimizers.Adam(config.learning_rate, beta_1=0.5, beta_2=0.9)
        self.g_opt.build(self.generator.trainable_variables)
        self.d_opt.build(self.critic.trainable_variables)
        self.steps_total, self.checkpoint_every = config.steps, config.checkpoint_every
        self._checkpoint(workdir, resume_from, generator=self.generator, critic=self.critic,
                         g_opt=self.g_opt, d_opt=self.d_opt)
        self._critic_step = self._compile(self._critic_update)
        self._generator_step = self._compile(self._generator_update)

    def sample(self, labels, training: bool = False) -> tf.Tensor:
        """Generated maps for ``labels`` (class indices)."""
        labels = tf.cast(labels, tf.int32)
        noise = tf.random.normal([tf.shape(labels)[0], self.config.latent_dim])
        return self.generator([noise, labels], training=training)

    def _critic_update(self, real: tf.Tensor, labels: tf.Tensor) -> dict:
        labels = tf.cast(labels, tf.int32)
        fake = self.sample(labels, training=True)
        alpha = tf.random.uniform([tf.shape(real)[0], 1, 1, 1])
        mixed = alpha * real + (1.0 - alpha) * fake
        with tf.GradientTape() as tape:
            with tf.GradientTape() as inner:
                inner.watch(mixed)
                mixed_score = self.critic([mixed, labels], training=True)
            grad = inner.gradient(mixed_score, mixed)
            norm = tf.sqrt(tf.reduce_sum(tf.square(grad), axis=[1, 2, 3]) + 1e-12)
            penalty = tf.reduce_mean(tf.square(norm - 1.0))
            distance = (tf.reduce_mean(self.critic([real, labels], training=True))
                        - tf.reduce_mean(self.critic([fake, labels], training=True)))
            loss = -distance + self.config.gp_weight * penalty
        distribute.minimize(self.d_opt, tape, loss, self.critic.trainable_variables)
        return {"critic_loss": loss, "wasserstein": distance, "gradient_penalty": penalty}

    def _generator_update(self, labels: tf.Tensor) -> tf.Tensor:
        labels = tf.cast(labels, tf.int32)
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(self.critic([self.sample(labels, training=True), labels],
                                               training=True))
        distribute.minimize(self.g_opt, tape, loss, self.generator.trainable_variables)
        return loss

    desc, postfix = "GAN", "wasserstein"

    def train_step(self, step: int, batches) -> tuple[dict, tuple]:
        """``critic_steps`` critic updates on real batches, then one generator update."""
        for _ in range(self.config.critic_steps):
            real, labels = next(batches)
            stats = self._critic_step(real, labels)
        stats["generator_loss"] = self._generator_step(labels)
        return stats, ()

    def fit(self, data: tf.data.Dataset, *, writer=None, classes: Sequence[str] = (),
            progress: bool = True) -> None:
        """Trains up to ``config.steps`` generator steps (resuming from the checkpoint).

        Args:
          data: an endless dataset of ``(feature maps, labels)`` batches.
          writer: TensorBoard writer for losses and generated spectrograms, or None.
          classes: class names (for the image titles).
          progress: show a progress bar.
        """
        self._classes = tuple(classes)
        super().fit(data, writer=writer, progress=progress)

    def write_images(self, writer, step: int, per_class: int = 2) -> None:
        """Generated spectrograms, ``per_class`` for every emotion, to TensorBoard."""
        classes = getattr(self, "_classes", ())
        labels = np.repeat(np.arange(self.num_classes), per_class)
        maps = self.sample(labels).numpy()[..., 0]
        titles = [classes[k] if classes else str(k) for k in labels]
        with writer.as_default(step=step):
            tf.summary.image("generated_per_emotion",
                             png_to_tensor(spectrograms_png(maps, titles)))


# -- generator quality ---------------------------------------------------------------------


def map_statistics(maps: np.ndarray) -> np.ndarray:
    """Per map, the mean and standard deviation over time of every bin and channel."""
    maps = np.asarray(maps, np.float64)
    return np.concatenate([maps.mean(1).reshape(len(maps), -1),
                           maps.std(1).reshape(len(maps), -1)], axis=1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b``:
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def _probe(stats: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
           steps: int = 300, learning_rate: float = 1e-2, l2: float = 1e-3):
    """A softmax regression on standardised statistics (the real-data probe): full-batch
    Adam in NumPy, so it runs the same inside any distribution strategy's scope."""
    mean, std = stats.mean(0), stats.std(0) + 1e-6
    x = (stats - mean) / std
    onehot = np.eye(num_classes)[labels]
    rng = np.random.default_rng(seed)
    limit = np.sqrt(6.0 / (x.shape[1] + num_classes))
    params = [rng.uniform(-limit, limit, (x.shape[1], num_classes)), np.zeros(num_classes)]
    moments = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    for t in range(1, steps + 1):
        logits = x @ params[0] + params[1]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g_logits = (p - onehot) / len(x)
        grads = [x.T @ g_logits + 2.0 * l2 * params[0], g_logits.sum(0)]
        for param, grad, m in zip(params, grads, moments):
            m[0] = 0.9 * m[0] + 0.1 * grad
            m[1] = 0.999 * m[1] + 0.001 * grad ** 2
            step = m[0] / (1 - 0.9 ** t) / (np.sqrt(m[1] / (1 - 0.999 ** t)) + 1e-7)
            param -= learning_rate * step
    w, b = params
    return lambda s: np.argmax(((s - mean) / std) @ w + b, -1)


def gan_quality(generate, real_train: np.ndarray, y_train: np.ndarray, real_held: np.ndarray,
                y_held: np.ndarray, classes: Sequence[str], per_class: int = 100,
                seed: int = 0) -> dict:
    """How real the generator's maps look to a real-data probe, and how far they lie.

    Args:
      generate: ``labels -> maps`` (the generator).
      real_train: real training maps (the probe's training data) and ``y_train``.
      real_held: real maps of speakers the GAN never saw (validation speakers) and
        ``y_held``; without them, pass the training maps.
      classes: class names.
      per_class: generated maps per emotion.
      seed: probe initialisation.

    Returns:
      ``{"probe_accuracy_real": a, "probe_accuracy_generated": a, "probe_accuracy_per_emotion":
      {emotion: a}, "fd_generated_vs_real": d, "fd_real_train_vs_real_held": d, ...}``.
    """
    n = len(classes)
    train_stats = map_statistics(real_train)
    classify = _probe(train_stats, y_train, n, seed)
    labels = np.repeat(np.arange(n), per_class)
    generated = np.concatenate([np.asarray(generate(labels[k:k + 64]))
                                for k in range(0, len(labels), 64)])
    gen_stats = map_statistics(generated)
    held_stats = map_statistics(real_held)
    gen_pred = classify(gen_stats)
    present = sorted(set(np.asarray(y_held).tolist()))
    return {
        "probe": "softmax regression on per-bin mean and std over time, real training maps",
        "probe_accuracy_real": float(np.mean(classify(held_stats) == y_held)),
        "probe_accuracy_generated": float(np.mean(gen_pred == labels)),
        "probe_accuracy_per_emotion": {classes[k]: float(np.mean(gen_pred[labels == k] == k))
                                       for k in range(n)},
        "fd_generated_vs_real": frechet_distance(gen_stats, held_stats),
        "fd_real_train_vs_real_held": frechet_distance(train_stats, held_stats),
        "n_generated": int(len(labels)), "n_real_held": int(len(real_held)),
        "held_classes": [classes[k] for k in present],
    }


# -- GAN-augmented classifier training --------------------------------------------------------


class GANAugmentedSteps(TrainingSteps):
    """Training steps on real crops plus generated feature maps (and optionally adversarial
    crops). Reports ``loss``, ``accuracy`` (clean real crops; absent when every real crop
    is adversarial), ``gen_accuracy`` and, with adversarial examples, ``adv_accuracy``."""

    def __init__(self, model, generator: ConditionalWGAN, config: GANConfig, **kwargs):
        super().__init__(model, name="gan_augmented_steps", **kwargs)
        self.gan = generator
        self.config = config
        self.adversarial = config.adversarial
        self.budget: Budget | None = None
        if config.adversarial is not None:
            self.set_budget(config.adversarial.budget_at(0))
        self.gen_accuracy = keras.metrics.SparseCategoricalAccuracy(name="gen_accuracy")
        self.adv_accuracy = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")

    @property
    def metrics(self):
        if self.adversarial is None:
            return [*super().metrics, self.gen_accuracy]
        clean = [] if self.adversarial.ratio >= 1.0 else [self.clean_accuracy]
        return [self.loss_tracker, *clean, self.gen_accuracy, self.adv_accuracy]

    def set_budget(self, budget: Budget) -> None:
        """Changes the adversarial budget (the step function is traced again for it)."""
        if budget != self.budget:
            self.budget = budget
            self._craft = compiled_crafter(self.ser, self.adversarial, budget)
            self.retrace()

    def train_step(self, data):
        x, y, w = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.cast(y, tf.int32)
        w = tf.ones(tf.shape(y), tf.float32) if w is None else tf.cast(w, tf.float32)
        batch = tf.shape(y)[0]
        n_gen = tf.cast(tf.round(self.config.ratio * tf.cast(batch, tf.float32)), tf.int32)
        y_gen = tf.random.uniform([n_gen], 0, self.gan.num_classes, dtype=tf.int32)
        generated = tf.stop_gradient(self.gan.sample(y_gen))
        real = self.ser.features(x)
        n_adv = tf.constant(0)
        if self.adversarial is not None:
            n_adv = tf.cast(tf.round(self.adversarial.ratio * tf.cast(batch, tf.float32)),
                            tf.int32)
            if self.adversarial.domain == "waveform":
                adv = self.ser.features(self._craft(x[:n_adv], y[:n_adv]))
            else:
                adv = self._craft(real[:n_adv], y[:n_adv])
            real = tf.concat([adv, real[n_adv:]], 0)
        inputs = tf.concat([real, generated], 0)
        labels = tf.concat([y, y_gen], 0)
        weights = tf.concat([w, tf.ones([n_gen])], 0)
        with tf.GradientTape() as tape:
            logits = self.ser.classify(inputs, training=True)
            xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            loss = tf.reduce_sum(weights * xent) / tf.cast(batch + n_gen, tf.float32)
        distribute.minimize(self.optimizer, tape, loss, self.ser.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.adv_accuracy.update_state(y[:n_adv], logits[:n_adv])
        self.clean_accuracy.update_state(y[n_adv:], logits[n_adv:batch])
        self.gen_accuracy.update_state(y_gen, logits[batch:])
        return {m.name: m.result() for m in self.metrics}


class GANTrainer(RobustSelection, FoldTrainer):
    """A fold trained with GAN-generated feature maps mixed in (see the module docstring).

    With adversarial examples (``GANConfig.adversarial``) the model is selected as in
    adversarial training, on clean and PGD validation UAR (:class:`RobustSelection`);
    without, on clean validation UAR.
    """

    def __init__(self, *args, gan: GANConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.gan_cfg = gan
        self.quality: dict = {}

    method_name = "GAN-augmented training"
    supports_mixup = False
    supports_speaker_norm = False

    def feature_shape(self) -> tuple[int, int, int]:
        shape = self.model.frontend.compute_output_shape((None, self.segment))
        return tuple(int(d) for d in shape[1:])

    def _real_maps(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        clips = central_clips(self.corpus, indices, segment_samples=self.segment,
                              pad_mode=self.cfg.pad_mode)
        featurize = tf.function(self.model.features)
        maps = np.concatenate([featurize(tf.constant(clips[k:k + 64])).numpy()
                               for k in range(0, len(clips), 64)])
        return maps, self.labels[np.asarray(indices)]

    def prepare(self) -> None:
        """Trains (or resumes, or loads) the GAN on the training speakers' features."""
        distribute.check_batch(self.gan_cfg.batch_size, "--gan_batch_size")
        root = os.path.join(self.workdir, "gan")
        self.gan = ConditionalWGAN(self.feature_shape(), len(self.classes), self.gan_cfg,
                                   workdir=root, seed=self.cfg.seed,
                                   resume_from=os.path.join(self.chief_workdir, "gan"))
        featurize = self.model.features
        real = training_dataset(self.corpus, self.fold.train, self.labels,
                                segment_samples=self.segment,
                                batch_size=self.gan_cfg.batch_size, seed=self.cfg.seed,
                                augment=self.cfg.augment, pad_mode=self.cfg.pad_mode,
                                drop_remainder=True)
        real = real.repeat().map(lambda x, y: (featurize(x), y),
                                 num_parallel_calls=tf.data.AUTOTUNE)
        writer = tf.summary.create_file_writer(os.path.join(self.workdir, "tb", "gan"))
        self.gan.fit(real, writer=writer, classes=self.classes, progress=self.verbose == 1)
        writer.flush()
        quality_path = os.path.join(root, "quality.json")
        if not os.path.exists(quality_path):
            train_maps, y_train = self._real_maps(self.fold.train)
            held = self.fold.val or self.fold.train
            held_maps, y_held = self._real_maps(held)
            quality = gan_quality(lambda labels: self.gan.sample(labels), train_maps, y_train,
                                  held_maps, y_held, self.classes, seed=self.cfg.seed)
            quality["held_out"] = "validation speakers" if self.fold.val else "training speakers"
            write_json(quality_path, quality)
            log.info("%s GAN: probe accuracy %.3f on generated maps (%.3f on real held-out), "
                     "FD %.1f (real train vs held-out %.1f)", self.fold.name,
                     quality["probe_accuracy_generated"], quality["probe_accuracy_real"],
                     quality["fd_generated_vs_real"], quality["fd_real_train_vs_real_held"])
        with open(quality_path) as f:
            self.quality = json.load(f)

    def robust_config(self) -> AdversarialConfig | None:
        return self.gan_cfg.adversarial

    def make_steps(self) -> TrainingSteps:
        return GANAugmentedSteps(self.model, self.gan, self.gan_cfg)

    def callbacks(self) -> list[keras.callbacks.Callback]:
        if self.gan_cfg.adversarial is None:
            return []
        return [BudgetSchedule(self.steps, self.gan_cfg.adversarial)]

    def describe(self) -> dict:
        cfg = dataclasses.asdict(self.gan_cfg)
        if self.gan_cfg.adversarial is not None:
            cfg["adversarial"]["budget"] = self.gan_cfg.adversarial.budget.to_dict()
        return {"gan": {"config": cfg, "quality": self.quality}}

    def hparams(self) -> dict:
        gan = {f"gan_{k}": v for k, v in dataclasses.asdict(self.gan_cfg).items()
               if k != "adversarial"}
        gan["gan_adversarial"] = (self.gan_cfg.adversarial.method
                                  if self.gan_cfg.adversarial else "none")
        return {**super().hparams(), **gan}
