"""Defended training: adversarial training, GAN-augmented training and a GAN purifier; and
the registry of every training method (with the convex head fit of
:mod:`ser_tf.training.convex` and the distillation of :mod:`ser_tf.training.distill`).

Each method is a fold trainer with the standard trainer's outputs and resume behaviour
(:mod:`ser_tf.training.standard`), composed with the project's attacks
(:mod:`ser_tf.attacks`). :func:`fold_trainer` maps an experiment's ``trainer`` name and
``method`` configuration to the function :func:`ser_tf.training.experiment.run_experiment`
calls for each fold.
"""

from __future__ import annotations

import functools

from ser_tf.defenses.adversarial import AdversarialConfig, AdversarialTrainer
from ser_tf.defenses.gan import GANConfig, GANTrainer
from ser_tf.defenses.purifier import PurifierConfig, PurifierTrainer
from ser_tf.training.convex import ConvexConfig, ConvexTrainer
from ser_tf.training.distill import DistillConfig, DistillTrainer
from ser_tf.training.experiment import ExperimentConfig, Trainer
from ser_tf.training.standard import train_fold

#: trainer name -> (its method configuration type, its FoldTrainer, the keyword it takes).
METHODS = {
    "adversarial": (AdversarialConfig, AdversarialTrainer, "adversarial"),
    "gan": (GANConfig, GANTrainer, "gan"),
    "purifier": (PurifierConfig, PurifierTrainer, "purifier"),
    "convex": (ConvexConfig, ConvexTrainer, "convex"),
    "distill": (DistillConfig, DistillTrainer, "distill"),
}
TRAINERS = ("standard", *METHODS)


def fold_trainer(cfg: ExperimentConfig) -> Trainer:
    """The fold trainer of ``cfg.trainer``, configured with ``cfg.method`` (its defaults when
    None): :func:`ser_tf.training.standard.train_fold` with the method's FoldTrainer.

    Raises:
      ValueError: an unknown trainer, a method configuration of the wrong type, or one the
        run's distribution strategy cannot train (adversarial weight perturbation on
        several replicas).
    """
    if cfg.trainer == "standard":
        return train_fold
    if cfg.trainer not in METHODS:
        raise ValueError(f"unknown trainer {cfg.trainer!r}; available: {list(TRAINERS)}")
    config_type, trainer_type, keyword = METHODS[cfg.trainer]
    method = cfg.method if cfg.method is not None else config_type()
    if not isinstance(method, config_type):
        raise ValueError(f"--trainer={cfg.trainer} takes a {config_type.__name__}, got "
                         f"{type(method).__name__}")
    if getattr(method, "awp_gamma", 0.0) and cfg.train.strategy != "default":
        # Before any data is read; the training steps refuse it too, at run time.
        raise ValueError("--adv_awp runs on one replica: use --strategy=default")
    return functools.partial(train_fold, trainer_factory=functools.partial(
        trainer_type, **{keyword: method}))


__all__ = ["AdversarialConfig", "ConvexConfig", "DistillConfig", "GANConfig", "METHODS",
           "PurifierConfig", "TRAINERS", "fold_trainer"]
