"""Robustness evaluation: a sweep of attacks and budgets over a model's test utterances.

What is attacked, the *unit*: by default one clip per test utterance, its central
``segment_s`` seconds (shorter utterances extended as in training, see
:func:`ser_tf.data.pipeline.central_clips`), so that the perturbation is one signal a
listener could hear; the clean figures of such a report are measured on the same clips,
which is why they differ from ``metrics.json``. With a :class:`Windowing`, each test
utterance is attacked whole instead, through the model's utterance decision: the logits
averaged over all its windows, exactly as ``metrics.json`` (and a served model) evaluates
it, so that the clean figures are the training run's and the attack must move the decision
a user would see. The budget is then relative to the whole utterance's peak or energy.

Two domains: ``waveform`` attacks the whole model through its differentiable frontend;
``features`` attacks the classifier on its normalised log-mel input (as the published SER
evaluations did). Each attack in :data:`ATTACKS` has a norm, and runs over the budgets of
that norm in each domain. White-box attacks are compiled with ``tf.function``; black-box
ones only ever call the model forward, through a query counter.

:func:`evaluate` returns raw per-example outcomes (:class:`Outcome`), so that several folds
can be pooled before :func:`report` turns them into the ``robustness.json`` schema.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from ser_tf.attacks import blackbox, whitebox
from ser_tf.attacks.budget import Budget, achieved
from ser_tf.evaluation.metrics import classification_metrics, group_metrics

log = logging.getLogger(__name__)

GROUPS = ("emotion", "gender", "speaker", "language")


@dataclasses.dataclass(frozen=True)
class AttackEntry:
    """A registered attack.

    Attributes:
      fn: the attack function (``fn(model_fn, x, *, budget, y, **options)``).
      family: ``white-box`` or ``black-box``.
      norm: ``linf`` or ``l2``: which budgets it runs over.
      options: default keyword options.
      description: one line for ``--help`` and reports.
    """

    fn: Callable
    family: str
    norm: str
    options: dict
    description: str


ATTACKS: dict[str, AttackEntry] = {
    "fgsm": AttackEntry(whitebox.fgsm, "white-box", "linf", {}, "FGSM, one signed step"),
    "fgm": AttackEntry(whitebox.fgm, "white-box", "l2", {}, "FGM, one L2 step"),
    "bim": AttackEntry(whitebox.bim, "white-box", "linf", {"steps": 10}, "BIM, 10 steps"),
    "pgd": AttackEntry(whitebox.pgd, "white-box", "linf", {"steps": 10, "restarts": 1},
                       "PGD L-inf, 10 steps, random start"),
    "pgd_l2": AttackEntry(whitebox.pgd, "white-box", "l2", {"steps": 10, "restarts": 1},
                          "PGD L2, 10 steps, random start"),
    "mim": AttackEntry(whitebox.mim, "white-box", "linf", {"steps": 10},
                       "MIM, 10 steps, momentum 1.0"),
    "cw_l2": AttackEntry(whitebox.carlini_wagner_l2, "white-box", "l2",
                         {"steps": 50, "search_steps": 4}, "Carlini-Wagner L2"),
    # Score-based: logits only, a query budget of about 1 + steps * (2 * samples + 1).
    "spsa": AttackEntry(blackbox.spsa, "black-box", "linf", {"steps": 40, "samples": 16},
                        "SPSA (score-based), 40 steps x 32 queries"),
    "nes": AttackEntry(blackbox.spsa, "black-box", "linf",
                       {"steps": 40, "samples": 16, "estimator": "nes"},
                       "NES (score-based), 40 steps x 32 queries"),
    # Decision-based: labels only.
    "hsj": AttackEntry(blackbox.hop_skip_jump, "black-box", "l2", {"max_queries": 1000},
                       "HopSkipJump L2 (decision-based), 1000 queries"),
    "hsj_linf": AttackEntry(blackbox.hop_skip_jump, "black-box", "linf", {"max_queries": 1000},
                            "HopSkipJump L-inf (decision-based), 1000 queries"),
    # Transfer: a substitute trained on the target's labels, attacked white-box.
    "transfer_fgsm": AttackEntry(whitebox.fgsm, "black-box", "linf", {},
                                 "FGSM on a label-trained substitute, transferred"),
    "transfer_pgd": AttackEntry(whitebox.pgd, "black-box", "linf", {"steps": 10, "restarts": 1},
                                "PGD on a label-trained substitute, transferred"),
    "transfer_mim": AttackEntry(whitebox.mim, "black-box", "linf", {"steps": 10},
                                "MIM on a label-trained substitute, transferred"),
}

SUBSTITUTE = {"rounds": 2, "lambda_": 0.1, "epochs": 10, "batch_size": 32}
UNITS = ("clip", "utterance")
UNIT_TEXT = {"clip": "one clip per test utterance: its central segment_s seconds",
             "utterance": "each test utterance whole: its logits averaged over all windows "
                          "(eval_hop_s), as metrics.json evaluates it"}


@dataclasses.dataclass(frozen=True)
class Windowing:
    """How a model reads a whole utterance, for attacks on the utterance decision.

    Attributes:
      hop_samples: hop between the model's windows (the run's ``eval_hop_s``).
      pad_mode: how an utterance shorter than a window is extended (``loop`` or ``zero``).
      whole: the model reads the utterance whole, at its own length (runs trained with
        ``--eval_whole``); only utterances shorter than ``hop_samples`` are extended.
    """

    hop_samples: int
    pad_mode: str = "loop"
    whole: bool = False

    def __post_init__(self):
        if self.hop_samples < 1:
            raise ValueError(f"hop_samples must be positive, got {self.hop_samples}")
        if self.pad_mode not in ("loop", "zero"):
            raise ValueError(f"pad_mode must be loop or zero, got {self.pad_mode!r}")

    def logits(self, model_fn: Callable[[tf.Tensor], tf.Tensor], segment_samples: int
               ) -> Callable[[tf.Tensor], tf.Tensor]:
        """``f(waves [B, samples]) -> [B, C]``: the utterance logits of utterances of one
        length (each row's window logits averaged), differentiable end to end. A row of
        exactly ``segment_samples`` is one window, so ``f`` of a clip is the clip's logits.
        """
        from ser_tf.data.pipeline import batch_windows, extend

        if self.whole:
            return lambda waves: model_fn(extend(waves, self.hop_samples, self.pad_mode))

        def utterance(waves):
            windows = batch_windows(waves, segment_samples, self.hop_samples, self.pad_mode)
            shape = tf.shape(windows)
            logits = model_fn(tf.reshape(windows, [-1, segment_samples]))
            return tf.reduce_mean(tf.reshape(logits, [shape[0], shape[1], -1]), axis=1)

        return utterance


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Which attacks at which budgets.

    Attributes:
      attacks: names from :data:`ATTACKS`.
      domains: ``waveform`` and/or ``features``.
      linf_db: waveform L-inf budgets, dB relative to each utterance's peak.
      snr_db: waveform L2 budgets, as SNR in dB.
      feature_linf: feature-domain L-inf radii (normalised units).
      feature_l2: feature-domain L2 radii (normalised units).
      overrides: sweep-wide option values, ``{option: value}``, each applied to every
        attack whose registry entry takes that option (ser-attack's ``--steps`` reaches
        every iterative attack, ``--restarts`` the PGD ones); an option no registered
        attack takes is an error.
      options: per-attack option overrides, ``{name: {option: value}}``; they win over
        ``overrides`` for the attack they name.
      bpda: also run every white-box attack through the straight-through (BPDA) version
        of a model's purifier, as ``NAME+bpda`` (see :meth:`ser_tf.models.SERModel.classify`).
      eot: white-box attacks (BPDA variants too) follow gradients of the logits averaged
        over this many draws of a random model's randomness
        (:func:`ser_tf.attacks.whitebox.expectation_over_transformation`); 1: one draw per
        gradient. Black-box attacks query the model as it answers.
    """

    attacks: Sequence[str] = ("fgsm", "pgd", "mim")
    domains: Sequence[str] = ("waveform",)
    linf_db: Sequence[float] = (-50.0, -40.0, -30.0)
    snr_db: Sequence[float] = (40.0, 30.0, 20.0)
    feature_linf: Sequence[float] = (0.25, 0.75, 1.25)
    feature_l2: Sequence[float] = (5.0, 10.0, 20.0)
    overrides: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    bpda: bool = False
    eot: int = 1

    def __post_init__(self):
        if self.eot < 1:
            raise ValueError(f"eot must be at least 1, got {self.eot}")
        taken = {key for entry in ATTACKS.values() for key in entry.options}
        untaken = sorted(set(self.overrides) - taken)
        if untaken:
            raise ValueError(f"no attack takes the options {untaken}; options attacks "
                             f"take: {sorted(taken)}")
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown or not self.attacks:
            raise ValueError(f"unknown attacks {unknown}; choose from {sorted(ATTACKS)}")
        bad = sorted(set(self.domains) - {"waveform", "features"})
        if bad or not self.domains:
            raise ValueError(f"unknown domains {bad}; choose waveform and/or features")

    def attack_options(self, name: str) -> dict:
        """The keyword options attack ``name`` runs with: its registry defaults, then the
        sweep-wide ``overrides`` of the options it takes, then its own ``options``."""
        defaults = ATTACKS[name].options
        return {**defaults, **{k: v for k, v in self.overrides.items() if k in defaults},
                **self.options.get(name, {})}

    def budgets(self, name: str, domain: str) -> list[Budget]:
        """The budgets attack ``name`` runs over in ``domain``, weakest first."""
        norm = ATTACKS[name].norm
        if domain == "waveform":
            if norm == "linf":
                return [Budget("linf_db", v) for v in sorted(self.linf_db)]
            return [Budget("snr_db", v) for v in sorted(self.snr_db, reverse=True)]
        values = self.feature_linf if norm == "linf" else self.feature_l2
        return [Budget(norm, v) for v in sorted(values)]

    def runs(self) -> list[tuple[str, str, Budget]]:
        """Every ``(attack, domain, budget)`` of the sweep (BPDA runs after their attack's)."""
        out = []
        for name in self.attacks:
            variants = [name]
            if self.bpda and ATTACKS[name].family == "white-box":
                variants.append(f"{name}+bpda")
            out += [(v, domain, b) for v in variants for domain in self.domains
                    for b in self.budgets(name, domain)]
        return out


@dataclasses.dataclass
class Outcome:
    """Per-example results of one attack at one budget.

    Attributes:
      name, domain, budget, family: what ran.
      y_pred: predictions on the adversarial inputs ``[N]``.
      linf_db, snr_db: achieved perturbation per example (waveform domain; relative to the
        input of that domain).
      linf, l2: achieved absolute perturbation per example.
      queries: model queries per example (black-box attacks), else None.
      seconds: wall time of the attack.
      options: the attack's options as it ran (registry defaults with the sweep's
        overrides, e.g. ``steps`` and ``restarts``), and ``eot`` for white-box attacks.
    """

    name: str
    domain: str
    budget: Budget
    family: str
    y_pred: np.ndarray
    linf_db: np.ndarray
    snr_db: np.ndarray
    linf: np.ndarray
    l2: np.ndarray
    queries: np.ndarray | None
    seconds: float
    options: dict = dataclasses.field(default_factory=dict)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _spans(x, batch_size: int) -> list[slice]:
    """The attack batches: ``batch_size`` clips, or one utterance (a list of waveforms of
    different lengths)."""
    if isinstance(x, list):
        return [slice(k, k + 1) for k in range(len(x))]
    return list(_batches(len(x), batch_size))


def _predict(fn, x, batch_size: int) -> np.ndarray:
    return np.concatenate([np.argmax(fn(tf.constant(np.stack(x[s]))), -1)
                           for s in _spans(x, batch_size)])


def _achieved(x, x_adv) -> dict[str, np.ndarray]:
    """:func:`achieved` per example, for clips or for utterances of different lengths."""
    if not isinstance(x, list):
        return achieved(x, x_adv)
    parts = [achieved(a[None], b[None]) for a, b in zip(x, x_adv)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _crafter(fn: Callable, target: Callable, budget: Budget, options: dict) -> Callable:
    """``craft(x, y)`` for one attack at one budget (a closure tf.function can trace)."""

    def craft(xb, yb):
        return fn(target, xb, budget=budget, y=yb, **options)

    return craft


def _substitute(model, domain: str, oracle: Callable, attacker: np.ndarray, seed: int,
                counter: blackbox.QueryCounter) -> keras.Model:
    """Trains the transfer attack's substitute: a compact CNN (the attacker knows the input
    format, not the architecture or weights) on the oracle's labels of the attacker's audio
    (or its features, in the features domain), with Jacobian-based augmentation."""
    import keras

    from ser_tf.models import MODELS, ModelConfig, build_model

    config = ModelConfig(name="cnn", sample_rate=model.sample_rate, segment_s=model.segment_s,
                         specaugment=False)
    labels = list(model.labels) or [str(k) for k in range(int(oracle(attacker[:1]).shape[-1]))]

    def build():
        keras.utils.set_random_seed(seed)
        if domain == "waveform":
            return build_model(config, labels, seed=seed)
        bins, channels = attacker.shape[2], attacker.shape[3]
        net = MODELS["cnn"](config, len(labels), bins, channels)
        net.build((None,) + attacker.shape[1:])
        return net

    return blackbox.train_substitute(oracle, attacker, build_fn=build, domain=domain,
                                     seed=seed, counter=counter, **SUBSTITUTE)


def evaluate(model, x, y: np.ndarray, sweep: Sweep, *, batch_size: int = 32,
             seed: int = 0, progress: bool = True, attacker_x: np.ndarray | None = None,
             keep_examples: int = 0,
             on_result: Callable[[Outcome, np.ndarray], None] | None = None,
             windowing: Windowing | None = None) -> tuple[np.ndarray, list[Outcome]]:
    """Runs the sweep on clips ``x [N, samples]`` (or whole utterances, see ``windowing``)
    with true labels ``y [N]``.

    White-box attacks run compiled. Score- and decision-based attacks reach the model only
    through a :class:`~ser_tf.attacks.blackbox.QueryCounter` (forward passes; their
    ``queries`` are per example). Transfer attacks first train one substitute per domain on
    the target's labels of ``attacker_x`` (counted once; reported per attacked example), then
    craft on the substitute and replay on the target.

    Args:
      model: an :class:`ser_tf.models.SERModel`.
      x: waveform clips.
      y: true class indices.
      sweep: attacks, domains and budgets.
      batch_size: examples per attack batch.
      seed: seeds TF's global generator before each attack and the black-box attacks' own
        generators, so that random starts and sampling repeat exactly.
      progress: show a progress bar (one step per attack batch).
      attacker_x: the transfer attacker's own unlabelled clips (never the test clips);
        required when the sweep has a ``transfer_*`` attack.
      keep_examples: pass the first this many adversarial inputs of each run to
        ``on_result`` (features-domain runs pass adversarial feature maps).
      on_result: called with each :class:`Outcome` and its kept adversarial examples.
      windowing: attack whole utterances through the model's utterance decision (window
        logits averaged, see :class:`Windowing`): ``x`` is then a sequence of 1-D
        waveforms of any lengths, attacked one utterance per batch, and kept examples are
        lists of waveforms. Waveform domain only. The transfer attacker's substitute is
        still trained on clips (``attacker_x``) and crafts on whole utterances through
        their averaged windows.

    Returns:
      ``(clean predictions [N], outcomes)``.
    """
    y = np.asarray(y, np.int32)
    if windowing is None:
        x = np.asarray(x, np.float32)
    else:
        x = [np.asarray(w, np.float32).reshape(-1) for w in x]
        if "features" in sweep.domains:
            raise ValueError("features-domain attacks work on clips: the overlapping windows "
                             "of an utterance have no single feature map to perturb (use "
                             "the clip unit for them)")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if sweep.bpda and getattr(model, "purifier", None) is None:
        raise ValueError("BPDA attacks need a model with a purifier (ser-train "
                         "--trainer=purifier)")
    if sweep.eot > 1 and not getattr(model, "random", False):
        raise ValueError(f"EOT over {sweep.eot} draws needs a random model (ser-train "
                         "--input_noise_db): this one gives the same logits every time")

    def decision(fn, windowed: bool = False):
        """The logits an attack sees: a clip's, or an utterance's (windows averaged, also
        for a model of an ``eval_whole`` run when ``windowed``: the substitute's)."""
        if windowing is None:
            return fn
        reads = dataclasses.replace(windowing, whole=False) if windowed else windowing
        return reads.logits(fn, model.segment_samples)

    forward = tf.function(decision(lambda w: model(w, training=False)), reduce_retracing=True)
    classify = tf.function(lambda f: model.classify(f, training=False), reduce_retracing=True)
    # The models the BPDA variants differentiate: the same logits, the purifier's backward
    # pass replaced by the identity.
    straight = {"waveform": decision(lambda w: model(w, training=False, bpda=True)),
                "features": lambda f: model.classify(f, training=False, bpda=True)}
    featurize = tf.function(lambda w: model.features(w), reduce_retracing=True)

    def features_of(waves: np.ndarray) -> np.ndarray:
        return np.concatenate([featurize(tf.constant(waves[s])).numpy()
                               for s in _batches(len(waves), batch_size)])

    clean_pred = _predict(forward, x, batch_size)
    features = features_of(x) if "features" in sweep.domains else None
    runs = sweep.runs()
    if any(name.startswith("transfer_") for name, _, _ in runs) and attacker_x is None:
        raise ValueError("transfer attacks need the attacker's own clips (attacker_x)")
    substitutes: dict[str, tuple] = {}
    spans = _spans(x, batch_size)
    bar = tqdm(total=len(runs) * len(spans), desc="attacks",
               unit="batch" if windowing is None else "utt", disable=not progress)
    outcomes = []
    for name, domain, budget in runs:
        base, _, variant = name.partition("+")
        entry = ATTACKS[base]
        options = sweep.attack_options(base)
        inputs = x if domain == "waveform" else features
        target = forward if domain == "waveform" else classify
        gradient_model = whitebox.expectation_over_transformation(
            straight[domain] if variant == "bpda" else target, sweep.eot)
        bar.set_postfix_str(f"{name} {domain} {budget.label}")
        tf.random.set_seed(seed)
        start = time.perf_counter()
        # queries: per-example query counts (black-box only); counter: the live counter
        # whose growth over a batch is that batch's queries (score/decision-based only).
        queries, counter = None, None
        if base.startswith("transfer_"):
            if domain not in substitutes:
                bar.set_postfix_str(f"training the {domain} substitute")
                oracle = blackbox.QueryCounter(target)
                own = np.asarray(attacker_x, np.float32)
                own = own if domain == "waveform" else features_of(own)
                substitutes[domain] = (_substitute(model, domain, target, own, seed, oracle),
                                       oracle.queries)
            substitute, spent = substitutes[domain]
            if domain == "waveform":  # the substitute (a compact CNN) reads windows
                substitute = decision(substitute, windowed=True)
            craft = tf.function(_crafter(entry.fn, substitute, budget, options),
                                reduce_retracing=True)
            queries = np.full(len(inputs), spent / len(inputs))
        elif entry.family == "black-box":
            counter = blackbox.QueryCounter(target)
            craft = _crafter(entry.fn, target, budget, {**options, "seed": seed,
                                                        "counter": counter})
            queries = np.zeros(len(inputs))
        else:
            craft = tf.function(_crafter(entry.fn, gradient_model, budget, options),
                                reduce_retracing=True)
        adv = []
        for s in spans:
            xb, yb = np.stack(inputs[s]), y[s]
            if windowing is None and counter is None and len(xb) < batch_size <= len(inputs):
                # Pad the last batch to the traced shape (a second trace costs seconds).
                pad = batch_size - len(xb)
                xb = np.concatenate([xb, inputs[:pad]])
                yb = np.concatenate([yb, y[:pad]])
            before = counter.queries if counter is not None else 0
            adv.extend(np.asarray(craft(tf.constant(xb), tf.constant(yb)))[:s.stop - s.start])
            if counter is not None:
                # The batch advances together: its queries are shared evenly.
                queries[s] = (counter.queries - before) / (s.stop - s.start)
            bar.update(1)
        adv = adv if windowing is not None else np.stack(adv)
        seconds = time.perf_counter() - start
        y_pred = _predict(target, adv, batch_size)
        got = _achieved(inputs, adv)
        outcome = Outcome(name=name, domain=domain, budget=budget, family=entry.family,
                          y_pred=y_pred, linf_db=got["linf_db"], snr_db=got["snr_db"],
                          linf=got["linf"], l2=got["l2"], queries=queries, seconds=seconds,
                          options=dict(options, **({"eot": sweep.eot}
                                                   if entry.family == "white-box" else {})))
        outcomes.append(outcome)
        log.info("%s %s %s: accuracy %.3f (clean %.3f), %.1f s%s", name, domain, budget.label,
                 float(np.mean(y_pred == y)), float(np.mean(clean_pred == y)), seconds,
                 "" if queries is None else f", {queries.mean():.0f} queries per example")
        if on_result is not None:
            on_result(outcome, adv[:keep_examples])
    bar.close()
    return clean_pred, outcomes


def _group_values(metadata: Sequence, y: np.ndarray, labels: Sequence[str]) -> dict:
    groups = {"emotion": [labels[k] for k in y]}
    for key in GROUPS[1:]:
        groups[key] = [str(getattr(m, key)) for m in metadata]
    return groups


def report(y: np.ndarray, clean_pred: np.ndarray, outcomes: Sequence[Outcome],
           labels: Sequence[str], metadata: Sequence) -> dict:
    """The ``robustness.json`` content from per-example outcomes (pooled as given).

    Returns:
      ``{"clean": metrics, "attacks": [{"name", "family", "domain", "budget", "accuracy",
      "uar", "success_rate", "mean_snr_db", "max_linf_db", "queries", "by_group", ...}]}``;
      ``max_linf_db`` is over every clip (it must stay within an L-inf budget),
      ``mean_snr_db`` and ``mean_l2`` over the clips the model got right clean.
    """
    y = np.asarray(y)
    groups = _group_values(metadata, y, labels)
    clean = classification_metrics(y, clean_pred, labels)
    clean["by_group"] = group_metrics(y, clean_pred, labels, groups)
    correct = clean_pred == y
    rows = []
    for o in outcomes:
        m = classification_metrics(y, o.y_pred, labels)
        changed = o.l2 > 0
        # The perturbation the attack needed: over the clips the model got right (a clip
        # already misclassified needs none, and would make a minimal attack look quieter).
        worked = changed & correct
        row = {
            "name": o.name, "family": o.family, "domain": o.domain,
            "budget": o.budget.to_dict(), "label": o.budget.label,
            "accuracy": m["accuracy"], "uar": m["uar"],
            "per_class_recall": m["per_class_recall"],
            # Of the clips the model got right, the share the attack turned wrong.
            "success_rate": (float(np.mean(o.y_pred[correct] != y[correct]))
                             if correct.any() else None),
            "n": m["n"],
            "max_linf": float(o.linf.max()) if len(o.linf) else 0.0,
            "mean_l2": float(o.l2[worked].mean()) if worked.any() else 0.0,
            "seconds": o.seconds,
            "options": o.options,
            "by_group": group_metrics(y, o.y_pred, labels, groups),
        }
        if o.domain == "waveform":
            row["max_linf_db"] = float(o.linf_db[changed].max()) if changed.any() else None
            row["mean_snr_db"] = float(o.snr_db[worked].mean()) if worked.any() else None
        if o.queries is not None:
            row["queries"] = int(o.queries.sum())
            row["queries_per_example"] = float(o.queries.mean())
        rows.append(row)
    return {"clean": clean, "attacks": rows}


def pool(parts: Sequence[tuple[np.ndarray, np.ndarray, list[Outcome]]]
         ) -> tuple[np.ndarray, np.ndarray, list[Outcome]]:
    """Concatenates ``(y, clean_pred, outcomes)`` of several folds run with the same sweep."""
    ys = np.concatenate([p[0] for p in parts])
    clean = np.concatenate([p[1] for p in parts])
    pooled = []
    for k, first in enumerate(parts[0][2]):
        same = [p[2][k] for p in parts]
        cat = {f: np.concatenate([getattr(o, f) for o in same])
               for f in ("y_pred", "linf_db", "snr_db", "linf", "l2")}
        queries = (np.concatenate([o.queries for o in same])
                   if first.queries is not None else None)
        pooled.append(dataclasses.replace(first, **cat, queries=queries,
                                          seconds=float(sum(o.seconds for o in same))))
    return ys, clean, pooled


# -- a whole job: a trained workdir in, robustness.json, plots, TensorBoard and WAVs out ------


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """What ``ser-attack`` runs on a training workdir.

    Attributes:
      sweep: attacks, domains and budgets.
      folds: fold names to attack (empty: every trained fold).
      max_utterances: attack at most this many test utterances per fold (a seeded,
        class-stratified subsample; 0: all).
      batch_size: examples per attack batch.
      seed: sampling and attack seed.
      examples: adversarial examples per run written as WAV and to TensorBoard.
      out_dir: where the reports go (empty: the training workdir itself); fold reports,
        TensorBoard summaries and WAVs go to its ``fold_XX/`` folders for cross-validation.
      attacker_clips: clips the transfer attacker owns: drawn (class-stratified, seeded)
        from the fold's training and validation speakers, never the test speakers, and
        labelled by querying the target.
      progress: show progress bars.
      unit: ``clip`` (each test utterance's central ``segment_s`` seconds) or
        ``utterance`` (each test utterance whole, through the averaged logits of all its
        windows, as ``metrics.json`` evaluates it; see :class:`Windowing`).
    """

    sweep: Sweep = Sweep()
    folds: Sequence[str] = ()
    max_utterances: int = 0
    batch_size: int = 32
    seed: int = 0
    examples: int = 2
    out_dir: str = ""
    attacker_clips: int = 200
    progress: bool = True
    unit: str = "clip"

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; choose from {UNITS}")
        if self.unit == "utterance" and "features" in self.sweep.domains:
            raise ValueError("the utterance unit attacks waveforms only: feature-domain "
                             "attacks need one feature map per input (use the clip unit)")


def subsample(y: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Up to ``limit`` positions of ``y``, stratified by class, in their original order."""
    y = np.asarray(y)
    if limit <= 0 or limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    # Round-robin over classes in a seeded order keeps the class balance of the original.
    by_class = {c: [i for i in order if y[i] == c] for c in np.unique(y)}
    picked: list[int] = []
    while len(picked) < limit:
        for c in sorted(by_class):
            if by_class[c] and len(picked) < limit:
                picked.append(by_class[c].pop(0))
    return np.sort(np.asarray(picked))


def _write_wav(path: str, wave: np.ndarray, rate: int) -> None:
    data = tf.audio.encode_wav(tf.clip_by_value(tf.constant(wave, tf.float32)[:, None], -1, 1),
                               rate)
    tf.io.write_file(path, data)


def _padded(waves) -> np.ndarray:
    """Waveforms of different lengths as one ``[N, longest]`` array (zeros after each)."""
    out = np.zeros((len(waves), max(len(w) for w in waves)), np.float32)
    for k, w in enumerate(waves):
        out[k, :len(w)] = w
    return out


class _Recorder:
    """Writes a run's kept examples to WAV files and TensorBoard.

    ``clips`` are the attacked inputs: fixed-length clips, or a list of whole utterances
    (whose spectrogram images show their central window, the model's input size).
    """

    def __init__(self, workdir: str, model, clips, ids: Sequence[str],
                 labels: Sequence[str], y: np.ndarray, pad_mode: str = "loop"):
        self.root = os.path.join(workdir, "adversarial")
        self.model, self.clips, self.ids, self.labels, self.y = model, clips, ids, labels, y
        self.rate = model.sample_rate
        self.pad_mode = pad_mode
        self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tb", "attack"))
        self.step: dict[tuple[str, str, str], int] = {}
        self._clean_features: np.ndarray | None = None

    def features(self, waves) -> np.ndarray:
        """The model's features of clips, or of each utterance's central window."""
        if isinstance(waves, list):
            from ser_tf.data.pipeline import fit_length

            waves = np.stack([fit_length(tf.constant(w), self.model.segment_samples,
                                         tf.constant(0.5), self.pad_mode).numpy()
                              for w in waves])
        return self.model.features(waves).numpy()

    def clean_features(self, n: int) -> np.ndarray:
        """Features of the first ``n`` clean inputs (computed once for every run)."""
        if self._clean_features is None or len(self._clean_features) < n:
            self._clean_features = self.features(self.clips[:n])
        return self._clean_features[:n]

    def __call__(self, outcome: Outcome, adv: np.ndarray) -> None:
        from ser_tf.evaluation.report import png_to_tensor, spectrograms_png

        key = (outcome.name, outcome.domain, outcome.budget.kind)
        step = self.step.get(key, 0)
        self.step[key] = step + 1
        tag = f"{outcome.domain}/{outcome.name}"
        acc = float(np.mean(outcome.y_pred == self.y))
        with self.writer.as_default():
            tf.summary.scalar(f"{tag}/accuracy", acc, step=step,
                              description=f"budget {outcome.budget.label} at step {step}")
            tf.summary.text(f"{tag}/budget", outcome.budget.label, step=step)
            if not len(adv):
                return
            n = len(adv)
            if outcome.domain == "waveform":
                clean = self.clips[:n]
                # Utterances of different lengths go to TensorBoard zero-padded to the
                # longest; the WAV files keep each at its own length.
                clean_t, adv_t = _padded(clean), _padded(adv)
                tf.summary.audio(f"{tag}/adversarial", adv_t[:, :, None], self.rate,
                                 step=step, max_outputs=n)
                tf.summary.audio(f"{tag}/clean", clean_t[:, :, None], self.rate, step=step,
                                 max_outputs=n)
                # The perturbation alone, raised to the clean input's peak so it can be heard.
                delta = adv_t - clean_t
                gain = np.abs(clean_t).max(1, keepdims=True) / np.maximum(
                    np.abs(delta).max(1, keepdims=True), 1e-9)
                tf.summary.audio(f"{tag}/perturbation_amplified", (delta * gain)[:, :, None],
                                 self.rate, step=step, max_outputs=n)
                feats_clean = self.clean_features(n)
                feats_adv = self.features(adv)
                self._wavs(outcome, clean, adv)
            else:
                feats_adv = adv
                feats_clean = self.clean_features(n)
            grid = np.concatenate([feats_clean[..., 0], feats_adv[..., 0],
                                   feats_adv[..., 0] - feats_clean[..., 0]])
            titles = ([f"clean {self.ids[k]}" for k in range(n)]
                      + [f"{outcome.name} {outcome.budget.label}"] * n
                      + ["difference"] * n)
            tf.summary.image(f"{tag}/features", png_to_tensor(spectrograms_png(grid, titles)),
                             step=step)

    def _wavs(self, outcome: Outcome, clean: np.ndarray, adv: np.ndarray) -> None:
        folder = os.path.join(self.root, f"{outcome.name}_{outcome.budget.kind}"
                                         f"{outcome.budget.value:g}")
        os.makedirs(folder, exist_ok=True)
        for k in range(len(adv)):
            clean_path = os.path.join(self.root, f"{self.ids[k]}_clean.wav")
            if not os.path.exists(clean_path):
                _write_wav(clean_path, clean[k], self.rate)
            _write_wav(os.path.join(folder, f"{self.ids[k]}.wav"), adv[k], self.rate)


def _write_outputs(workdir: str, robustness: dict) -> None:
    from ser_tf.evaluation.report import robustness_png
    from ser_tf.workdir import write_json

    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "robustness.json"), robustness)
    for metric in ("accuracy", "uar"):
        with open(os.path.join(workdir, f"robustness_{metric}.png"), "wb") as f:
            f.write(robustness_png(robustness, metric))
    with open(os.path.join(workdir, "robustness_by_group.csv"), "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["attack", "domain", "budget", "group", "value", "accuracy", "uar", "n"])
        rows = [{"name": "clean", "domain": "", "label": "", "by_group":
                 robustness["clean"]["by_group"]}] + robustness["attacks"]
        for row in rows:
            for group, values in row["by_group"].items():
                for value, m in values.items():
                    out.writerow([row["name"], row["domain"], row["label"], group, value,
                                  f"{m['accuracy']:.4f}", f"{m['uar']:.4f}", m["n"]])


def attack_workdir(experiment, job: JobConfig) -> dict:
    """Attacks the test utterances of every (selected) fold of a trained workdir.

    Args:
      experiment: the run's :class:`ser_tf.training.experiment.ExperimentConfig` (rebuilt
        from its ``flags.txt``), so that the folds and test speakers are exactly the
        training run's.
      job: what to run.

    Returns:
      The top-level ``robustness.json`` content (pooled over folds for cross-validation,
      with each fold's own report under ``"folds"``), also written to ``job.out_dir`` (or
      the workdir) with the plots and the per-group table; each fold's folder there gets
      its own files, TensorBoard summaries and WAVs.

    Raises:
      ValueError: unknown fold, an untrained fold, or an unsupported run.
      FileNotFoundError: the data is missing.
    """
    from ser_tf.data.pipeline import central_clips, hop_in_samples, waveforms
    from ser_tf.training.experiment import open_run

    if experiment.train.speaker_norm:
        raise ValueError("ser-attack does not support --speaker_norm runs yet: their models "
                         "need each speaker's statistics as a second input")
    run = open_run(experiment, job.folds, progress=job.progress)
    decoded, labels_all, classes = run.decoded, run.labels, run.classes
    out_dir = job.out_dir or experiment.workdir
    parts, fold_reports = [], []
    for fold in run.selected:
        model = keras.saving.load_model(run.model_path(fold))
        workdir = run.fold_workdir(fold, out_dir)
        test = np.asarray(fold.test)
        keep = subsample(labels_all[test], job.max_utterances, job.seed)
        test = test[keep]
        y = labels_all[test]
        metadata = [decoded.utterances[i] for i in test]
        pad_mode = experiment.train.pad_mode
        windowing = None
        if job.unit == "utterance":
            clips = waveforms(decoded, test)
            windowing = Windowing(hop_in_samples(experiment.train.eval_hop_s,
                                                 model.sample_rate),
                                  pad_mode, whole=experiment.train.eval_whole)
        else:
            clips = central_clips(decoded, test, segment_samples=model.segment_samples,
                                  pad_mode=pad_mode)
        log.info("%s: attacking %d test utterances of speakers %s (%s)", fold.name, len(test),
                 ",".join(fold.test_speakers), UNIT_TEXT[job.unit])
        ids = [os.path.splitext(os.path.basename(u.path))[0] for u in metadata]
        attacker_x = None
        if any(name.startswith("transfer_") for name in job.sweep.attacks):
            own = np.concatenate([np.asarray(fold.train), np.asarray(fold.val)]).astype(int)
            own = own[subsample(labels_all[own], job.attacker_clips, job.seed)]
            attacker_x = central_clips(decoded, own, segment_samples=model.segment_samples,
                                       pad_mode=pad_mode)
        recorder = _Recorder(workdir, model, clips, ids, classes, y, pad_mode)
        clean_pred, outcomes = evaluate(model, clips, y, job.sweep, batch_size=job.batch_size,
                                        seed=job.seed, progress=job.progress,
                                        attacker_x=attacker_x, keep_examples=job.examples,
                                        on_result=recorder, windowing=windowing)
        recorder.writer.close()
        fold_report = report(y, clean_pred, outcomes, classes, metadata)
        fold_report.update(fold=fold.name, test_speakers=list(fold.test_speakers))
        if len(run.folds) > 1:
            _write_outputs(workdir, fold_report)
        parts.append((y, clean_pred, outcomes, metadata))
        fold_reports.append(fold_report)
    ys, clean, pooled = pool([p[:3] for p in parts])
    metadata = [m for p in parts for m in p[3]]
    robustness = report(ys, clean, pooled, classes, metadata)
    robustness.update(
        corpus=experiment.corpus, protocol=experiment.protocol,
        synthetic=any(u.corpus == "synthetic" for u in decoded.utterances),
        unit=UNIT_TEXT[job.unit], eot=job.sweep.eot,
        folds=[{"fold": r["fold"], "test_speakers": r["test_speakers"],
                "clean": {k: r["clean"][k] for k in ("accuracy", "uar", "n")},
                "attacks": [{k: a[k] for k in ("name", "domain", "label", "accuracy", "uar")}
                            for a in r["attacks"]]} for r in fold_reports])
    _write_outputs(out_dir, robustness)
    return robustness
