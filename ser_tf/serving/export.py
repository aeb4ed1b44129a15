"""``ser-export``'s library side: a trained workdir in, checked edge artifacts out.

For every (selected) fold of a ser-train run, :func:`export_workdir` writes into the
fold's ``export/`` folder:

* ``savedmodel/``: the serving SavedModel (raw audio of any length -> probabilities and
  label; see :mod:`ser_tf.serving.savedmodel`);
* ``model_<variant>.tflite`` for each TFLite variant (:mod:`ser_tf.serving.tflite`),
  ``int8`` calibrated on central clips of the fold's training speakers;
* ``serving.json`` (labels, rate, windows, conditioning), ``labels.txt``, ``MODEL_CARD.md``;
* ``export_report.json``: every artifact checked against the Keras model on the fold's
  test utterances (:mod:`ser_tf.serving.verify`) and the issue's parity targets.

Cross-validation runs also get a pooled ``export/export_report.json`` at the top.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import tempfile
import time
from typing import Sequence

import keras
import numpy as np

from ser_tf.attacks.budget import Budget
from ser_tf.attacks.runner import ATTACKS, Sweep, evaluate, subsample
from ser_tf.data.pipeline import central_clips, decode_corpus, waveforms
from ser_tf.serving import savedmodel, tflite, verify
from ser_tf.serving.runtime import KerasPredictor, load_predictor
from ser_tf.serving.spec import ServingSpec
from ser_tf.workdir import write_json

log = logging.getLogger(__name__)

# Parity targets per artifact: (least argmax agreement, most UAR drop, most robust accuracy
# drop), all against the Keras model; None: not checked.
TARGETS = {"savedmodel": (0.999, 0.0, None), "float32": (0.999, None, None),
           "float16": (0.995, None, None), "dynamic": (0.97, 0.02, 0.03),
           "int8": (0.97, 0.02, 0.03)}
# The row of a random model's second Keras draw (see _checks).
REDRAW = "keras_redraw"
# Attacks run against each artifact itself: the score- and decision-based entries of the
# attack registry, with their registered options.
BLACKBOX_ATTACKS = tuple(name for name, entry in ATTACKS.items()
                         if entry.family == "black-box" and not name.startswith("transfer_"))


@dataclasses.dataclass(frozen=True)
class ExportJob:
    """What ``ser-export`` does with a trained workdir.

    Attributes:
      folds: fold names to export (empty: every fold).
      variants: TFLite variants to write (see :data:`ser_tf.serving.tflite.VARIANTS`).
      calibration_clips: training clips that calibrate the int8 model.
      int8_float_layers: names of further classifier layers that the int8 variant keeps in
        float32, besides the frontend, the normaliser and the first conv block (e.g.
        ``bilstm``: quantizing a recurrent layer's every time step adds up error that can
        flip near-tied decisions).
      transfer_attack: white-box attack (``ser_tf.attacks.runner.ATTACKS``) crafted on the
        Keras model and replayed on every artifact.
      transfer_linf_db: its waveform L-inf budgets (dB below each clip's peak).
      blackbox_attack: score- or decision-based attack run against each artifact itself
        (``spsa``, ``nes``, ``hsj``, ``hsj_linf``; empty: none).
      blackbox_db: its budget: L-inf dB below the peak for spsa/nes/hsj_linf (default -40),
        SNR dB for hsj (default 30).
      blackbox_clips: test clips it attacks (class-stratified subsample).
      max_utterances: check at most this many test utterances (0: all).
      latency_utterances: utterances timed per artifact.
      seed: subsample and attack seed.
      batch_size: attack batch size.
      progress: progress bars.
    """

    folds: Sequence[str] = ()
    variants: Sequence[str] = tflite.VARIANTS
    calibration_clips: int = 200
    int8_float_layers: Sequence[str] = ()
    transfer_attack: str = "pgd"
    transfer_linf_db: Sequence[float] = (-60.0, -40.0)
    blackbox_attack: str = "spsa"
    blackbox_db: float | None = None
    blackbox_clips: int = 40
    max_utterances: int = 0
    latency_utterances: int = 20
    seed: int = 0
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.variants) - set(tflite.VARIANTS))
        if unknown:
            raise ValueError(f"unknown TFLite variants {unknown}; choose from "
                             f"{list(tflite.VARIANTS)}")
        entry = ATTACKS.get(self.transfer_attack)
        if entry is None or entry.family != "white-box" or entry.norm != "linf":
            raise ValueError(f"transfer_attack must be a white-box L-inf attack, got "
                             f"{self.transfer_attack!r}")
        if self.blackbox_attack and self.blackbox_attack not in BLACKBOX_ATTACKS:
            raise ValueError(f"blackbox_attack must be one of {list(BLACKBOX_ATTACKS)} or "
                             f"empty, got {self.blackbox_attack!r}")
        for value in self.transfer_linf_db:
            Budget("linf_db", float(value))  # validates
        self.blackbox_budget  # validates the black-box budget
        if self.int8_float_layers and "int8" not in self.variants:
            raise ValueError(f"int8_float_layers {list(self.int8_float_layers)} apply only to "
                             f"the int8 variant, which is not among the variants "
                             f"{list(self.variants)}")
        if self.calibration_clips < 1 and "int8" in self.variants:
            raise ValueError("int8 needs calibration_clips >= 1")

    @property
    def blackbox_budget(self) -> Budget | None:
        if not self.blackbox_attack:
            return None
        if ATTACKS[self.blackbox_attack].norm == "linf":
            return Budget("linf_db", -40.0 if self.blackbox_db is None else self.blackbox_db)
        return Budget("snr_db", 30.0 if self.blackbox_db is None else self.blackbox_db)


def _classifier_layers(model, names: Sequence[str]) -> list[str]:
    """``names``, each checked to be a layer of the model's classifier."""
    known = [layer.name for layer in model.classifier.layers]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"the int8 float layers {unknown} are not layers of the classifier "
                         f"{model.classifier.name!r}; its layers: {known}")
    return list(names)


def _check_float_layers_early(workdir: str, names: Sequence[str]) -> None:
    """Checks the int8 float layers against one trained model of ``workdir`` before the
    corpus is decoded, so a misspelt name fails at once rather than after minutes of
    decoding. Every fold's model has the same layers; :func:`write_artifacts` checks each
    model it exports again."""
    if not names:
        return
    found = sorted(glob.glob(os.path.join(workdir, "model.keras"))
                   + glob.glob(os.path.join(workdir, "fold_*", "model.keras")))
    if found:
        _classifier_layers(keras.saving.load_model(found[0]), names)


def write_artifacts(model, spec: ServingSpec, out_dir: str, variants: Sequence[str],
                    calibration: np.ndarray | None,
                    int8_float_layers: Sequence[str] = ()) -> dict[str, str]:
    """Writes the SavedModel, the TFLite variants, ``serving.json`` and ``labels.txt``.

    ``int8_float_layers`` names classifier layers the int8 variant keeps in float32 on top
    of its defaults (see :class:`ExportJob`).

    Returns:
      artifact name (``savedmodel`` or the variant) -> path.

    Raises:
      ser_tf.serving.tflite.ConversionError: a conversion failed (the others are kept).
    """
    float_layers = tflite.int8_float_layers(model.frontend.name, model.normalizer.name,
                                            _classifier_layers(model, int8_float_layers))
    os.makedirs(out_dir, exist_ok=True)
    spec.write(out_dir)
    with open(os.path.join(out_dir, "labels.txt"), "w") as f:
        f.write("\n".join(spec.labels) + "\n")
    saved = os.path.join(out_dir, "savedmodel")
    paths = {"savedmodel": savedmodel.export_savedmodel(model, spec, saved)}
    with tempfile.TemporaryDirectory(prefix="ser_edge_") as tmp:
        edge = savedmodel.export_edge_savedmodel(model, os.path.join(tmp, "edge"))
        for variant in variants:
            start = time.perf_counter()
            content = tflite.convert(edge, variant, calibration=calibration,
                                     float_layers=float_layers)
            path = os.path.join(out_dir, f"model_{variant}.tflite")
            with open(path, "wb") as f:
                f.write(content)
            paths[variant] = path
            log.info("wrote %s (%.0f kB, %.0f s)", path, len(content) / 1024,
                     time.perf_counter() - start)
    return paths


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
                   for f in files)
    return os.path.getsize(path)


def _checks(name: str, row: dict, reference: dict, redraw: dict | None = None) -> list[dict]:
    """The parity checks of artifact ``name`` against the Keras row ``reference``.

    For a random model (input noise), ``redraw`` is Keras run again with fresh noise: no
    artifact can agree with one Keras draw better than another draw does, so each bar
    gives way by what the redraw missed plus twice the standard error of comparing two
    such estimates (``sqrt(2 p (1 - p) / n)`` at the redraw's agreement ``p`` over the
    ``n`` test utterances; also applied to the robust figures, some of which are measured
    on fewer clips).
    """
    target = TARGETS.get(name)
    if target is None:
        return []
    least_agreement, uar_drop, robust_drop = target
    margin = uar_slack = 0.0
    if redraw is not None:
        p, n = redraw["agreement"], max(1, reference["n"])
        margin = 2.0 * math.sqrt(2.0 * p * (1.0 - p) / n)
        least_agreement = min(least_agreement, p - margin)
        uar_slack = abs(reference["uar"] - redraw["uar"])
    bar = round(least_agreement, 4)
    out = [{"check": f"agreement >= {bar}", "value": row["agreement"],
            "ok": row["agreement"] >= least_agreement - 1e-9}]
    if uar_drop is not None:
        diff = reference["uar"] - row["uar"]
        tol = uar_drop + uar_slack + margin
        out.append({"check": f"UAR within {tol:.2f} of Keras", "value": round(diff, 4),
                    "ok": abs(diff) <= tol + 1e-9})
    if robust_drop is not None:
        for key, robust in row["robust"].items():
            diff = reference["robust"][key]["accuracy"] - robust["accuracy"]
            tol = robust_drop + margin
            if redraw is not None:
                tol += abs(reference["robust"][key]["accuracy"]
                           - redraw["robust"][key]["accuracy"])
            out.append({"check": f"{key} robust accuracy within {tol:.2f} of Keras",
                        "value": round(diff, 4), "ok": abs(diff) <= tol + 1e-9})
    return out


def verify_artifacts(reference_model, spec: ServingSpec, paths: dict[str, str],
                     waves: list[np.ndarray], clips: np.ndarray, y: np.ndarray,
                     classes: Sequence[str], job: ExportJob, keras_path: str) -> dict:
    """Measures every artifact against the Keras model (see :mod:`ser_tf.serving.verify`).

    Args:
      reference_model: the Keras model.
      spec: its serving spec.
      paths: artifact name -> path (from :func:`write_artifacts`).
      waves: raw (unconditioned) test utterances at the model's rate.
      clips: their conditioned central clips (what attacks perturb).
      y: true labels.
      classes: class names.
      job: budgets, attacks and sizes.
      keras_path: the ``model.keras`` file (size and latency of the reference).

    Returns:
      The ``export_report.json`` content, with each artifact's predictions under
      ``"_predictions"`` (for pooling; removed before writing).
    """
    keras_predictor = KerasPredictor(reference_model, spec)
    predictors = {"keras": keras_predictor}
    random = bool(getattr(reference_model, "random", False))
    if random:
        # A random model answers differently each time: Keras once more, with fresh noise,
        # measures how far any faithful artifact can be expected to agree with it.
        predictors[REDRAW] = keras_predictor
    predictors.update({name: load_predictor(path) for name, path in paths.items()})

    # Adversarial clips crafted white-box on the Keras model, one set per budget.
    sweep = Sweep(attacks=(job.transfer_attack,), domains=("waveform",),
                  linf_db=tuple(float(v) for v in job.transfer_linf_db))
    crafted: dict[str, np.ndarray] = {}

    def keep(outcome, adv):
        crafted[f"{job.transfer_attack} {outcome.budget.label}"] = adv

    evaluate(reference_model, clips, y, sweep, batch_size=job.batch_size, seed=job.seed,
             progress=job.progress, keep_examples=len(clips), on_result=keep)
    bb_budget = job.blackbox_budget
    bb_idx = subsample(y, job.blackbox_clips, job.seed) if bb_budget is not None else None

    rows, predictions = [], {}
    for name, predictor in predictors.items():
        start = time.perf_counter()
        logits = verify.utterance_logits(predictor, waves, job.progress, f"checking {name}")
        source = paths.get(name, keras_path)
        row = {"name": name, "format": predictor.kind, "path": source,
               "size_bytes": _size(source), "n": int(len(y))}
        if name == "keras":
            reference_logits = logits
        row.update(verify.agreement(logits, reference_logits))
        row.update(verify.scores(y, logits.argmax(-1), classes))
        row["robust"] = {}
        predictions[name] = {"clean": (y, logits.argmax(-1))}
        for key, adv in crafted.items():
            adv_pred = predictor.window_logits(adv).argmax(-1)
            row["robust"][f"transfer {key}"] = verify.scores(y, adv_pred, classes)
            predictions[name][f"transfer {key}"] = (y, adv_pred)
        if bb_budget is not None:
            pred, info = verify.blackbox_attack(
                predictor, clips[bb_idx], y[bb_idx], name=job.blackbox_attack,
                budget=bb_budget,
                seed=job.seed)
            key = f"{job.blackbox_attack} {bb_budget.label}"
            row["robust"][key] = dict(verify.scores(y[bb_idx], pred, classes), **info)
            predictions[name][key] = (y[bb_idx], pred)
        if name in paths and name != "savedmodel":
            with open(paths[name], "rb") as f:
                summary = tflite.op_summary(f.read())
            row["ops"] = {k: summary[k] for k in ("total_ops", "flex_ops", "int8_ops",
                                                  "int8_weight_ops")}
        row["check_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        log.info("%s: agreement %.4f, UAR %.3f, %s", name, row["agreement"], row["uar"],
                 ", ".join(f"{k} acc {v['accuracy']:.3f}" for k, v in row["robust"].items()))

    timed = {"keras": keras_path, **paths}
    latency = verify.measure_latency(timed, waves[:job.latency_utterances],
                                     keras_spec=os.path.join(os.path.dirname(
                                         paths["savedmodel"]), "serving.json"))
    redraw = next((r for r in rows if r["name"] == REDRAW), None)
    for row in rows:
        row["latency"] = latency["keras" if row["name"] == REDRAW else row["name"]]
        row["checks"] = _checks(row["name"], row, rows[0], redraw)
    failed = [f"{r['name']}: {c['check']} ({c['value']})" for r in rows for c in r["checks"]
              if not c["ok"]]
    return {
        "reference": "keras",
        "random_model": random,
        "input_noise": ({"level_db": reference_model.noise.level_db,
                         "draws": reference_model.noise.draws} if random else None),
        "n_utterances": int(len(y)),
        "unit": ("clean: utterances from raw audio, each artifact conditioning and windowing "
                 "it; robust: one central clip per utterance"),
        "transfer": {"attack": job.transfer_attack, "crafted_on": "keras",
                     "budgets": sorted(crafted)},
        "blackbox": (None if bb_budget is None else
                     {"attack": job.blackbox_attack, "budget": bb_budget.to_dict(),
                      "clips": int(len(bb_idx)),
                      "options": ATTACKS[job.blackbox_attack].options,
                      "run_against": "each artifact itself"}),
        "artifacts": rows,
        "failed_checks": failed,
        "_predictions": predictions,
    }


# -- reports ---------------------------------------------------------------------------------


def format_report(report: dict, title: str = "") -> str:
    """The export report as a plain-text table (what ``ser-export`` prints)."""
    keys = list(report["artifacts"][0]["robust"])
    head = (f"{'artifact':<13}{'size kB':>9}{'agree':>8}{'max|dp|':>9}{'UAR':>7}"
            + "".join(f"{k[:22]:>24}" for k in keys) + f"{'ms/utt':>9}")
    lines = [title, head] if title else [head]
    for r in report["artifacts"]:
        lat = r.get("latency", {}).get("utterance_ms_median")
        lines.append(f"{r['name']:<13}{r['size_bytes'] / 1024:>9.0f}{r['agreement']:>8.4f}"
                     f"{r['max_abs_diff']:>9.4f}{r['uar']:>7.3f}"
                     + "".join(f"{r['robust'][k]['accuracy']:>16.3f} / {r['robust'][k]['uar']:.3f}"
                               for k in keys)
                     + (f"{lat:>9.1f}" if lat is not None else f"{'-':>9}"))
    lines.append("robust columns: accuracy / UAR under attack")
    if report.get("random_model"):
        lines.append(f"a random model (input noise): {REDRAW} is Keras again with fresh "
                     "noise, and the checks allow for that draw-to-draw variation")
    if report.get("failed_checks"):
        lines.append("FAILED checks: " + "; ".join(report["failed_checks"]))
    elif any(r.get("checks") for r in report["artifacts"]):
        lines.append("all parity checks passed")
    return "\n".join(lines)


def _training_line(metrics: dict) -> str:
    """How the model was trained (and defended), from its fold's ``metrics.json``."""
    adv, gan, purifier = (metrics.get(k) for k in ("adversarial_training", "gan", "purifier"))
    if adv:
        budget = adv["budget"]
        share = ("every example, TRADES beta " f"{adv['trades_beta']:g}"
                 if adv["method"] == "trades" else f"{adv['ratio']:.0%} of each batch")
        return (f"adversarial ({adv['method']}, {adv['steps'] if adv['method'] != 'fast' else 1}"
                f" step(s), {budget['kind']} {budget['value']:g} in the {adv['domain']} "
                f"domain, {share})")
    if gan:
        return (f"GAN-augmented ({gan['config']['ratio']:g} generated feature maps per real "
                f"crop{', with adversarial examples' if gan['config'].get('adversarial') else ''}"
                ")")
    if purifier:
        return ("standard, then a GAN purifier in front of the classifier (part of every "
                "artifact below)")
    return "standard (no defense)"


def model_card(spec: ServingSpec, report: dict, context: dict) -> str:
    """A short model card (Markdown): what the model is, how it was tested, what it needs."""
    m = context.get("metrics", {})
    robustness = context.get("robustness")
    lines = [f"# SER model card: {context.get('model', 'model')} ({context.get('fold', '')})",
             "",
             "Speech emotion recognition, trained with ser_tf.",
             "",
             "## Input and output",
             f"- Mono audio at {spec.sample_rate} Hz, float32 samples in [-1, 1].",
             f"- Labels (logit order): {', '.join(spec.labels)}.",
             f"- Conditioning before the model: silence trimmed at {spec.audio.trim_db} dB "
             f"below the loudest frame, level normalised ({spec.audio.normalize}, "
             f"{spec.audio.level_db} dBFS).",
             f"- Windows of {spec.segment_samples} samples every {spec.hop_samples} samples "
             f"(shorter audio extended by {spec.pad_mode}); the windows' logits are averaged.",
             "- `savedmodel/` does all of this itself (`serving_default`: raw waveform "
             "[samples] -> probabilities, label). The `.tflite` files take one conditioned "
             "window [1, segment] and return logits and probabilities: an app conditions, "
             "windows and averages (as `ser_tf.serving.runtime` does).",
             ]
    noise = report.get("input_noise")
    if noise:
        lines.append(f"- Random at inference (the randomized input defense): every artifact "
                     f"adds Gaussian noise {-noise['level_db']:g} dB below each window's peak "
                     f"and averages the logits of {noise['draws']} draw(s), so the same audio "
                     "gets slightly different probabilities from call to call.")
    lines += ["",
              "## Evaluation protocol",
              f"- Corpus {context.get('corpus')}, protocol {context.get('protocol')}, test "
              f"speakers {', '.join(context.get('test_speakers', []))} (never seen in "
              "training).",
              f"- Test: UAR {m.get('uar', float('nan')):.3f}, accuracy "
              f"{m.get('accuracy', float('nan')):.3f} on {m.get('n', '?')} utterances.",
              ]
    if context.get("synthetic"):
        lines.append("- SYNTHETIC corpus: these numbers say nothing about real speech.")
    lines.append(f"- Training: {_training_line(m)}.")
    if robustness:
        lines += ["", f"## Robustness (ser-attack on the Keras model, {robustness['clean']['n']}"
                  f" clips, clean accuracy {robustness['clean']['accuracy']:.3f})", "",
                  "| attack | domain | accuracy under attack by budget |", "|---|---|---|"]
        runs: dict[tuple[str, str], list[str]] = {}
        for a in robustness.get("attacks", []):
            runs.setdefault((a["name"], a["domain"]), []).append(
                f"{a['label']}: {a['accuracy']:.3f}")
        lines += [f"| {name} | {domain} | {', '.join(v)} |"
                  for (name, domain), v in runs.items()]
    lines += ["", "## Exported artifacts (checked against the Keras model)", "",
              "| artifact | size kB | agreement | UAR | "
              + " | ".join(report["artifacts"][0]["robust"]) + " | ms/utterance (1 thread) |",
              "|---" * (5 + len(report["artifacts"][0]["robust"])) + "|"]
    for r in report["artifacts"]:
        lat = r.get("latency", {}).get("utterance_ms_median", float("nan"))
        lines.append(f"| {r['name']} | {r['size_bytes'] / 1024:.0f} | {r['agreement']:.4f} | "
                     f"{r['uar']:.3f} | "
                     + " | ".join(f"{v['accuracy']:.3f} / {v['uar']:.3f}"
                                  for v in r["robust"].values())
                     + f" | {lat:.1f} |")
    lines += ["", "Robust columns are accuracy / UAR under attack: transfer = crafted white-box on "
              "the Keras model and replayed; the score/decision-based attack runs against "
              "each artifact itself.",
              "", "## Limits",
              f"- Trained and tested on {context.get('corpus')} only: expect lower accuracy "
              "on other speaking styles, languages and microphones.",
              "- The transfer columns are white-box attacks crafted with the Keras model's "
              "gradients: the accuracy left under them is what an attacker with the model "
              "file leaves this model."]
    if report.get("failed_checks"):
        lines += ["", "## Failed export checks", ""]
        lines += [f"- {c}" for c in report["failed_checks"]]
    return "\n".join(lines) + "\n"


def _read_json(path: str) -> dict | None:
    import json

    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pool(fold_reports: list[dict], predictions: list[dict], classes: Sequence[str]) -> dict:
    """Pooled (all folds' predictions together) scores per artifact, and the folds' means."""
    rows = []
    for k, first in enumerate(fold_reports[0]["artifacts"]):
        name = first["name"]
        row = {"name": name, "format": first["format"]}
        keys = list(predictions[0][name])
        for key in keys:
            ys = np.concatenate([p[name][key][0] for p in predictions])
            pred = np.concatenate([p[name][key][1] for p in predictions])
            row[key] = verify.scores(ys, pred, classes)
        ref = np.concatenate([p["keras"]["clean"][1] for p in predictions])
        own = np.concatenate([p[name]["clean"][1] for p in predictions])
        row["agreement"] = float(np.mean(ref == own))
        row["max_abs_diff"] = max(r["artifacts"][k]["max_abs_diff"] for r in fold_reports)
        row["size_bytes_mean"] = float(np.mean([r["artifacts"][k]["size_bytes"]
                                                for r in fold_reports]))
        row["utterance_ms_median_mean"] = float(np.mean(
            [r["artifacts"][k]["latency"]["utterance_ms_median"] for r in fold_reports]))
        rows.append(row)
    return {"pooled": rows}


def export_workdir(experiment, job: ExportJob) -> dict:
    """Exports and checks every (selected) fold of a trained workdir.

    Args:
      experiment: the run's ExperimentConfig (rebuilt from its ``flags.txt``).
      job: what to export and how to check it.

    Returns:
      The report of a single split, or ``{"folds": [...], "pooled": [...]}`` for
      cross-validation (also written to ``workdir/export/export_report.json``).

    Raises:
      ValueError: unknown or untrained folds, an unsupported run.
      FileNotFoundError: the data is missing.
      ser_tf.serving.tflite.ConversionError: a TFLite conversion failed.
    """
    from ser_tf.training.experiment import open_run

    if experiment.train.speaker_norm:
        raise ValueError("ser-export does not support --speaker_norm runs: their models need "
                         "each speaker's feature statistics as a second input")
    _check_float_layers_early(experiment.workdir, job.int8_float_layers)
    run = open_run(experiment, job.folds, progress=job.progress)
    raw_audio = dataclasses.replace(experiment.audio, trim_db=None, normalize="none",
                                    min_duration_s=0.0)
    fold_reports, fold_predictions = [], []
    for fold in run.selected:
        keras_path = run.model_path(fold)
        model = keras.saving.load_model(keras_path)
        spec = ServingSpec.for_model(model, experiment.audio, experiment.train.eval_hop_s,
                                     experiment.train.pad_mode)
        out_dir = os.path.join(run.fold_workdir(fold), "export")
        log.info("%s: exporting to %s", fold.name, out_dir)
        calibration = None
        if "int8" in job.variants:
            own = np.concatenate([np.asarray(fold.train), np.asarray(fold.val)]).astype(int)
            own = own[subsample(run.labels[own], job.calibration_clips, job.seed)]
            calibration = central_clips(run.decoded, own, segment_samples=spec.segment_samples,
                                        pad_mode=spec.pad_mode)
        paths = write_artifacts(model, spec, out_dir, job.variants, calibration,
                                job.int8_float_layers)

        test = np.asarray(fold.test)
        test = test[subsample(run.labels[test], job.max_utterances, job.seed)]
        y = run.labels[test]
        raw = decode_corpus([run.decoded.utterances[i] for i in test], raw_audio,
                            on_bad_audio="fail", progress=False)
        waves = waveforms(raw, range(len(test)))
        clips = central_clips(run.decoded, test, segment_samples=spec.segment_samples,
                              pad_mode=spec.pad_mode)
        report = verify_artifacts(model, spec, paths, waves, clips, y, run.classes, job,
                                  keras_path)
        fold_predictions.append(report.pop("_predictions"))
        report.update(fold=fold.name, test_speakers=list(fold.test_speakers),
                      corpus=experiment.corpus, protocol=experiment.protocol,
                      synthetic=any(u.corpus == "synthetic" for u in run.decoded.utterances),
                      spec=spec.to_dict())
        if "int8" in job.variants:  # kept float on top of the frontend, normaliser, block1
            report["int8_float_layers"] = list(job.int8_float_layers)
        write_json(os.path.join(out_dir, "export_report.json"), report)
        fold_dir = run.fold_workdir(fold)
        context = {"model": experiment.model.name, "fold": fold.name,
                   "corpus": experiment.corpus, "protocol": experiment.protocol,
                   "test_speakers": list(fold.test_speakers), "synthetic": report["synthetic"],
                   "metrics": _read_json(os.path.join(fold_dir, "metrics.json")) or {},
                   "robustness": _read_json(os.path.join(fold_dir, "robustness.json"))}
        with open(os.path.join(out_dir, "MODEL_CARD.md"), "w") as f:
            f.write(model_card(spec, report, context))
        fold_reports.append(report)
    if len(run.folds) == 1:
        return fold_reports[0]
    pooled = dict(_pool(fold_reports, fold_predictions, run.classes),
                  folds=[{k: r[k] for k in ("fold", "test_speakers", "artifacts",
                                            "failed_checks")} for r in fold_reports],
                  corpus=experiment.corpus, protocol=experiment.protocol)
    top = os.path.join(experiment.workdir, "export")
    os.makedirs(top, exist_ok=True)
    write_json(os.path.join(top, "export_report.json"), pooled)
    return pooled
