"""Knowledge distillation: a model trained on a stronger teacher's soft labels as well.

``ser-train --trainer=distill --distill_teacher=RUN`` trains the model its flags build (a
CNN-LSTM, say) with the standard trainer's loop, selection, outputs and resume, on a
loss that adds to the (class-weighted) cross-entropy on the true labels the
Kullback-Leibler divergence from a teacher's predictions at temperature ``T``
(Hinton, Vinyals and Dean's recipe):

``loss = (1 - a) * xent(y, z) + a * T^2 * KL(softmax(t / T) || softmax(z / T))``

with ``z`` the student's logits on a training crop and ``t`` the teacher's logits for the
whole utterance the crop was cut from. The teacher is a trained ``ser-train`` run of the
same protocol (e.g. the functionals model of ``configs/emodb_functionals.flags``, which
classifies unseen speakers better than a CNN-LSTM trained alone); each fold takes the
teacher of the same fold, refused unless it was tested on the same speakers, so nothing
of the test speaker reaches the student through the teacher. The teacher reads each
training utterance as its own run evaluated them (whole, or its windows' averaged
logits), once per fold before training; the student's validation and test use the true
labels only.

The student stays an ordinary model of its architecture: it saves, attacks and exports
like any other, with no trace of the teacher.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from ser_tf.data.pipeline import evaluation_dataset, hop_in_samples
from ser_tf.evaluation.predict import predict_utterances
from ser_tf.training import distribute
from ser_tf.training.standard import FoldTrainer, TrainingSteps, load_fold_model
from ser_tf.workdir import run_flags

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """The teacher and the loss (filled from flags by the app).

    Attributes:
      teacher_dir: workdir of the teacher's ``ser-train`` run (same protocol and classes).
      weight: ``a``, the share of the loss that is the teacher's (0 to 1).
      temperature: ``T``; above 1 softens both distributions, so the teacher's ranking of
        the wrong classes counts too.
    """

    teacher_dir: str = ""
    weight: float = 0.5
    temperature: float = 2.0

    def __post_init__(self):
        if not self.teacher_dir:
            raise ValueError("distillation needs a teacher: --distill_teacher=WORKDIR of a "
                             "trained ser-train run")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {self.temperature}")


def distillation_loss(labels: tf.Tensor, teacher_logits: tf.Tensor, logits: tf.Tensor,
                      weight: float, temperature: float) -> tf.Tensor:
    """Per-example ``(1 - a) * xent(y, z) + a * T^2 * KL(p_T(t) || p_T(z))``.

    ``T^2`` keeps the soft term's gradient on the scale of the hard one's as ``T`` grows.

    Args:
      labels: ``[B]`` class indices.
      teacher_logits: ``[B, C]``.
      logits: ``[B, C]``, the student's.
      weight: ``a``.
      temperature: ``T``.

    Returns:
      ``[B]`` losses.
    """
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    t = float(temperature)
    log_teacher = tf.nn.log_softmax(teacher_logits / t)
    kl = tf.reduce_sum(tf.exp(log_teacher) * (log_teacher - tf.nn.log_softmax(logits / t)),
                       axis=-1)
    return (1.0 - weight) * xent + weight * (t * t) * kl


class DistillationSteps(TrainingSteps):
    """Training steps on :func:`distillation_loss`; batches are
    ``(x, (labels, teacher_logits), sample_weight)``."""

    def __init__(self, model, weight: float, temperature: float, **kwargs):
        super().__init__(model, **kwargs)
        self.weight, self.temperature = float(weight), float(temperature)

    def train_step(self, data):
        x, (y, teacher), w = data
        y = tf.cast(y, tf.int32)
        with tf.GradientTape() as tape:
            logits = self.ser(x, training=True)
            per_example = distillation_loss(y, teacher, logits, self.weight,
                                            self.temperature)
            loss = tf.reduce_sum(w * per_example) / tf.cast(tf.shape(y)[0], tf.float32)
        distribute.minimize(self.optimizer, tape, loss, self.ser.trainable_variables)
        self.loss_tracker.update_state(loss)
        self.clean_accuracy.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}


class DistillTrainer(FoldTrainer):
    """A fold trained on true labels and a teacher's predictions (see the module
    docstring)."""

    method_name = "distillation"
    supports_mixup = False

    def __init__(self, *args, distill: DistillConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.distill_cfg = distill
        self.teacher = None
        self.teacher_flags: dict[str, str] = {}

    def prepare(self) -> None:
        """Loads and checks the teacher, and how its run read utterances (its
        ``flags.txt``), before any step; its predictions are made only if training runs
        (:meth:`train_dataset`)."""
        cfg = self.distill_cfg
        flags = run_flags(cfg.teacher_dir)
        if flags.get("speaker_norm") == "true":
            # Its inputs would need every speaker's statistics, and it is not strict.
            raise ValueError(f"{cfg.teacher_dir} was trained with --speaker_norm; a teacher "
                             "must read bare waveforms")
        teacher = load_fold_model(cfg.teacher_dir, self.fold.name, self.fold.test_speakers)
        if list(teacher.labels) != list(self.classes):
            raise ValueError(f"{cfg.teacher_dir}: the teacher's classes {list(teacher.labels)} "
                             f"are not this run's {self.classes}")
        if teacher.sample_rate != self.rate:
            raise ValueError(f"{cfg.teacher_dir}: the teacher runs at {teacher.sample_rate} Hz, "
                             f"this run at {self.rate} Hz")
        self.teacher, self.teacher_flags = teacher, flags

    @property
    def teacher_whole(self) -> bool:
        """Whether the teacher reads each utterance whole (its run's ``--eval_whole``)."""
        return self.teacher_flags.get("eval_whole") == "true"

    def teacher_logits(self) -> np.ndarray:
        """``[utterances, C]``: the teacher's logits for every training utterance (zero
        elsewhere), read as the teacher's run read its test utterances: whole, or its
        windows at its hop."""
        teacher, flags = self.teacher, self.teacher_flags
        ds, n_win = evaluation_dataset(
            self.corpus, self.fold.train, segment_samples=teacher.segment_samples,
            hop_samples=hop_in_samples(float(flags.get("eval_hop_s", "1.0")), self.rate),
            batch_size=64, pad_mode=flags.get("pad_mode", "loop"), whole=self.teacher_whole)
        forward = tf.function(lambda x: teacher(x, training=False), reduce_retracing=True)
        logits = predict_utterances(forward, ds, len(self.fold.train), n_win,
                                    progress=self.verbose == 1, desc="teacher")
        truth = self.labels[self.fold.train]
        log.info("%s: teacher %s agrees with %.3f of the %d training labels", self.fold.name,
                 self.distill_cfg.teacher_dir, float(np.mean(logits.argmax(-1) == truth)),
                 len(truth))
        table = np.zeros((len(self.corpus.utterances), logits.shape[-1]), np.float32)
        table[np.asarray(self.fold.train)] = logits
        return table

    def make_steps(self) -> TrainingSteps:
        return DistillationSteps(self.model, self.distill_cfg.weight,
                                 self.distill_cfg.temperature)

    def train_dataset(self) -> tf.data.Dataset:
        # The crops carry their utterance's index as the "label"; the true label, the
        # teacher's logits and the class weight are looked up by it.
        ds = self.training_crops(np.arange(len(self.corpus.utterances)))
        labels = tf.constant(self.labels.astype(np.int32))
        teacher = tf.constant(self.teacher_logits())
        weights = tf.constant(self.loss_weights())

        def attach(x, index):
            y = tf.gather(labels, index)
            return x, (y, tf.gather(teacher, index)), tf.gather(weights, y)

        return ds.map(attach)

    def describe(self) -> dict:
        cfg = self.distill_cfg
        return {"distillation": {"teacher": cfg.teacher_dir, "weight": cfg.weight,
                                 "temperature": cfg.temperature,
                                 "teacher_whole": self.teacher_whole}}

    def hparams(self) -> dict:
        return {**super().hparams(), "distill_weight": self.distill_cfg.weight,
                "distill_temperature": self.distill_cfg.temperature}
