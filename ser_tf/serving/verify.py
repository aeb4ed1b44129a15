"""Checks of every exported artifact against the Keras model it came from.

For each artifact (Keras itself included, as the reference row):

* clean: utterance-level predictions from raw test audio (each artifact conditions and
  windows it, see :mod:`ser_tf.serving.runtime`): argmax agreement with Keras, the
  largest absolute difference of a class probability, accuracy and UAR;
* transfer: accuracy and UAR on adversarial clips crafted white-box on the Keras model
  (does the artifact's arithmetic, e.g. int8, keep or blunt the attack?);
* black-box: a score-based attack run directly against the artifact's own window
  classifier (the TFLite interpreter for the TFLite files), with its query counts;
* latency: milliseconds per utterance (conditioning, windows, model) and per window
  (model alone) on one thread, measured in a child process started with one TF thread.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ser_tf.attacks import blackbox
from ser_tf.attacks.budget import Budget
from ser_tf.attacks.runner import ATTACKS
from ser_tf.evaluation.metrics import classification_metrics
from ser_tf.serving.runtime import Predictor, softmax


def utterance_logits(predictor: Predictor, waves: Sequence[np.ndarray], progress: bool = False,
                     desc: str = "") -> np.ndarray:
    """``[N, classes]`` utterance logits of raw waveforms."""
    out = [predictor.utterance_logits(w)[0]
           for w in tqdm(waves, desc=desc or predictor.kind, unit="utt", leave=False,
                         disable=not progress)]
    return np.stack(out).astype(np.float32)


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Argmax agreement and the largest absolute class-probability difference."""
    return {"agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
            "max_abs_diff": float(np.abs(softmax(logits) - softmax(reference)).max())}


def scores(y: np.ndarray, predictions: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy and UAR of predicted class indices."""
    m = classification_metrics(y, predictions, labels)
    return {"accuracy": m["accuracy"], "uar": m["uar"]}


def blackbox_attack(predictor: Predictor, clips: np.ndarray, y: np.ndarray, *, name: str,
                    budget: Budget, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Runs a registered score- or decision-based attack (``ser_tf.attacks.runner.ATTACKS``,
    with its registered options) against ``predictor.window_logits``.

    Returns:
      ``(predictions [N], {"queries_per_example", "seconds"})``.
    """
    entry = ATTACKS[name]
    counter = blackbox.QueryCounter(predictor.window_logits)
    start = time.perf_counter()
    adv = np.asarray(entry.fn(predictor.window_logits, clips, budget=budget, y=y, seed=seed,
                              counter=counter, **entry.options))
    seconds = time.perf_counter() - start
    pred = predictor.window_logits(adv).argmax(-1)
    return pred, {"queries_per_example": round(counter.queries / len(clips), 1),
                  "seconds": round(seconds, 1)}


# -- latency, in a child process with one TF thread --------------------------------------------


def measure_latency(artifacts: dict[str, str], waves: Sequence[np.ndarray], *,
                    keras_spec: str = "", repeats: int = 1, timeout_s: float = 900) -> dict:
    """Single-thread latency of each artifact, measured in a fresh child process.

    Args:
      artifacts: name -> path (SavedModel folder, ``.tflite`` or ``.keras``).
      waves: raw utterances to time (each run ``repeats`` times after a warm-up).
      keras_spec: ``serving.json`` for a ``.keras`` artifact.
      repeats: timed runs per utterance.
      timeout_s: give up after this long.

    Returns:
      name -> ``{"utterance_ms_median", "utterance_ms_p90", "window_ms_median", "threads"}``.

    Raises:
      RuntimeError: the child process failed.
    """
    with tempfile.TemporaryDirectory(prefix="ser_latency_") as tmp:
        data = os.path.join(tmp, "waves.npz")
        np.savez(data, *[np.asarray(w, np.float32) for w in waves])
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            json.dump({"artifacts": artifacts, "keras_spec": keras_spec, "repeats": repeats,
                       "waves": data}, f)
        env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
                   TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "ser_tf.serving.verify", job],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise RuntimeError(f"latency measurement failed:\n{tail}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_artifacts(job: dict) -> dict:
    import keras
    import tensorflow as tf

    import ser_tf.models  # noqa: F401  (registers the model classes for loading)
    from ser_tf.serving.runtime import KerasPredictor, load_predictor
    from ser_tf.serving.spec import ServingSpec

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    archive = np.load(job["waves"])
    waves = [archive[k] for k in archive.files]
    results = {}
    for name, path in job["artifacts"].items():
        if path.endswith(".keras"):
            predictor = KerasPredictor(keras.saving.load_model(path),
                                       ServingSpec.read(job["keras_spec"]))
        else:
            predictor = load_predictor(path, num_threads=1)
        predictor.utterance_logits(waves[0])  # warm-up: traces and allocates
        per_utt = []
        for w in waves:
            for _ in range(job["repeats"]):
                start = time.perf_counter()
                predictor.utterance_logits(w)
                per_utt.append(1000 * (time.perf_counter() - start))
        window = predictor.windows(waves[0])[:1]
        per_win = []
        for _ in range(max(5, len(waves))):
            start = time.perf_counter()
            predictor.window_logits(window)
            per_win.append(1000 * (time.perf_counter() - start))
        results[name] = {"utterance_ms_median": round(statistics.median(per_utt), 2),
                         "utterance_ms_p90": round(float(np.percentile(per_utt, 90)), 2),
                         "window_ms_median": round(statistics.median(per_win), 2),
                         "threads": 1, "utterances": len(waves)}
    return results


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(json.dumps(_time_artifacts(json.load(f))))
