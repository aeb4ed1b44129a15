"""ser-attack: robustness of a trained model under white-box and black-box attacks.

Examples:
  ser-attack --workdir=runs/synthetic
  ser-attack --workdir=runs/emodb_loso --fold=fold_03 --attacks=fgsm,pgd,mim,cw_l2 \\
      --domains=waveform,features --linf_db=-50,-40,-30 --feature_linf=0.25,0.75,1.25
  ser-attack --workdir=runs/emodb_loso --fold=fold_03 --attacks=pgd --unit=utterance
  ser-attack --workdir=runs/noisy --attacks=pgd --steps=20 --eot=16

Reads the training run's flags.txt, so the test utterances are exactly those of the run's
speaker-independent split, and writes into the workdir (and each attacked fold_XX/):
robustness.json, robustness_accuracy.png and robustness_uar.png (curves against budget,
one line per attack), robustness_by_group.csv (per emotion, gender, speaker, language),
TensorBoard summaries under tb/attack (clean, adversarial and perturbation audio and
features) and a few adversarial WAV files under adversarial/.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from trainers import common  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "A ser-train workdir (its flags.txt names the data and "
                    "split; its model.keras or fold_XX/model.keras are attacked).")
flags.DEFINE_list("fold", [], "Attack only these folds (e.g. fold_03); empty: every fold.")
flags.DEFINE_string("data_dir", "", "Override the run's --data_dir (e.g. when the corpus "
                    "moved).")
flags.DEFINE_list("attacks", ["fgsm", "pgd", "mim"], "Attacks to run. White-box: fgsm, fgm, "
                  "bim, pgd, pgd_l2, mim, cw_l2; score-based: spsa, nes; decision-based: "
                  "hsj, hsj_linf; transfer (substitute trained on the target's labels): "
                  "transfer_fgsm, transfer_pgd, transfer_mim. L-inf attacks sweep --linf_db / "
                  "--feature_linf, L2 ones --snr_db / --feature_l2.")
flags.DEFINE_list("domains", ["waveform"], "waveform (through the frontend) and/or features "
                  "(the classifier on normalised log-mel).")
flags.DEFINE_list("linf_db", ["-50", "-40", "-30"], "Waveform L-inf budgets, dB relative to "
                  "each utterance's peak.")
flags.DEFINE_list("snr_db", ["40", "30", "20"], "Waveform L2 budgets as SNR (dB).")
flags.DEFINE_list("feature_linf", ["0.25", "0.75", "1.25"], "Feature-domain L-inf radii "
                  "(normalised units; the published SER evaluations used 0.25-1.25).")
flags.DEFINE_list("feature_l2", ["5", "10", "20"], "Feature-domain L2 radii.")
flags.DEFINE_integer("steps", 0, "Override the iterations of every iterative attack "
                     "(0: each attack's default).")
flags.DEFINE_integer("restarts", 1, "Independent random starts of the PGD attacks (pgd, "
                     "pgd_l2, transfer_pgd); per example the most successful is kept.")
flags.DEFINE_integer("max_utterances", 0, "Attack at most this many test utterances per "
                     "fold (class-stratified, seeded; 0: all).")
flags.DEFINE_integer("batch_size", 32, "Examples per attack batch.")
flags.DEFINE_integer("seed", 0, "Seed of the subsample and of random starts/sampling.")
flags.DEFINE_integer("examples", 2, "Adversarial examples per run kept as WAV and in "
                     "TensorBoard.")
flags.DEFINE_string("out_dir", "", "Write the reports here instead of into the workdir "
                    "(fold reports into its fold_XX/ folders).")
flags.DEFINE_integer("attacker_clips", 200, "Transfer attacks: clips of the non-test "
                     "speakers the attacker owns and has the target label.")
flags.DEFINE_bool("bpda", False, "Also run every white-box attack with straight-through "
                  "(BPDA) gradients through the model's purifier, as NAME+bpda (models "
                  "trained with --trainer=purifier).")
flags.DEFINE_integer("eot", 1, "Expectation over transformation: white-box attacks follow "
                     "the logits averaged over this many draws of a random model's input "
                     "noise per gradient (models trained with --input_noise_db; 1: one "
                     "draw).")
flags.DEFINE_enum("unit", "clip", ["clip", "utterance"], "What is attacked: clip (each test "
                  "utterance's central --segment_s seconds, one model input) or utterance "
                  "(each test utterance whole, through its logits averaged over all windows, "
                  "as metrics.json evaluates it; the budget is relative to the whole "
                  "utterance; waveform domain only).")
flags.DEFINE_bool("progress", None, "Progress bars (default: on a terminal).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    import tensorflow as tf

    # Each attack and budget is its own compiled function: TF's retracing warnings about
    # that are expected here, not a sign of trouble.
    tf.get_logger().setLevel(logging.ERROR)
    from ser_tf.attacks.runner import JobConfig, Sweep, attack_workdir
    from ser_tf.data.pipeline import BadAudioError
    from ser_tf.evaluation.report import format_robustness

    experiment = common.training_config(FLAGS.workdir, FLAGS.data_dir)
    if FLAGS.steps < 0:
        raise app.UsageError(f"--steps must be at least 0 (0: each attack's default), got "
                             f"{FLAGS.steps}")
    if FLAGS.restarts < 1:
        raise app.UsageError(f"--restarts must be at least 1, got {FLAGS.restarts}")
    overrides = {"restarts": FLAGS.restarts, **({"steps": FLAGS.steps} if FLAGS.steps else {})}
    try:
        sweep = Sweep(attacks=tuple(FLAGS.attacks), domains=tuple(FLAGS.domains),
                      linf_db=common.floats(FLAGS.linf_db, "linf_db"),
                      snr_db=common.floats(FLAGS.snr_db, "snr_db"),
                      feature_linf=common.floats(FLAGS.feature_linf, "feature_linf"),
                      feature_l2=common.floats(FLAGS.feature_l2, "feature_l2"),
                      overrides=overrides,
                      bpda=FLAGS.bpda, eot=FLAGS.eot)
        sweep.runs()  # builds every Budget, which validates its value
        progress = sys.stderr.isatty() if FLAGS.progress is None else FLAGS.progress
        job = JobConfig(sweep=sweep, folds=tuple(FLAGS.fold),
                        max_utterances=FLAGS.max_utterances, batch_size=FLAGS.batch_size,
                        seed=FLAGS.seed, examples=FLAGS.examples, out_dir=FLAGS.out_dir,
                        attacker_clips=FLAGS.attacker_clips, progress=progress,
                        unit=FLAGS.unit)
    except ValueError as err:
        raise app.UsageError(str(err))
    try:
        robustness = attack_workdir(experiment, job)
    except (BadAudioError, ValueError, FileNotFoundError) as err:
        logging.error("%s", err)
        return 1
    label = " [SYNTHETIC corpus]" if robustness.get("synthetic") else ""
    print(format_robustness(robustness, f"\n{experiment.corpus}{label}, protocol "
                                        f"{experiment.protocol}:"))
    workdir = os.path.abspath(FLAGS.out_dir or experiment.workdir)
    print(f"\nResults: {workdir}/robustness.json\n"
          f"Curves:  {workdir}/robustness_accuracy.png, robustness_uar.png\n"
          f"Audio:   {workdir}/{'fold_*/' if experiment.protocol != 'speakers' else ''}"
          f"adversarial/ and tensorboard --logdir {workdir}")
    return 0


def run():
    """Console-script entry point (``ser-attack``)."""
    app.run(main)


if __name__ == "__main__":
    run()
