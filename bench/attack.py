"""Attack throughput: ser_tf's PGD-10 against IBM ART's and against the model's own bound.

The question: how many examples per second does a 10-step L-inf PGD on waveforms reach,
and how close is that to the best any implementation could do on this model?

* **ser_tf**: :func:`ser_tf.attacks.whitebox.pgd` (CleverHans' PGD in the budget's scaled
  space), random start, 10 steps, inside one ``tf.function``, as ``ser-attack`` runs it
  (on a CPU, each batch as two concurrent halves,
  :func:`ser_tf.attacks.whitebox.concurrent_halves`).
* **ART**: ``ProjectedGradientDescent`` of the Adversarial Robustness Toolbox (the
  ``bench`` extra) through ``TensorFlowV2Classifier`` on the same Keras model, the same
  inputs, the same budget (-30 dB below the peak; the clips are peak-normalised, so one
  absolute epsilon is that budget), 10 steps, one random start.
* **bound**: one forward and backward pass to the input (the loss gradient PGD needs at
  every step), compiled, timed alone; 10 of them are the least work a PGD-10 can do, so
  ``rate / 10`` bounds any PGD-10 on this model that takes its gradients one batch at a
  time. The **split-batch bound** is the same pass over the two halves of the batch side
  by side, as ser_tf's attacks take it on a CPU: the bound for a PGD-10 that does that.

Pushing the bound itself means making the model's own gradient cheaper. Two ways are
measured: the model's own optimisations (the written-out gradients of the frontend,
:class:`ser_tf.frontend.LogMelGradient` and :func:`ser_tf.frontend.blocked_matmul`, and of
the first conv, :func:`ser_tf.models.layers.conv2d_same`; the BatchNorms folded into the
convs at inference and the relus moved after the pools,
:func:`ser_tf.models.layers.folded_stack`), against the "unoptimised"
rows, which trace the same model with TensorFlow's own gradients
(:func:`ser_tf.frontend.automatic_gradients`) and its conv stack called layer by layer
(:func:`ser_tf.models.layers.unfolded_batchnorm`), ART's included (its eager calls read the
same switches on every call), so the two attack implementations also meet on a model without
those optimisations; and XLA (the XLA rows compile the same
functions with ``jit_compile=True``). Every row, ART's included, frames the conv stack's
time chunks with :func:`ser_tf.frontend.frame_time`, which has no switch: against
``tf.signal.frame`` it moved the EmoDB CNN-LSTM's bound by about 10%.

Contenders alternate in a rotating order over the repeats; each reports its median.
Each model is measured in a fresh process (:func:`attack_report_subprocess`), so that no
state one model's contenders leave behind (traces, allocations) touches the next's.
The model is built from a ser-train flagfile (``make bench`` measures the EmoDB CNN-LSTM
of ``configs/emodb_cnn_lstm.flags``, the one ``ser-attack`` is measured on, and the
heavier default ``ModelConfig()``); its weights are untrained, which does not change the
work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.resample_quality import EMODB_WAV_DIR  # noqa: E402
from ser_tf.attacks.budget import Budget, epsilon  # noqa: E402
from ser_tf.attacks.whitebox import concurrent_halves, pgd  # noqa: E402
from ser_tf.data import corpora  # noqa: E402
from ser_tf.data.audio import AudioConfig  # noqa: E402
from ser_tf.data.pipeline import central_clips, decode_corpus  # noqa: E402
from ser_tf.frontend import automatic_gradients  # noqa: E402
from ser_tf.models import ModelConfig, build_model  # noqa: E402
from ser_tf.models.layers import unfolded_batchnorm  # noqa: E402

STEPS = 10
AUTO_PGD = "ser_tf PGD-10, unoptimised model"
AUTO_BOUND = "gradient pass, unoptimised model (bound x10)"
AUTO_ART = "ART PGD-10, unoptimised model"
SPLIT_BOUND = "gradient pass, split batch (bound x10)"
BUDGET = Budget("linf_db", -30.0)
TARGET_ART = 5.0     # ser_tf at least this many times ART
TARGET_BOUND = 0.9   # ser_tf at least this share of the gradient-pass bound


def _log(message: str) -> None:
    print(f"[bench.attack] {message}", file=sys.stderr, flush=True)


def _clips(count: int, seconds: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` EmoDB clips (central ``seconds``), spread over the corpus, and labels."""
    utterances = corpora.emodb(EMODB_WAV_DIR.parent)
    keep = np.linspace(0, len(utterances) - 1, count).astype(int)
    utterances = [utterances[i] for i in keep]
    decoded = decode_corpus(utterances, AudioConfig(), progress=False)
    classes = sorted({u.emotion for u in decoded.utterances})
    y = np.array([classes.index(u.emotion) for u in decoded.utterances], np.int32)
    x = central_clips(decoded, range(len(decoded)), segment_samples=int(16000 * seconds))
    return x, y, classes


def _timed(fn, repeats_out: list[float]) -> None:
    start = time.perf_counter()
    fn()
    repeats_out.append(time.perf_counter() - start)


def model_config(flagfile: str | None):
    """The ModelConfig of a ser-train flagfile (None: the default ``ModelConfig()``)."""
    if flagfile is None:
        return ModelConfig()
    from absl import flags

    from trainers import train

    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["ser-train", f"--flagfile={flagfile}", "--workdir=unused"])
    return train.build_config(fv).model


def attack_report(repeats: int = 3, *, flagfile: str | None = None, examples: int = 64,
                  batch_size: int = 32, art_examples: int = 96, seed: int = 0) -> dict:
    """Examples per second of PGD-10 by ser_tf, ART and the gradient-pass bound.

    Args:
      flagfile: a ser-train flagfile whose model is measured (None: the default model).
      repeats: timed rounds per contender (after one untimed warm-up each).
      examples: clips attacked per round by ser_tf and timed by the bound.
      batch_size: attack batch size for all contenders.
      art_examples: clips per ART round. Now and then one of ART's batches takes about
        1.5 times as long as the others (seen alone in a process too), so a round of a
        single batch makes its per-round rate, and the median, swing between two values;
        three batches per round average over them, as a long attack job would.
      seed: model and random-start seed.

    Returns:
      ``{"model", "params", "segment_samples", "batch_size", "steps", "budget",
      "methods": {name: {"examples_per_s", "range"}}, "ratio_art", "ratio_bound",
      "optimisations": {...}, "xla": {...}, "targets", "met_art", "met_bound"}``.
    """
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    config = model_config(flagfile)
    x, y, classes = _clips(max(examples, art_examples), config.segment_s)
    keras.utils.set_random_seed(seed)
    model = build_model(config, classes, seed=seed)
    model.normalizer.adapt([model.frontend(x[i:i + 32]) for i in range(0, len(x), 32)])
    params = int(model.count_params())
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def gradient_pass(jit: bool, split: bool = False):
        def inference(v):
            return model(v, training=False)

        forward = concurrent_halves(inference) if split else inference

        @tf.function(jit_compile=jit)
        def grad(xs, ys):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                loss = loss_fn(ys, forward(xs))
            return tape.gradient(loss, xs)
        return grad

    def ser_tf_pgd(jit: bool):
        @tf.function(jit_compile=jit)
        def attack(xs, ys):
            return pgd(model, xs, budget=BUDGET, y=ys, steps=STEPS)
        return attack

    eps = float(np.median(epsilon(x, BUDGET).numpy()))
    classifier = TensorFlowV2Classifier(model=model, nb_classes=len(classes),
                                        input_shape=x.shape[1:], loss_object=loss_fn,
                                        clip_values=(-1.0, 1.0))
    art = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps,
                                   eps_step=min(1.0, 2.5 / STEPS) * eps, max_iter=STEPS,
                                   num_random_init=1, batch_size=batch_size, verbose=False)

    @contextlib.contextmanager
    def unoptimised():
        # TF's own gradients and the conv stack layer by layer: read when a function is
        # traced, and by ART's eager calls on every call.
        with automatic_gradients(), unfolded_batchnorm():
            yield

    def art_round():
        art.generate(x[:art_examples], y=y[:art_examples])

    def art_unoptimised():
        with unoptimised():
            art_round()

    def batched(fn):
        """One round of ``fn`` over ``examples`` clips, batch by batch."""
        def run():
            for start in range(0, examples, batch_size):
                out = fn(tf.constant(x[start:start + batch_size]),
                         tf.constant(y[start:start + batch_size]))
            np.asarray(out)
        return run

    # name -> (callable running one round, clips per round, gradient passes per clip).
    # Each compiled function is built once here, so every round reuses its trace.
    compiled = {
        "ser_tf PGD-10 (tf.function)": (batched(ser_tf_pgd(False)), examples, 1),
        "gradient pass (bound x10)": (batched(gradient_pass(False)), examples, STEPS),
        SPLIT_BOUND: (batched(gradient_pass(False, split=True)), examples, STEPS),
        "ART PGD-10 (TensorFlowV2Classifier)": (art_round, art_examples, 1),
        AUTO_PGD: (batched(ser_tf_pgd(False)), examples, 1),
        AUTO_BOUND: (batched(gradient_pass(False)), examples, STEPS),
        AUTO_ART: (art_unoptimised, art_examples, 1),
        "ser_tf PGD-10 (XLA)": (batched(ser_tf_pgd(True)), examples, 1),
        "gradient pass, XLA (bound x10)": (batched(gradient_pass(True)), examples, STEPS),
    }
    times: dict[str, list[float]] = {name: [] for name in compiled}
    failed: dict[str, str] = {}
    for name, (fn, _, _) in compiled.items():
        _log(f"warm-up: {name}")
        try:
            # The warm-up traces: the unoptimised rows are traced with TF's own gradients
            # and the conv stack layer by layer.
            with unoptimised() if name in (AUTO_PGD, AUTO_BOUND) else contextlib.nullcontext():
                fn()
        except Exception as err:  # noqa: BLE001 - e.g. XLA unsupported: report, go on
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            _log(f"  {name} failed: {failed[name]}")
    names = [n for n in compiled if n not in failed]
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            _timed(compiled[name][0], times[name])
            count, divisor = compiled[name][1], compiled[name][2]
            _log(f"round {r + 1}: {name} {count / times[name][-1] / divisor:.1f} examples/s")
    methods = {}
    for name in names:
        count, divisor = compiled[name][1], compiled[name][2]
        rates = [count / t / divisor for t in times[name]]
        methods[name] = {"examples_per_s": statistics.median(rates),
                         "range": (min(rates), max(rates))}
    ours = methods["ser_tf PGD-10 (tf.function)"]["examples_per_s"]
    art_rate = methods["ART PGD-10 (TensorFlowV2Classifier)"]["examples_per_s"]
    bound = methods["gradient pass (bound x10)"]["examples_per_s"]
    split_bound = methods.get(SPLIT_BOUND, {}).get("examples_per_s")
    report = {"model": config.name, "flagfile": flagfile, "params": params,
              "segment_samples": int(x.shape[1]), "batch_size": batch_size, "steps": STEPS,
              "budget": BUDGET.label,
              "examples": examples, "art_examples": art_examples, "methods": methods,
              "failed": failed, "ratio_art": ours / art_rate, "ratio_bound": ours / bound,
              "ratio_split_bound": ours / split_bound if split_bound else None,
              "targets": {"art": TARGET_ART, "bound": TARGET_BOUND}}
    report["met_art"] = report["ratio_art"] >= TARGET_ART
    report["met_bound"] = report["ratio_bound"] >= TARGET_BOUND
    xla_pgd = methods.get("ser_tf PGD-10 (XLA)", {}).get("examples_per_s")
    xla_bound = methods.get("gradient pass, XLA (bound x10)", {}).get("examples_per_s")
    auto_pgd = methods.get(AUTO_PGD, {}).get("examples_per_s")
    auto_bound = methods.get(AUTO_BOUND, {}).get("examples_per_s")
    auto_art = methods.get(AUTO_ART, {}).get("examples_per_s")
    report["optimisations"] = {
        "bound_speedup": bound / auto_bound if auto_bound else None,
        "pgd_speedup": ours / auto_pgd if auto_pgd else None,
        "ratio_art_unoptimised": auto_pgd / auto_art if auto_pgd and auto_art else None,
        "art_speedup": art_rate / auto_art if auto_art else None}
    report["xla"] = {"pgd_speedup": xla_pgd / ours if xla_pgd else None,
                     "bound_speedup": xla_bound / bound if xla_bound else None,
                     "ratio_bound": xla_pgd / xla_bound if xla_pgd and xla_bound else None}
    return report


def attack_report_subprocess(**kwargs) -> dict:
    """:func:`attack_report` with ``kwargs``, run in a fresh Python process; stderr (the
    progress lines) passes through."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        command = [sys.executable, "-m", "bench.attack", f"--json={out}"]
        for key, value in kwargs.items():
            if value is not None:
                command.append(f"--{key}={value}")
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out) as f:
            return json.load(f)


def to_markdown(report: dict) -> str:
    """Renders :func:`attack_report`'s result as Markdown."""
    def verdict(met: bool) -> str:
        return "**met**" if met else "**not met**"

    source = (f"the model of `{report['flagfile']}`" if report["flagfile"]
              else "the default model, `build_model(ModelConfig(), labels)`")
    lines = [
        f"Model: {source}, a {report['model']} of {report['params']:,} parameters (log-mel "
        f"frontend inside), on {report['segment_samples']}-sample EmoDB clips; L-inf PGD, "
        f"{report['steps']} steps, budget {report['budget']} below each clip's peak, one "
        f"random start, batch {report['batch_size']}. ser_tf and the bound: "
        f"{report['examples']} clips per round; ART: {report['art_examples']}. The bound is "
        "one compiled forward+backward pass to the input, timed alone, divided by the "
        f"{report['steps']} passes PGD-{report['steps']} needs. Median over rounds, "
        "contenders alternating, each model in a fresh process.",
        "",
        "| contender | examples/s (median) | range |",
        "|---|---:|---:|",
    ]
    for name, m in report["methods"].items():
        lo, hi = m["range"]
        lines.append(f"| {name} | {m['examples_per_s']:.1f} | {lo:.1f}-{hi:.1f} |")
    for name, why in report["failed"].items():
        lines.append(f"| {name} | failed: {why} | |")
    lines += [
        "",
        f"- ser_tf / ART: **{report['ratio_art']:.1f}x** (target >= "
        f"{report['targets']['art']:g}x): {verdict(report['met_art'])}.",
        f"- ser_tf / gradient-pass bound: **{report['ratio_bound']:.2f}x** (target >= "
        f"{report['targets']['bound']:g}x): {verdict(report['met_bound'])}.",
    ]
    if report.get("ratio_split_bound"):
        lines.append(f"- ser_tf / split-batch bound (its gradients as ser_tf's attacks take "
                     f"them on a CPU, two halves side by side): "
                     f"{report['ratio_split_bound']:.2f}x.")
    optimised = report.get("optimisations", {})
    if optimised.get("bound_speedup"):
        lines.append(f"- The model's own optimisations (written-out gradients of the frontend "
                     "and the first conv, BatchNorm folded into the convs at inference, "
                     "relus after the pools) "
                     f"move the bound by {optimised['bound_speedup']:.2f}x and ser_tf's PGD "
                     f"by {optimised['pgd_speedup']:.2f}x over the unoptimised model.")
    if optimised.get("ratio_art_unoptimised"):
        lines.append(f"- On the unoptimised model, ART and ser_tf both running it, ser_tf / "
                     f"ART is **{optimised['ratio_art_unoptimised']:.1f}x**. The model's "
                     f"optimisations speed ART's eager PGD up by {optimised['art_speedup']:.2f}x "
                     f"and ser_tf's compiled one by {optimised['pgd_speedup']:.2f}x.")
    xla = report["xla"]
    if xla["bound_speedup"] and xla["pgd_speedup"]:
        lines.append(f"- XLA (`jit_compile=True`) moves the bound by "
                     f"{xla['bound_speedup']:.2f}x and ser_tf's PGD by "
                     f"{xla['pgd_speedup']:.2f}x; under XLA ser_tf reaches "
                     f"{xla['ratio_bound']:.2f}x of the XLA bound.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.attack [--flagfile=F] [--repeats=N] [--json=OUT]``: one model's
    report, as Markdown on stdout and optionally as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flagfile", default=None,
                        help="ser-train flagfile of the model (default: ModelConfig())")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--art_examples", type=int, default=96)
    parser.add_argument("--json", default="", help="also write the report here as JSON")
    args = parser.parse_args(argv)
    report = attack_report(repeats=args.repeats, flagfile=args.flagfile,
                           examples=args.examples, art_examples=args.art_examples)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(to_markdown(report))


if __name__ == "__main__":
    main()
