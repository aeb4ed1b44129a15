"""Distillation: the loss against a NumPy reference, and a student that follows its teacher."""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from ser_tf.data.audio import AudioConfig
from ser_tf.data.corpora import write_manifest
from ser_tf.defenses import fold_trainer
from ser_tf.models import ModelConfig
from ser_tf.training.convex import ConvexConfig
from ser_tf.training.distill import DistillConfig, distillation_loss
from ser_tf.training.experiment import ExperimentConfig, run_experiment
from ser_tf.training.standard import TrainConfig
from ser_tf.workdir import run_flags

FUNCTIONALS = ModelConfig(name="functionals", segment_s=0.5, n_mels=24, n_cepstra=6)


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("weight,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0)])
def test_distillation_loss_matches_a_numpy_reference(weight, temperature):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 8)
    teacher = rng.normal(size=(8, 5)).astype(np.float32) * 3
    student = rng.normal(size=(8, 5)).astype(np.float32) * 3
    got = distillation_loss(tf.constant(y), tf.constant(teacher), tf.constant(student),
                            weight, temperature).numpy()
    xent = -_log_softmax(student)[np.arange(8), y]
    log_p, log_q = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    np.testing.assert_allclose(got, (1 - weight) * xent + weight * temperature ** 2 * kl,
                               rtol=1e-5, atol=1e-5)
    # A student that already predicts what its teacher does pays only the hard term.
    same = distillation_loss(tf.constant(y), tf.constant(teacher), tf.constant(teacher),
                             weight, temperature).numpy()
    np.testing.assert_allclose(same, (1 - weight) * -_log_softmax(teacher)[np.arange(8), y],
                               rtol=1e-5, atol=1e-5)


def test_distill_config_needs_a_teacher_and_sane_values():
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillConfig()
    with pytest.raises(ValueError, match="weight"):
        DistillConfig(teacher_dir="t", weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(teacher_dir="t", temperature=0.0)


def test_run_flags_reads_values_and_booleans(tmp_path):
    (tmp_path / "flags.txt").write_text("--eval_whole\n--nospeaker_norm\n--eval_hop_s=0.25\n"
                                        "--aug_noise_snr=\n")
    assert run_flags(str(tmp_path)) == {"eval_whole": "true", "speaker_norm": "false",
                                        "eval_hop_s": "0.25", "aug_noise_snr": ""}
    with pytest.raises(FileNotFoundError, match="no flags.txt"):
        run_flags(str(tmp_path / "missing"))


# Each emotion relabelled as the next one: a teacher fitted on these labels predicts the
# wrong emotion for every utterance, in a way a student can only have learned from it.
ROTATE = {"anger": "neutral", "neutral": "sadness", "sadness": "anger"}


@pytest.fixture(scope="module")
def manifests(synthetic_corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("manifests")
    true = write_manifest(synthetic_corpus, folder / "true.csv")
    rotated = write_manifest([dataclasses.replace(u, emotion=ROTATE[u.emotion])
                              for u in synthetic_corpus], folder / "rotated.csv")
    return str(true), str(rotated)


def _experiment(manifest, workdir, trainer, method, model=FUNCTIONALS, epochs=20,
                whole=True) -> ExperimentConfig:
    return ExperimentConfig(workdir=str(workdir), corpus="manifest", data_dir=manifest,
                            protocol="speakers", test_speakers=("s01",), val_speakers=1,
                            audio=AudioConfig(), model=model, trainer=trainer, method=method,
                            train=TrainConfig(epochs=epochs, patience=0, eval_whole=whole,
                                              eval_hop_s=0.25, learning_rate=0.01,
                                              batch_size=8),
                            verbose=0)


@pytest.fixture(scope="module")
def rotated_teacher(manifests, tmp_path_factory):
    """A functionals teacher fitted on the rotated labels, with the flags.txt ser-train
    writes (the student reads how the teacher evaluated from it)."""
    workdir = tmp_path_factory.mktemp("teacher")
    cfg = _experiment(manifests[1], workdir, "convex", ConvexConfig(c_values=(0.1, 1.0)))
    metrics = run_experiment(cfg, fold_trainer(cfg))
    (workdir / "flags.txt").write_text("--eval_whole\n--eval_hop_s=0.25\n--pad_mode=loop\n"
                                       "--nospeaker_norm\n")
    return str(workdir), metrics


def _predicted(workdir) -> np.ndarray:
    """The predicted class of each test utterance, from a run's predictions.csv."""
    with open(os.path.join(workdir, "predictions.csv")) as f:
        rows = list(csv.DictReader(f))
    logits = [[float(v) for k, v in row.items() if k.startswith("logit_")] for row in rows]
    return np.argmax(logits, axis=1)


def test_a_student_learns_its_teachers_predictions(manifests, rotated_teacher, tmp_path):
    true, _ = manifests
    teacher_dir, _ = rotated_teacher
    taught = _predicted(teacher_dir)

    def student(weight):
        cfg = _experiment(true, tmp_path / f"w{weight}", "distill",
                          DistillConfig(teacher_dir=teacher_dir, weight=weight,
                                        temperature=1.0))
        metrics = run_experiment(cfg, fold_trainer(cfg))
        return metrics, float(np.mean(_predicted(cfg.workdir) == taught))

    soft, soft_agrees = student(1.0)
    hard, hard_agrees = student(0.0)
    assert soft["distillation"] == {"teacher": teacher_dir, "weight": 1.0,
                                    "temperature": 1.0, "teacher_whole": True}
    # The teacher names the wrong emotion for every training utterance. Taught by the
    # teacher alone, the student (the teacher's architecture) makes the teacher's
    # predictions on the unseen speaker; taught by the true labels alone, it does not.
    print(soft_agrees, hard_agrees, soft["accuracy"], hard["accuracy"])
    assert soft_agrees >= 0.8
    assert hard_agrees <= soft_agrees - 0.3
    assert os.path.exists(os.path.join(tmp_path, "w1.0", "model.keras"))


def test_a_teacher_must_have_held_out_the_same_speakers(manifests, rotated_teacher, tmp_path):
    true, _ = manifests
    teacher_dir, _ = rotated_teacher
    cfg = dataclasses.replace(
        _experiment(true, tmp_path / "w", "distill", DistillConfig(teacher_dir=teacher_dir),
                    epochs=1),
        test_speakers=("s02",))
    with pytest.raises(ValueError, match="may have trained on them"):
        run_experiment(cfg, fold_trainer(cfg))


def test_a_teacher_with_per_speaker_normalisation_is_refused(manifests, rotated_teacher,
                                                             tmp_path):
    true, _ = manifests
    teacher_dir, _ = rotated_teacher
    spk = tmp_path / "spk"
    spk.mkdir()
    (spk / "flags.txt").write_text("--speaker_norm\n")
    cfg = _experiment(true, tmp_path / "w", "distill", DistillConfig(teacher_dir=str(spk)),
                      epochs=1)
    with pytest.raises(ValueError, match="--speaker_norm"):
        run_experiment(cfg, fold_trainer(cfg))


def test_distill_flags_build_the_method(tmp_path):
    from absl import flags

    from trainers import train

    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["ser-train", "--trainer=distill", "--distill_teacher=runs/func",
        "--distill_weight=0.7", "--distill_temperature=3", f"--workdir={tmp_path}"])
    assert train._method_config(fv) == DistillConfig(teacher_dir="runs/func", weight=0.7,
                                                     temperature=3.0)
