"""Defended training: adversarial training's steps, schedule, selection and trainer runs."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TONE_LABELS, tone_dataset
from ser_tf.attacks import whitebox
from ser_tf.attacks.budget import Budget
from ser_tf.data.audio import AudioConfig
from ser_tf.data.corpora import write_manifest
from ser_tf.defenses import fold_trainer
from ser_tf.defenses.adversarial import AdversarialConfig, AdversarialSteps
from ser_tf.models import ModelConfig, build_model
from ser_tf.training.experiment import ExperimentConfig, run_experiment
from ser_tf.training.standard import TrainConfig

TONE_BUDGET = Budget("linf_db", -30.0)


def test_budget_warms_up_linearly_in_amplitude_then_stays():
    cfg = AdversarialConfig(budget=Budget("linf_db", -40.0), warmup_epochs=3)
    radii = [cfg.budget_at(e).radius for e in range(6)]
    full = Budget("linf_db", -40.0).radius
    np.testing.assert_allclose(radii, [full / 4, full / 2, 3 * full / 4, full, full, full])
    snr = AdversarialConfig(budget=Budget("snr_db", 30.0), warmup_epochs=1)
    assert snr.budget_at(0).value == pytest.approx(30.0 + 20 * np.log10(2))
    feats = AdversarialConfig(domain="features", budget=Budget("linf", 0.5), warmup_epochs=1)
    assert feats.budget_at(0) == Budget("linf", 0.25)
    assert AdversarialConfig(warmup_epochs=0).budget_at(0) == Budget("linf_db", -40.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "madry"}, "unknown adversarial training method"),
    ({"budget": Budget("linf", 0.5)}, "waveform domain needs linf_db or snr_db"),
    ({"domain": "features"}, "features domain needs linf or l2"),
    ({"ratio": 0.0}, "ratio must be in"),
    ({"steps": 0}, "must be >= 1"),
    ({"robust_weight": 1.5}, "robust_weight"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdversarialConfig(**kwargs)


def test_fast_method_is_one_step_of_1_25_radii():
    cfg = AdversarialConfig(method="fast", steps=10)
    assert (cfg.attack_steps, cfg.fraction) == (1, 1.25)
    assert AdversarialConfig(steps=5).fraction == pytest.approx(0.5)


def _tone_model():
    keras.utils.set_random_seed(0)
    config = ModelConfig(name="cnn", sample_rate=8000, segment_s=0.5, n_mels=24,
                         conv_filters=(8, 16), dense_units=16, dropout=0.0,
                         specaugment=False)
    return build_model(config, TONE_LABELS, seed=0)


def _train_and_attack(method: str | None, epochs: int = 15) -> tuple[float, float]:
    """Trains the tone CNN (standard or adversarially at -30 dB) and returns its clean and
    PGD-10 accuracy on held-out tones at -30 dB."""
    x, y = tone_dataset(40, seed=0)
    x_test, y_test = tone_dataset(10, seed=1)
    model = _tone_model()
    model.normalizer.adapt([model.frontend(x)])
    optimizer = keras.optimizers.Adam(3e-3)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fitter = model
    if method is not None:
        fitter = AdversarialSteps(model, AdversarialConfig(
            method=method, budget=TONE_BUDGET, steps=3, ratio=1.0, warmup_epochs=0))
        fitter.compile(optimizer=optimizer, jit_compile=False)
    fitter.fit(x, y, batch_size=20, epochs=epochs, verbose=0, shuffle=True)
    clean = float(np.mean(np.argmax(model(x_test), -1) == y_test))
    tf.random.set_seed(0)
    adv = whitebox.pgd(lambda v: model(v, training=False), x_test, budget=TONE_BUDGET,
                       y=y_test, steps=10)
    return clean, float(np.mean(np.argmax(model(adv), -1) == y_test))


@pytest.fixture(scope="module")
def standard_tones():
    return _train_and_attack(None)


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_raises_robust_accuracy_over_standard(standard_tones, method):
    std_clean, std_robust = standard_tones
    clean, robust = _train_and_attack(method)
    assert std_clean >= 0.9, "the standard tone model did not learn"
    assert std_robust <= 0.2, f"PGD at -30 dB should break the standard model ({std_robust})"
    assert clean >= 0.9, f"{method} training lost the clean task ({clean:.2f})"
    assert robust >= std_robust + 0.3, (
        f"{method}: robust accuracy {robust:.2f} vs standard {std_robust:.2f}")


def test_adversarial_steps_report_clean_and_adversarial_accuracy():
    x, y = tone_dataset(6, seed=0)
    model = _tone_model()
    model.normalizer.adapt([model.frontend(x)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = AdversarialSteps(model, AdversarialConfig(budget=TONE_BUDGET, steps=2, ratio=0.5,
                                                      warmup_epochs=0))
    steps.compile(optimizer=model.optimizer, jit_compile=False)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = steps.fit(x, y, batch_size=6, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "adv_accuracy"}
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_weights)]
    assert all(changed), "every weight of the wrapped model trains"
    assert not steps.weights or all(any(w is v for v in model.weights) for w in steps.weights)


# -- the trainer end to end (ser-train --trainer=adversarial) -------------------------------


TINY_MODEL = ModelConfig(segment_s=0.5, n_mels=24, conv_filters=(4, 8), chunk_frames=12,
                         hop_frames=6, chunk_units=8, lstm_units=4)


@pytest.fixture(scope="module")
def manifest(synthetic_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(synthetic_corpus, path)
    return str(path)


def _experiment(manifest, workdir, method) -> ExperimentConfig:
    return ExperimentConfig(workdir=str(workdir), corpus="manifest", data_dir=manifest,
                            protocol="speakers", test_speakers=("s01",), val_speakers=1,
                            audio=AudioConfig(), model=TINY_MODEL, trainer="adversarial",
                            method=method,
                            train=TrainConfig(epochs=2, batch_size=8, patience=0),
                            verbose=0)


@pytest.mark.parametrize("method", [
    AdversarialConfig(method="pgd", steps=2, val_steps=2, warmup_epochs=1),
    AdversarialConfig(method="fast", val_steps=2, warmup_epochs=1),
    AdversarialConfig(method="trades", steps=2, val_steps=2, warmup_epochs=1),
    AdversarialConfig(method="pgd", domain="features", budget=Budget("linf", 0.5), steps=2,
                      val_steps=2, warmup_epochs=1),
], ids=["pgd", "fast", "trades", "pgd-features"])
def test_adversarial_trainer_writes_the_standard_outputs_and_robust_history(
        manifest, tmp_path, method):
    cfg = _experiment(manifest, tmp_path / "w", method)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    assert metrics["trainer"] == "adversarial"
    recorded = metrics["adversarial_training"]
    assert recorded["method"] == method.method
    assert recorded["budget"] == method.budget.to_dict()
    history = metrics["history"]
    assert [h["budget"] for h in history] == [method.budget_at(0).label, method.budget.label]
    for h in history:
        assert 0.0 <= h["val_robust_uar"] <= 1.0 and 0.0 <= h["adv_accuracy"] <= 1.0
        assert h["score"] == pytest.approx(0.5 * h["val_uar"] + 0.5 * h["val_robust_uar"])
    assert metrics["best_val_score"] == max(h["score"] for h in history)
    model = keras.saving.load_model(os.path.join(cfg.workdir, "model.keras"))
    assert model.labels == tuple(metrics["labels"])
    tags = set()
    for root, _, files in os.walk(os.path.join(cfg.workdir, "tb", "val")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags |= {v.tag for v in event.summary.value}
    assert {"epoch_robust_uar", "epoch_uar", "epoch_score"} <= tags
    # A finished run is read back, not trained again.
    again = run_experiment(cfg, fold_trainer(cfg))
    assert again["history"] == history


def test_adversarial_trainer_resumes_with_the_budget_of_its_epoch(manifest, tmp_path):
    method = AdversarialConfig(steps=2, val_steps=2, warmup_epochs=2)
    cfg = _experiment(manifest, tmp_path / "w", method)
    run_experiment(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1)),
                   fold_trainer(cfg))
    os.remove(os.path.join(cfg.workdir, "metrics.json"))  # unfinished as far as it knows
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    metrics = run_experiment(longer, fold_trainer(longer))
    with open(os.path.join(cfg.workdir, "checkpoints", "state.json")) as f:
        state = json.load(f)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert [h["budget"] for h in metrics["history"]] == [
        method.budget_at(e).label for e in range(3)]


def test_unknown_trainer_and_wrong_method_config_are_clear_errors(manifest, tmp_path):
    cfg = _experiment(manifest, tmp_path, AdversarialConfig())
    with pytest.raises(ValueError, match="unknown trainer"):
        fold_trainer(dataclasses.replace(cfg, trainer="bayesian"))
    with pytest.raises(ValueError, match="needs an AdversarialConfig"):
        fold_trainer(dataclasses.replace(cfg, method=object()))
