"""Defended training cost: epoch time of every training method against standard training.

The question the defenses issue asks: what does hardening cost? Each method trains the
same model (the EmoDB CNN-LSTM of ``configs/emodb_cnn_lstm.flags``, same seed, normaliser
adapted on the same crops) on the same ``training_dataset`` (EmoDB files spread over all
speakers and emotions, a fresh random crop per utterance each epoch, batch 16):

* standard: ``model.fit`` as the standard trainer runs it;
* PGD-k (Madry, every example adversarial): k attack steps (each one forward and one
  backward pass to the input) plus the training step, so about ``k + 1`` standard epochs;
* fast: one attack step from a random start (about 2);
* PGD-k + AWP: PGD-k with adversarial weight perturbation, whose ascent on the weights is
  one more forward and backward pass per step (about ``k + 2``);
* TRADES-k: k steps on the KL term, plus one inference pass for the clean prediction and a
  training step on twice the batch (about ``k + 3``);
* GAN-augmented: the training step on the batch plus ``ratio`` generated maps (the
  generator's inference pass is cheap; the GAN's own training is a separate, one-off stage
  and is timed per step alongside).

Every method runs ``epochs`` epochs per round in a rotating order over ``repeats`` rounds
(neighbouring measurements see the same load from other jobs); the first epoch of each fit
traces the step and is not timed. Reported: median seconds per epoch, and the ratio to
standard training next to the pass-count estimate above.
"""

from __future__ import annotations

import statistics
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from bench.attack import model_config
from bench.training import _EpochTimer, _utterances
from ser_tf.attacks.budget import Budget
from ser_tf.data.audio import AudioConfig
from ser_tf.data.pipeline import decode_corpus, training_dataset
from ser_tf.defenses.adversarial import AdversarialConfig, AdversarialSteps
from ser_tf.defenses.gan import ConditionalWGAN, GANAugmentedSteps, GANConfig
from ser_tf.defenses.purifier import PurifierConfig, PurifierGAN
from ser_tf.models import build_model

BUDGET = Budget("linf_db", -40.0)
FLAGFILE = "configs/emodb_cnn_lstm.flags"


def _log(message: str) -> None:
    print(f"[bench.defenses] {message}", file=sys.stderr, flush=True)


def _methods(steps: int) -> dict[str, tuple[AdversarialConfig | GANConfig | None, float]]:
    """Method name -> (its configuration, the pass-count estimate of its cost)."""
    return {
        "standard": (None, 1.0),
        "fast": (AdversarialConfig(method="fast", budget=BUDGET, ratio=1.0,
                                   warmup_epochs=0), 2.0),
        f"PGD-{steps}": (AdversarialConfig(method="pgd", budget=BUDGET, steps=steps,
                                           ratio=1.0, warmup_epochs=0), steps + 1.0),
        f"PGD-{steps} + AWP": (AdversarialConfig(method="pgd", budget=BUDGET, steps=steps,
                                                 ratio=1.0, warmup_epochs=0, awp_gamma=5e-3),
                               steps + 2.0),
        f"TRADES-{steps}": (AdversarialConfig(method="trades", budget=BUDGET, steps=steps,
                                              warmup_epochs=0), steps + 3.0),
        "GAN-augmented": (GANConfig(ratio=0.5), 1.5),
    }


def defenses_report(epochs: int = 5, repeats: int = 2, *, steps: int = 5,
                    max_files: int = 160, batch_size: int = 16, stage_steps: int = 20,
                    seed: int = 0) -> dict:
    """Epoch times of each training method and their ratios to standard training.

    Args:
      epochs: epochs per fit (the first is not timed). Five: now and then an epoch of
        PGD-5 takes about 1 s more than its neighbours (2.5 s against 1.6 s, at varying
        epochs, 2026-11-24); with two timed epochs per fit one such epoch moved the
        median by a quarter.
      repeats: rounds over all methods.
      steps: attack steps of PGD-k and TRADES-k.
      max_files: EmoDB files, spread over speakers and emotions.
      batch_size: batch size.
      stage_steps: steps timed of the one-off GAN and purifier stages.
      seed: weights, crops and attack seed.

    Returns:
      ``{"examples", "batch_size", "steps", "methods": {name: {"epoch_s", "epoch_s_all",
      "ratio", "expected"}}, "stages": {"gan_step_s", "purifier_step_s"}}``.
    """
    if epochs < 2:
        raise ValueError("need epochs >= 2: the first epoch of each fit is not timed")
    config = model_config(FLAGFILE)
    utterances = _utterances(max_files)
    classes = sorted({u.emotion for u in utterances})
    corpus = decode_corpus(utterances, AudioConfig(), progress=False)
    labels = np.array([classes.index(u.emotion) for u in corpus.utterances], np.int32)
    segment = int(round(config.segment_s * corpus.config.sample_rate))
    dataset = training_dataset(corpus, np.arange(len(corpus)), labels,
                               segment_samples=segment, batch_size=batch_size, seed=seed)
    crops = np.concatenate([x.numpy() for x, _ in dataset])
    n = len(crops)
    _log(f"{n} crops of {segment} samples per epoch, batch {batch_size}")

    def build(method):
        keras.utils.set_random_seed(seed)
        model = build_model(config, classes, seed=seed)
        frontend = tf.function(model.frontend)
        model.normalizer.adapt(frontend(crops[i:i + 64]) for i in range(0, n, 64))
        model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        if method is None:
            return model, model
        if isinstance(method, GANConfig):
            shape = model.frontend.compute_output_shape((None, segment))[1:]
            gan = ConditionalWGAN(shape, len(classes), method, seed=seed)
            steps_model = GANAugmentedSteps(model, gan, method)
        else:
            steps_model = AdversarialSteps(model, method)
        steps_model.compile(optimizer=model.optimizer, jit_compile=False)
        return model, steps_model

    methods = _methods(steps)
    timers = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(repeats):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            _, fitter = build(methods[name][0])
            timer = _EpochTimer(name, n)
            fitter.fit(dataset, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False)
            timers[name] += timer.times[1:]
    base = statistics.median(timers["standard"])
    report_methods = {}
    for name, (_, expected) in methods.items():
        median = statistics.median(timers[name])
        report_methods[name] = {"epoch_s": median, "epoch_s_all": timers[name],
                                "examples_per_s": n / median, "ratio": median / base,
                                "expected": expected}
        _log(f"{name}: {median:.2f} s/epoch, {median / base:.2f}x standard "
             f"(estimate {expected:.1f}x)")

    # The one-off stages, per step (after a first, traced step).
    model, _ = build(None)
    shape = model.frontend.compute_output_shape((None, segment))[1:]
    gan = ConditionalWGAN(shape, len(classes), GANConfig(steps=stage_steps + 1), seed=seed)
    maps = dataset.map(lambda x, y: (model.features(x), y)).repeat()
    start = time.perf_counter()
    gan.fit(maps.take(3 * (stage_steps + 1)), progress=False)
    gan_total = time.perf_counter() - start
    purifier = PurifierGAN(model, PurifierConfig(steps=stage_steps + 1,
                                                 batch_size=batch_size), seed=seed)
    start = time.perf_counter()
    purifier.fit(dataset.repeat(), progress=False)
    purifier_total = time.perf_counter() - start
    stages = {"gan_step_s": gan_total / (stage_steps + 1),
              "purifier_step_s": purifier_total / (stage_steps + 1),
              "note": "per step including the first (traced) one"}
    return {"examples": n, "batch_size": batch_size, "steps": steps, "budget": BUDGET.label,
            "epochs": epochs, "repeats": repeats, "model_flagfile": FLAGFILE,
            "methods": report_methods, "stages": stages}


def to_markdown(report: dict) -> str:
    """The report as a Markdown table with a short reading."""
    lines = [
        f"Same model ({report['model_flagfile']}), same data ({report['examples']} random "
        f"EmoDB crops per epoch, batch {report['batch_size']}), budget {report['budget']}; "
        f"median of {report['repeats'] * (report['epochs'] - 1)} timed epochs per method, "
        "methods interleaved.",
        "",
        "| method | s/epoch | examples/s | cost vs standard | pass-count estimate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | {m['epoch_s']:.2f} | {m['examples_per_s']:.0f} | "
                     f"{m['ratio']:.2f}x | {m['expected']:.1f}x |")
    s = report["stages"]
    lines += ["", f"One-off stages: a WGAN-GP generator step (3 critic steps, batch 32) takes "
              f"{s['gan_step_s']:.2f} s; a purifier step (PGD-10 on half a batch of "
              f"{report['batch_size']}, discriminator and purifier updates) "
              f"{s['purifier_step_s']:.2f} s ({s['note']})."]
    return "\n".join(lines)
