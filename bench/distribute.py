"""Data-parallel throughput: one replica vs two, with ser-train's own training loop.

The question: what does ``ser-train --strategy=mirrored`` (two replicas in one process)
or ``--strategy=multiworker`` (two worker processes, ring all-reduce over loopback) do to
training throughput on this machine, against one replica? Every contender trains the
EmoDB CNN-LSTM of ``configs/emodb_cnn_lstm.flags`` (2 s crops, its sizes, AdamW) with
:class:`ser_tf.training.standard.TrainingSteps` and
:func:`ser_tf.training.standard.run_epochs` (what ser-train runs) on the same EmoDB
utterances decoded by the pipeline, the same global batch, the same number of crops per
epoch. Strategies are per process, so each contender runs in its own process(es):
rounds alternate between contenders in a rotating order, each run trains ``epochs``
epochs and its first (tracing) is not timed; the median epoch time gives examples per
second.

On a machine without GPUs the two replicas share the same cores (``--cpu_devices=2``
splits the CPU into two logical devices; two workers are two processes on the same
cores): the ratio measures the cost of the synchronisation and of the smaller
per-replica batches, not a speed-up. On a multi-GPU machine the same command measures the
speed-up.

``python -m bench.distribute --worker ...`` is the per-process entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("one replica", "mirrored, 2 replicas", "multiworker, 2 workers")


def _log(message: str) -> None:
    print(f"[bench.distribute] {message}", file=sys.stderr, flush=True)


def _worker(args: argparse.Namespace) -> None:
    """One contender's process: trains ``args.epochs`` epochs, writes epoch times."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from ser_tf.training import distribute

    if args.cpu_devices:
        distribute.split_cpu(args.cpu_devices)
    strategy = distribute.get_strategy(args.strategy)

    import keras
    import numpy as np
    import tensorflow as tf

    from bench.resample_quality import EMODB_WAV_DIR
    from ser_tf.data import corpora
    from ser_tf.data.audio import AudioConfig
    from ser_tf.data.pipeline import decode_corpus, training_dataset
    from ser_tf.training.standard import TrainingSteps, run_epochs
    from trainers import common

    cfg = common.experiment_config(["--flagfile=configs/emodb_cnn_lstm.flags",
                                    f"--data_dir={EMODB_WAV_DIR.parent}"], "/tmp/unused")
    utterances = corpora.select_classes(corpora.emodb(EMODB_WAV_DIR.parent),
                                        corpora.resolve_classes("emodb7", []))
    keep = np.linspace(0, len(utterances) - 1, min(args.files, len(utterances))).astype(int)
    decoded = decode_corpus([utterances[i] for i in keep], AudioConfig())
    classes = sorted({u.emotion for u in decoded.utterances})
    labels = np.array([classes.index(u.emotion) for u in decoded.utterances], np.int32)
    segment = int(cfg.model.segment_s * cfg.model.sample_rate)
    with strategy.scope():
        from ser_tf.models import build_model

        keras.utils.set_random_seed(0)
        model = build_model(cfg.model, classes, seed=0)
        model(tf.zeros([2, segment]))
        model.compile(optimizer=keras.optimizers.AdamW(cfg.train.learning_rate,
                                                       weight_decay=cfg.train.weight_decay))
        steps = TrainingSteps(model)
        steps.compile(optimizer=model.optimizer)
        data = training_dataset(
            decoded, range(len(labels)), labels, segment_samples=segment,
            batch_size=args.batch_size, seed=0, augment=cfg.train.augment,
            drop_remainder=True)
        examples = int(data.cardinality()) * args.batch_size
        times: list[float] = []

        class Timer(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                times.append(time.perf_counter() - self.start)

        run_epochs(steps, data, epochs=args.epochs, initial_epoch=0, callbacks=[Timer()],
                   verbose=0)
    if distribute.is_chief():
        Path(args.out).write_text(json.dumps({"epoch_seconds": times, "examples": examples,
                                              "replicas": distribute.replicas()}))


def _run(contender: str, epochs: int, batch_size: int, files: int) -> dict:
    """Runs one contender's process(es) to the end; returns the chief's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        base = [sys.executable, "-m", "bench.distribute", "--worker", f"--out={out}",
                f"--epochs={epochs}", f"--batch_size={batch_size}", f"--files={files}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        if contender == "one replica":
            commands = [(base + ["--strategy=default"], env)]
        elif contender.startswith("mirrored"):
            commands = [(base + ["--strategy=mirrored", "--cpu_devices=2"], env)]
        else:
            from ser_tf.training.distribute import loopback_tf_configs

            commands = [(base + ["--strategy=multiworker"], {**env, "TF_CONFIG": config})
                        for config in loopback_tf_configs(2)]
        procs = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for cmd, e in commands]
        errors = [p.communicate()[1] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"{contender} failed:\n" + "\n".join(e[-2000:] for e in errors))
        return json.loads(Path(out).read_text())


def distribute_report(epochs: int = 6, repeats: int = 2, *, batch_size: int = 32,
                      files: int = 535) -> dict:
    """Examples per second of one replica, two mirrored replicas and two workers.

    Args:
      epochs: epochs per run (the first is not timed).
      repeats: runs per contender, alternating in rotating order.
      batch_size: the global batch of every contender.
      files: EmoDB utterances (evenly spread over speakers and emotions).
    """
    if not (ROOT.parent / "shared" / "data" / "emodb" / "wav").is_dir() \
            and "SER_TF_EMODB" not in os.environ:
        raise FileNotFoundError("the distribution benchmark trains on EmoDB "
                                "(../shared/data/emodb or SER_TF_EMODB)")
    timed: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    examples = {}
    for r in range(repeats):
        order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[:r % len(CONTENDERS)]
        for contender in order:
            _log(f"round {r + 1}/{repeats}: {contender}")
            result = _run(contender, epochs, batch_size, files)
            timed[contender] += result["epoch_seconds"][1:]
            examples[contender] = result["examples"]
            _log(f"  epochs {', '.join(f'{t:.1f}' for t in result['epoch_seconds'])} s")
    rates = {c: examples[c] / statistics.median(timed[c]) for c in CONTENDERS}
    return {"epochs": epochs, "repeats": repeats, "batch_size": batch_size, "files": files,
            "examples_per_epoch": examples,
            "epoch_seconds": timed,
            "examples_per_s": rates,
            "ratio_vs_one_replica": {c: rates[c] / rates["one replica"] for c in CONTENDERS}}


def to_markdown(report: dict) -> str:
    rows = ["| contender | examples/epoch | median epoch (s) | examples/s | vs one replica |",
            "|---|---:|---:|---:|---:|"]
    for c in CONTENDERS:
        rows.append(f"| {c} | {report['examples_per_epoch'][c]} | "
                    f"{statistics.median(report['epoch_seconds'][c]):.1f} | "
                    f"{report['examples_per_s'][c]:.1f} | "
                    f"{report['ratio_vs_one_replica'][c]:.2f}x |")
    return "\n".join([
        f"The EmoDB CNN-LSTM (`configs/emodb_cnn_lstm.flags`), {report['files']} EmoDB "
        f"utterances, global batch {report['batch_size']}, ser-train's loop "
        f"(`run_epochs`); {report['repeats']} runs of {report['epochs']} epochs per "
        "contender in alternating order, first epoch of each run not timed. Two replicas "
        "here share the same two cores (logical CPU devices, or two worker processes): "
        "the ratio is the price of synchronising and of half-size per-replica batches on "
        "a CPU-only machine, not a multi-GPU speed-up.", "", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help="run one contender")
    parser.add_argument("--strategy", default="default")
    parser.add_argument("--cpu_devices", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    print(to_markdown(distribute_report(args.epochs, batch_size=args.batch_size,
                                        files=args.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
