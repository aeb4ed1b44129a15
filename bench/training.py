"""Training throughput: ``model.fit`` on the ser_tf tf.data path vs in-memory NumPy arrays.

The question a user asks: does feeding the model from ser_tf's pipeline (EmoDB decoded
once with :func:`ser_tf.data.pipeline.decode_corpus` and cached in memory, then
:func:`ser_tf.data.pipeline.training_dataset`: shuffle, a fresh random 3 s crop of every
utterance each epoch, batch, prefetch) cost training speed, compared with the fastest
thing Keras can be given, ``model.fit`` on NumPy arrays already in memory?

Both contenders train the same model (``build_model(ModelConfig(), labels)``, the
default CNN-LSTM with its log-mel frontend inside, built from the same seed, normaliser
adapted on the same crops), with the same batch size, optimizer and loss, on the same
number of 3 s crops per epoch (the NumPy arrays are one epoch of the pipeline's crops,
``[N, 48000]``). Each fit runs ``epochs`` epochs and its first epoch is left out of the
timing (in the very first fit it includes tracing; in later ones it would still carry
fit's start-up). Fits of the two contenders alternate, in a rotating order, and the
median epoch time over all timed epochs is reported as examples per second.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.resample_quality import EMODB_WAV_DIR  # noqa: E402
from ser_tf.data import corpora  # noqa: E402
from ser_tf.data.audio import AudioConfig  # noqa: E402
from ser_tf.data.pipeline import decode_corpus, training_dataset  # noqa: E402
from ser_tf.models import ModelConfig, SERModel, build_model  # noqa: E402

# Minimum ratio (ser_tf path / NumPy arrays) of training examples per second.
TARGET = 0.95
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4  # the trainer's defaults (TrainConfig), without its LR schedule


def _log(message: str) -> None:
    """Progress on stderr, so that a long run visibly moves."""
    print(f"[bench.training] {message}", file=sys.stderr, flush=True)


class _EpochTimer(keras.callbacks.Callback):
    """Records the wall time of every epoch (and prints it, for progress)."""

    def __init__(self, name: str, examples: int):
        super().__init__()
        self.name, self.examples = name, examples
        self.times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        _log(f"  {self.name} epoch {epoch + 1}: {self.times[-1]:.1f} s, "
             f"{self.examples / self.times[-1]:.0f} examples/s")


def _utterances(max_files: int | None) -> list[corpora.Utterance]:
    utterances = corpora.emodb(EMODB_WAV_DIR.parent)
    if max_files is not None and max_files < len(utterances):
        # Evenly spread over the sorted list, so all speakers and emotions stay in.
        keep = np.linspace(0, len(utterances) - 1, max_files).astype(int)
        utterances = [utterances[i] for i in keep]
    return utterances


def _build(classes: Sequence[str], crops: np.ndarray, seed: int) -> SERModel:
    """The default model, normaliser adapted on ``crops``, compiled."""
    keras.utils.set_random_seed(seed)  # identical initial weights for both contenders
    model = build_model(ModelConfig(), classes, seed=seed)
    frontend = tf.function(model.frontend)
    model.normalizer.adapt(frontend(crops[i:i + 64]) for i in range(0, len(crops), 64))
    model.compile(
        optimizer=keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def _pipeline_alone(dataset: tf.data.Dataset, examples: int, epochs: int) -> dict:
    """How fast ``training_dataset`` produces batches with no model consuming them.

    Its CPU time per example, next to the training step's, bounds how much the input
    path can slow training down on shared cores, independently of the noise in the
    epoch timings.
    """
    for _ in dataset:  # warm-up: first iterator, autotuning
        pass
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for _ in dataset:
            pass
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"examples_per_s": epochs * examples / wall,
            "cpu_ms_per_example": 1000 * cpu / (epochs * examples)}


def training_report(epochs: int = 3, repeats: int = 3, *, batch_size: int = 32,
                    max_files: int | None = None, seed: int = 0) -> dict:
    """Training examples per second of the ser_tf tf.data path and of NumPy arrays.

    Each contender trains ``epochs * repeats`` epochs in one continuous run (one epoch
    per ``fit`` call, ``initial_epoch`` advancing), alternating with the other contender
    epoch by epoch; the first epoch of each (tracing) is not timed.

    Args:
      epochs: epochs per round.
      repeats: rounds; ``epochs * repeats - 1`` epochs of each contender are timed.
      batch_size: batch size of both.
      max_files: use at most this many EmoDB files, spread evenly (None: all 535).
      seed: seed for weights, shuffling and crops.

    Returns:
      ``{"examples", "batch_size", "epochs", "repeats", "segment_samples", "params",
      "trainable_params", "decode_s", "methods": {name: {"examples_per_s", "epoch_s",
      "epoch_s_all", "first_epoch_s", "examples_per_s_min", "examples_per_s_max"}},
      "ratio", "paired_ratio", "pipeline_alone", "target", "met"}``; ``ratio`` is
      ser_tf's median examples/s over the NumPy path's, ``paired_ratio`` the median of
      the ratios of epochs run back to back, and ``pipeline_alone`` the rate and CPU
      cost of iterating ``training_dataset`` with no model.

    Raises:
      ValueError: fewer than 2 epochs in all (nothing would be timed).
      FileNotFoundError: EmoDB is missing.
    """
    if epochs * repeats < 2:
        raise ValueError("need epochs * repeats >= 2: the first epoch is not timed")
    utterances = _utterances(max_files)
    classes = sorted({u.emotion for u in utterances})
    _log(f"decoding {len(utterances)} EmoDB files with decode_corpus")
    start = time.perf_counter()
    corpus = decode_corpus(utterances, AudioConfig(), progress=False)
    decode_s = time.perf_counter() - start
    labels = np.array([classes.index(u.emotion) for u in corpus.utterances], np.int32)
    config = ModelConfig()
    segment = int(round(config.segment_s * corpus.config.sample_rate))
    dataset = training_dataset(corpus, np.arange(len(corpus)), labels,
                               segment_samples=segment, batch_size=batch_size, seed=seed)
    # One epoch of the pipeline's own crops: the same number and kind of examples.
    batches = [(x.numpy(), y.numpy()) for x, y in dataset]
    crops = np.concatenate([b[0] for b in batches])
    crop_labels = np.concatenate([b[1] for b in batches])
    n = len(crops)
    _log(f"{n} crops of {segment} samples; building two copies of the model")

    pipeline_alone = _pipeline_alone(dataset, n, epochs=2)
    _log(f"training_dataset alone: {pipeline_alone['examples_per_s']:.0f} examples/s, "
         f"{pipeline_alone['cpu_ms_per_example']:.2f} CPU ms/example")

    models = {"ser_tf tf.data": _build(classes, crops, seed),
              "NumPy arrays": _build(classes, crops, seed)}
    # The dataset shuffles itself (Keras warns if fit is asked to shuffle it).
    fit_args = {"ser_tf tf.data": ((dataset,), {"shuffle": False}),
                "NumPy arrays": ((crops, crop_labels), {"batch_size": batch_size,
                                                        "shuffle": True})}
    names = list(models)
    timers = {name: _EpochTimer(name, n) for name in names}
    total = epochs * repeats
    # One continuous training run per contender, one epoch per fit call, alternating
    # epoch by epoch (the order flips every epoch): neighbouring epochs of the two see
    # the same load from other jobs, which varies over tens of seconds.
    for epoch in range(total):
        order = names if epoch % 2 == 0 else names[::-1]
        for name in order:
            args, kwargs = fit_args[name]
            models[name].fit(*args, initial_epoch=epoch, epochs=epoch + 1, verbose=0,
                             callbacks=[timers[name]], **kwargs)

    methods = {}
    for name in names:
        timed = timers[name].times[1:]  # the first epoch traces the train step
        median = statistics.median(timed)
        rates = sorted(n / t for t in timed)
        methods[name] = {"examples_per_s": n / median, "epoch_s": median,
                         "epoch_s_all": timed, "first_epoch_s": timers[name].times[0],
                         "examples_per_s_min": rates[0], "examples_per_s_max": rates[-1]}
    ours, theirs = (timers[name].times[1:] for name in names)
    paired = [b / a for a, b in zip(ours, theirs)]
    ratio = methods[names[0]]["examples_per_s"] / methods[names[1]]["examples_per_s"]
    model = models[names[0]]
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    report = {"examples": n, "batch_size": batch_size, "epochs": epochs, "repeats": repeats,
              "segment_samples": segment, "classes": len(classes),
              "params": int(model.count_params()), "trainable_params": trainable,
              "model": f"{config.name} ({model.name})", "decode_s": decode_s,
              "methods": methods, "ratio": ratio, "paired_ratio": statistics.median(paired),
              "pipeline_alone": pipeline_alone,
              "target": TARGET, "met": ratio >= TARGET}
    _log(f"ser_tf {methods[names[0]]['examples_per_s']:.0f} examples/s, NumPy "
         f"{methods[names[1]]['examples_per_s']:.0f}: x{ratio:.3f} (target {TARGET})")
    return report


def to_markdown(report: dict) -> str:
    """Renders :func:`training_report`'s result as Markdown."""
    verdict = "**met**" if report["met"] else "**not met**"
    lines = [
        f"Model: `build_model(ModelConfig(), labels)`, the default {report['model']}, "
        f"{report['params']:,} parameters ({report['trainable_params']:,} trainable), "
        f"{report['classes']} classes; AdamW (lr {LEARNING_RATE:g}, weight decay "
        f"{WEIGHT_DECAY:g}), sparse categorical cross-entropy on logits, batch "
        f"{report['batch_size']}, {report['examples']} crops of "
        f"{report['segment_samples']} samples (3 s) per epoch. "
        "**ser_tf tf.data**: EmoDB decoded once by `decode_corpus` (cached in memory, "
        f"{report['decode_s']:.1f} s), `training_dataset` (shuffle, a new random crop per "
        "utterance each epoch, batch, prefetch). **NumPy arrays**: one epoch of those crops "
        f"as `[{report['examples']}, {report['segment_samples']}]` float32 in memory, "
        "`model.fit(x, y, shuffle=True)`.",
        "",
        f"Timing: each contender trains {report['epochs'] * report['repeats']} epochs "
        "(one continuous run, one epoch per `fit` call), alternating with the other "
        "epoch by epoch; the first epoch of each (tracing) is left out; median epoch "
        "time, and the range over the timed epochs.",
        "",
        "| input path | examples/s (median) | range | median epoch s "
        "| first epoch s (tracing) | timed epochs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['examples_per_s']:.0f} "
                     f"| {m['examples_per_s_min']:.0f}-{m['examples_per_s_max']:.0f} "
                     f"| {m['epoch_s']:.2f} | {m['first_epoch_s']:.1f} "
                     f"| {len(m['epoch_s_all'])} |")
    alone = report["pipeline_alone"]
    train_cpu_ms = 1000.0 / report["methods"]["NumPy arrays"]["examples_per_s"]
    lines += ["", f"Ratio ser_tf / NumPy: **{report['ratio']:.3f}** (median of the "
              f"ratios of back-to-back epochs {report['paired_ratio']:.3f}); target >= "
              f"{report['target']:g}: {verdict}.",
              "",
              f"The input path alone (iterating `training_dataset`, no model): "
              f"{alone['examples_per_s']:.0f} examples/s, {alone['cpu_ms_per_example']:.2f} "
              f"CPU ms per example, against about {train_cpu_ms:.0f} ms of wall time per "
              "example for the training step: even fully serialised with the step, the "
              "input path would cost training about "
              f"{100 * alone['cpu_ms_per_example'] / train_cpu_ms:.1f}% (its CPU time as a "
              "share of the step's wall time), whatever the noise in the epoch timings."]
    return "\n".join(lines)
