"""Defended training: adversarial training, GAN-augmented training and a GAN purifier.

Each method is a fold trainer with the standard trainer's outputs and resume behaviour
(:mod:`ser_tf.training.standard`), composed with the project's attacks
(:mod:`ser_tf.attacks`). :func:`fold_trainer` maps an experiment's ``trainer`` name and
``method`` configuration to the function :func:`ser_tf.training.experiment.run_experiment`
calls for each fold.
"""

from __future__ import annotations

import functools

from ser_tf.defenses.adversarial import AdversarialConfig, train_adversarial_fold
from ser_tf.defenses.gan import GANConfig, train_gan_fold
from ser_tf.defenses.purifier import PurifierConfig, train_purifier_fold
from ser_tf.training.experiment import ExperimentConfig, Trainer
from ser_tf.training.standard import train_fold

TRAINERS = ("standard", "adversarial", "gan", "purifier")


def fold_trainer(cfg: ExperimentConfig) -> Trainer:
    """The fold trainer of ``cfg.trainer``, configured with ``cfg.method``.

    Raises:
      ValueError: an unknown trainer, or a method configuration of the wrong type.
    """
    if cfg.trainer == "standard":
        return train_fold
    if cfg.trainer == "adversarial":
        method = cfg.method if cfg.method is not None else AdversarialConfig()
        if not isinstance(method, AdversarialConfig):
            raise ValueError(f"--trainer=adversarial needs an AdversarialConfig, got "
                             f"{type(method).__name__}")
        return functools.partial(train_adversarial_fold, adversarial=method)
    if cfg.trainer == "gan":
        method = cfg.method if cfg.method is not None else GANConfig()
        if not isinstance(method, GANConfig):
            raise ValueError(f"--trainer=gan needs a GANConfig, got {type(method).__name__}")
        return functools.partial(train_gan_fold, gan=method)
    if cfg.trainer == "purifier":
        method = cfg.method if cfg.method is not None else PurifierConfig()
        if not isinstance(method, PurifierConfig):
            raise ValueError(f"--trainer=purifier needs a PurifierConfig, got "
                             f"{type(method).__name__}")
        return functools.partial(train_purifier_fold, purifier=method)
    raise ValueError(f"unknown trainer {cfg.trainer!r}; available: {list(TRAINERS)}")


__all__ = ["AdversarialConfig", "GANConfig", "PurifierConfig", "TRAINERS", "fold_trainer",
           "train_adversarial_fold", "train_gan_fold", "train_purifier_fold"]
