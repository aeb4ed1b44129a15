"""Adversarial attacks on SER models and the budgets they work under.

Every attack is a function ``attack(model_fn, x, *, budget, y=None, targeted=False, ...)
-> x_adv`` (:mod:`ser_tf.attacks.whitebox`, :mod:`ser_tf.attacks.blackbox`), bounded by a
:class:`~ser_tf.attacks.budget.Budget` that is relative to each utterance for waveforms
(dB below its peak, or an SNR) or absolute in normalised-feature units.
"""

from ser_tf.attacks.blackbox import (QueryCounter, hop_skip_jump, spsa, train_substitute,
                                     transfer_attack)
from ser_tf.attacks.budget import Budget, achieved, project
from ser_tf.attacks.whitebox import (bim, carlini_wagner_l2, expectation_over_transformation,
                                     fgm, fgsm, mim, pgd)

__all__ = ["Budget", "achieved", "project", "bim", "carlini_wagner_l2",
           "expectation_over_transformation", "fgm", "fgsm", "mim", "pgd", "QueryCounter",
           "hop_skip_jump", "spsa", "train_substitute", "transfer_attack"]
