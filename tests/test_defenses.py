"""Defended training: adversarial training's steps, schedule, selection and trainer runs."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TONE_LABELS, fit_tone_model, tone_dataset
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


def _tags(*path: str) -> set[str]:
    """Every summary tag in the TensorBoard event files under ``path``."""
    tags = set()
    for root, _, files in os.walk(os.path.join(*path)):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                tags |= {v.tag for v in event.summary.value}
    return tags


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
    ({"awp_gamma": -0.1}, "awp_gamma"),
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


@pytest.mark.parametrize("config", [
    AdversarialConfig(budget=TONE_BUDGET, steps=2, ratio=0.5, warmup_epochs=0),
    AdversarialConfig(method="fast", budget=TONE_BUDGET, ratio=0.5, warmup_epochs=0),
    AdversarialConfig(method="trades", budget=TONE_BUDGET, steps=2, warmup_epochs=0),
    AdversarialConfig(domain="features", budget=Budget("l2", 1.0), steps=2, ratio=0.5,
                      warmup_epochs=0),
    AdversarialConfig(budget=TONE_BUDGET, steps=2, ratio=1.0, warmup_epochs=0),
    AdversarialConfig(budget=TONE_BUDGET, steps=2, ratio=0.5, warmup_epochs=0,
                      awp_gamma=5e-3),
    AdversarialConfig(method="trades", budget=TONE_BUDGET, steps=2, warmup_epochs=0,
                      awp_gamma=5e-3),
], ids=["pgd", "fast", "trades", "pgd-features-l2", "pgd-all-adversarial", "pgd-awp",
        "trades-awp"])
def test_adversarial_steps_train_every_weight_and_report_both_accuracies(config):
    x, y = tone_dataset(6, seed=0)
    model = _tone_model()
    model.normalizer.adapt([model.frontend(x)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps = AdversarialSteps(model, config)
    steps.compile(optimizer=model.optimizer, jit_compile=False)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = steps.fit(x, y, batch_size=6, epochs=1, verbose=0)
    # With no clean example in the batches there is no clean accuracy to report.
    clean = config.method == "trades" or config.ratio < 1.0
    assert set(history.history) == ({"loss", "adv_accuracy", "adv_radius_used"}
                                    | ({"accuracy"} if clean else set()))
    assert np.isfinite(history.history["loss"][0])
    # The crafted examples use the budget they were asked for, and never more.
    assert 0.9 <= history.history["adv_radius_used"][0] <= 1.0 + 1e-5
    changed = [not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_weights)]
    assert all(changed), "every weight of the wrapped model trains"
    assert not steps.weights or all(any(w is v for v in model.weights) for w in steps.weights)


def _training_loss(model, x, y) -> tf.Tensor:
    """The mean cross-entropy of ``model`` in training mode (what an AWP step ascends)."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        y, model(x, training=True)))


def test_weight_perturbation_ascends_the_loss_by_its_relative_size_and_restores_exactly():
    from ser_tf.defenses.adversarial import WeightPerturbation

    x, y = tone_dataset(6, seed=0)
    model = _tone_model()
    model.normalizer.adapt([model.frontend(x)])
    model(x, training=True)  # moves the batch-norm statistics off their initial values
    awp = WeightPerturbation(model, 0.05)
    assert awp.weights and all(len(v.shape) >= 2 for v in awp.weights)
    assert any("moving_mean" in v.path for v in awp.state)

    def loss():
        return _training_loss(model, x, y)

    before = {v.path: v.numpy().copy() for v in model.variables}
    loss_before = float(loss())
    for v in model.variables:  # the reference pass moved the statistics: set them back
        v.assign(before[v.path])
    originals = awp.ascend(loss)
    perturbed = {v.path for v in awp.weights}
    for v in model.variables:
        if v.path in perturbed:
            moved = np.linalg.norm(v.numpy() - before[v.path])
            assert moved == pytest.approx(0.05 * np.linalg.norm(before[v.path]), rel=1e-4)
        else:  # biases, batch-norm scales and statistics, normaliser statistics
            np.testing.assert_array_equal(v.numpy(), before[v.path], err_msg=v.path)
    assert float(loss()) > loss_before, "the perturbation goes up the loss"
    awp.restore(originals)
    for v in awp.weights:
        np.testing.assert_array_equal(v.numpy(), before[v.path])


def test_awp_steps_take_the_gradient_at_the_perturbed_weights_and_update_the_originals():
    from ser_tf.defenses.adversarial import WeightPerturbation

    x, y = tone_dataset(6, seed=0)
    model = _tone_model()
    model.normalizer.adapt([model.frontend(x)])
    start = {v.path: v.numpy().copy() for v in model.variables}
    gamma, lr = 0.05, 0.1

    def loss():
        return _training_loss(model, x, y)

    # The step by hand: up the loss, the gradient there, back, then SGD.
    awp = WeightPerturbation(model, gamma)
    originals = awp.ascend(loss)
    with tf.GradientTape() as tape:
        grads = tape.gradient(loss(), model.trainable_variables)
    awp.restore(originals)
    expected = {v.path: start[v.path] - lr * g.numpy()
                for v, g in zip(model.trainable_variables, grads)}
    for v in model.variables:
        v.assign(start[v.path])
    # The training steps on the same batch. At -160 dB (a radius of 1e-8 of the peak) the
    # crafted examples equal the clean ones in float32, so both see the same inputs.
    steps = AdversarialSteps(model, AdversarialConfig(
        budget=Budget("linf_db", -160.0), steps=1, ratio=0.5, warmup_epochs=0,
        awp_gamma=gamma))
    steps.compile(optimizer=keras.optimizers.SGD(lr), jit_compile=False)
    steps.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy(), expected[v.path], atol=1e-6, err_msg=v.path)
    # And it is not the plain step, whose gradient is taken at the unperturbed weights.
    plain = AdversarialSteps(model, dataclasses.replace(steps.config, awp_gamma=0.0))
    for v in model.variables:
        v.assign(start[v.path])
    plain.compile(optimizer=keras.optimizers.SGD(lr), jit_compile=False)
    plain.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    moved = max(np.abs(v.numpy() - expected[v.path]).max() for v in model.trainable_variables)
    assert moved > 1e-3, "AWP's step should differ from the plain step"


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
    AdversarialConfig(method="trades", domain="features", budget=Budget("linf", 0.5), steps=2,
                      val_steps=2, warmup_epochs=1),
], ids=["pgd", "trades-features"])
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
    assert {"epoch_robust_uar", "epoch_uar", "epoch_score"} <= _tags(cfg.workdir, "tb", "val")
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
    # ... and the examples of the resumed epochs were crafted at it (not at epoch 1's).
    for h in metrics["history"]:
        assert 0.9 <= h["adv_radius_used"] <= 1.0 + 1e-5, h


def test_unknown_trainer_and_wrong_method_config_are_clear_errors(manifest, tmp_path):
    cfg = _experiment(manifest, tmp_path, AdversarialConfig())
    with pytest.raises(ValueError, match="unknown trainer"):
        fold_trainer(dataclasses.replace(cfg, trainer="bayesian"))
    with pytest.raises(ValueError, match="takes a AdversarialConfig, got object"):
        fold_trainer(dataclasses.replace(cfg, method=object()))


# -- GAN-augmented training ------------------------------------------------------------------


def test_conditional_wgan_trains_with_finite_losses_generates_the_right_shape_and_resumes(
        tmp_path):
    from ser_tf.defenses.gan import ConditionalWGAN, GANConfig

    shape = (21, 12, 1)  # frames and bins that are not multiples of the upsampling
    cfg = GANConfig(latent_dim=8, width=4, steps=3, critic_steps=2, batch_size=4,
                    checkpoint_every=2)
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(16,) + shape).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices((maps, np.arange(16) % 3)).repeat().batch(4)
    gan = ConditionalWGAN(shape, 3, cfg, workdir=str(tmp_path))
    writer = tf.summary.create_file_writer(str(tmp_path / "tb"))
    gan.fit(data, writer=writer, classes=("a", "b", "c"), progress=False)
    writer.flush()
    assert gan.sample([0, 1, 2, 2]).shape == (4,) + shape
    scalars, images = {}, set()
    for name in os.listdir(tmp_path / "tb"):
        for event in tf.compat.v1.train.summary_iterator(str(tmp_path / "tb" / name)):
            for v in event.summary.value:
                if v.tag == "generated_per_emotion":
                    images.add(event.step)
                else:
                    scalars.setdefault(v.tag, []).append(float(tf.make_ndarray(v.tensor)))
    assert {"critic_loss", "generator_loss", "wasserstein", "gradient_penalty"} <= set(scalars)
    assert all(np.isfinite(v).all() for v in scalars.values())
    assert images == {2, 3}
    # Re-opened from its workdir it is finished: nothing more is trained.
    again = ConditionalWGAN(shape, 3, dataclasses.replace(cfg, steps=3), workdir=str(tmp_path))
    assert int(again.step.numpy()) == 3
    np.testing.assert_array_equal(again.generator.get_weights()[0],
                                  gan.generator.get_weights()[0])


def test_gan_quality_tells_a_faithful_generator_from_noise():
    from ser_tf.defenses.gan import gan_quality

    rng = np.random.default_rng(0)

    def maps(labels):
        # Class k: a ridge at bins 3k..3k+2 over noise.
        out = rng.normal(0.0, 0.5, (len(labels), 30, 12, 1))
        for i, k in enumerate(labels):
            out[i, :, 3 * k:3 * k + 3] += 2.0
        return out.astype(np.float32)

    y_train, y_held = np.arange(60) % 3, np.arange(30) % 3
    real_train, real_held = maps(y_train), maps(y_held)
    faithful = gan_quality(maps, real_train, y_train, real_held, y_held, ("a", "b", "c"),
                           per_class=30)
    noise = gan_quality(lambda labels: rng.normal(size=(len(labels), 30, 12, 1)), real_train,
                        y_train, real_held, y_held, ("a", "b", "c"), per_class=30)
    assert faithful["probe_accuracy_real"] >= 0.95
    assert faithful["probe_accuracy_generated"] >= 0.95
    assert min(faithful["probe_accuracy_per_emotion"].values()) >= 0.9
    assert noise["probe_accuracy_generated"] < 0.6
    assert faithful["fd_generated_vs_real"] < 0.2 * noise["fd_generated_vs_real"]
    assert faithful["fd_real_train_vs_real_held"] == noise["fd_real_train_vs_real_held"]


def _gan_experiment(manifest, workdir, **gan):
    from ser_tf.defenses.gan import GANConfig

    method = GANConfig(**{"steps": 4, "critic_steps": 2, "latent_dim": 8, "width": 4,
                          "batch_size": 8, "checkpoint_every": 2, **gan})
    return dataclasses.replace(_experiment(manifest, workdir, None), trainer="gan",
                               method=method)


def test_gan_trainer_mixes_generated_and_adversarial_examples_and_reports_the_generator(
        manifest, tmp_path):
    adversarial = AdversarialConfig(method="fast", val_steps=2, warmup_epochs=0)
    cfg = _gan_experiment(manifest, tmp_path / "w", adversarial=adversarial)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    quality = metrics["gan"]["quality"]
    assert set(quality["probe_accuracy_per_emotion"]) == set(metrics["labels"])
    assert np.isfinite(quality["fd_generated_vs_real"])
    for h in metrics["history"]:
        assert 0.0 <= h["gen_accuracy"] <= 1.0 and 0.0 <= h["adv_accuracy"] <= 1.0
        # Selected as adversarial training is: on clean and robust validation UAR.
        assert 0.0 <= h["val_robust_uar"] <= 1.0
        assert h["score"] == pytest.approx(0.5 * h["val_uar"] + 0.5 * h["val_robust_uar"])
    assert {"epoch_robust_uar", "epoch_score"} <= _tags(cfg.workdir, "tb", "val")
    assert metrics["gan"]["config"]["adversarial"]["method"] == "fast"
    assert os.path.exists(os.path.join(cfg.workdir, "gan", "quality.json"))
    assert keras.saving.load_model(os.path.join(cfg.workdir, "model.keras")).purifier is None


def test_gan_config_rejects_trades_mixing_and_bad_values():
    from ser_tf.defenses.gan import GANConfig

    with pytest.raises(ValueError, match="TRADES"):
        GANConfig(adversarial=AdversarialConfig(method="trades"))
    with pytest.raises(ValueError, match="awp_gamma"):
        GANConfig(adversarial=AdversarialConfig(awp_gamma=5e-3))
    with pytest.raises(ValueError, match="ratio"):
        GANConfig(ratio=-1.0)


# -- the GAN purifier defense ----------------------------------------------------------------


@pytest.fixture(scope="module")
def purified_tone_model():
    """The tone CNN, briefly trained, with a purifier whose correction is not zero."""
    from ser_tf.defenses.purifier import build_purifier

    x, y = tone_dataset(20, seed=0)
    model = _tone_model()
    model.normalizer.adapt([model.frontend(x)])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=20, epochs=8, verbose=0)
    purifier = build_purifier(24, 1, width=4)
    out = purifier.get_layer("purifier_out")
    kernel, bias = out.get_weights()
    out.set_weights([np.random.default_rng(0).normal(0, 0.05, kernel.shape), bias])
    return model.with_purifier(purifier)


def test_purifier_and_classifier_save_load_and_export_as_one_model(purified_tone_model,
                                                                   tmp_path):
    from ser_tf.serving.export import write_artifacts
    from ser_tf.serving.runtime import load_predictor
    from ser_tf.serving.spec import ServingSpec

    model = purified_tone_model
    x, _ = tone_dataset(3, seed=5)
    reference = model(x).numpy()
    without = model.classifier(model.features(x)).numpy()
    assert np.abs(reference - without).max() > 1e-3, "the purifier must change the logits"
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.purifier is not None
    np.testing.assert_allclose(loaded(x).numpy(), reference, atol=1e-5)
    spec = ServingSpec.for_model(loaded, AudioConfig(sample_rate=8000), hop_s=0.25)
    paths = write_artifacts(loaded, spec, str(tmp_path / "export"), ("float32",), None)
    for name in ("savedmodel", "float32"):
        got = load_predictor(paths[name]).window_logits(x)
        np.testing.assert_allclose(got, reference, atol=1e-4, err_msg=name)


def test_bpda_keeps_the_logits_and_passes_gradients_straight_through(purified_tone_model):
    model = purified_tone_model
    x, y = tone_dataset(2, seed=6)
    x = tf.constant(x)
    np.testing.assert_allclose(model(x, bpda=True).numpy(), model(x).numpy(), atol=1e-6)

    def grad(fn, v):
        with tf.GradientTape() as tape:
            tape.watch(v)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, fn(v)))
        return tape.gradient(loss, v)

    feats = model.features(x)
    straight = grad(lambda f: model.classify(f, bpda=True), feats)
    # BPDA's gradient is the classifier's gradient at the purified point, passed unchanged.
    at_purified = grad(lambda f: model.classifier(f), model.purifier(feats))
    np.testing.assert_allclose(straight.numpy(), at_purified.numpy(), rtol=1e-4, atol=1e-6)
    full = grad(lambda f: model.classify(f), feats)
    assert np.abs(full.numpy() - straight.numpy()).max() > 1e-6
    wave_grad = grad(lambda w: model(w, bpda=True), x)
    assert np.all(np.isfinite(wave_grad.numpy())) and np.abs(wave_grad.numpy()).max() > 0


def test_attack_runner_runs_bpda_variants_only_for_purified_models(purified_tone_model):
    from ser_tf.attacks.runner import Sweep, evaluate

    x, y = tone_dataset(2, seed=7)
    sweep = Sweep(attacks=("fgsm", "pgd"), linf_db=(-30.0,), options={"pgd": {"steps": 2}},
                  bpda=True)
    assert [r[0] for r in sweep.runs()] == ["fgsm", "fgsm+bpda", "pgd", "pgd+bpda"]
    clean, outcomes = evaluate(purified_tone_model, x, y, sweep, batch_size=6, progress=False)
    assert [o.name for o in outcomes] == ["fgsm", "fgsm+bpda", "pgd", "pgd+bpda"]
    for o in outcomes:
        assert np.nanmax(o.linf_db) <= -30.0 + 1e-3
    with pytest.raises(ValueError, match="purifier"):
        evaluate(_tone_model(), x, y, sweep, progress=False)


def test_purifier_trainer_puts_a_trained_purifier_into_the_saved_model(manifest, tmp_path):
    from ser_tf.defenses.purifier import PurifierConfig

    method = PurifierConfig(steps=4, width=4, batch_size=8, attack_steps=2,
                            checkpoint_every=2)
    cfg = dataclasses.replace(_experiment(manifest, tmp_path / "w", None),
                              trainer="purifier", method=method)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    report = metrics["purifier"]
    assert report["config"]["steps"] == 4
    assert 0.0 <= report["val_uar_with_purifier"] <= 1.0
    model = keras.saving.load_model(os.path.join(cfg.workdir, "model.keras"))
    assert model.purifier is not None
    out = model.purifier.get_layer("purifier_out").get_weights()[0]
    assert np.abs(out).max() > 0, "the purifier's correction was trained away from zero"
    assert {"reconstruction_l1", "discriminator_loss",
            "clean_adversarial_purified"} <= _tags(cfg.workdir, "tb", "purifier")


def test_purifier_goes_in_front_of_an_already_trained_classifier(manifest, tmp_path):
    from ser_tf.defenses.purifier import PurifierConfig

    base = dataclasses.replace(_experiment(manifest, tmp_path / "std", None), trainer="standard")
    run_experiment(base, fold_trainer(base))
    trained = keras.saving.load_model(os.path.join(base.workdir, "model.keras"))
    method = PurifierConfig(steps=2, width=4, batch_size=8, attack_steps=2,
                            checkpoint_every=2, classifier_from=base.workdir)
    cfg = dataclasses.replace(base, workdir=str(tmp_path / "pur"), trainer="purifier",
                              method=method)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    # One "epoch": the loaded classifier, validated; no training of another one.
    assert len(metrics["history"]) == 1 and metrics["best_epoch"] == 1
    assert metrics["history"][0]["loss"] is None  # nothing trained; JSON has no NaN
    model = keras.saving.load_model(os.path.join(cfg.workdir, "model.keras"))
    assert model.purifier is not None
    for mine, theirs in zip(model.classifier.get_weights(), trained.classifier.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(model.normalizer.get_weights()[0],
                                  trained.normalizer.get_weights()[0])
    # Running it again resumes the finished fold; the errors name what is wrong.
    assert run_experiment(cfg, fold_trainer(cfg))["uar"] == metrics["uar"]
    other = dataclasses.replace(cfg, workdir=str(tmp_path / "other"), test_speakers=("s02",))
    with pytest.raises(ValueError, match="tested on speakers"):
        run_experiment(other, fold_trainer(other))
    refit = dataclasses.replace(cfg, workdir=str(tmp_path / "refit"),
                                train=dataclasses.replace(cfg.train, refit=True))
    with pytest.raises(ValueError, match="--refit"):
        run_experiment(refit, fold_trainer(refit))
    wider = dataclasses.replace(cfg, workdir=str(tmp_path / "wider"),
                                model=dataclasses.replace(TINY_MODEL, lstm_units=7))
    with pytest.raises(ValueError, match="not the one these flags build"):
        run_experiment(wider, fold_trainer(wider))
    missing = dataclasses.replace(cfg, workdir=str(tmp_path / "missing"),
                                  method=dataclasses.replace(
                                      method, classifier_from=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="no trained model"):
        run_experiment(missing, fold_trainer(missing))


def test_frechet_distance_matches_the_closed_form():
    from ser_tf.defenses.gan import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal(1.0, 2.0, (20000, 3))
    # Isotropic Gaussians: |mu_a - mu_b|^2 + d * (s_a - s_b)^2 = 3 + 3 * 1.
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


# -- the randomized input defense and expectation over transformation -----------------------


@pytest.fixture(scope="module")
def noisy_tone_model():
    """The tone CNN trained with input noise at -25 dB, kept at inference."""
    config = ModelConfig(name="cnn", sample_rate=8000, segment_s=0.5, n_mels=24,
                         conv_filters=(8, 16), dense_units=16, dropout=0.0,
                         specaugment=False, input_noise_db=-25.0)
    return fit_tone_model(config, n_per_class=30, epochs=10)


def test_a_random_model_averages_its_draws_and_saves_loads_and_exports_random(
        noisy_tone_model, tmp_path):
    from ser_tf.serving.export import (REDRAW, ExportJob, format_report, verify_artifacts,
                                       write_artifacts)
    from ser_tf.serving.runtime import KerasPredictor, load_predictor
    from ser_tf.serving.spec import ServingSpec
    from ser_tf.serving.tflite import op_summary

    model = noisy_tone_model
    x, y = tone_dataset(4, seed=5)
    assert model.random and not _tone_model().random
    assert np.mean(np.argmax(model(x), -1) == y) >= 0.9, "the noisy tone model did not learn"

    def spread(draws: int) -> float:
        model.noise.draws = draws
        try:
            return float(np.std(np.stack([model(x).numpy() for _ in range(12)]), axis=0).mean())
        finally:
            model.noise.draws = 1

    one, sixteen = spread(1), spread(16)
    assert one > 0, "input noise must make the logits random"
    # Averaging 16 independent draws divides the spread by about 4.
    assert sixteen < one / 2.5, (one, sixteen)

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.random and loaded.noise.get_config() == model.noise.get_config()
    feats = model.features(x)
    np.testing.assert_allclose(loaded.classify(feats).numpy(), model.classify(feats).numpy(),
                               atol=1e-5)

    spec = ServingSpec.for_model(loaded, AudioConfig(sample_rate=8000), hop_s=0.25)
    paths = write_artifacts(loaded, spec, str(tmp_path / "export"), ("float32",), None)
    with open(paths["float32"], "rb") as f:
        ops = op_summary(f.read())
    assert ops["flex_ops"] == [] and ops["ops"].get("RANDOM_STANDARD_NORMAL") == 1
    for name in ("savedmodel", "float32"):
        predictor = load_predictor(paths[name])
        first, second = predictor.window_logits(x), predictor.window_logits(x)
        assert not np.allclose(first, second), f"{name} lost the input noise"
        assert np.mean(first.argmax(-1) == y) >= 0.9, name

    # ser-export's checks: Keras is drawn twice, and the bars allow for the difference.
    keras_predictor = KerasPredictor(loaded, spec)
    waves, y = tone_dataset(4, seed=6, seconds=0.8)
    clips = np.stack([keras_predictor.windows(w)[0] for w in waves])
    job = ExportJob(transfer_linf_db=(-30.0,), blackbox_clips=3, latency_utterances=2,
                    progress=False)
    report = verify_artifacts(loaded, spec, paths, list(waves), clips, y, TONE_LABELS, job,
                              paths["savedmodel"])
    rows = {r["name"]: r for r in report["artifacts"]}
    assert list(rows) == ["keras", REDRAW, "savedmodel", "float32"]
    assert report["random_model"] and report["input_noise"] == {"level_db": -25.0, "draws": 1}
    assert rows[REDRAW]["checks"] == [] and rows[REDRAW]["latency"] == rows["keras"]["latency"]
    p = rows[REDRAW]["agreement"]
    bar = min(0.999, p - 2 * np.sqrt(2 * p * (1 - p) / len(y)))
    assert rows["savedmodel"]["checks"][0]["check"] == f"agreement >= {round(bar, 4)}"
    assert "random model" in format_report(report)


def test_averaging_draws_keeps_the_logits_through_keras_the_edge_model_and_tflite(tmp_path):
    """With noise too faint to matter, averaging 3 draws must give the noiseless logits,
    in Keras, in the fixed-length (batch 1, unrolled) edge model and in the TFLite file."""
    from ser_tf.serving import savedmodel
    from ser_tf.serving.export import write_artifacts
    from ser_tf.serving.runtime import load_predictor
    from ser_tf.serving.spec import ServingSpec

    config = dataclasses.replace(TINY_MODEL, sample_rate=8000, specaugment=False,
                                 input_noise_db=-200.0, noise_draws=3)
    model = build_model(config, TONE_LABELS, seed=0)
    x, _ = tone_dataset(2, seed=0)
    model.normalizer.adapt([model.raw_features(x)])
    plain = model.classify(model.normalizer(model.frontend(x))).numpy()
    np.testing.assert_allclose(model(x).numpy(), plain, atol=1e-5)
    edge = savedmodel.fixed_length_model(model)
    np.testing.assert_allclose(edge(x[:1]).numpy(), plain[:1], atol=1e-5)
    spec = ServingSpec.for_model(model, AudioConfig(sample_rate=8000), hop_s=0.25)
    paths = write_artifacts(model, spec, str(tmp_path), ("float32",), None)
    np.testing.assert_allclose(load_predictor(paths["float32"]).window_logits(x), plain,
                               atol=1e-4)


def test_export_checks_of_a_random_model_give_way_by_the_redraws_variation():
    from ser_tf.serving.export import _checks

    keras_row = {"n": 50, "uar": 0.60, "robust": {"t": {"accuracy": 0.30}}}
    redraw = {"agreement": 0.9, "uar": 0.58, "robust": {"t": {"accuracy": 0.26}}}
    row = {"agreement": 0.85, "uar": 0.52, "robust": {"t": {"accuracy": 0.20}}}
    margin = 2 * np.sqrt(2 * 0.9 * 0.1 / 50)  # 0.12
    agree, uar, robust = _checks("int8", row, keras_row, redraw)
    assert agree["check"] == f"agreement >= {round(0.9 - margin, 4)}" and agree["ok"]
    assert uar["check"] == f"UAR within {0.02 + 0.02 + margin:.2f} of Keras" and uar["ok"]
    assert robust["ok"] and robust["value"] == pytest.approx(0.10)
    # Without the redraw (a deterministic model) the same artifact fails every bar.
    assert not any(c["ok"] for c in _checks("int8", row, keras_row))


def test_eot_gradient_estimates_the_expected_gradient_better_than_one_draw(noisy_tone_model):
    model = noisy_tone_model
    x, y = tone_dataset(2, seed=6)
    x = tf.constant(x)

    def gradient(fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(y, fn(x)))
        return tape.gradient(loss, x).numpy()

    def cosine(a, b):
        return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    tf.random.set_seed(0)
    reference = gradient(whitebox.expectation_over_transformation(model, 256))
    single = np.mean([cosine(gradient(model), reference) for _ in range(4)])
    eot = np.mean([cosine(gradient(whitebox.expectation_over_transformation(model, 32)),
                          reference) for _ in range(4)])
    assert eot > single + 0.1 and eot > 0.7, (single, eot)
    # On a deterministic function EOT changes nothing.
    plain = _tone_model()
    assert whitebox.expectation_over_transformation(plain, 1) is plain
    np.testing.assert_allclose(whitebox.expectation_over_transformation(plain, 3)(x).numpy(),
                               plain(x).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        whitebox.expectation_over_transformation(plain, 0)


def test_attack_runner_averages_gradients_only_for_random_models(noisy_tone_model):
    from ser_tf.attacks.runner import Sweep, evaluate

    x, y = tone_dataset(3, seed=7)
    sweep = Sweep(attacks=("pgd",), linf_db=(-30.0,), options={"pgd": {"steps": 2}}, eot=4)
    clean, outcomes = evaluate(noisy_tone_model, x, y, sweep, batch_size=9, progress=False)
    assert [o.name for o in outcomes] == ["pgd"]
    assert np.nanmax(outcomes[0].linf_db) <= -30.0 + 1e-3
    with pytest.raises(ValueError, match="random model"):
        evaluate(_tone_model(), x, y, sweep, progress=False)
    with pytest.raises(ValueError, match="eot"):
        Sweep(eot=0)


def test_trainer_learns_normalisation_on_noisy_features_and_saves_a_random_model(
        manifest, tmp_path):
    cfg = ExperimentConfig(workdir=str(tmp_path / "w"), corpus="manifest", data_dir=manifest,
                           protocol="speakers", test_speakers=("s01",), val_speakers=1,
                           audio=AudioConfig(),
                           model=dataclasses.replace(TINY_MODEL, input_noise_db=-20.0,
                                                     noise_draws=2),
                           train=TrainConfig(epochs=1, batch_size=8, patience=0), verbose=0)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    assert 0.0 <= metrics["uar"] <= 1.0
    model = keras.saving.load_model(os.path.join(cfg.workdir, "model.keras"))
    assert model.random and model.noise.level_db == -20.0 and model.noise.draws == 2
    # The normaliser's statistics are those of noisy features, what the classifier reads:
    # nearer the per-bin mean of the corpus' features with the noise than without it.
    from ser_tf.data.corpora import load_corpus
    from ser_tf.data.pipeline import decode_corpus, waveforms

    decoded = decode_corpus(load_corpus("manifest", manifest), AudioConfig(), progress=False)
    waves = waveforms(decoded, range(len(decoded.utterances)))
    clean = np.concatenate([model.frontend(w[None]).numpy()[0] for w in waves])
    noisy = np.concatenate([model.raw_features(w[None]).numpy()[0] for w in waves])
    learned = model.normalizer.mean.numpy().reshape(-1)
    assert np.abs(noisy.mean(0) - clean.mean(0)).mean() > 0.5, "the noise must matter here"
    assert (np.abs(learned - noisy.mean(0).reshape(-1)).mean()
            < 0.5 * np.abs(learned - clean.mean(0).reshape(-1)).mean())


def test_adversarial_validation_of_a_random_model_attacks_through_eot(manifest, tmp_path):
    cfg = ExperimentConfig(workdir=str(tmp_path / "w"), corpus="manifest", data_dir=manifest,
                           protocol="speakers", test_speakers=("s01",), val_speakers=1,
                           audio=AudioConfig(),
                           model=dataclasses.replace(TINY_MODEL, input_noise_db=-20.0),
                           trainer="adversarial",
                           method=AdversarialConfig(steps=1, val_steps=2, val_eot=3,
                                                    warmup_epochs=0),
                           train=TrainConfig(epochs=1, batch_size=8, patience=0), verbose=0)
    metrics = run_experiment(cfg, fold_trainer(cfg))
    assert metrics["adversarial_training"]["val_eot"] == 3
    assert 0.0 <= metrics["history"][0]["val_robust_uar"] <= 1.0
    descriptions = set()
    for root, _, files in os.walk(os.path.join(cfg.workdir, "tb", "val")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                descriptions |= {v.metadata.summary_description for v in event.summary.value
                                 if v.tag == "epoch_robust_uar"}
    assert descriptions == {"PGD-2 at -40 dB, EOT over 3 draws, central clips"}, descriptions
    with pytest.raises(ValueError, match="val_eot"):
        AdversarialConfig(val_eot=0)
