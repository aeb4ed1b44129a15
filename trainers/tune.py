"""ser-tune: hyperparameter search over ser-train runs (keras-tuner).

Examples:
  ser-tune --flagfile=configs/synthetic_cnn_lstm.flags --workdir=runs/tune_synthetic \\
      --max_trials=8
  ser-tune --flagfile=configs/emodb_cnn_lstm.flags --fold=fold_03 --workdir=runs/tune_emodb \\
      --tuner=hyperband --objective=robust --objective_attack=pgd \\
      --objective_budget=linf_db:-40

Takes every ser-train flag (the base configuration each trial starts from) and its own.
Every trial is a ser-train run of the base flags with the trial's values (in
WORKDIR/trial_XX/, resumable like any training run), scored on the validation speakers of
its folds: clean UAR, UAR under --objective_attack at --objective_budget, or a mix.
Writes into --workdir: tune.json (every trial's values, clean and robust validation UAR
and objective; the best trial; the base configuration's figures), best.flags (for
`ser-train --flagfile=best.flags --workdir=...`), flags.txt and tb/ (TensorBoard's hparams
dashboard: tensorboard --logdir WORKDIR/tb). Running the same command again resumes the
search; a larger --max_trials continues it.
"""

from __future__ import annotations

import logging
import os

# Quiet TF's C++ start-up chatter unless the user asked for it (set before TF loads).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402  (after the environment default above)

from trainers import common, train  # noqa: E402

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines ser-train's flags (the base configuration) and ser-tune's own on ``fv``."""
    train.define_flags(fv)
    flags.DEFINE_enum("tuner", "random", ["random", "hyperband", "bayesian"],
                      "Search algorithm: random search, Hyperband (its trials' --epochs up to "
                      "the base --epochs) or Bayesian optimisation (needs scipy and "
                      "scikit-learn: pip install -e '.[tune]').", flag_values=fv)
    flags.DEFINE_integer("max_trials", 10, "Trials at most (also caps Hyperband; 0 lifts that "
                         "cap and Hyperband runs its brackets to the end). Re-running with a "
                         "larger value continues the search.", flag_values=fv)
    flags.DEFINE_enum("objective", "mix", ["clean", "robust", "mix"],
                      "What trials are scored on, on validation speakers only: clean UAR, "
                      "UAR under --objective_attack at --objective_budget, or (1 - w) clean "
                      "+ w robust with w = --objective_weight.", flag_values=fv)
    flags.DEFINE_string("objective_attack", "pgd", "Attack of the robust UAR: a ser-attack "
                        "name (white-box: fgsm, fgm, bim, pgd, pgd_l2, mim, cw_l2; black-box: "
                        "spsa, nes, hsj, hsj_linf, transfer_*).", flag_values=fv)
    flags.DEFINE_string("objective_budget", "linf_db:-40", "Budget of the robust UAR, "
                        "KIND:VALUE: linf_db or snr_db on waveforms, linf or l2 on features; "
                        "its norm must be the attack's.", flag_values=fv)
    flags.DEFINE_float("objective_weight", 0.5, "--objective=mix: weight of the robust UAR, "
                       "in [0, 1].", flag_values=fv)
    flags.DEFINE_integer("objective_steps", 0, "Iterations of the objective's attack (0: the "
                         "attack's default, e.g. 10 for pgd).", flag_values=fv)
    flags.DEFINE_list("hparams", [], "Hyperparameters to search (ser-train flag names): "
                      "n_mels, log_floor, conv_filters, chunk_units, lstm_units, dense_units, "
                      "dropout, stats_dropout, learning_rate, weight_decay, batch_size, "
                      "adv_budget, adv_ratio. Empty: n_mels, log_floor, conv_filters, "
                      "lstm_units (dense_units for --model=cnn), dropout, learning_rate, "
                      "batch_size, and adv_budget, adv_ratio with adversarial training.",
                      flag_values=fv)
    flags.DEFINE_multi_string("space", [], "A searched hyperparameter's values, NAME=A|B|C "
                              "(choices) or NAME=LOW:HIGH (a numeric range), e.g. "
                              "--space=dropout=0.1:0.4 --space=conv_filters=8,16,32|16,32,64 "
                              "--space=adv_budget=linf_db:-45|linf_db:-40. Repeatable.",
                              flag_values=fv)
    flags.DEFINE_integer("hyperband_factor", 3, "Hyperband's reduction factor.",
                         flag_values=fv)
    flags.DEFINE_integer("hyperband_iterations", 1, "Hyperband's iterations.", flag_values=fv)
    flags.DEFINE_integer("bayesian_initial_points", 0, "Bayesian optimisation: random trials "
                         "before the Gaussian process guides (0: three per hyperparameter).",
                         flag_values=fv)
    flags.DEFINE_bool("baseline", True, "Also train and measure the base configuration "
                      "(WORKDIR/baseline), beside the trials in tune.json.", flag_values=fv)


def base_lines(fv: flags.FlagValues) -> list[str]:
    """The base configuration: every ser-train flag but --workdir and --verbose. A synthetic
    corpus is generated once, in WORKDIR/data, for every trial."""
    from ser_tf.training.tuning import override_lines

    lines = [line for line in common.flag_lines(fv, "workdir")
             if not line.startswith(("--workdir=", "--verbose="))]
    if fv.corpus == "synthetic" and not fv.data_dir:
        lines = override_lines(lines, {"data_dir": os.path.join(
            os.path.abspath(fv.workdir), "data")})
    return lines


def configure(verbose: int):
    """ser-train's configuration from flag lines and a workdir (its trials log at
    ``verbose``)."""
    return lambda lines, workdir: common.experiment_config(lines, workdir, verbose)


def prepare(fv: flags.FlagValues = FLAGS):
    """The checked search of parsed flags ``fv`` (nothing trained yet).

    Raises:
      app.UsageError: bad flags, naming them.
    """
    from ser_tf.attacks.budget import Budget
    from ser_tf.defenses import fold_trainer
    from ser_tf.training.tuning import Objective, Search, SearchConfig

    # Trials are quiet unless --verbose is given: ser-tune logs one line per trial.
    verbose = fv.verbose if fv["verbose"].present else 0
    try:
        objective = Objective(kind=fv.objective, attack=fv.objective_attack,
                              budget=Budget.parse(fv.objective_budget),
                              weight=fv.objective_weight, steps=fv.objective_steps)
        cfg = SearchConfig(workdir=fv.workdir, tuner=fv.tuner, objective=objective,
                           hparams=tuple(fv.hparams), space=tuple(fv.space),
                           max_trials=fv.max_trials, hyperband_factor=fv.hyperband_factor,
                           hyperband_iterations=fv.hyperband_iterations,
                           initial_points=fv.bayesian_initial_points, baseline=fv.baseline)
        return Search(cfg, base_lines(fv), configure(verbose), fold_trainer)
    except (ValueError, ImportError) as err:
        raise app.UsageError(str(err)) from None


def write_flags(fv: flags.FlagValues) -> str:
    """``WORKDIR/flags.txt``: the resolved ser-train and ser-tune flags (reruns the search;
    --verbose is left out, so the trials of a rerun stay quiet unless it is given)."""
    path = os.path.join(fv.workdir, "flags.txt")
    os.makedirs(fv.workdir, exist_ok=True)
    lines = [line for line in common.flag_lines(fv, "workdir") + common.flag_lines(fv, "tuner")
             if not line.startswith("--verbose=")]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    common.setup_strategy(FLAGS)  # before any TF op
    import tensorflow as tf

    # Every trial builds its own model and attack: TF's retracing warnings about that are
    # expected here, not a sign of trouble.
    tf.get_logger().setLevel(logging.ERROR)
    if not FLAGS["verbose"].present:
        # One line per trial: the trials' own progress (corpus, folds, epochs, attacks)
        # shows with --verbose; their warnings (e.g. bad audio) always do.
        logging.getLogger("ser_tf").setLevel(logging.WARNING)
        logging.getLogger("ser_tf.training.tuning").setLevel(logging.INFO)
    search = prepare(FLAGS)
    write_flags(FLAGS)
    from ser_tf.data.pipeline import BadAudioError
    from ser_tf.training.tuning import format_summary

    try:
        summary = search.run()
    except (BadAudioError, ValueError, FileNotFoundError, RuntimeError) as err:
        logging.error("%s", err)
        return 1
    label = " [SYNTHETIC corpus]" if summary["synthetic"] else ""
    folds = ", ".join(f"{f['fold']} (validation speakers {','.join(f['val_speakers'])})"
                      for f in summary["folds"])
    print(f"\n{summary['corpus']}{label}, {summary['tuner']} search, {folds}:")
    print(format_summary(summary))
    workdir = os.path.abspath(FLAGS.workdir)
    print(f"\nBest:    {summary['best']['flagfile']} (ser-train --flagfile=... --workdir=...)\n"
          f"Summary: {workdir}/tune.json\n"
          f"Curves:  tensorboard --logdir {workdir}/tb (hparams dashboard)")
    return 0


def run():
    """Console-script entry point (``ser-tune``)."""
    define_flags(FLAGS)
    app.run(main)


if __name__ == "__main__":
    run()
