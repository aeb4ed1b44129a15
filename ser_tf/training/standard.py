"""The standard trainer: one fold, resumable, monitored, evaluated at utterance level.

:func:`train_fold` trains a :class:`~ser_tf.models.SERModel` on one speaker-independent
fold and writes its workdir:

* ``checkpoints/``: model, optimizer and epoch after every epoch (``tf.train.Checkpoint``,
  written atomically), plus ``state.json`` with the early-stopping state and history, so a
  run killed at any point (even ``kill -9`` mid-epoch) resumes from the last finished epoch
  with nothing lost; ``best.weights.h5`` holds the best validation epoch.
* ``tb/``: TensorBoard logs: training loss/accuracy, validation UAR/accuracy per epoch,
  learning rate, confusion matrices, hparams, example spectrograms and audio.
* ``model.keras`` (the selected model), ``metrics.json`` (test metrics, schema in
  DESIGN.md) and ``confusion_matrix.png``. A fold whose ``metrics.json`` exists is done
  and is not trained again.

Model selection uses only the validation speakers (utterance-level UAR over all windows);
normalisation statistics come from the training speakers only. Without validation
speakers the last epoch is the model.

With ``refit`` the validation speakers choose only the number of epochs: a fresh model is
then trained on training and validation speakers together for that many epochs (its own
resumable run in ``refit/``), and that model is the fold's result. On a corpus with ten
speakers, handing the two validation speakers back to training is worth several points of
UAR; the test speakers stay untouched throughout.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import time
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from ser_tf.data.pipeline import (AugmentConfig, DecodedCorpus, evaluation_dataset,
                                  hop_in_samples, speaker_feature_stats, training_dataset)
from ser_tf.evaluation.metrics import evaluate_predictions
from ser_tf.evaluation.predict import predict_utterances
from ser_tf.evaluation.report import confusion_matrix_png, png_to_tensor, spectrograms_png
from ser_tf.models import ModelConfig, SERModel, build_model
from ser_tf.training import distribute
from ser_tf.training.protocols import Fold
from ser_tf.workdir import write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (filled from flags by the app).

    Attributes:
      epochs: maximum number of epochs.
      batch_size: batch size.
      learning_rate: peak learning rate (AdamW), reached after warm-up, then cosine decay.
      weight_decay: AdamW decoupled weight decay.
      warmup_epochs: linear warm-up length in epochs.
      ema: momentum of an exponential moving average of the trainable weights, updated
        every step (0: none). With it, validation, model selection and the saved model
        use the averaged weights, while training goes on from the raw ones; averaging
        damps the epoch-to-epoch swings that small corpora and adversarial training give
        (e.g. 0.99: about the last 100 steps).
      patience: stop after this many epochs without a better validation UAR (0: never).
      class_weighting: weight the loss by inverse class frequency (balanced).
      seed: seed for weights, shuffling, crops and augmentation.
      eval_hop_s: hop between evaluation windows in seconds.
      pad_mode: ``loop`` or ``zero`` for clips shorter than a window.
      eval_whole: evaluate each utterance whole, as one input of its own length, instead
        of averaging the logits of fixed windows (for length-free classifiers such as the
        functionals model; see :func:`ser_tf.data.pipeline.evaluation_dataset`). The
        normaliser's statistics come from whole training utterances too.
      augment: waveform augmentation for training crops.
      deterministic: enable TF op determinism (same seed, same numbers).
      speaker_norm: per-speaker feature normalisation: every speaker, test speakers
        included, standardised with statistics of its own unlabelled audio. Not strictly
        speaker-independent; results are labelled as such.
      refit: after early stopping, retrain on training + validation speakers for the
        selected number of epochs and report that model.
      strategy: the tf.distribute strategy (``default``, ``mirrored``, ``multiworker``;
        see :mod:`ser_tf.training.distribute`); ``batch_size`` is then the global batch.
      mixup: ``alpha`` of mixup (Zhang et al. 2018) for standard training: every
        training waveform is mixed with another of its batch, ``lam * x_i + (1 - lam) *
        x_j`` with ``lam ~ Beta(alpha, alpha)`` (the larger share kept by ``x_i``), and
        the loss mixes the two examples' (class-weighted) cross-entropies with the same
        weights. 0: off.
    """

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    ema: float = 0.0
    patience: int = 10
    class_weighting: bool = True
    seed: int = 0
    eval_hop_s: float = 1.0
    pad_mode: str = "loop"
    eval_whole: bool = False
    augment: AugmentConfig = AugmentConfig()
    deterministic: bool = True
    speaker_norm: bool = False
    refit: bool = False
    strategy: str = "default"
    mixup: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if self.mixup < 0.0:
            raise ValueError(f"mixup alpha must be >= 0, got {self.mixup}")


def write_predictions(path: str, utterances: Sequence, y_true: np.ndarray, logits: np.ndarray,
                      classes: Sequence[str]) -> None:
    """Per-utterance predictions and logits as CSV (pooled over folds by the experiment)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "speaker", "gender", "language", "true", "predicted"]
                        + [f"logit_{c}" for c in classes])
        for u, t, lg in zip(utterances, y_true, logits):
            writer.writerow([u.path, u.speaker, u.gender, u.language, classes[t],
                             classes[int(np.argmax(lg))]] + [f"{v:.5f}" for v in lg])


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Balanced per-class weights ``n / (k * n_c)`` (scikit-learn's "balanced"); 0 for a
    class absent from ``labels``."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


class TrainingSteps(keras.Model):
    """The training steps of a fold, around a :class:`~ser_tf.models.SERModel`.

    :func:`run_epochs` runs :meth:`train_step` on every batch, on every replica of the
    distribution strategy. The wrapper holds no weights of its own (it trains the wrapped
    model's with that model's optimizer) and is never saved. Here the step is plain
    (class-weighted) cross-entropy, on mixup's blends with ``mixup > 0`` (see
    :class:`TrainConfig`); the defenses' steps subclass it. Reported per epoch: ``loss``
    and ``accuracy`` (against each blend's larger share) on the training batches,
    aggregated over replicas.
    """

    def __init__(self, model, mixup: float = 0.0, name: str = "training_steps", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ser = model
        self.mixup = float(mixup)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._step_fn = None

    @property
    def metrics(self):
        return [self.loss_tracker, self.clean_accuracy]

    def call(self, inputs, training=False):
        return self.ser(inputs, training=training)

    def train_step(self, data):
        x, y, w = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.cast(y, tf.int32)
        w = tf.ones(tf.shape(y), tf.float32) if w is None else tf.cast(w, tf.float32)
        if self.mixup > 0:
            x, lam, partner = self._blend(x)
        with tf.GradientTape() as tape:
            logits = self.ser(x, training=True)
            xent = w * tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            if self.mixup > 0:
                other = tf.gather(w, partner) * tf.nn.sparse_softmax_cross_entropy_with_logits(
                    tf.gather(y, partner), logits)
                xent = lam * xent + (1.0 - lam) * other
            loss = tf.reduce_sum(xent) / tf.cast(tf.shape(y)[0], tf.float32)
        distribute.minimize(self.optimizer, tape, loss, self.ser.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.clean_accuracy.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}

    def _blend(self, x):
        """Mixup's blends of the waveform batch ``x``: ``(blends, lam [B], partner [B])``,
        each example mixed with the batch's ``partner`` one (a random permutation), its own
        share ``lam >= 0.5`` drawn from ``Beta(alpha, alpha)`` folded at 0.5."""
        batch = tf.shape(x)[0]
        g1 = tf.random.gamma([batch], self.mixup)
        g2 = tf.random.gamma([batch], self.mixup)
        lam = g1 / tf.maximum(g1 + g2, 1e-12)
        lam = tf.maximum(lam, 1.0 - lam)
        partner = tf.random.shuffle(tf.range(batch))
        return lam[:, None] * x + (1.0 - lam[:, None]) * tf.gather(x, partner), lam, partner

    def step_function(self):
        """:meth:`train_step` compiled, run on every replica (traced once, until
        :meth:`retrace`)."""
        if self._step_fn is None:
            strategy = distribute.current()
            self._step_fn = tf.function(lambda batch: strategy.run(self.train_step,
                                                                   args=(batch,)))
        return self._step_fn

    def retrace(self) -> None:
        """Forgets the compiled step (e.g. after the attack budget changed)."""
        self._step_fn = None


def run_epochs(steps: TrainingSteps, dataset: tf.data.Dataset, *, epochs: int,
               initial_epoch: int, callbacks: Sequence[keras.callbacks.Callback],
               verbose: int) -> None:
    """Trains ``steps`` for epochs ``initial_epoch .. epochs - 1`` over ``dataset``.

    The loop of ``keras.Model.fit`` (callbacks, progress bar, ``stop_training``), written
    out because Keras 3's ``fit`` fails under ``MultiWorkerMirroredStrategy`` (it reduces
    scalar step outputs along axis 0, keras-team/keras#20585): batches are distributed
    over the strategy's replicas, each runs :meth:`TrainingSteps.train_step`, and the
    epoch's logs are the metrics aggregated over every replica.
    """
    n_steps = int(dataset.cardinality())
    n_steps = n_steps if n_steps > 0 else None
    data = distribute.distributed(dataset)
    hooks = keras.callbacks.CallbackList(list(callbacks), add_progbar=verbose != 0,
                                         model=steps, verbose=verbose, epochs=epochs,
                                         steps=n_steps)
    steps.stop_training = False
    hooks.on_train_begin()
    logs: dict = {}
    for epoch in range(initial_epoch, epochs):
        steps.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for i, batch in enumerate(data):
            hooks.on_train_batch_begin(i)
            steps.step_function()(batch)
            hooks.on_train_batch_end(i, {m.name: m.result() for m in steps.metrics}
                                     if verbose == 1 else None)
        logs = {m.name: float(m.result()) for m in steps.metrics}
        hooks.on_epoch_end(epoch, logs)
        if steps.stop_training:
            break
    hooks.on_train_end(logs)


class _EpochState(keras.callbacks.Callback):
    """Validation, early stopping, TensorBoard summaries and checkpoints after each epoch."""

    def __init__(self, trainer: "FoldTrainer"):
        super().__init__()
        self.t = trainer

    def on_epoch_begin(self, epoch, logs=None):
        self.t._epoch_start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.t.end_epoch(epoch, logs or {})
        if self.t.should_stop():
            self.model.stop_training = True


class FoldTrainer:
    """State and steps of one fold's training (see :func:`train_fold`).

    Other training methods (``ser_tf.defenses``, ``ser_tf.training.convex``) subclass it
    and override its extension points: :meth:`make_steps` (the :class:`TrainingSteps`
    that :func:`run_epochs` runs), :meth:`callbacks` (extra per-epoch work), :meth:`train`
    (the epoch loop itself), :meth:`validate` (the model-selection score) and
    :meth:`hparams` (what TensorBoard's hparams dashboard shows).

    Under a distribution strategy (``cfg.strategy``) the models, optimizers and training
    steps are built in its scope. ``workdir`` is where this process writes: the fold's
    folder on the chief, a private folder inside it on other workers
    (:func:`~ser_tf.training.distribute.worker_dir`); ``chief_workdir`` is the fold's
    folder, from which every worker resumes.
    """

    #: The training method's name in messages, whether it takes per-speaker
    #: normalisation (whose inputs are dicts, not waveforms), and whether its gradient
    #: steps are the standard ones that ``--mixup`` blends (a method with steps of its own,
    #: or none, must say False, or mixup would be silently ignored).
    method_name = "standard training"
    supports_speaker_norm = True
    supports_mixup = True

    def __init__(self, corpus: DecodedCorpus, labels: np.ndarray, classes: Sequence[str],
                 fold: Fold, model_cfg: ModelConfig, cfg: TrainConfig, workdir: str,
                 verbose: int):
        self.corpus, self.labels, self.classes = corpus, labels, list(classes)
        self.fold, self.model_cfg, self.cfg = fold, model_cfg, cfg
        self.verbose = verbose
        self.strategy = distribute.get_strategy(cfg.strategy)
        self.chief_workdir = workdir
        self.workdir = distribute.worker_dir(workdir)
        self.ckpt_dir = os.path.join(self.workdir, "checkpoints")
        self.state_path = os.path.join(self.ckpt_dir, "state.json")
        self.best_path = os.path.join(self.ckpt_dir, "best.weights.h5")
        self.rate = corpus.config.sample_rate
        self.segment = int(round(model_cfg.segment_s * self.rate))
        self.hop = hop_in_samples(cfg.eval_hop_s, self.rate)
        self.state = {"epoch": 0, "best_score": -1.0, "best_epoch": -1, "wait": 0,
                      "history": [], "train_seconds": 0.0}
        self.val_writer = tf.summary.create_file_writer(
            os.path.join(self.workdir, "tb", "val"))
        self._eval_sets: dict[tuple[int, ...], tuple[tf.data.Dataset, int]] = {}
        self._epoch_start = time.time()
        self._steps: TrainingSteps | None = None

    # -- setup -------------------------------------------------------------------------------
    def build(self) -> None:
        if self.cfg.speaker_norm and not self.supports_speaker_norm:
            raise ValueError(f"{self.method_name} does not support --speaker_norm")
        if self.cfg.mixup and not self.supports_mixup:
            raise ValueError(f"--mixup is for standard training, not {self.method_name}")
        if self.cfg.mixup and self.cfg.speaker_norm:
            raise ValueError("--mixup blends bare waveforms: it does not take --speaker_norm")
        distribute.check_batch(self.cfg.batch_size)
        keras.utils.set_random_seed(self.cfg.seed)
        self._steps = None
        self.model: SERModel = build_model(self.model_cfg, self.classes, seed=self.cfg.seed)
        self.forward = tf.function(lambda x: self.model(x, training=False),
                                   reduce_retracing=True)
        steps = max(1, -(-len(self.fold.train) // self.cfg.batch_size))
        total = steps * self.cfg.epochs
        warmup = int(min(total - 1, self.cfg.warmup_epochs * steps))
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else self.cfg.learning_rate, decay_steps=max(1, total - warmup),
            alpha=0.01, warmup_target=self.cfg.learning_rate if warmup else None,
            warmup_steps=warmup)
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=self.cfg.weight_decay,
                                           use_ema=self.cfg.ema > 0,
                                           ema_momentum=self.cfg.ema or 0.99)
        self.model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        self.model.optimizer.build(self.model.trainable_variables)
        self.epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer,
                                              epoch=self.epoch_var)
        self.manager = tf.train.CheckpointManager(self.checkpoint, self.ckpt_dir, max_to_keep=2)
        os.makedirs(self.ckpt_dir, exist_ok=True)

    def compute_norm_stats(self) -> None:
        """Per-speaker statistics for ``speaker_norm`` (None: the model's learned ones)."""
        self.norm_stats = None
        if self.cfg.speaker_norm:
            self.norm_stats = speaker_feature_stats(
                self.corpus, tf.function(self.model.raw_features, reduce_retracing=True),
                segment_samples=self.segment, hop_samples=self.hop, pad_mode=self.cfg.pad_mode,
                whole=self.cfg.eval_whole)

    def restore(self) -> bool:
        """Resumes from the chief's last finished epoch if a checkpoint exists."""
        ckpt_dir = os.path.join(self.chief_workdir, "checkpoints")
        latest = tf.train.latest_checkpoint(ckpt_dir)
        state_path = os.path.join(ckpt_dir, "state.json")
        if latest is None or not os.path.exists(state_path):
            return False
        self.checkpoint.read(latest).assert_existing_objects_matched()
        with open(state_path) as f:
            state = json.load(f)
        # The state file is written after the checkpoint; trust the checkpoint's epoch.
        state["history"] = state["history"][:int(self.epoch_var.numpy())]
        state["epoch"] = int(self.epoch_var.numpy())
        # Runs started before the score had its own name kept it as "best_uar".
        state.setdefault("best_score", state.pop("best_uar", -1.0))
        self.state = state
        log.info("resuming %s at epoch %d (best validation score %.3f at epoch %d)",
                 self.workdir, state["epoch"], state["best_score"], state["best_epoch"] + 1)
        return True

    def adapt_normalizer(self) -> None:
        """Feature statistics from every window (or whole utterance) of the training
        speakers only (with one draw of the model's input noise, if it has any)."""
        ds, _ = self.evaluation_inputs(self.fold.train, speaker_stats=False)
        frontend = tf.function(self.model.raw_features, reduce_retracing=True)
        self.model.normalizer.adapt(frontend(w) for _, w in ds)

    def training_crops(self, labels: np.ndarray) -> tf.data.Dataset:
        """The fold's training batches as the epochs draw them (crops, augmentation,
        per-speaker statistics, batch and seed of this run), each crop labelled with
        ``labels[i]`` of its utterance ``i`` (``labels`` indexed like the corpus)."""
        # With several replicas every step must split evenly: no last incomplete batch.
        return training_dataset(self.corpus, self.fold.train, labels,
                                segment_samples=self.segment, batch_size=self.cfg.batch_size,
                                seed=self.cfg.seed, augment=self.cfg.augment,
                                pad_mode=self.cfg.pad_mode, norm_stats=self.norm_stats,
                                drop_remainder=distribute.replicas() > 1)

    def loss_weights(self) -> np.ndarray:
        """``[classes]`` float32: each class's weight in the training loss, balanced over
        the training split with ``class_weighting`` (:func:`class_weights`), else ones."""
        if not self.cfg.class_weighting:
            return np.ones(len(self.classes), np.float32)
        return class_weights(self.labels[self.fold.train], len(self.classes))

    def train_dataset(self) -> tf.data.Dataset:
        ds = self.training_crops(self.labels)
        if self.cfg.class_weighting:
            weights = tf.constant(self.loss_weights())
            ds = ds.map(lambda x, y: (x, y, tf.gather(weights, y)))
        return ds

    # -- evaluation ----------------------------------------------------------------------------
    def evaluation_inputs(self, indices: Sequence[int], speaker_stats: bool = True
                          ) -> tuple[tf.data.Dataset, int]:
        """The evaluation inputs of ``indices`` as this fold reads utterances (windows, or
        whole utterances with ``eval_whole``): :func:`evaluation_dataset`'s
        ``(dataset, count)``, with the fold's per-speaker statistics attached unless
        ``speaker_stats`` is False (bare waveforms)."""
        return evaluation_dataset(
            self.corpus, indices, segment_samples=self.segment, hop_samples=self.hop,
            batch_size=64, pad_mode=self.cfg.pad_mode,
            norm_stats=self.norm_stats if speaker_stats else None, whole=self.cfg.eval_whole)

    def predict(self, indices: Sequence[int], desc: str) -> np.ndarray:
        # Built once per split: validation runs every epoch and rebuilding meant recomputing
        # the window table and retracing the window function each time.
        key = tuple(indices)
        if key not in self._eval_sets:
            self._eval_sets[key] = self.evaluation_inputs(indices)
        ds, n_win = self._eval_sets[key]
        return predict_utterances(self.forward, ds, len(indices), n_win,
                                  progress=self.verbose == 1, desc=desc)

    def evaluate(self, indices: Sequence[int], desc: str) -> tuple[dict, np.ndarray]:
        logits = self.predict(indices, desc)
        metrics = evaluate_predictions(self.labels[indices], logits.argmax(-1), self.classes,
                                       [self.corpus.utterances[i] for i in indices])
        return metrics, logits

    # -- extension points ----------------------------------------------------------------
    def make_steps(self) -> TrainingSteps:
        """The training method's steps, uncompiled (here plain cross-entropy on the SER
        model). Called once per :meth:`build`, by :attr:`steps`."""
        return TrainingSteps(self.model, mixup=self.cfg.mixup)

    @property
    def steps(self) -> TrainingSteps:
        """The fold's training steps (:meth:`make_steps`), made on first use and compiled
        with the SER model's optimizer (use it in the strategy's scope)."""
        if self._steps is None:
            self._steps = self.make_steps()
            self._steps.compile(optimizer=self.model.optimizer, jit_compile=False)
        return self._steps

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """Callbacks run before the per-epoch validation and checkpoint."""
        return []

    def train(self, start: int) -> None:
        """Trains from epoch ``start`` (0-based) to ``cfg.epochs`` or early stopping; every
        epoch ends in :meth:`end_epoch` (here :func:`run_epochs` over :attr:`steps`)."""
        callbacks = [
            keras.callbacks.TensorBoard(os.path.join(self.workdir, "tb"),
                                        write_graph=False, profile_batch=0),
            *self.callbacks(),
            _EpochState(self),
        ]
        run_epochs(self.steps, self.train_dataset(), epochs=self.cfg.epochs,
                   initial_epoch=start, callbacks=callbacks, verbose=self.verbose)

    def prepare(self) -> None:
        """Work after the normaliser is adapted (or restored) and before the first step
        (here none; e.g. training a GAN on the normalised features)."""

    def finalize(self) -> None:
        """Work on the selected model before it is tested and saved (here none; e.g.
        training a purifier in front of it)."""

    def validate(self, epoch: int, logs: dict) -> tuple[float, dict, dict]:
        """Validation after an epoch.

        Returns:
          ``(score, metrics, entry)``: the model-selection score (higher is better; here
          the validation UAR, or the training accuracy without validation speakers), the
          validation metrics (empty without validation speakers) and extra figures for the
          epoch's history entry.
        """
        val, _ = self.evaluate(self.fold.val, "validating") if self.fold.val else ({}, None)
        return val.get("uar", float(logs.get("accuracy", 0.0))), val, {}

    def describe(self) -> dict:
        """What the training method adds to ``metrics.json`` (nothing here)."""
        return {}

    def hparams(self) -> dict:
        """Hyperparameters for TensorBoard's hparams dashboard."""
        return {**dataclasses.asdict(self.model_cfg), **dataclasses.asdict(self.cfg)}

    # -- per-epoch -------------------------------------------------------------------------
    @contextlib.contextmanager
    def averaged_weights(self):
        """Inside, the model holds the moving average of its trainable weights (``ema``);
        the raw weights are back on exit. Without ``ema`` nothing changes."""
        optimizer = self.model.optimizer
        # Before the first step the averages are not set (e.g. a classifier taken from
        # another run, or one fitted without gradient steps): the weights are the model's.
        if not getattr(optimizer, "use_ema", False) or int(optimizer.iterations) == 0:
            yield
            return
        # The optimizer keeps the averages in step with its variables (Keras' own
        # SwapEMAWeights callback swaps the same lists).
        pairs = list(zip(optimizer._trainable_variables,
                         optimizer._model_variables_moving_average))

        def swap():
            for var, average in pairs:
                raw = var.numpy()
                var.assign(average)
                average.assign(raw)

        swap()
        try:
            yield
        finally:
            swap()

    def end_epoch(self, epoch: int, logs: dict) -> None:
        fit_seconds = time.time() - self._epoch_start
        with self.averaged_weights():
            self._select(epoch, logs, fit_seconds)
        self.state["epoch"] = epoch + 1
        self.epoch_var.assign(epoch + 1)
        # Checkpoint first, then the state that refers to it (restore trusts the checkpoint).
        self.manager.save(checkpoint_number=epoch + 1)
        write_json(self.state_path, self.state)

    def _select(self, epoch: int, logs: dict, fit_seconds: float) -> None:
        """Validates the model as it is now, records the epoch and keeps its weights if it
        is the best so far."""
        score, val, extra = self.validate(epoch, logs)
        self.state["train_seconds"] += time.time() - self._epoch_start
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        # Every training metric of the epoch (loss, accuracy, and e.g. adv_accuracy).
        train = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0}
        # No "accuracy" when no clean example was trained on (e.g. --adv_ratio=1).
        # No "loss" when nothing was trained (a classifier taken from another run): None,
        # not NaN, which is not JSON.
        entry = {"epoch": epoch + 1,
                 "loss": float(logs["loss"]) if "loss" in logs else None,
                 "accuracy": train.get("accuracy"), **train,
                 "val_uar": val.get("uar"), "val_accuracy": val.get("accuracy"),
                 "score": score, "learning_rate": lr, "fit_seconds": round(fit_seconds, 2),
                 **extra}
        self.state["history"].append(entry)
        with self.val_writer.as_default(step=epoch + 1):
            tf.summary.scalar("epoch_score", score)
            if val:
                tf.summary.scalar("epoch_uar", val["uar"])
                tf.summary.scalar("epoch_accuracy", val["accuracy"])
                tf.summary.image("confusion_matrix", png_to_tensor(confusion_matrix_png(
                    val["confusion_matrix"], self.classes, f"validation, epoch {epoch + 1}")))
            tf.summary.scalar("learning_rate", lr)
        # Without validation speakers there is nothing to select on: the last epoch wins.
        if score > self.state["best_score"] or not self.fold.val:
            self.state.update(best_score=score, best_epoch=epoch, wait=0)
            self.model.save_weights(self.best_path)
        else:
            self.state["wait"] += 1
        if self.verbose:
            more = {**{k: v for k, v in train.items() if k not in ("loss", "accuracy")},
                    **extra}
            shown = "".join(f", {k} {v:.3f}" for k, v in more.items() if isinstance(v, float))
            log.info("%s epoch %d: loss %s, train acc %s, val UAR %s%s, score %.3f%s",
                     self.fold.name, epoch + 1,
                     "-" if entry["loss"] is None else f"{entry['loss']:.4f}",
                     "-" if entry["accuracy"] is None else f"{entry['accuracy']:.3f}",
                     "-" if entry["val_uar"] is None else f"{entry['val_uar']:.3f}", shown,
                     score, " (best)" if self.state["wait"] == 0 else "")

    def should_stop(self) -> bool:
        return (bool(self.cfg.patience) and bool(self.fold.val)
                and self.state["wait"] >= self.cfg.patience)

    # -- summaries -----------------------------------------------------------------------------
    def write_examples(self) -> None:
        """Hparams, plus a few training crops as audio and spectrograms, for TensorBoard.

        The spectrograms are what the normaliser reads: with input noise in the model, the
        features of the noisy crops (one draw), not of the clean audio."""
        writer = tf.summary.create_file_writer(os.path.join(self.workdir, "tb", "examples"))
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in self.hparams().items()}
        waves, labels = next(iter(training_dataset(
            self.corpus, self.fold.train, self.labels, segment_samples=self.segment,
            batch_size=8, seed=self.cfg.seed, pad_mode=self.cfg.pad_mode)))
        feats = self.model.raw_features(waves)[..., 0].numpy()
        titles = [self.classes[int(y)] for y in labels]
        with writer.as_default(step=0):
            hp.hparams(hparams, trial_id=os.path.basename(os.path.abspath(self.workdir)))
            tf.summary.audio("training_crops", waves[..., None], self.rate, max_outputs=4)
            tf.summary.image("log_mel", png_to_tensor(spectrograms_png(feats, titles)))
            tf.summary.text("labels", ", ".join(titles))
        writer.flush()


TrainerFactory = Callable[..., FoldTrainer]


def load_fold_model(workdir: str, fold: str, test_speakers: Sequence[str]) -> keras.Model:
    """The model of a trained run for ``fold``: ``workdir/fold/model.keras``, else
    ``workdir/model.keras``, refused unless that run tested on the same speakers (a
    model that trained on this fold's test speakers would leak them into whatever is
    built on it: a purifier's classifier, a distillation teacher)."""
    for folder in (os.path.join(workdir, fold), workdir):
        path = os.path.join(folder, "model.keras")
        if os.path.exists(path):
            break
    else:
        raise FileNotFoundError(f"no trained model for {fold} in {workdir} (looked for "
                                f"{fold}/model.keras and model.keras)")
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.exists(metrics_path):
        raise FileNotFoundError(f"{metrics_path} is missing: cannot check which speakers "
                                f"the model at {path} was tested on")
    with open(metrics_path) as f:
        tested = json.load(f).get("test_speakers")
    if sorted(tested or []) != sorted(test_speakers):
        raise ValueError(f"{path} was tested on speakers {tested}, this fold on "
                         f"{list(test_speakers)}: that model may have trained on them")
    return keras.saving.load_model(path)


def train_fold(corpus: DecodedCorpus, labels: np.ndarray, classes: Sequence[str], fold: Fold,
               model_cfg: ModelConfig, cfg: TrainConfig, workdir: str,
               verbose: int = 2, trainer_factory: TrainerFactory = FoldTrainer) -> dict:
    """Trains, selects and evaluates one fold; resumes an interrupted run.

    Args:
      corpus: the decoded corpus.
      labels: class index per utterance of ``corpus``.
      classes: class names.
      fold: the split.
      model_cfg: the model to build.
      cfg: how to train.
      workdir: where this fold's outputs go.
      verbose: 0 silent, 1 progress bars, 2 one line per epoch.
      trainer_factory: builds the fold's :class:`FoldTrainer` from the arguments above
        (a subclass for other training methods).

    Returns:
      The test metrics (also written to ``workdir/metrics.json``).
    """
    metrics_path = os.path.join(workdir, "metrics.json")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            log.info("%s is already trained; delete its metrics.json to train again", workdir)
            return json.load(f)
    os.makedirs(workdir, exist_ok=True)
    labels = np.asarray(labels, np.int32)
    trainer = _fit(trainer_factory(corpus, labels, classes, fold, model_cfg, cfg, workdir,
                                   verbose))
    best = trainer.state["history"][trainer.state["best_epoch"]] if fold.val else {}
    selection = {"best_epoch": trainer.state["best_epoch"] + 1,
                 "epochs_run": trainer.state["epoch"],
                 "best_val_uar": best.get("val_uar"),
                 "best_val_score": best.get("score"),
                 "train_seconds": round(trainer.state["train_seconds"], 1),
                 "history": trainer.state["history"]}
    if cfg.refit and fold.val:
        refit_fold = dataclasses.replace(fold, train=list(fold.train) + list(fold.val), val=[])
        refit_cfg = dataclasses.replace(cfg, epochs=selection["best_epoch"], patience=0,
                                        refit=False)
        log.info("%s: refitting on training + validation speakers (%d utterances) for %d "
                 "epochs", fold.name, len(refit_fold.train), refit_cfg.epochs)
        trainer = _fit(trainer_factory(corpus, labels, classes, refit_fold, model_cfg,
                                       refit_cfg, os.path.join(workdir, "refit"), verbose))
        selection.update(refit_epochs=refit_cfg.epochs, n_refit_train=len(refit_fold.train),
                         train_seconds=round(selection["train_seconds"]
                                             + trainer.state["train_seconds"], 1))

    with trainer.strategy.scope():
        trainer.finalize()
    # The chief writes the fold's outputs; other workers write theirs privately.
    out = distribute.worker_dir(workdir)
    test, logits = trainer.evaluate(fold.test, "testing")
    write_predictions(os.path.join(out, "predictions.csv"),
                      [corpus.utterances[i] for i in fold.test], labels[fold.test], logits,
                      classes)
    test.update(fold=fold.name, test_speakers=list(fold.test_speakers),
                val_speakers=list(fold.val_speakers), n_train=len(fold.train),
                n_val=len(fold.val), **selection, **trainer.describe())
    png = confusion_matrix_png(test["confusion_matrix"], classes, f"test, {fold.name}")
    with open(os.path.join(out, "confusion_matrix.png"), "wb") as f:
        f.write(png)
    writer = tf.summary.create_file_writer(os.path.join(out, "tb", "test"))
    with writer.as_default(step=trainer.state["epoch"]):
        tf.summary.scalar("uar", test["uar"])
        tf.summary.scalar("accuracy", test["accuracy"])
        tf.summary.image("confusion_matrix", png_to_tensor(png))
    writer.flush()
    trainer.model.save(os.path.join(out, "model.keras"))
    write_json(os.path.join(out, "metrics.json"), test)
    return test


def _fit(trainer: FoldTrainer) -> FoldTrainer:
    """Trains (or resumes) one model in the trainer's workdir; returns the trainer with the
    selected weights loaded. Models, optimizers and steps are built in the strategy's
    scope."""
    cfg = trainer.cfg
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.backend.clear_session()
    with trainer.strategy.scope():
        trainer.build()
        trainer.compute_norm_stats()
        if not trainer.restore():
            trainer.adapt_normalizer()
            trainer.write_examples()
        trainer.prepare()
        start = trainer.state["epoch"]
        if start < cfg.epochs and not trainer.should_stop():
            trainer.train(start)
        if os.path.exists(trainer.best_path):
            trainer.model.load_weights(trainer.best_path)
    return trainer
