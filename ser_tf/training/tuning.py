"""Hyperparameter search over ser-train runs with keras-tuner.

A search tries hyperparameter values (the values of ``ser-train`` flags: frontend sizes,
widths, dropout, learning rate, batch size, the adversarial budget and ratio) with one of
keras-tuner's oracles (random search, Hyperband, Bayesian optimisation). Every trial is a
real ``ser-train`` run: the base flags with the trial's values put in, written as the
trial's ``flags.txt``, trained by :func:`ser_tf.training.experiment.run_experiment` with
the method's fold trainer (:func:`ser_tf.defenses.fold_trainer`) in its own workdir
``W/trial_XX``; so it has every output of a training run and resumes as one does.

The objective uses only each trained fold's validation speakers, never its test speakers:

* ``clean``: the validation UAR of the selected model (``best_val_uar`` of the fold's
  ``metrics.json``: every window of each validation utterance);
* ``robust``: the UAR on the validation utterances' central clips under a named attack
  (:data:`ser_tf.attacks.runner.ATTACKS`) at one budget, run on the saved ``model.keras``
  with :func:`ser_tf.attacks.runner.evaluate`;
* ``mix``: ``(1 - weight) * clean + weight * robust``.

Both figures are measured for every trial whatever the objective, averaged over the trained
folds. Hyperband's ``tuner/epochs`` becomes the trial's ``--epochs`` (each trial trains from
scratch: the cosine schedule is set by the epoch count, so a longer run is no continuation
of a shorter one). The search resumes: keras-tuner's oracle state lives in ``W`` and is
reloaded, an interrupted trial is run again with the same values in the same workdir (where
the trainer resumes from its last epoch), and a trial already measured is read back.

Outputs in ``W``: ``tune.json`` (every trial's values, clean and robust validation UAR,
objective; the best trial; the base configuration's figures), ``best.flags`` (a flagfile
``ser-train --flagfile=best.flags --workdir=...`` takes as it is: the base flags with the
best values), ``search.json`` (what the search is; a re-run must match it) and ``tb/`` (one
run per trial for TensorBoard's hparams dashboard).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Mapping, Sequence

import keras
import keras_tuner
import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp_api

from ser_tf.attacks.budget import Budget
from ser_tf.attacks.runner import ATTACKS, Sweep, evaluate, subsample
from ser_tf.data.pipeline import central_clips
from ser_tf.evaluation.metrics import classification_metrics
from ser_tf.training.experiment import (ExperimentConfig, TrainedRun, Trainer, open_run,
                                        run_experiment)
from ser_tf.workdir import write_json

log = logging.getLogger(__name__)

TUNERS = ("random", "hyperband", "bayesian")
OBJECTIVES = ("clean", "robust", "mix")
#: Modules the Bayesian oracle needs, and the packages that provide them.
BAYESIAN_REQUIRES = {"scipy": "scipy", "sklearn": "scikit-learn"}
#: What every trial reports to the oracle (the objective first).
METRICS = ("objective", "val_uar", "val_robust_uar", "val_clip_uar")
#: Examples per attack batch of the robust measurement.
ATTACK_BATCH = 32

#: Builds ser-train's experiment from its flags (``--name=value`` lines, as a flagfile holds
#: them) for a workdir; the app supplies it (the library reads no flags).
Configure = Callable[[Sequence[str], str], ExperimentConfig]
#: The fold trainer of an experiment's training method (the app passes
#: :func:`ser_tf.defenses.fold_trainer`, which stands above this module).
TrainerFor = Callable[[ExperimentConfig], Trainer]


# -- the search space --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values one hyperparameter takes: a list of choices, or a ``[low, high]`` range.

    Attributes:
      choices: the values (int, float or str), or empty for a range.
      low, high: the range's bounds.
      log: sample the range on a log scale.
    """

    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    def to_dict(self) -> dict:
        if self.choices:
            return {"choices": list(self.choices)}
        return {"low": self.low, "high": self.high, "log": self.log}

    @property
    def candidates(self) -> tuple:
        """The values to check before searching: the choices, or the range's bounds."""
        return self.choices or (self.low, self.high)


@dataclasses.dataclass(frozen=True)
class HParam:
    """A searchable hyperparameter: a ser-train flag.

    Attributes:
      name: the flag it sets (also its name in the search and in TensorBoard).
      kind: ``int``, ``float``, ``filters`` (a comma list of ints, searched as choices) or
        ``budget`` (a ``KIND:VALUE`` budget, searched as choices).
      default: the default domain for a base configuration.
      applies: why it does not apply to a base configuration (None: it applies).
      log: ranges are sampled on a log scale by default.
    """

    name: str
    kind: str
    default: Callable[[ExperimentConfig], Domain]
    applies: Callable[[ExperimentConfig], str | None] = lambda cfg: None
    log: bool = False

    def parse(self, value: str):
        """One value of this hyperparameter from text, in the type the search holds."""
        value = value.strip()
        if self.kind == "int":
            return int(value)
        if self.kind == "float":
            return float(value)
        if self.kind == "filters":
            filters = tuple(int(v) for v in value.split(","))
            if not filters or min(filters) < 1:
                raise ValueError(f"{value!r} is not a list of positive filter counts")
            return ",".join(str(f) for f in filters)
        return value  # budget: checked against the base configuration by configure()


def _adversarial(cfg: ExperimentConfig):
    """The base configuration's adversarial-training method (None without one)."""
    if cfg.trainer == "adversarial":
        return cfg.method
    return getattr(cfg.method, "adversarial", None) if cfg.trainer == "gan" else None


def _needs_adversarial(cfg: ExperimentConfig) -> str | None:
    if _adversarial(cfg) is None:
        return "it needs --trainer=adversarial (or --trainer=gan --gan_adversarial)"
    return None


def _needs_ratio(cfg: ExperimentConfig) -> str | None:
    method = _adversarial(cfg)
    if method is not None and method.method == "trades":
        return "TRADES attacks every example (--adv_ratio is unused)"
    return _needs_adversarial(cfg)


def _models(*names: str) -> Callable[[ExperimentConfig], str | None]:
    def check(cfg: ExperimentConfig) -> str | None:
        if cfg.model.name in names:
            return None
        return f"--model={cfg.model.name} has none (it is used by {', '.join(names)})"
    return check


def _stats_dropout(cfg: ExperimentConfig) -> str | None:
    if cfg.model.name == "functionals" or cfg.model.statistics:
        return None
    return "it needs --model=functionals or --statistics"


def _widths(value: int) -> Domain:
    return Domain(choices=tuple(sorted({max(1, value // 2), value, value * 2})))


def _filters(cfg: ExperimentConfig) -> Domain:
    return Domain(choices=tuple(",".join(str(max(1, round(f * s))) for f in cfg.model.conv_filters)
                                for s in (0.5, 1.0, 2.0)))


def _budgets(cfg: ExperimentConfig) -> Domain:
    base = _adversarial(cfg).budget
    if base.kind in ("linf_db", "snr_db"):
        values = [base.value + d for d in (-10.0, -5.0, 0.0, 5.0, 10.0)]
    else:
        values = [base.value * s for s in (0.5, 0.75, 1.0, 1.5, 2.0)]
    return Domain(choices=tuple(f"{base.kind}:{v:g}" for v in values))


HPARAMS: dict[str, HParam] = {p.name: p for p in (
    HParam("n_mels", "int", lambda cfg: Domain(choices=(32, 40, 64, 80))),
    HParam("log_floor", "float", lambda cfg: Domain(low=1e-6, high=1.0, log=True), log=True),
    HParam("conv_filters", "filters", _filters, _models("cnn_lstm", "cnn")),
    HParam("chunk_units", "int", lambda cfg: _widths(cfg.model.chunk_units),
           _models("cnn_lstm"), log=True),
    HParam("lstm_units", "int", lambda cfg: _widths(cfg.model.lstm_units), _models("cnn_lstm"),
           log=True),
    HParam("dense_units", "int", lambda cfg: _widths(cfg.model.dense_units), _models("cnn"),
           log=True),
    HParam("dropout", "float", lambda cfg: Domain(low=0.0, high=0.5), _models("cnn_lstm", "cnn")),
    HParam("stats_dropout", "float", lambda cfg: Domain(low=0.0, high=0.7), _stats_dropout),
    HParam("learning_rate", "float", lambda cfg: Domain(low=1e-4, high=1e-2, log=True),
           log=True),
    HParam("weight_decay", "float", lambda cfg: Domain(low=1e-5, high=1e-3, log=True),
           log=True),
    HParam("batch_size", "int", lambda cfg: Domain(choices=(16, 32, 64)), log=True),
    HParam("adv_budget", "budget", _budgets, _needs_adversarial),
    HParam("adv_ratio", "float", lambda cfg: Domain(low=0.3, high=1.0), _needs_ratio),
)}

#: Searched when --hparams names none (those that apply to the base configuration).
DEFAULT_HPARAMS = ("n_mels", "log_floor", "conv_filters", "lstm_units", "dense_units",
                   "dropout", "learning_rate", "batch_size", "adv_budget", "adv_ratio")


def parse_domain(param: HParam, spec: str) -> Domain:
    """A domain from ``--space`` text: ``A|B|C`` (choices) or ``LOW:HIGH`` (a range of a
    numeric hyperparameter, on its default scale).

    Raises:
      ValueError: unreadable values, an empty or reversed range, a log range that
        reaches 0.
    """
    numeric = param.kind in ("int", "float")
    where = f"--space={param.name}={spec}"
    try:
        if numeric and ":" in spec and "|" not in spec:
            low, _, high = spec.partition(":")
            low, high = param.parse(low), param.parse(high)
            if not low < high:
                raise ValueError("the range's low end must be below its high end")
            if param.log and low <= 0:
                raise ValueError(f"{param.name} is searched on a log scale: its range must "
                                 f"be above 0")
            return Domain(low=low, high=high, log=param.log)
        choices = tuple(dict.fromkeys(param.parse(v) for v in spec.split("|")))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return Domain(choices=choices)


def build_space(base: ExperimentConfig, names: Sequence[str] = (),
                specs: Sequence[str] = ()) -> dict[str, Domain]:
    """The search space: which hyperparameters, over which values.

    Args:
      base: the base configuration (default domains are relative to it, e.g. conv widths
        half and double the base's).
      names: hyperparameters to search; empty: every one of :data:`DEFAULT_HPARAMS` that
        applies to ``base``.
      specs: ``NAME=SPEC`` domain overrides (see :func:`parse_domain`).

    Raises:
      ValueError: an unknown hyperparameter, one that does not apply to ``base``, a spec
        for one that is not searched, or an unreadable spec.
    """
    known = ", ".join(sorted(HPARAMS))
    unknown = [n for n in names if n not in HPARAMS]
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown} in --hparams; searchable: {known}")
    for name in names:
        reason = HPARAMS[name].applies(base)
        if reason:
            raise ValueError(f"--hparams names {name}, which does not apply here: {reason}")
    chosen = list(dict.fromkeys(names)) or [n for n in DEFAULT_HPARAMS
                                            if HPARAMS[n].applies(base) is None]
    space = {n: HPARAMS[n].default(base) for n in chosen}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not text.strip():
            raise ValueError(f"--space={spec} is not NAME=SPEC (SPEC: A|B|C or LOW:HIGH)")
        if name not in HPARAMS:
            raise ValueError(f"--space names unknown hyperparameter {name!r}; searchable: "
                             f"{known}")
        if name not in space:
            raise ValueError(f"--space names {name}, which is not searched (searched: "
                             f"{', '.join(space)}; add it to --hparams)")
        space[name] = parse_domain(HPARAMS[name], text.strip())
    return space


def flag_value(value) -> str:
    """A hyperparameter value as flag text (floats exactly, so a flagfile gives them back)."""
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def override_lines(lines: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Flag lines (``--name=value``) with the named flags set to ``values`` (replaced in
    place, or appended)."""
    out, done = [], set()
    for line in lines:
        name = line.lstrip("-").partition("=")[0]
        bare = name[2:] if name.startswith("no") and name[2:] in values else name
        if bare in values:
            if bare not in done:
                out.append(f"--{bare}={values[bare]}")
                done.add(bare)
            continue
        out.append(line)
    return out + [f"--{n}={v}" for n, v in values.items() if n not in done]


def check_space(space: Mapping[str, Domain], base_lines: Sequence[str], configure: Configure,
                workdir: str) -> None:
    """Builds ser-train's configuration with every choice (and range end) of ``space``, so
    a value ser-train rejects is an error before any trial runs.

    Raises:
      ValueError: naming the hyperparameter, the value and ser-train's reason.
    """
    for name, domain in space.items():
        for value in domain.candidates:
            try:
                configure(override_lines(base_lines, {name: flag_value(value)}), workdir)
            except ValueError as err:
                raise ValueError(f"{name}={flag_value(value)} is not a valid ser-train "
                                 f"value: {err}") from None


def keras_tuner_space(space: Mapping[str, Domain], base: ExperimentConfig
                      ) -> keras_tuner.HyperParameters:
    """The space as keras-tuner hyperparameters (defaults: the base's values where they lie
    inside)."""
    hps = keras_tuner.HyperParameters()
    for name, domain in space.items():
        default = base_value(base, name)
        if domain.choices:
            hps.Choice(name, list(domain.choices),
                       default=default if default in domain.choices else None)
        else:
            inside = default if domain.low <= default <= domain.high else None
            sampling = "log" if domain.log else "linear"
            if HPARAMS[name].kind == "int":
                hps.Int(name, int(domain.low), int(domain.high), sampling=sampling,
                        default=inside)
            else:
                hps.Float(name, float(domain.low), float(domain.high), sampling=sampling,
                          default=inside)
    return hps


def base_value(base: ExperimentConfig, name: str):
    """A hyperparameter's value in the base configuration, in the search's type."""
    if name == "conv_filters":
        return ",".join(str(f) for f in base.model.conv_filters)
    if name == "adv_budget":
        budget = _adversarial(base).budget
        return f"{budget.kind}:{budget.value:g}"
    if name == "adv_ratio":
        return _adversarial(base).ratio
    if name in ("learning_rate", "weight_decay", "batch_size"):
        return getattr(base.train, name)
    return getattr(base.model, name)


# -- the objective -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a trial is scored on (higher is better), on validation speakers only.

    Attributes:
      kind: ``clean``, ``robust`` or ``mix``.
      attack: the robust measurement's attack, a name from
        :data:`ser_tf.attacks.runner.ATTACKS`.
      budget: its budget (its norm must be the attack's).
      weight: ``mix``: the robust UAR's weight, in [0, 1].
      steps: iterations of an iterative attack (0: the attack's default).
    """

    kind: str = "mix"
    attack: str = "pgd"
    budget: Budget = Budget("linf_db", -40.0)
    weight: float = 0.5
    steps: int = 0

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.kind!r}; choose from {OBJECTIVES}")
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; choose from {sorted(ATTACKS)}")
        norm = ATTACKS[self.attack].norm
        if self.budget.norm_name != norm:
            name, kinds = (("an L-inf", "linf_db or linf") if norm == "linf"
                           else ("an L2", "snr_db or l2"))
            raise ValueError(f"{self.attack} is {name} attack: its budget is {kinds}, not "
                             f"{self.budget.kind}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"the objective weight must be in [0, 1], got {self.weight}")
        if self.steps < 0:
            raise ValueError(f"attack steps must be >= 0, got {self.steps}")
        if self.steps and "steps" not in ATTACKS[self.attack].options:
            raise ValueError(f"{self.attack} takes no steps (it is "
                             f"{ATTACKS[self.attack].description})")

    def sweep(self) -> Sweep:
        """The robust measurement as an attack sweep of one attack at one budget."""
        field = {"linf_db": "linf_db", "snr_db": "snr_db", "linf": "feature_linf",
                 "l2": "feature_l2"}[self.budget.kind]
        options = {self.attack: {"steps": self.steps}} if self.steps else {}
        return Sweep(attacks=(self.attack,), domains=(self.budget.domain,), options=options,
                     **{field: (self.budget.value,)})

    def value(self, clean: float, robust: float) -> float:
        """The objective from the clean and robust validation UAR."""
        if self.kind == "clean":
            return clean
        if self.kind == "robust":
            return robust
        return (1.0 - self.weight) * clean + self.weight * robust

    @property
    def attack_label(self) -> str:
        steps = self.steps or ATTACKS[self.attack].options.get("steps")
        name = f"{self.attack}-{steps}" if steps else self.attack
        domain = "" if self.budget.domain == "waveform" else " (features)"
        return f"{name} at {self.budget.label}{domain}"

    @property
    def description(self) -> str:
        if self.kind == "clean":
            return "clean validation UAR"
        if self.kind == "robust":
            return f"robust validation UAR under {self.attack_label}"
        return (f"{1 - self.weight:g} x clean + {self.weight:g} x robust validation UAR "
                f"under {self.attack_label}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "attack": self.attack, "budget": self.budget.to_dict(),
                "weight": self.weight, "steps": self.steps, "description": self.description}


def measure(run: TrainedRun, workdir: str, objective: Objective, seed: int = 0) -> dict:
    """Clean and robust validation UAR of a trained run (each fold's validation speakers).

    Args:
      run: the search's corpus and folds (:func:`ser_tf.training.experiment.open_run`).
      workdir: the trained run (its ``fold_XX/`` folders for cross-validation).
      objective: the attack and budget of the robust figure, and how to combine.
      seed: the attack's seed.

    Returns:
      ``{"val_uar", "val_clip_uar", "val_robust_uar", "objective", "folds": [...]}``: means
      over the folds; ``val_clip_uar`` is the clean UAR on the attacked clips.
    """
    folds = []
    for fold in run.selected:
        folder = run.fold_workdir(fold, workdir)
        with open(os.path.join(folder, "metrics.json")) as f:
            metrics = json.load(f)
        model = keras.saving.load_model(os.path.join(folder, "model.keras"))
        val = np.asarray(fold.val)
        y = run.labels[val]
        pad = run.config.train.pad_mode
        clips = central_clips(run.decoded, val, segment_samples=model.segment_samples,
                              pad_mode=pad)
        attacker_x = None
        if objective.attack.startswith("transfer_"):
            # The transfer attacker owns audio of training speakers only.
            own = np.asarray(fold.train)[subsample(run.labels[fold.train], 200, seed)]
            attacker_x = central_clips(run.decoded, own, segment_samples=model.segment_samples,
                                       pad_mode=pad)
        clean_pred, (outcome,) = evaluate(model, clips, y, objective.sweep(),
                                          batch_size=ATTACK_BATCH, seed=seed, progress=False,
                                          attacker_x=attacker_x)
        folds.append({"fold": fold.name, "val_speakers": list(fold.val_speakers),
                      "n_val": len(val), "val_uar": float(metrics["best_val_uar"]),
                      "val_clip_uar": classification_metrics(y, clean_pred, run.classes)["uar"],
                      "val_robust_uar": classification_metrics(y, outcome.y_pred,
                                                               run.classes)["uar"]})
        del model
        gc.collect()
    means = {k: float(np.mean([f[k] for f in folds]))
             for k in ("val_uar", "val_clip_uar", "val_robust_uar")}
    return {**means, "objective": objective.value(means["val_uar"], means["val_robust_uar"]),
            "folds": folds}


# -- running trials ----------------------------------------------------------------------------


class TrialRunner:
    """Trains and measures one configuration in its own workdir (a trial, or the baseline).

    A run already measured (its ``tune_trial.json`` holds the same flags) is read back;
    an interrupted one resumes where its trainer stopped.
    """

    RECORD = "tune_trial.json"

    def __init__(self, base_lines: Sequence[str], configure: Configure, trainer_for: TrainerFor,
                 objective: Objective, run: TrainedRun, space: Mapping[str, Domain],
                 tb_dir: str, seed: int):
        self.base_lines, self.configure, self.trainer_for = list(base_lines), configure, trainer_for
        self.objective, self.run, self.space = objective, run, dict(space)
        self.tb_dir, self.seed = tb_dir, seed

    def __call__(self, name: str, workdir: str, values: Mapping) -> dict:
        """Runs (or reads back) ``values`` (hyperparameters, plus ``epochs`` for Hyperband)
        in ``workdir``; returns its record."""
        overrides = {n: flag_value(v) for n, v in values.items()}
        path = os.path.join(workdir, self.RECORD)
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
            if record.get("flags") == overrides:
                return record
        lines = override_lines(self.base_lines, overrides)
        os.makedirs(workdir, exist_ok=True)
        write_flagfile(os.path.join(workdir, "flags.txt"), lines)
        cfg = self.configure(lines, workdir)
        start = time.time()
        run_experiment(cfg, self.trainer_for(cfg))
        measured = measure(self.run, workdir, self.objective, seed=self.seed)
        record = {"name": name, "workdir": os.path.abspath(workdir), "flags": overrides,
                  "hyperparameters": dict(values), **measured,
                  "seconds": round(time.time() - start, 1)}
        self.write_summary(name, values, record)
        write_json(path, record)
        return record

    def write_summary(self, name: str, values: Mapping, record: dict) -> None:
        """One run for TensorBoard's hparams dashboard: the values and the metrics."""
        folder = os.path.join(self.tb_dir, name.replace(" ", "_"))
        shutil.rmtree(folder, ignore_errors=True)  # a trial run again replaces its summary
        writer = tf.summary.create_file_writer(folder)
        with writer.as_default(step=0):
            hp_api.hparams(dict(values), trial_id=name)
            for metric in METRICS:
                tf.summary.scalar(f"tune/{metric}", record[metric])
        writer.close()


def write_hparams_config(tb_dir: str, space: Mapping[str, Domain], base: ExperimentConfig,
                         objective: Objective, hyperband: bool) -> None:
    """The hparams dashboard's experiment: the searched hyperparameters and the metrics."""
    os.makedirs(tb_dir, exist_ok=True)
    for name in os.listdir(tb_dir):  # one experiment summary, also after a resume
        if name.startswith("events.out.tfevents"):
            os.remove(os.path.join(tb_dir, name))
    hparams = []
    for name, domain in space.items():
        value = base_value(base, name)
        if domain.choices:
            hparams.append(hp_api.HParam(name, hp_api.Discrete(
                sorted(set(domain.choices) | {value}))))
        else:
            hparams.append(hp_api.HParam(name, hp_api.RealInterval(
                float(min(domain.low, value)), float(max(domain.high, value)))))
    if hyperband:
        hparams.append(hp_api.HParam("epochs", hp_api.IntInterval(1, base.train.epochs)))
    metrics = [hp_api.Metric("tune/objective", display_name=f"objective: "
                             f"{objective.description}"),
               hp_api.Metric("tune/val_uar", display_name="clean validation UAR"),
               hp_api.Metric("tune/val_robust_uar",
                             display_name=f"robust validation UAR ({objective.attack_label})"),
               hp_api.Metric("tune/val_clip_uar",
                             display_name="clean validation UAR on the attacked clips")]
    writer = tf.summary.create_file_writer(tb_dir)
    with writer.as_default():
        hp_api.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()


def trial_values(trial_hparams: Mapping, space: Mapping[str, Domain]) -> dict:
    """A keras-tuner trial's values as ser-train flag values: the searched ones, and
    Hyperband's ``tuner/epochs`` as ``epochs``."""
    values = {n: trial_hparams[n] for n in space if n in trial_hparams}
    if "tuner/epochs" in trial_hparams:
        values["epochs"] = int(trial_hparams["tuner/epochs"])
    return values


def _format_values(values: Mapping) -> str:
    return " ".join(f"{n}={v:.3g}" if isinstance(v, float) else f"{n}={v}"
                    for n, v in values.items())


class SERTuner(keras_tuner.Tuner):
    """A keras-tuner Tuner whose trials are ser-train runs (see the module docstring)."""

    def __init__(self, oracle: keras_tuner.Oracle, runner: TrialRunner, workdir: str):
        self.runner = runner
        self.records: dict[str, dict] = {}
        workdir = os.path.abspath(workdir)
        # The project folder is the workdir itself: trials in W/trial_XX, state in W.
        super().__init__(oracle=oracle, directory=os.path.dirname(workdir),
                         project_name=os.path.basename(workdir), overwrite=False)
        # keras-tuner reloads a project only once its tuner state exists, which it writes
        # when a trial ends: write it now, so that a first trial interrupted is resumed too.
        self.save()

    def run_trial(self, trial, *args, **kwargs) -> dict[str, float]:
        values = trial_values(trial.hyperparameters.values, self.runner.space)
        record = self.runner(f"trial_{trial.trial_id}", self.get_trial_dir(trial.trial_id),
                             values)
        self.records[trial.trial_id] = record
        return {m: float(record[m]) for m in METRICS}

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        done = len(self.oracle.trials)
        cap = self.oracle.max_trials or "-"
        if trial.status != "COMPLETED":
            reason = [ln for ln in (trial.message or "").splitlines() if ln.strip()]
            log.warning("trial %s [%d/%s] failed: %s", trial.trial_id, done, cap,
                        reason[-1] if reason else trial.status)
            return
        r = self.records[trial.trial_id]
        best = best_trial(self.oracle)
        log.info("trial %s [%d/%s]: %s -> val UAR %.3f, robust %.3f, objective %.3f "
                 "(best: trial %s, %.3f)", trial.trial_id, done, cap,
                 _format_values(r["hyperparameters"]), r["val_uar"], r["val_robust_uar"],
                 r["objective"], best.trial_id, best.score)


def best_trial(oracle: keras_tuner.Oracle):
    """The completed trial of the highest score (the earliest of equal ones), or None."""
    done = [oracle.trials[i] for i in oracle.start_order
            if oracle.trials[i].status == "COMPLETED"]
    return max(done, key=lambda t: t.score) if done else None


def make_oracle(tuner: str, space: keras_tuner.HyperParameters, *, max_trials: int,
                max_epochs: int, seed: int, hyperband_factor: int = 3,
                hyperband_iterations: int = 1, initial_points: int = 0) -> keras_tuner.Oracle:
    """keras-tuner's oracle of ``tuner``, maximising the ``objective`` metric.

    Raises:
      ValueError: an unknown tuner, or bad settings.
      ImportError: ``bayesian`` without scipy or scikit-learn (naming the missing ones).
    """
    objective = keras_tuner.Objective("objective", direction="max")
    common = dict(objective=objective, hyperparameters=space, seed=seed,
                  allow_new_entries=False, tune_new_entries=False)
    if tuner not in TUNERS:
        raise ValueError(f"unknown tuner {tuner!r}; choose from {TUNERS}")
    if max_trials < 0 or (max_trials == 0 and tuner != "hyperband"):
        raise ValueError(f"--max_trials must be >= 1 (0 only lifts Hyperband's cap), got "
                         f"{max_trials}")
    if tuner == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=max_trials, **common)
    if tuner == "hyperband":
        if hyperband_factor < 2 or hyperband_iterations < 1:
            raise ValueError("Hyperband needs a factor >= 2 and iterations >= 1")
        oracle = keras_tuner.oracles.HyperbandOracle(
            max_epochs=max_epochs, factor=hyperband_factor,
            hyperband_iterations=hyperband_iterations, **common)
        oracle.max_trials = max_trials or None  # the base Oracle's cap, honoured by every oracle
        return oracle
    missing = [package for module, package in BAYESIAN_REQUIRES.items()
               if not _importable(module)]
    if missing:
        raise ImportError(f"--tuner=bayesian needs {' and '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: "
                          f"pip install -e '.[tune]' (or pip install {' '.join(missing)})")
    if initial_points < 0:
        raise ValueError(f"initial points must be >= 0, got {initial_points}")
    return keras_tuner.oracles.BayesianOptimizationOracle(
        max_trials=max_trials, num_initial_points=initial_points or None, **common)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# -- the search --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """A search (the app fills it from flags).

    Attributes:
      workdir: the search's folder (trials in ``trial_XX/``).
      tuner: ``random``, ``hyperband`` or ``bayesian``.
      objective: what trials are scored on.
      hparams: hyperparameters to search (empty: the defaults that apply).
      space: ``NAME=SPEC`` domain overrides.
      max_trials: trials at most (0: Hyperband's own schedule decides).
      hyperband_factor: Hyperband's reduction factor.
      hyperband_iterations: Hyperband's iterations.
      initial_points: Bayesian optimisation's random trials first (0: keras-tuner's
        default, three per hyperparameter).
      baseline: also train and measure the base configuration (``W/baseline``).
    """

    workdir: str
    tuner: str = "random"
    objective: Objective = Objective()
    hparams: Sequence[str] = ()
    space: Sequence[str] = ()
    max_trials: int = 10
    hyperband_factor: int = 3
    hyperband_iterations: int = 1
    initial_points: int = 0
    baseline: bool = True


class Search:
    """A prepared search: everything checked, nothing trained yet (see :meth:`run`)."""

    def __init__(self, cfg: SearchConfig, base_lines: Sequence[str], configure: Configure,
                 trainer_for: TrainerFor):
        """Checks the settings and the space against ser-train and against a search already
        in ``cfg.workdir``.

        Args:
          cfg: the search.
          base_lines: the base ser-train flags (``--name=value``, no ``--workdir``).
          configure: builds ser-train's configuration from flag lines (the app's).
          trainer_for: the fold trainer of a configuration's training method.

        Raises:
          ValueError: bad settings (naming them), or a different search in the workdir.
          ImportError: the Bayesian tuner's packages are missing.
        """
        self.cfg, self.base_lines, self.configure = cfg, list(base_lines), configure
        self.trainer_for = trainer_for
        self.workdir = os.path.abspath(cfg.workdir)
        self.base = configure(self.base_lines, os.path.join(self.workdir, "baseline"))
        if self.base.val_speakers < 1:
            raise ValueError("ser-tune scores trials on validation speakers: --val_speakers "
                             "must be >= 1")
        if self.base.train.refit:
            raise ValueError("--refit trains the final model on the validation speakers, "
                             "which the objective is measured on; tune without it")
        if self.base.train.speaker_norm:
            raise ValueError("--speaker_norm models need each speaker's statistics as a "
                             "second input, which the robust measurement does not support")
        self.space = build_space(self.base, cfg.hparams, cfg.space)
        check_space(self.space, self.base_lines, configure, self.base.workdir)
        self.hps = keras_tuner_space(self.space, self.base)
        # Built now so that bad tuner settings are errors before anything runs.
        self.make_oracle()
        identity = {"tuner": cfg.tuner, "objective": cfg.objective.to_dict(),
                    "space": {n: d.to_dict() for n, d in self.space.items()},
                    "base_flags": self.base_lines,
                    "hyperband": ([cfg.hyperband_factor, cfg.hyperband_iterations]
                                  if cfg.tuner == "hyperband" else None),
                    "initial_points": cfg.initial_points if cfg.tuner == "bayesian" else None}
        self.identity = json.loads(json.dumps(identity))
        path = os.path.join(self.workdir, "search.json")
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
            changed = sorted(k for k in self.identity if before.get(k) != self.identity[k])
            if changed:
                raise ValueError(f"{self.workdir} holds another search (it differs in: "
                                 f"{', '.join(changed)}); re-run it with the flags it was "
                                 f"started with (its flags.txt) or use a new --workdir")

    def make_oracle(self) -> keras_tuner.Oracle:
        cfg = self.cfg
        # The base --seed; keras-tuner takes a seed of 0 for "unseeded".
        return make_oracle(cfg.tuner, self.hps, max_trials=cfg.max_trials,
                           max_epochs=self.base.train.epochs, seed=self.base.train.seed + 1,
                           hyperband_factor=cfg.hyperband_factor,
                           hyperband_iterations=cfg.hyperband_iterations,
                           initial_points=cfg.initial_points)

    def run(self) -> dict:
        """Runs (or resumes) the search; writes and returns the ``tune.json`` summary.

        Raises:
          ValueError, FileNotFoundError: unusable data (before any trial runs).
          RuntimeError: no trial completed.
        """
        # The corpus and folds, decoded once for every trial's robust measurement.
        run = open_run(self.base, self.base.only_folds)
        os.makedirs(self.workdir, exist_ok=True)
        write_json(os.path.join(self.workdir, "search.json"), self.identity)
        if len(run.selected) > 1:
            log.info("each trial trains %d folds (name one with --fold to tune on it)",
                     len(run.selected))
        tb_dir = os.path.join(self.workdir, "tb")
        write_hparams_config(tb_dir, self.space, self.base, self.cfg.objective,
                             self.cfg.tuner == "hyperband")
        runner = TrialRunner(self.base_lines, self.configure, self.trainer_for,
                             self.cfg.objective, run, self.space, tb_dir, self.base.train.seed)
        log.info("objective: %s, on validation speakers %s", self.cfg.objective.description,
                 "; ".join(f"{f.name}: {','.join(f.val_speakers)}" for f in run.selected))
        baseline = None
        if self.cfg.baseline:
            values = {n: base_value(self.base, n) for n in self.space}
            baseline = runner("baseline", self.base.workdir, values)
            log.info("baseline (the base flags): %s -> val UAR %.3f, robust %.3f, objective "
                     "%.3f", _format_values(values), baseline["val_uar"],
                     baseline["val_robust_uar"], baseline["objective"])
        tuner = SERTuner(self.make_oracle(), runner, self.workdir)
        tuner.search(verbose=0)
        return self.summarize(tuner, run, baseline)

    def summarize(self, tuner: SERTuner, run: TrainedRun, baseline: dict | None) -> dict:
        """``tune.json`` and ``best.flags`` from the oracle's trials."""
        oracle = tuner.oracle
        trials = []
        for trial_id in oracle.start_order:
            trial = oracle.trials[trial_id]
            path = os.path.join(tuner.get_trial_dir(trial_id), TrialRunner.RECORD)
            entry = {"trial_id": trial_id, "status": trial.status,
                     "hyperparameters": trial_values(trial.hyperparameters.values,
                                                     self.space)}
            if trial.status == "COMPLETED" and os.path.exists(path):
                with open(path) as f:
                    record = json.load(f)
                entry.update({k: record[k] for k in (*METRICS, "folds", "seconds",
                                                     "workdir")})
            trials.append(entry)
        completed = [t for t in trials if "objective" in t]
        if not completed:
            raise RuntimeError(f"no trial completed; each trial's error is in "
                               f"{self.workdir}/trial_*/trial.json")
        best_id = best_trial(oracle).trial_id
        best = next(t for t in trials if t["trial_id"] == best_id)
        flagfile = os.path.join(self.workdir, "best.flags")
        lines = override_lines(self.base_lines, {n: flag_value(v)
                                                 for n, v in best["hyperparameters"].items()})
        write_flagfile(flagfile, lines, header=[
            f"ser-tune's best trial: trial {best_id} ({len(completed)} trials completed, "
            f"{self.cfg.tuner} search in {self.workdir}):",
            f"  objective {best['objective']:.4f} = {self.cfg.objective.description}",
            f"  clean validation UAR {best['val_uar']:.4f}, robust "
            f"{best['val_robust_uar']:.4f}",
            f"  tuned: {_format_values(best['hyperparameters'])}",
            "The base flags with the best values; train with:",
            "  ser-train --flagfile=best.flags --workdir=WORKDIR"])
        summary = {
            "tuner": self.cfg.tuner, "objective": self.cfg.objective.to_dict(),
            "corpus": self.base.corpus,
            "synthetic": any(u.corpus == "synthetic" for u in run.decoded.utterances),
            "protocol": self.base.protocol,
            "folds": [{"fold": f.name, "val_speakers": list(f.val_speakers),
                       "test_speakers": list(f.test_speakers)} for f in run.selected],
            "space": {n: d.to_dict() for n, d in self.space.items()},
            "trials": trials, "best": {**best, "flagfile": flagfile},
            "baseline": None if baseline is None else {
                k: baseline[k] for k in ("hyperparameters", *METRICS, "folds", "workdir")},
        }
        write_json(os.path.join(self.workdir, "tune.json"), summary)
        return summary


def write_flagfile(path: str, lines: Sequence[str], header: Sequence[str] = ()) -> str:
    """Writes flag lines as a flagfile (``header`` as ``#`` comments first)."""
    text = "".join(f"# {h}\n" for h in header) + "".join(f"{ln}\n" for ln in lines)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def format_summary(summary: dict) -> str:
    """A short table of the trials (best marked ``*``) and the baseline."""
    names = list(summary["space"])
    if any("epochs" in t["hyperparameters"] for t in summary["trials"]):
        names.append("epochs")
    rows = []
    best_id = summary["best"]["trial_id"]
    entries = [("base", summary["baseline"])] if summary["baseline"] else []
    entries += [(("*" if t["trial_id"] == best_id else " ") + t["trial_id"], t)
                for t in summary["trials"]]
    for label, t in entries:
        values = t["hyperparameters"]
        cells = [label] + [(f"{values[n]:.3g}" if isinstance(values.get(n), float)
                            else str(values.get(n, "-"))) for n in names]
        if "objective" in t:
            cells += [f"{t['val_uar']:.3f}", f"{t['val_robust_uar']:.3f}",
                      f"{t['objective']:.3f}"]
        else:
            cells += ["-", "-", t.get("status", "-").lower()]
        rows.append(cells)
    header = ["trial"] + names + ["val UAR", "robust", "objective"]
    widths = [max(len(str(r[k])) for r in [header] + rows) for k in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header)] + [fmt.format(*r) for r in rows]
    objective = summary["objective"]["description"]
    return "\n".join([f"objective: {objective}", *lines])


__all__ = ["BAYESIAN_REQUIRES", "DEFAULT_HPARAMS", "Domain", "HPARAMS", "HParam",
           "OBJECTIVES", "Objective", "SERTuner", "Search", "SearchConfig", "TUNERS",
           "TrialRunner", "build_space", "flag_value", "format_summary", "make_oracle",
           "measure", "override_lines", "write_flagfile"]
