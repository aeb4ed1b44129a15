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


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines ser-train's flags on ``fv`` (other apps parse a run's flags.txt with them)."""
    # -- data ----------------------------------------------------------------------------------
    flags.DEFINE_enum("corpus", "synthetic", ["emodb", "ravdess", "cremad", "tess", "manifest",
                                              "synthetic"], "Corpus adapter.", flag_values=fv)
    flags.DEFINE_string("data_dir", "", "Corpus folder (manifest: the CSV). Synthetic: where to "
                        "generate it (default WORKDIR/data).", flag_values=fv)
    flags.DEFINE_string("classes", "", "Class set name (emodb7, emodb5, big4, ...) or a comma "
                        "list of emotions; empty: every emotion present.", flag_values=fv)
    flags.DEFINE_string("merge", "", "Merge labels before selection, e.g. calm:neutral.",
                        flag_values=fv)
    flags.DEFINE_enum("on_bad_audio", "skip", ["skip", "fail"],
                      "Bad audio files: skip (log each, count in metrics.json) or fail.",
                      flag_values=fv)
    flags.DEFINE_integer("sample_rate", 16000, "Model sample rate; audio is resampled to it.",
                         flag_values=fv)
    flags.DEFINE_float("trim_db", 30.0, "Trim leading/trailing audio this many dB below the "
                       "peak (negative: no trimming).", flag_values=fv)
    flags.DEFINE_enum("normalize", "peak", ["peak", "rms", "none"], "Level normalisation.",
                      flag_values=fv)
    flags.DEFINE_float("level_db", -1.0, "Normalisation target in dBFS.", flag_values=fv)
    flags.DEFINE_integer("synthetic_speakers", 6, "Speakers of the generated synthetic corpus.",
                         flag_values=fv)
    flags.DEFINE_integer("synthetic_per_class", 6, "Synthetic utterances per speaker and emotion.",
                         flag_values=fv)
    # -- protocol ------------------------------------------------------------------------------
    flags.DEFINE_enum("protocol", "speakers", ["loso", "speakers", "kfold"],
                      "Speaker-independent protocol.", flag_values=fv)
    flags.DEFINE_list("test_speakers", [], "Held-out test speakers (--protocol=speakers).",
                      flag_values=fv)
    flags.DEFINE_integer("folds", 5, "Speaker-disjoint folds (--protocol=kfold).", flag_values=fv)
    flags.DEFINE_integer("val_speakers", 2, "Validation speakers per fold (from training "
                         "speakers), for early stopping.", flag_values=fv)
    flags.DEFINE_list("fold", [], "Train only these folds (e.g. fold_03); empty: all.",
                      flag_values=fv)
    # -- model ---------------------------------------------------------------------------------
    flags.DEFINE_enum("model", "cnn_lstm", ["cnn_lstm", "cnn", "functionals"],
                      "Model architecture.", flag_values=fv)
    flags.DEFINE_float("segment_s", 3.0, "Model input length in seconds (training crops and "
                       "evaluation windows).", flag_values=fv)
    flags.DEFINE_integer("n_mels", 64, "Mel bands.", flag_values=fv)
    flags.DEFINE_integer("n_mfcc", 0, "0: log-mel features; else the number of MFCCs.",
                         flag_values=fv)
    flags.DEFINE_bool("deltas", False, "Add delta and delta-delta channels.", flag_values=fv)
    flags.DEFINE_float("frame_ms", 25.0, "Analysis window (ms).", flag_values=fv)
    flags.DEFINE_float("hop_ms", 10.0, "Frame hop (ms).", flag_values=fv)
    flags.DEFINE_float("fmin", 20.0, "Lowest mel frequency (Hz).", flag_values=fv)
    flags.DEFINE_float("log_floor", 1e-6, "Added to the mel power before the log; larger "
                       "floors flatten quiet frames (less sensitive to low-level "
                       "adversarial noise).", flag_values=fv)
    flags.DEFINE_bool("per_utterance_norm", False, "Subtract each utterance's own feature mean "
                      "(uses only that utterance: still strict).", flag_values=fv)
    flags.DEFINE_bool("specaugment", True, "SpecAugment masking while training.", flag_values=fv)
    flags.DEFINE_float("input_noise_db", 0.0, "Randomized input defense: Gaussian noise at "
                       "this level (dB below each waveform's peak, e.g. -34) added before "
                       "the frontend in training and at inference; 0: none. Judge such "
                       "models with ser-attack --eot.", flag_values=fv)
    flags.DEFINE_integer("noise_draws", 1, "Noise draws whose logits a model with "
                         "--input_noise_db averages per prediction.", flag_values=fv)
    flags.DEFINE_list("conv_filters", ["16", "32", "64"], "Filters per conv block.", flag_values=fv)
    flags.DEFINE_integer("chunk_frames", 32, "CNN-LSTM: frames per time chunk.", flag_values=fv)
    flags.DEFINE_integer("chunk_hop", 16, "CNN-LSTM: hop between chunks (frames).", flag_values=fv)
    flags.DEFINE_integer("chunk_units", 128, "CNN-LSTM: chunk embedding size.", flag_values=fv)
    flags.DEFINE_integer("lstm_units", 64, "CNN-LSTM: LSTM units per direction.", flag_values=fv)
    flags.DEFINE_integer("dense_units", 64, "CNN: hidden dense units.", flag_values=fv)
    flags.DEFINE_float("dropout", 0.3, "Dropout rate.", flag_values=fv)
    flags.DEFINE_bool("statistics", False, "CNN-LSTM: add an utterance-functionals branch "
                      "(mean, std, percentiles, moments, slope of spectral and cepstral "
                      "descriptors) read by the output layer beside the BiLSTM.", flag_values=fv)
    flags.DEFINE_integer("n_cepstra", 20, "Cepstral coefficients of the functionals' descriptors.",
                         flag_values=fv)
    flags.DEFINE_list("descriptors", ["spectrum", "level", "cepstra", "deltas"],
                      "Frame-level descriptors the functionals summarise: spectrum, level, "
                      "cepstra, deltas, delta_deltas, flux.", flag_values=fv)
    flags.DEFINE_float("stats_dropout", 0.5, "Dropout on the standardised functionals.",
                       flag_values=fv)
    # -- training ------------------------------------------------------------------------------
    flags.DEFINE_enum("trainer", "standard",
                      ["standard", "adversarial", "gan", "purifier", "convex", "distill"],
                      "Training method: standard; adversarial (--adv_* flags); gan: "
                      "GAN-augmented (--gan_* flags); purifier: standard, then a GAN "
                      "purifier in front of the classifier (--purifier_* flags); convex: "
                      "--model=functionals' linear head fitted as L2-regularised softmax "
                      "regression along a path of --convex_c values (no gradient epochs); "
                      "distill: standard, plus a trained teacher run's soft labels "
                      "(--distill_* flags).",
                      flag_values=fv)
    flags.DEFINE_integer("epochs", 40, "Maximum epochs.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Batch size.", flag_values=fv)
    flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW, cosine decay).",
                       flag_values=fv)
    flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.", flag_values=fv)
    flags.DEFINE_float("ema", 0.0, "Momentum of a moving average of the weights, updated every "
                       "step, that validation, model selection and the saved model use "
                       "(0: off; e.g. 0.99).", flag_values=fv)
    flags.DEFINE_float("warmup_epochs", 1.0, "Linear learning-rate warm-up (epochs).",
                       flag_values=fv)
    flags.DEFINE_integer("patience", 10, "Early stopping patience on validation UAR (0: off).",
                         flag_values=fv)
    flags.DEFINE_float("mixup", 0.0, "Mixup alpha (standard training): every training "
                       "waveform is blended with another of its batch, the weights drawn "
                       "from Beta(alpha, alpha), and so are the two labels' losses (0: off; "
                       "e.g. 0.4).", flag_values=fv)
    flags.DEFINE_bool("class_weighting", True, "Balance the loss by class frequency.",
                      flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, crops, augmentation).",
                         flag_values=fv)
    flags.DEFINE_float("eval_hop_s", 1.0, "Hop between evaluation windows (s).", flag_values=fv)
    flags.DEFINE_enum("pad_mode", "loop", ["loop", "zero"], "Extend short clips by looping or "
                      "zero padding.", flag_values=fv)
    flags.DEFINE_bool("eval_whole", False, "Evaluate each utterance whole, at its own length, "
                      "instead of averaging fixed windows' logits (length-free models such as "
                      "--model=functionals; --trainer=convex also fits on whole utterances).",
                      flag_values=fv)
    flags.DEFINE_float("aug_gain_db", 0.0, "Random gain range (+-dB).", flag_values=fv)
    flags.DEFINE_list("aug_noise_snr", [], "Additive white noise SNR range, e.g. 10,30 (dB).",
                      flag_values=fv)
    flags.DEFINE_float("aug_noise_prob", 0.5, "Probability of adding noise.", flag_values=fv)
    flags.DEFINE_float("aug_shift_s", 0.0, "Random circular time shift (s).", flag_values=fv)
    flags.DEFINE_list("aug_speed", [], "Speed-perturbation factors drawn per crop, e.g. "
                      "0.9,1.0,1.1 (empty: off).", flag_values=fv)
    flags.DEFINE_bool("refit", False, "After early stopping, retrain on training + validation "
                      "speakers for the selected number of epochs and report that model.",
                      flag_values=fv)
    flags.DEFINE_bool("speaker_norm", False, "Per-speaker feature normalisation with each "
                      "speaker's own unlabelled audio, test speakers included (NOT strict; "
                      "labelled as such in metrics.json).", flag_values=fv)
    flags.DEFINE_bool("deterministic", True, "TF op determinism (same seed, same numbers).",
                      flag_values=fv)
    # -- distribution ----------------------------------------------------------------------
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"],
                      "tf.distribute strategy: default (one device); mirrored (this machine's "
                      "GPUs, else its --cpu_devices); multiworker (the workers in TF_CONFIG). "
                      "--batch_size is the global batch.", flag_values=fv)
    flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical devices "
                         "(0: as TensorFlow finds it), e.g. to run --strategy=mirrored on a "
                         "machine without GPUs.", flag_values=fv)
    # -- adversarial training (--trainer=adversarial) ---------------------------------------
    flags.DEFINE_enum("adv_method", "pgd", ["pgd", "fast", "trades"], "pgd: Madry PGD-k; fast: "
                      "FGSM with a random start (Wong et al.); trades: TRADES.", flag_values=fv)
    flags.DEFINE_enum("adv_domain", "waveform", ["waveform", "features"], "Craft training "
                      "examples on the waveform (through the frontend) or on the normalised "
                      "features.", flag_values=fv)
    flags.DEFINE_string("adv_budget", "linf_db:-40", "Training budget KIND:VALUE: linf_db (dB "
                        "below each crop's peak) or snr_db for waveforms, linf or l2 for "
                        "features.", flag_values=fv)
    flags.DEFINE_integer("adv_steps", 10, "Attack steps of pgd and of TRADES' inner "
                         "maximisation.", flag_values=fv)
    flags.DEFINE_float("adv_step_size", 0.0, "Step as a fraction of the radius (0: 2.5/steps; "
                       "fast: 1.25).", flag_values=fv)
    flags.DEFINE_float("adv_ratio", 0.6, "Share of each batch replaced by adversarial examples "
                       "(pgd, fast).", flag_values=fv)
    flags.DEFINE_float("trades_beta", 6.0, "TRADES: weight of the robustness (KL) term.",
                       flag_values=fv)
    flags.DEFINE_integer("adv_warmup_epochs", 5, "Epochs over which the budget's radius grows "
                         "linearly to its full size.", flag_values=fv)
    flags.DEFINE_float("robust_weight", 0.5, "Model selection: weight of the robust validation "
                       "UAR (PGD at the training budget) against the clean one.",
                       flag_values=fv)
    flags.DEFINE_integer("adv_val_steps", 10, "PGD steps of the per-epoch validation attack.",
                         flag_values=fv)
    flags.DEFINE_integer("adv_val_eot", 4, "On a random model (--input_noise_db), the "
                         "validation attack follows the logits averaged over this many noise "
                         "draws (EOT), as ser-attack --eot does; each draw costs one more "
                         "pass per step. Ignored on deterministic models.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("adv_awp", 0.0, "Adversarial weight perturbation (Wu et al. 2020): "
                       "each step also perturbs the kernels by this fraction of their norm "
                       "along the loss gradient and takes the update's gradient there (0: "
                       "none; 5e-3 in the paper). One more pass per step; one replica.",
                       flag_values=fv)
    # -- GAN-augmented training (--trainer=gan) ---------------------------------------------
    flags.DEFINE_integer("gan_steps", 2000, "Generator updates of the conditional WGAN-GP.",
                         flag_values=fv)
    flags.DEFINE_integer("gan_critic_steps", 3, "Critic updates per generator update.",
                         flag_values=fv)
    flags.DEFINE_integer("gan_latent_dim", 64, "Generator noise dimensions.", flag_values=fv)
    flags.DEFINE_integer("gan_width", 32, "GAN conv width.", flag_values=fv)
    flags.DEFINE_integer("gan_batch_size", 32, "Real feature maps per critic step.",
                         flag_values=fv)
    flags.DEFINE_float("gan_learning_rate", 2e-4, "GAN Adam learning rate.", flag_values=fv)
    flags.DEFINE_float("gan_ratio", 0.5, "Generated feature maps per real crop in classifier "
                       "training.", flag_values=fv)
    flags.DEFINE_bool("gan_adversarial", False, "Also mix adversarial examples into each real "
                      "batch, as --trainer=adversarial does (--adv_* flags; pgd or fast).",
                      flag_values=fv)
    # -- GAN purifier defense (--trainer=purifier) ------------------------------------------
    flags.DEFINE_integer("purifier_steps", 1500, "Purifier updates.", flag_values=fv)
    flags.DEFINE_integer("purifier_width", 32, "Purifier and discriminator conv width.",
                         flag_values=fv)
    flags.DEFINE_integer("purifier_batch_size", 32, "Training crops per purifier step.",
                         flag_values=fv)
    flags.DEFINE_list("purifier_budgets", ["linf_db:-50", "linf_db:-40", "linf_db:-30"],
                      "Waveform budgets of the purifier's adversarial training inputs "
                      "(cycled).", flag_values=fv)
    flags.DEFINE_integer("purifier_attack_steps", 10, "PGD steps crafting them.",
                         flag_values=fv)
    flags.DEFINE_float("purifier_clean_share", 0.5, "Share of each purifier batch left clean.",
                       flag_values=fv)
    flags.DEFINE_float("purifier_rec_weight", 10.0, "Weight of the L1 reconstruction term.",
                       flag_values=fv)
    flags.DEFINE_float("purifier_gan_weight", 1.0, "Weight of the least-squares GAN term.",
                       flag_values=fv)
    flags.DEFINE_float("purifier_cls_weight", 1.0, "Weight of the frozen classifier's "
                       "cross-entropy on purified features (0: off).", flag_values=fv)
    flags.DEFINE_string("purifier_classifier_from", "", "Workdir of a trained run (same "
                        "model flags and split) whose classifiers the purifiers are put in "
                        "front of, instead of training them first (empty: train).",
                        flag_values=fv)
    # -- convex head fit (--trainer=convex) ------------------------------------------------
    flags.DEFINE_list("convex_c", ["0.001", "0.003", "0.01", "0.03", "0.1", "0.3", "1"],
                      "Inverse L2 strengths C of the regularisation path, increasing; each "
                      "point is validated and selected on as an epoch is.", flag_values=fv)
    flags.DEFINE_integer("convex_max_iterations", 5000, "L-BFGS iterations per point.",
                         flag_values=fv)
    # -- distillation (--trainer=distill) ---------------------------------------------------
    flags.DEFINE_string("distill_teacher", "", "Workdir of the teacher: a trained ser-train "
                        "run of the same protocol and classes (each fold learns from the "
                        "teacher's fold with the same test speakers).", flag_values=fv)
    flags.DEFINE_float("distill_weight", 0.5, "Share of the loss that is the KL divergence "
                       "from the teacher's predictions (0 to 1).", flag_values=fv)
    flags.DEFINE_float("distill_temperature", 2.0, "Softmax temperature of both models in the "
                       "distillation term.", flag_values=fv)
    # -- output --------------------------------------------------------------------------------
    flags.DEFINE_string("workdir", None, "Output folder (created; re-running resumes).",
                        flag_values=fv)
    flags.DEFINE_integer("verbose", -1, "0 quiet, 1 progress bars, 2 a line per epoch; -1: 1 on "
                         "a terminal, else 2.", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


def build_config(fv: flags.FlagValues = FLAGS):
    """The typed experiment configuration from parsed ser-train flags ``fv``."""
    from ser_tf.data.audio import AudioConfig
    from ser_tf.data.pipeline import AugmentConfig
    from ser_tf.models import ModelConfig
    from ser_tf.training.experiment import ExperimentConfig
    from ser_tf.training.standard import TrainConfig

    snr = tuple(float(v) for v in fv.aug_noise_snr)
    if snr and len(snr) != 2:
        raise app.UsageError("--aug_noise_snr takes two values: low,high")
    verbose = fv.verbose if fv.verbose >= 0 else (1 if sys.stderr.isatty() else 2)
    audio = AudioConfig(sample_rate=fv.sample_rate,
                        trim_db=fv.trim_db if fv.trim_db >= 0 else None,
                        normalize=fv.normalize, level_db=fv.level_db)
    model = ModelConfig(name=fv.model, sample_rate=fv.sample_rate,
                        segment_s=fv.segment_s, n_mels=fv.n_mels, n_mfcc=fv.n_mfcc,
                        use_deltas=fv.deltas, frame_ms=fv.frame_ms, hop_ms=fv.hop_ms,
                        fmin=fv.fmin, per_utterance_norm=fv.per_utterance_norm,
                        log_floor=fv.log_floor,
                        specaugment=fv.specaugment, input_noise_db=fv.input_noise_db,
                        noise_draws=fv.noise_draws,
                        conv_filters=tuple(int(f) for f in fv.conv_filters),
                        chunk_frames=fv.chunk_frames, hop_frames=fv.chunk_hop,
                        chunk_units=fv.chunk_units, lstm_units=fv.lstm_units,
                        dense_units=fv.dense_units, dropout=fv.dropout,
                        statistics=fv.statistics, n_cepstra=fv.n_cepstra,
                        descriptors=tuple(fv.descriptors),
                        stats_dropout=fv.stats_dropout)
    augment = AugmentConfig(gain_db=fv.aug_gain_db, noise_snr_db=snr or None,
                            noise_prob=fv.aug_noise_prob, shift_s=fv.aug_shift_s,
                            speed=tuple(float(f) for f in fv.aug_speed))
    train = TrainConfig(epochs=fv.epochs, batch_size=fv.batch_size,
                        learning_rate=fv.learning_rate, weight_decay=fv.weight_decay,
                        warmup_epochs=fv.warmup_epochs, ema=fv.ema, patience=fv.patience,
                        class_weighting=fv.class_weighting, seed=fv.seed,
                        eval_hop_s=fv.eval_hop_s, pad_mode=fv.pad_mode,
                        eval_whole=fv.eval_whole, augment=augment,
                        deterministic=fv.deterministic, speaker_norm=fv.speaker_norm,
                        refit=fv.refit, strategy=fv.strategy, mixup=fv.mixup)
    method = _method_config(fv)
    return ExperimentConfig(
        workdir=fv.workdir, corpus=fv.corpus, data_dir=fv.data_dir,
        classes=fv.classes, merge=fv.merge, protocol=fv.protocol,
        test_speakers=tuple(fv.test_speakers), folds=fv.folds,
        val_speakers=fv.val_speakers, only_folds=tuple(fv.fold), trainer=fv.trainer,
        method=method,
        on_bad_audio=fv.on_bad_audio, audio=audio, model=model, train=train,
        synthetic_speakers=fv.synthetic_speakers,
        synthetic_per_class=fv.synthetic_per_class, verbose=verbose)


def _method_config(fv: flags.FlagValues):
    """The training method's own configuration from its flags (None for standard)."""
    from ser_tf.attacks.budget import Budget
    from ser_tf.defenses import (AdversarialConfig, ConvexConfig, DistillConfig, GANConfig,
                                 PurifierConfig)

    def adversarial():
        return AdversarialConfig(
            method=fv.adv_method, domain=fv.adv_domain, budget=Budget.parse(fv.adv_budget),
            steps=fv.adv_steps, step_size=fv.adv_step_size or None, ratio=fv.adv_ratio,
            trades_beta=fv.trades_beta, warmup_epochs=fv.adv_warmup_epochs,
            robust_weight=fv.robust_weight, val_steps=fv.adv_val_steps,
            val_eot=fv.adv_val_eot, awp_gamma=fv.adv_awp)

    if fv.trainer == "adversarial":
        return adversarial()
    if fv.trainer == "gan":
        return GANConfig(latent_dim=fv.gan_latent_dim, width=fv.gan_width, steps=fv.gan_steps,
                         critic_steps=fv.gan_critic_steps, batch_size=fv.gan_batch_size,
                         learning_rate=fv.gan_learning_rate, ratio=fv.gan_ratio,
                         adversarial=adversarial() if fv.gan_adversarial else None)
    if fv.trainer == "convex":
        try:
            c_values = tuple(float(c) for c in fv.convex_c)
        except ValueError:
            raise ValueError(f"--convex_c must be numbers, got {fv.convex_c}")
        return ConvexConfig(c_values=c_values, max_iterations=fv.convex_max_iterations)
    if fv.trainer == "distill":
        return DistillConfig(teacher_dir=fv.distill_teacher, weight=fv.distill_weight,
                             temperature=fv.distill_temperature)
    if fv.trainer == "purifier":
        return PurifierConfig(
            width=fv.purifier_width, steps=fv.purifier_steps,
            batch_size=fv.purifier_batch_size,
            budgets=tuple(Budget.parse(b) for b in fv.purifier_budgets),
            attack_steps=fv.purifier_attack_steps, clean_share=fv.purifier_clean_share,
            reconstruction_weight=fv.purifier_rec_weight,
            adversarial_weight=fv.purifier_gan_weight,
            classification_weight=fv.purifier_cls_weight,
            classifier_from=fv.purifier_classifier_from)
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.setup_logging()
    try:
        cfg = build_config()
    except ValueError as err:
        raise app.UsageError(str(err))
    common.setup_strategy(FLAGS)  # before any TF op
    from ser_tf.training import distribute

    if distribute.is_chief():
        common.write_flags(cfg.workdir)
    import tensorflow as tf

    from ser_tf.data.pipeline import BadAudioError
    from ser_tf.defenses import fold_trainer
    from ser_tf.evaluation.report import format_metrics
    from ser_tf.training.experiment import run_experiment

    try:
        metrics = run_experiment(cfg, fold_trainer(cfg))
    except (BadAudioError, ValueError, FileNotFoundError) as err:
        logging.error("%s", err)
        return 1
    except tf.errors.UnavailableError as err:
        # Multi-worker training: a peer died (its collectives were aborted).
        logging.error("a worker of the cluster was lost (%s); restart every worker with the "
                      "same command: training resumes from the chief's last finished epoch",
                      str(err).splitlines()[0][:300])
        return 1
    if not distribute.is_chief():
        print(f"worker {distribute.task_id()}: done; the chief wrote the results")
        return 0
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
    define_flags(FLAGS)
    app.run(main)


if __name__ == "__main__":
    run()
