"""ser-train: train SER models under a speaker-independent protocol.

Examples:
  ser-train --flagfile=configs/synthetic_cnn_lstm.flags --workdir=runs/synthetic
  ser-train --flagfile=configs/emodb_cnn_lstm.flags --data_dir=../shared/data/emodb \\
      --workdir=runs/emodb_loso

Writes into --workdir: checkpoints, TensorBoard logs (tb/), model.keras, metrics.json and
flags.txt (one fold_XX/ workdir per fold with --protocol=loso|kfold). Running the same
command again resumes; a finished run is not redone.
"""

from __future__ import annotations

import logging
import os
import sys

# Quiet TF's C++ start-up chatter unless the user asked for it (set before TF loads).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402  (after the environment default above)

from trainers import common  # noqa: E402

FLAGS = flags.FLAGS

# -- data ----------------------------------------------------------------------------------
flags.DEFINE_enum("corpus", "synthetic", ["emodb", "ravdess", "cremad", "tess", "manifest",
                                          "synthetic"], "Corpus adapter.")
flags.DEFINE_string("data_dir", "", "Corpus folder (manifest: the CSV). Synthetic: where to "
                    "generate it (default WORKDIR/data).")
flags.DEFINE_string("classes", "", "Class set name (emodb7, emodb5, big4, ...) or a comma "
                    "list of emotions; empty: every emotion present.")
flags.DEFINE_string("merge", "", "Merge labels before selection, e.g. calm:neutral.")
flags.DEFINE_enum("on_bad_audio", "skip", ["skip", "fail"],
                  "Bad audio files: skip (log each, count in metrics.json) or fail.")
flags.DEFINE_integer("sample_rate", 16000, "Model sample rate; audio is resampled to it.")
flags.DEFINE_float("trim_db", 30.0, "Trim leading/trailing audio this many dB below the "
                   "peak (negative: no trimming).")
flags.DEFINE_enum("normalize", "peak", ["peak", "rms", "none"], "Level normalisation.")
flags.DEFINE_float("level_db", -1.0, "Normalisation target in dBFS.")
flags.DEFINE_integer("synthetic_speakers", 6, "Speakers of the generated synthetic corpus.")
flags.DEFINE_integer("synthetic_per_class", 6, "Synthetic utterances per speaker and emotion.")
# -- protocol ------------------------------------------------------------------------------
flags.DEFINE_enum("protocol", "speakers", ["loso", "speakers", "kfold"],
                  "Speaker-independent protocol.")
flags.DEFINE_list("test_speakers", [], "Held-out test speakers (--protocol=speakers).")
flags.DEFINE_integer("folds", 5, "Speaker-disjoint folds (--protocol=kfold).")
flags.DEFINE_integer("val_speakers", 2, "Validation speakers per fold (from training "
                     "speakers), for early stopping.")
flags.DEFINE_list("fold", [], "Train only these folds (e.g. fold_03); empty: all.")
# -- model ---------------------------------------------------------------------------------
flags.DEFINE_enum("model", "cnn_lstm", ["cnn_lstm", "cnn", "functionals"],
                  "Model architecture.")
flags.DEFINE_float("segment_s", 3.0, "Model input length in seconds (training crops and "
                   "evaluation windows).")
flags.DEFINE_integer("n_mels", 64, "Mel bands.")
flags.DEFINE_integer("n_mfcc", 0, "0: log-mel features; else the number of MFCCs.")
flags.DEFINE_bool("deltas", False, "Add delta and delta-delta channels.")
flags.DEFINE_float("frame_ms", 25.0, "Analysis window (ms).")
flags.DEFINE_float("hop_ms", 10.0, "Frame hop (ms).")
flags.DEFINE_float("fmin", 20.0, "Lowest mel frequency (Hz).")
flags.DEFINE_bool("per_utterance_norm", False, "Subtract each utterance's own feature mean "
                  "(uses only that utterance: still strict).")
flags.DEFINE_bool("specaugment", True, "SpecAugment masking while training.")
flags.DEFINE_list("conv_filters", ["16", "32", "64"], "Filters per conv block.")
flags.DEFINE_integer("chunk_frames", 32, "CNN-LSTM: frames per time chunk.")
flags.DEFINE_integer("chunk_hop", 16, "CNN-LSTM: hop between chunks (frames).")
flags.DEFINE_integer("chunk_units", 128, "CNN-LSTM: chunk embedding size.")
flags.DEFINE_integer("lstm_units", 64, "CNN-LSTM: LSTM units per direction.")
flags.DEFINE_integer("dense_units", 64, "CNN: hidden dense units.")
flags.DEFINE_float("dropout", 0.3, "Dropout rate.")
flags.DEFINE_bool("statistics", False, "CNN-LSTM: add an utterance-functionals branch "
                  "(mean, std, percentiles, moments, slope of spectral and cepstral "
                  "descriptors) read by the output layer beside the BiLSTM.")
flags.DEFINE_integer("n_cepstra", 20, "Cepstral coefficients of the functionals' descriptors.")
flags.DEFINE_list("descriptors", ["spectrum", "level", "cepstra", "deltas"],
                  "Frame-level descriptors the functionals summarise: spectrum, level, "
                  "cepstra, deltas, delta_deltas, flux.")
flags.DEFINE_float("stats_dropout", 0.5, "Dropout on the standardised functionals.")
# -- training ------------------------------------------------------------------------------
flags.DEFINE_enum("trainer", "standard", ["standard"], "Training method.")
flags.DEFINE_integer("epochs", 40, "Maximum epochs.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW, cosine decay).")
flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
flags.DEFINE_float("warmup_epochs", 1.0, "Linear learning-rate warm-up (epochs).")
flags.DEFINE_integer("patience", 10, "Early stopping patience on validation UAR (0: off).")
flags.DEFINE_bool("class_weighting", True, "Balance the loss by class frequency.")
flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, crops, augmentation).")
flags.DEFINE_float("eval_hop_s", 1.0, "Hop between evaluation windows (s).")
flags.DEFINE_enum("pad_mode", "loop", ["loop", "zero"], "Extend short clips by looping or "
                  "zero padding.")
flags.DEFINE_float("aug_gain_db", 0.0, "Random gain range (+-dB).")
flags.DEFINE_list("aug_noise_snr", [], "Additive white noise SNR range, e.g. 10,30 (dB).")
flags.DEFINE_float("aug_noise_prob", 0.5, "Probability of adding noise.")
flags.DEFINE_float("aug_shift_s", 0.0, "Random circular time shift (s).")
flags.DEFINE_list("aug_speed", [], "Speed-perturbation factors drawn per crop, e.g. "
                  "0.9,1.0,1.1 (empty: off).")
flags.DEFINE_bool("refit", False, "After early stopping, retrain on training + validation "
                  "speakers for the selected number of epochs and report that model.")
flags.DEFINE_bool("speaker_norm", False, "Per-speaker feature normalisation with each "
                  "speaker's own unlabelled audio, test speakers included (NOT strict; "
                  "labelled as such in metrics.json).")
flags.DEFINE_bool("deterministic", True, "TF op determinism (same seed, same numbers).")
# -- output --------------------------------------------------------------------------------
flags.DEFINE_string("workdir", None, "Output folder (created; re-running resumes).")
flags.DEFINE_integer("verbose", -1, "0 quiet, 1 progress bars, 2 a line per epoch; -1: 1 on "
                     "a terminal, else 2.")
flags.mark_flag_as_required("workdir")


def build_config():
    """The typed experiment configuration from the flags."""
    from ser_tf.data.audio import AudioConfig
    from ser_tf.data.pipeline import AugmentConfig
    from ser_tf.models import ModelConfig
    from ser_tf.training.experiment import ExperimentConfig
    from ser_tf.training.standard import TrainConfig

    snr = tuple(float(v) for v in FLAGS.aug_noise_snr)
    if snr and len(snr) != 2:
        raise app.UsageError("--aug_noise_snr takes two values: low,high")
    verbose = FLAGS.verbose if FLAGS.verbose >= 0 else (1 if sys.stderr.isatty() else 2)
    audio = AudioConfig(sample_rate=FLAGS.sample_rate,
                        trim_db=FLAGS.trim_db if FLAGS.trim_db >= 0 else None,
                        normalize=FLAGS.normalize, level_db=FLAGS.level_db)
    model = ModelConfig(name=FLAGS.model, sample_rate=FLAGS.sample_rate,
                        segment_s=FLAGS.segment_s, n_mels=FLAGS.n_mels, n_mfcc=FLAGS.n_mfcc,
                        use_deltas=FLAGS.deltas, frame_ms=FLAGS.frame_ms, hop_ms=FLAGS.hop_ms,
                        fmin=FLAGS.fmin, per_utterance_norm=FLAGS.per_utterance_norm,
                        specaugment=FLAGS.specaugment,
                        conv_filters=tuple(int(f) for f in FLAGS.conv_filters),
                        chunk_frames=FLAGS.chunk_frames, hop_frames=FLAGS.chunk_hop,
                        chunk_units=FLAGS.chunk_units, lstm_units=FLAGS.lstm_units,
                        dense_units=FLAGS.dense_units, dropout=FLAGS.dropout,
                        statistics=FLAGS.statistics, n_cepstra=FLAGS.n_cepstra,
                        descriptors=tuple(FLAGS.descriptors),
                        stats_dropout=FLAGS.stats_dropout)
    augment = AugmentConfig(gain_db=FLAGS.aug_gain_db, noise_snr_db=snr or None,
                            noise_prob=FLAGS.aug_noise_prob, shift_s=FLAGS.aug_shift_s,
                            speed=tuple(float(f) for f in FLAGS.aug_speed))
    train = TrainConfig(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
                        learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay,
                        warmup_epochs=FLAGS.warmup_epochs, patience=FLAGS.patience,
                        class_weighting=FLAGS.class_weighting, seed=FLAGS.seed,
                        eval_hop_s=FLAGS.eval_hop_s, pad_mode=FLAGS.pad_mode, augment=augment,
                        deterministic=FLAGS.deterministic, speaker_norm=FLAGS.speaker_norm,
                        refit=FLAGS.refit)
    return ExperimentConfig(
        workdir=FLAGS.workdir, corpus=FLAGS.corpus, data_dir=FLAGS.data_dir,
        classes=FLAGS.classes, merge=FLAGS.merge, protocol=FLAGS.protocol,
        test_speakers=tuple(FLAGS.test_speakers), folds=FLAGS.folds,
        val_speakers=FLAGS.val_speakers, only_folds=tuple(FLAGS.fold), trainer=FLAGS.trainer,
        on_bad_audio=FLAGS.on_bad_audio, audio=audio, model=model, train=train,
        synthetic_speakers=FLAGS.synthetic_speakers,
        synthetic_per_class=FLAGS.synthetic_per_class, verbose=verbose)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    try:
        cfg = build_config()
    except ValueError as err:
        raise app.UsageError(str(err))
    common.write_flags(cfg.workdir)
    from ser_tf.evaluation.report import format_metrics
    from ser_tf.data.pipeline import BadAudioError
    from ser_tf.training.experiment import run_experiment

    try:
        metrics = run_experiment(cfg)
    except (BadAudioError, ValueError, FileNotFoundError) as err:
        logging.error("%s", err)
        return 1
    label = " [SYNTHETIC corpus]" if metrics.get("synthetic") else ""
    if cfg.train.speaker_norm:
        label += " [PER-SPEAKER normalisation: not strict]"
    print(format_metrics(metrics, f"\n{cfg.corpus}{label}, protocol {cfg.protocol}, "
                                  f"test data:"))
    if metrics["bad_audio"]["count"]:
        print(f"  {metrics['bad_audio']['count']} bad audio file(s) skipped "
              f"(listed in metrics.json)")
    workdir = os.path.abspath(cfg.workdir)
    print(f"\nResults: {workdir}/metrics.json\n"
          f"Model:   {workdir}/{'fold_*/' if cfg.protocol != 'speakers' else ''}model.keras\n"
          f"Curves:  tensorboard --logdir {workdir}")
    return 0


def run():
    """Console-script entry point (``ser-train``)."""
    app.run(main)


if __name__ == "__main__":
    run()
