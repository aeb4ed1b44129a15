"""ser-export: a trained model as a SavedModel and TFLite files, each checked against it.

Examples:
  ser-export --workdir=runs/synthetic
  ser-export --workdir=runs/emodb_loso --fold=fold_03 --variants=float32,int8

Reads the training run's flags.txt and writes into each exported fold's export/ folder:
savedmodel/, model_<variant>.tflite, serving.json, labels.txt, MODEL_CARD.md and
export_report.json (per artifact: size, argmax agreement and largest probability
difference against the Keras model on the test utterances, accuracy and UAR, accuracy
under adversarial examples crafted on the Keras model, accuracy under a black-box attack
run against the artifact itself, and single-thread latency). Conversions run in child
processes, so a converter crash is reported as an error.
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
                    "split; its model.keras or fold_XX/model.keras are exported).")
flags.DEFINE_list("fold", [], "Export only these folds (e.g. fold_03); empty: every fold.")
flags.DEFINE_string("data_dir", "", "Override the run's --data_dir.")
flags.DEFINE_list("variants", ["float32", "float16", "dynamic", "int8"],
                  "TFLite variants: float32, float16, dynamic (dynamic-range), int8 (full "
                  "integer classifier, float frontend, calibrated on training clips).")
flags.DEFINE_integer("calibration_clips", 200, "Training clips that calibrate int8.")
flags.DEFINE_list("int8_float_layers", [], "Classifier layers the int8 variant also keeps in "
                  "float32, by name (e.g. bilstm), besides the frontend, the normaliser and "
                  "the first conv block.")
flags.DEFINE_string("transfer_attack", "pgd", "White-box L-inf attack crafted on the Keras "
                    "model and replayed on every artifact.")
flags.DEFINE_list("transfer_linf_db", ["-60", "-40"], "Its budgets, dB below each clip's "
                  "peak.")
flags.DEFINE_string("blackbox_attack", "spsa", "Attack run against each artifact itself: "
                    "spsa, nes (score-based), hsj, hsj_linf (decision-based); empty: none.")
flags.DEFINE_float("blackbox_db", None, "Its budget: L-inf dB below the peak (spsa, nes, "
                   "hsj_linf; default -40) or SNR dB (hsj; default 30).")
flags.DEFINE_integer("blackbox_clips", 40, "Test clips the black-box attack runs on.")
flags.DEFINE_integer("max_utterances", 0, "Check at most this many test utterances per fold "
                     "(0: all).")
flags.DEFINE_integer("latency_utterances", 20, "Utterances timed per artifact.")
flags.DEFINE_integer("seed", 0, "Subsample and attack seed.")
flags.DEFINE_bool("strict", False, "Exit with status 2 when an artifact misses a parity "
                  "target (agreement, UAR or robust accuracy against Keras).")
flags.DEFINE_bool("progress", None, "Progress bars (default: on a terminal).")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    from ser_tf.data.pipeline import BadAudioError
    from ser_tf.serving.export import ExportJob, export_workdir, format_report
    from ser_tf.serving.tflite import ConversionError

    experiment = common.training_config(FLAGS.workdir, FLAGS.data_dir)
    progress = sys.stderr.isatty() if FLAGS.progress is None else FLAGS.progress
    try:
        job = ExportJob(folds=tuple(FLAGS.fold), variants=tuple(FLAGS.variants),
                        calibration_clips=FLAGS.calibration_clips,
                        int8_float_layers=tuple(FLAGS.int8_float_layers),
                        transfer_attack=FLAGS.transfer_attack,
                        transfer_linf_db=common.floats(FLAGS.transfer_linf_db,
                                                       "transfer_linf_db"),
                        blackbox_attack=FLAGS.blackbox_attack, blackbox_db=FLAGS.blackbox_db,
                        blackbox_clips=FLAGS.blackbox_clips,
                        max_utterances=FLAGS.max_utterances,
                        latency_utterances=FLAGS.latency_utterances, seed=FLAGS.seed,
                        progress=progress)
    except ValueError as err:
        raise app.UsageError(str(err))
    try:
        report = export_workdir(experiment, job)
    except (BadAudioError, ValueError, FileNotFoundError, ConversionError) as err:
        logging.error("%s", err)
        return 1
    label = " [SYNTHETIC corpus]" if experiment.corpus == "synthetic" else ""
    for fold in report.get("folds", [report]):
        title = (f"\n{experiment.corpus}{label}, {fold.get('fold', '')} (test speakers "
                 f"{','.join(fold['test_speakers'])}):")
        print(format_report(fold, title))
    where = os.path.abspath(experiment.workdir)
    print(f"\nArtifacts and export_report.json: {where}/"
          f"{'fold_*/' if 'folds' in report else ''}export/")
    failed = [c for fold in report.get("folds", [report]) for c in fold["failed_checks"]]
    return 2 if failed and FLAGS.strict else 0


def run():
    """Console-script entry point (``ser-export``)."""
    app.run(main)


if __name__ == "__main__":
    run()
