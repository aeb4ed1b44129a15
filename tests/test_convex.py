"""The convex head fit: its L-BFGS solver against scikit-learn, and the trainer end to end."""

from __future__ import annotations

import csv
import glob
import json
import os

import keras
import numpy as np
import pytest

from ser_tf.data.audio import AudioConfig
from ser_tf.data.corpora import manifest as read_manifest
from ser_tf.data.corpora import write_manifest
from ser_tf.data.pipeline import decode_corpus, waveforms
from ser_tf.defenses import fold_trainer
from ser_tf.models import ModelConfig
from ser_tf.training.convex import ConvexConfig, fit_softmax_regression
from ser_tf.training.experiment import ExperimentConfig, run_experiment
from ser_tf.training.standard import TrainConfig

FUNCTIONALS = ModelConfig(name="functionals", segment_s=0.5, n_mels=24, n_cepstra=6)


def _problem(n=300, d=40, k=4, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    y = (z[:, :3] @ rng.normal(size=(3, k)) + rng.normal(size=(n, k))).argmax(axis=1)
    return z, y


@pytest.mark.parametrize("c", [0.001, 0.1, 10.0])
def test_softmax_regression_reaches_scikit_learns_optimum(c):
    linear_model = pytest.importorskip("sklearn.linear_model")
    z, y = _problem()
    counts = np.bincount(y, minlength=4)
    weights = (len(y) / (4 * counts))[y]
    fit = fit_softmax_regression(z, y, 4, c, sample_weight=weights, tolerance=1e-7)
    ref = linear_model.LogisticRegression(C=c, class_weight="balanced", tol=1e-12,
                                          max_iter=100000).fit(z, y)
    assert fit.gradient_max < 1e-7
    # Softmax logits are defined up to a constant per example: compare centred.
    np.testing.assert_allclose(fit.weights, ref.coef_.T, atol=1e-4)
    np.testing.assert_allclose(fit.bias - fit.bias.mean(),
                               ref.intercept_ - ref.intercept_.mean(), atol=1e-4)


def test_softmax_regression_warm_start_lands_on_the_same_solution_in_fewer_steps():
    z, y = _problem(seed=1)
    near = fit_softmax_regression(z, y, 4, 0.03)
    cold = fit_softmax_regression(z, y, 4, 0.1)
    warm = fit_softmax_regression(z, y, 4, 0.1, init=near)
    assert warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.weights, cold.weights, atol=1e-4)
    # Weaker regularisation fits the training data at least as well.
    assert np.abs(cold.weights).sum() > np.abs(near.weights).sum()


def test_convex_config_rejects_bad_paths():
    for values in [(), (0.1, 0.01), (0.0, 1.0), (0.1, 0.1)]:
        with pytest.raises(ValueError, match="increasing"):
            ConvexConfig(c_values=values)
    with pytest.raises(ValueError, match="max_iterations"):
        ConvexConfig(max_iterations=0)


@pytest.fixture(scope="module")
def manifest(synthetic_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(synthetic_corpus, path)
    return str(path)


def _experiment(manifest, workdir, model=FUNCTIONALS, refit=False, whole=False,
                speaker_norm=False) -> ExperimentConfig:
    return ExperimentConfig(workdir=str(workdir), corpus="manifest", data_dir=manifest,
                            protocol="speakers", test_speakers=("s01",), val_speakers=1,
                            audio=AudioConfig(), model=model, trainer="convex",
                            method=ConvexConfig(c_values=(0.01, 0.1, 1.0)),
                            train=TrainConfig(epochs=40, patience=0, refit=refit,
                                              eval_whole=whole, eval_hop_s=0.25,
                                              speaker_norm=speaker_norm),
                            verbose=0)


def test_convex_trainer_validates_every_point_and_saves_the_selected_head(manifest, tmp_path):
    cfg = _experiment(manifest, tmp_path / "w")
    metrics = run_experiment(cfg, fold_trainer(cfg))
    history = metrics["history"]
    # One "epoch" per point of the path, whatever --epochs says; each one converged.
    assert [h["c"] for h in history] == [0.01, 0.1, 1.0]
    assert all(h["gradient_max"] < 1e-5 for h in history)
    best = max(range(3), key=lambda i: (history[i]["val_uar"], -i))
    assert metrics["best_epoch"] == best + 1
    assert metrics["convex"]["c"] == history[best]["c"]
    # The saved model's head is the fit: training accuracy matches the history's.
    with open(os.path.join(cfg.workdir, "metrics.json")) as f:
        assert json.load(f)["convex"]["c_values"] == [0.01, 0.1, 1.0]
    model = keras.saving.load_model(os.path.join(cfg.workdir, "model.keras"))
    bn = model.classifier.get_layer("functionals_bn")
    gamma, beta = bn.get_weights()[:2]
    assert np.all(gamma == 1.0) and np.all(beta == 0.0)
    assert metrics["uar"] > 0.0


def test_convex_trainer_refits_at_the_selected_point_and_resumes(manifest, tmp_path):
    cfg = _experiment(manifest, tmp_path / "w", refit=True)
    first = run_experiment(cfg, fold_trainer(cfg))
    assert first["refit_epochs"] == first["best_epoch"]
    refit_history = json.load(open(os.path.join(cfg.workdir, "refit", "checkpoints",
                                                "state.json")))["history"]
    # The refit walks the path up to the selected point and keeps that point.
    assert [h["c"] for h in refit_history] == [0.01, 0.1, 1.0][:first["best_epoch"]]
    assert refit_history[-1]["c"] == first["convex"]["c"]
    # Re-running the finished run changes nothing; a run whose metrics are gone resumes
    # from its checkpoints to the same result.
    os.remove(os.path.join(cfg.workdir, "metrics.json"))
    again = run_experiment(cfg, fold_trainer(cfg))
    assert again["uar"] == pytest.approx(first["uar"])
    assert again["history"] == first["history"]


def test_convex_trainer_needs_the_functionals_model(manifest, tmp_path):
    tiny_cnn_lstm = ModelConfig(segment_s=0.5, n_mels=24, conv_filters=(4, 8), chunk_frames=12,
                                hop_frames=6, chunk_units=8, lstm_units=4)
    cfg = _experiment(manifest, tmp_path / "w", model=tiny_cnn_lstm)
    with pytest.raises(ValueError, match="--model=functionals"):
        run_experiment(cfg, fold_trainer(cfg))


def test_convex_flags_build_the_method(tmp_path):
    from absl import flags

    from trainers import train

    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["ser-train", "--trainer=convex", "--model=functionals", "--convex_c=0.01,0.1",
        f"--workdir={tmp_path}"])
    assert train._method_config(fv) == ConvexConfig(c_values=(0.01, 0.1))
    fv(["ser-train", "--trainer=convex", "--convex_c=0.1,abc", f"--workdir={tmp_path}"])
    with pytest.raises(ValueError, match="--convex_c"):
        train._method_config(fv)


def test_eval_whole_fits_and_scores_each_utterance_at_its_own_length(manifest, tmp_path):
    cfg = _experiment(manifest, tmp_path / "w", whole=True)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    assert metrics["uar"] > 0.0
    # With per-speaker normalisation the fit sees other functionals, and says so.
    norm = _experiment(manifest, tmp_path / "n", whole=True, speaker_norm=True)
    normed = run_experiment(norm, fold_trainer(norm))
    assert normed["speaker_normalization"].startswith("PER-SPEAKER")
    assert normed["history"][0]["loss"] != metrics["history"][0]["loss"]
    model = keras.saving.load_model(os.path.join(cfg.workdir, "model.keras"))
    (path,) = glob.glob(os.path.join(cfg.workdir, "**", "predictions.csv"), recursive=True)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    by_path = {u.path: u for u in read_manifest(manifest)}
    corpus = decode_corpus([by_path[r["path"]] for r in rows], cfg.audio, progress=False)
    waves = waveforms(corpus, range(len(rows)))
    # Longer than the model's 0.5 s windows (windowed evaluation would average several),
    # and than the 0.25 s evaluation hop (no utterance is extended).
    assert max(len(w) for w in waves) > 2 * model.segment_samples
    assert min(len(w) for w in waves) > model.sample_rate // 4
    for row, wave in zip(rows, waves):
        whole = model(wave[None], training=False).numpy()[0]
        logged = np.array([float(row[f"logit_{c}"]) for c in model.labels])
        np.testing.assert_allclose(logged, whole, atol=2e-3)
