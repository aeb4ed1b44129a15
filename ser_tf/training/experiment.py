"""An experiment: corpus -> decoded audio -> protocol folds -> a trainer per fold -> metrics.

:func:`run_experiment` is what ``ser-train`` calls. It lists the corpus (generating the
synthetic one when asked), selects classes, decodes all audio once, builds the
speaker-independent folds and trains each fold in its own workdir (``W`` itself for a
single split, ``W/fold_XX`` for cross-validation). Folds already finished are read back,
so re-running the same command resumes. The top-level ``metrics.json`` holds the test
metrics (a single split) or the mean and std over folds plus metrics pooled over all
folds' predictions.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from ser_tf.data import corpora
from ser_tf.data.audio import AudioConfig
from ser_tf.data.pipeline import decode_corpus
from ser_tf.evaluation.metrics import evaluate_predictions, summarize_folds
from ser_tf.models import ModelConfig
from ser_tf.training import distribute
from ser_tf.training.protocols import make_folds
from ser_tf.training.standard import TrainConfig, train_fold
from ser_tf.workdir import fold_dir, write_json

log = logging.getLogger(__name__)

#: Trains one fold: ``(decoded, labels, classes, fold, model_cfg, train_cfg, workdir,
#: verbose=) -> test metrics`` (see :func:`ser_tf.training.standard.train_fold`).
Trainer = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything ``ser-train`` needs (the app builds it from flags).

    Attributes:
      workdir: output folder.
      corpus: corpus name (see :data:`ser_tf.data.corpora.CORPORA`).
      data_dir: the corpus's folder ("" for synthetic: generated under ``workdir/data``).
      classes: class spec for :func:`ser_tf.data.corpora.resolve_classes`.
      merge: merge spec for :func:`ser_tf.data.corpora.parse_merge`.
      protocol: ``loso``, ``speakers`` or ``kfold``.
      test_speakers: held-out speakers for ``speakers``.
      folds: number of folds for ``kfold``.
      val_speakers: validation speakers per fold.
      only_folds: train only these fold names (empty: all).
      trainer: the training method's name (``standard``, ``adversarial``, ``gan``); the
        fold trainer itself is passed to :func:`run_experiment`
        (:func:`ser_tf.defenses.fold_trainer` maps this configuration to it).
      method: the training method's own configuration (e.g.
        :class:`ser_tf.defenses.adversarial.AdversarialConfig`), None for ``standard``.
      on_bad_audio: ``skip`` or ``fail``.
      audio: audio conditioning.
      model: model configuration.
      train: training configuration.
      synthetic_speakers: speakers of the generated synthetic corpus.
      synthetic_per_class: utterances per speaker and emotion of the synthetic corpus.
      verbose: 0 silent, 1 progress bars, 2 a line per epoch.
    """

    workdir: str
    corpus: str = "synthetic"
    data_dir: str = ""
    classes: str = ""
    merge: str = ""
    protocol: str = "speakers"
    test_speakers: Sequence[str] = ()
    folds: int = 5
    val_speakers: int = 2
    only_folds: Sequence[str] = ()
    trainer: str = "standard"
    method: object = None
    on_bad_audio: str = "skip"
    audio: AudioConfig = AudioConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    synthetic_speakers: int = 6
    synthetic_per_class: int = 6
    verbose: int = 2


def list_utterances(cfg: ExperimentConfig) -> tuple[list[corpora.Utterance], tuple[str, ...]]:
    """The corpus's utterances after class selection (generating synthetic data if needed),
    and the classes in label-index order."""
    if cfg.corpus == "synthetic":
        from ser_tf.data.synthetic import generate_corpus

        data_dir = cfg.data_dir or os.path.join(cfg.workdir, "data")
        utterances = generate_corpus(data_dir, n_speakers=cfg.synthetic_speakers,
                                     utterances_per_speaker=cfg.synthetic_per_class,
                                     sample_rate=cfg.audio.sample_rate, seed=cfg.train.seed)
    else:
        if not cfg.data_dir:
            raise ValueError(f"--data_dir is required for corpus {cfg.corpus!r}")
        utterances = corpora.load_corpus(cfg.corpus, cfg.data_dir)
    classes = corpora.resolve_classes(cfg.classes or None, utterances)
    selected = corpora.select_classes(utterances, classes,
                                      corpora.parse_merge(cfg.merge) or None)
    return selected, classes


@dataclasses.dataclass
class TrainedRun:
    """A finished (or running) experiment opened for reading by the jobs after training.

    Attributes:
      config: the run's configuration (rebuilt from its ``flags.txt``).
      decoded: the corpus, decoded and conditioned as in training.
      labels: label index per decoded utterance.
      classes: class names in label-index order.
      folds: every fold of the run's protocol.
      selected: the folds asked for (all of them when none were named).
    """

    config: ExperimentConfig
    decoded: object
    labels: np.ndarray
    classes: tuple[str, ...]
    folds: list
    selected: list

    def fold_workdir(self, fold, root: str = "") -> str:
        """The fold's folder under ``root`` (default: the run's workdir)."""
        return fold_dir(root or self.config.workdir, fold.name, len(self.folds))

    def model_path(self, fold) -> str:
        """The fold's trained ``model.keras``.

        Raises:
          ValueError: the fold has no trained model yet.
        """
        path = os.path.join(self.fold_workdir(fold), "model.keras")
        if not os.path.exists(path):
            raise ValueError(f"{fold.name}: no trained model at {path} (train it first)")
        return path


def open_run(cfg: ExperimentConfig, fold_names: Sequence[str] = (),
             progress: bool = False) -> TrainedRun:
    """Decodes a trained run's corpus and rebuilds its folds, exactly as training did.

    Args:
      cfg: the run's configuration.
      fold_names: folds to select (e.g. ``fold_03``); empty: every fold.
      progress: show decoding progress.

    Raises:
      ValueError: unknown fold names, or unusable data.
      FileNotFoundError: the data is missing.
    """
    utterances, classes = list_utterances(cfg)
    decoded = decode_corpus(utterances, cfg.audio, on_bad_audio=cfg.on_bad_audio,
                            progress=progress)
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[u.emotion] for u in decoded.utterances], np.int32)
    folds = make_folds(decoded.utterances, cfg.protocol, test_speakers=cfg.test_speakers,
                       folds=cfg.folds, val_speakers=cfg.val_speakers)
    names = [f.name for f in folds]
    unknown = sorted(set(fold_names) - set(names))
    if unknown:
        raise ValueError(f"unknown folds {unknown}; this run has {names}")
    selected = [f for f in folds if not fold_names or f.name in set(fold_names)]
    return TrainedRun(cfg, decoded, labels, tuple(classes), folds, selected)


def run_experiment(cfg: ExperimentConfig, fold_trainer: Trainer = train_fold) -> dict:
    """Runs (or resumes) an experiment and returns its top-level metrics.

    Args:
      cfg: the experiment.
      fold_trainer: trains each fold (default: the standard trainer).

    Raises:
      ValueError: bad protocol arguments, or unusable data.
      ser_tf.data.pipeline.BadAudioError: bad audio with ``on_bad_audio="fail"``.
    """
    if cfg.model.sample_rate != cfg.audio.sample_rate:
        raise ValueError("model and audio sample rates differ")
    distribute.get_strategy(cfg.train.strategy)  # before any other TF work
    os.makedirs(cfg.workdir, exist_ok=True)
    start = time.time()
    utterances, classes = list_utterances(cfg)
    log.info("corpus %s: %s", cfg.corpus, corpora.summarize(utterances))
    decoded = decode_corpus(utterances, cfg.audio, on_bad_audio=cfg.on_bad_audio,
                            progress=cfg.verbose == 1)
    utterances = decoded.utterances
    index = {c: k for k, c in enumerate(classes)}
    labels = np.array([index[u.emotion] for u in utterances], np.int32)
    folds = make_folds(utterances, cfg.protocol, test_speakers=cfg.test_speakers,
                       folds=cfg.folds, val_speakers=cfg.val_speakers)
    # Fold folders depend on the protocol's fold count, not on how many of them run, so
    # that training some folds now and others later (and ser-attack, ser-export) agree.
    n_folds = len(folds)
    if cfg.only_folds:
        unknown = sorted(set(cfg.only_folds) - {f.name for f in folds})
        if unknown:
            raise ValueError(f"unknown folds {unknown}; this protocol has "
                             f"{[f.name for f in folds]}")
        folds = [f for f in folds if f.name in set(cfg.only_folds)]

    fold_metrics, pooled_idx, pooled_pred = [], [], []
    for k, fold in enumerate(folds):
        workdir = fold_dir(cfg.workdir, fold.name, n_folds)
        log.info("fold %d/%d (%s): test speakers %s, validation speakers %s, %d/%d/%d "
                 "utterances", k + 1, len(folds), fold.name, ",".join(fold.test_speakers),
                 ",".join(fold.val_speakers), len(fold.train), len(fold.val), len(fold.test))
        metrics = fold_trainer(decoded, labels, classes, fold, cfg.model, cfg.train, workdir,
                               verbose=cfg.verbose)
        fold_metrics.append(metrics)
        if not distribute.is_chief():
            continue  # the chief pools and writes the results
        with open(os.path.join(workdir, "predictions.csv")) as f:
            pooled_pred += [index[r["predicted"]] for r in csv.DictReader(f)]
        pooled_idx += list(fold.test)
        log.info("fold %s: test UAR %.3f, accuracy %.3f", fold.name, metrics["uar"],
                 metrics["accuracy"])

    if not distribute.is_chief():
        distribute.remove_worker_dirs(cfg.workdir)
        return {"worker": distribute.task_id(), "folds": [m.get("fold") for m in fold_metrics],
                "outputs": "written by the chief"}
    context = {
        "corpus": cfg.corpus,
        "synthetic": any(u.corpus == "synthetic" for u in utterances),
        "protocol": cfg.protocol,
        "trainer": cfg.trainer,
        "strategy": cfg.train.strategy,
        "replicas": distribute.replicas(),
        "model": cfg.model.name,
        "classes": list(classes),
        "n_utterances": len(utterances),
        "speaker_normalization": (
            "PER-SPEAKER: each speaker's features z-normalised with its own unlabelled audio, "
            "test speakers included (not strictly speaker-independent)"
            if cfg.train.speaker_norm else
            "none (strict: nothing learned from test speakers)"),
        "bad_audio": {"count": len(decoded.bad),
                      "files": [{"path": b.path, "reason": b.reason} for b in decoded.bad]},
    }
    if len(folds) == 1:
        result = dict(fold_metrics[0])
    else:
        pooled = evaluate_predictions(labels[pooled_idx], np.array(pooled_pred), classes,
                                      [utterances[i] for i in pooled_idx])
        result = summarize_folds(fold_metrics, pooled)
        # The schema's top-level per-class and per-group figures are the pooled ones.
        for key in ("per_class_recall", "confusion_matrix", "labels", "n", "by_group"):
            result[key] = pooled[key]
    result.update(context)
    result["wall_seconds"] = round(time.time() - start, 1)
    write_json(os.path.join(cfg.workdir, "metrics.json"), result)
    return result
