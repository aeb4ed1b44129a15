"""Black-box attacks on the tiny tone model: budgets kept, queries counted, no gradients."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from ser_tf.attacks import blackbox
from ser_tf.attacks.budget import Budget, achieved, epsilon, project
from ser_tf.models import ModelConfig, build_model
from conftest import TONE_LABELS, tone_dataset


class Oracle:
    """The target behind a wall: counts every row it is shown and refuses gradients.

    Its gradient raises, so any attack that differentiated through the model (a tape over
    its output, ``tape.gradient``) would fail the test that uses it.
    """

    def __init__(self, model_fn):
        self.model_fn = tf.function(model_fn, reduce_retracing=True)
        self.rows = 0
        self.calls = 0

    def __call__(self, x):
        x = tf.convert_to_tensor(x, tf.float32)
        self.rows += int(x.shape[0])
        self.calls += 1

        @tf.custom_gradient
        def forward(inputs):
            def grad(upstream, variables=None):
                raise AssertionError("a black-box attack asked for a gradient of the target")
            return self.model_fn(inputs), grad

        return forward(x)


def accuracy(model_fn, x, y) -> float:
    return float(np.mean(np.argmax(model_fn(tf.constant(x)).numpy(), -1) == np.asarray(y)))


def assert_within_budget(x, x_adv, budget: Budget) -> None:
    x, x_adv = np.asarray(x), np.asarray(x_adv)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    radius = epsilon(tf.constant(x), budget).numpy().reshape(-1)
    got = achieved(x, x_adv)
    used = got["linf"] if budget.norm == np.inf else got["l2"]
    assert np.all(used <= radius * (1 + 1e-5) + 1e-7), (used / radius).max()
    if budget.clip_range() is not None:
        assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0


def pgd(model_fn, x, *, budget: Budget, y=None, targeted=False, steps=10):
    """A small white-box L-inf/L2 PGD for the transfer test (the substitute is ours)."""
    x = tf.convert_to_tensor(x, tf.float32)
    if y is None:
        y = tf.argmax(model_fn(x), -1)
    eps = epsilon(x, budget)
    x_adv = x
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(y, tf.int32), logits=model_fn(x_adv)))
        g = tape.gradient(loss, x_adv) * (-1.0 if targeted else 1.0)
        if budget.norm == np.inf:
            g = tf.sign(g)
        else:
            g = g / tf.norm(g, axis=-1, keepdims=True)
        x_adv = project(x, x_adv + 2.5 * eps / steps * g, budget)
    return x_adv


# --------------------------------------------------------------------------------------------


def test_oracle_guard_really_refuses_gradients(tone_model):
    model, x, _ = tone_model
    oracle = Oracle(model)
    xs = tf.identity(x[:2])
    with tf.GradientTape() as tape:
        tape.watch(xs)
        loss = tf.reduce_sum(oracle(xs))
    with pytest.raises(AssertionError, match="gradient"):
        tape.gradient(loss, xs)


def test_query_counter_counts_rows_and_chunks(tone_model):
    model, x, _ = tone_model
    oracle = Oracle(model)
    counter = blackbox.QueryCounter(oracle, chunk_size=7)
    logits = counter(x[:20])
    assert counter.queries == 20 == oracle.rows and counter.calls == 3 == oracle.calls
    np.testing.assert_allclose(logits.numpy(), model(x[:20]).numpy(), rtol=1e-4, atol=1e-4)
    labels = counter.labels(x[:5])
    assert labels.dtype == tf.int32 and labels.shape == (5,) and counter.queries == 25
    np.testing.assert_array_equal(labels.numpy(), np.argmax(logits.numpy()[:5], -1))
    counter.reset()
    assert counter.queries == 0

    @tf.function
    def traced(batch):
        return counter(batch)

    with pytest.raises(RuntimeError, match="eagerly"):
        traced(x[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        blackbox.QueryCounter(oracle, chunk_size=0)


@pytest.mark.parametrize("budget,estimator,update,max_acc", [
    (Budget("linf_db", -20), "spsa", "adam", 0.6),
    (Budget("snr_db", 10), "nes", "sign", 0.5),
])
def test_spsa_fools_the_model_within_budget(tone_model, budget, estimator, update, max_acc):
    model, x, y = tone_model
    oracle = Oracle(model)
    counter = blackbox.QueryCounter(oracle)
    steps, samples = 20, 16
    x_adv = blackbox.spsa(oracle, x, budget=budget, y=y, steps=steps, samples=samples,
                          estimator=estimator, update=update, seed=0, counter=counter)
    assert_within_budget(x, x_adv, budget)
    clean, adv = accuracy(model, x, y), accuracy(model, x_adv, y)
    assert clean >= 0.9 and adv <= max_acc, (clean, adv)
    # Every row the model saw was counted, and the early stop saved queries.
    assert counter.queries == oracle.rows
    assert len(x) < counter.queries < len(x) * (1 + steps * (2 * samples + 1))
    assert (counter.queries - len(x)) % (2 * samples + 1) == 0


def test_spsa_targeted_reaches_the_target(tone_model):
    model, x, y = tone_model
    target = (y.numpy() + 1) % 3
    x_adv = blackbox.spsa(Oracle(model), x, budget=Budget("snr_db", 10), y=target,
                          targeted=True, steps=20, samples=16, seed=0)
    hit = np.mean(np.argmax(model(x_adv).numpy(), -1) == target)
    assert hit >= 0.5, hit      # chance is 1/3, and the clean hit rate is ~0


def test_spsa_query_limit_and_determinism(tone_model):
    model, x, y = tone_model
    x, y = x[::5], y[::5]
    budget = Budget("linf_db", -30)
    samples, limit = 4, 1 + 2 * (2 * 4 + 1)
    runs = []
    for seed in (0, 0, 1):
        counter = blackbox.QueryCounter(Oracle(model))
        runs.append(blackbox.spsa(model, x, budget=budget, y=y, steps=50, samples=samples,
                                  max_queries=limit, seed=seed, counter=counter).numpy())
        assert counter.queries <= len(x) * limit
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_spsa_on_features_of_any_rank(tone_model):
    model, x, y = tone_model
    feats = model.features(x)
    budget = Budget("linf", 2.0)
    x_adv = blackbox.spsa(Oracle(model.classify), feats, budget=budget, y=y, steps=15,
                          samples=8, seed=0)
    assert x_adv.shape == feats.shape
    assert_within_budget(feats.numpy(), x_adv.numpy(), budget)
    assert accuracy(model.classify, x_adv, y) < accuracy(model.classify, feats, y) - 0.2


def test_bad_arguments(tone_model):
    model, x, y = tone_model
    budget = Budget("linf_db", -20)
    with pytest.raises(ValueError, match="estimator"):
        blackbox.spsa(model, x, budget=budget, estimator="fd")
    with pytest.raises(ValueError, match="update"):
        blackbox.spsa(model, x, budget=budget, update="sgd")
    with pytest.raises(ValueError, match="target"):
        blackbox.spsa(model, x, budget=budget, targeted=True)
    with pytest.raises(ValueError, match="max_queries"):
        blackbox.spsa(model, x, budget=budget, max_queries=0)
    with pytest.raises(ValueError, match="samples"):
        blackbox.spsa(model, x, budget=budget, samples=0)
    with pytest.raises(ValueError, match="delta"):
        blackbox.spsa(model, x, budget=budget, delta=-1.0)
    with pytest.raises(ValueError, match="max_queries"):
        blackbox.hop_skip_jump(model, x, budget=budget, max_queries=-5)
    with pytest.raises(ValueError, match="target"):
        blackbox.hop_skip_jump(model, x, budget=budget, targeted=True)
    with pytest.raises(ValueError, match="x_init"):
        blackbox.hop_skip_jump(model, x, budget=budget, y=y, targeted=True, x_init=x[:3])
    with pytest.raises(ValueError, match="labels"):
        blackbox.spsa(model, x, budget=budget, y=y[:4])
    with pytest.raises(ValueError, match="counter"):
        blackbox.spsa(model, x, budget=budget, counter=object())
    with pytest.raises(ValueError, match="rounds"):
        blackbox.train_substitute(model, x, build_fn=lambda: None, rounds=-1)
    with pytest.raises(ValueError, match="domain"):
        blackbox.train_substitute(model, x, build_fn=lambda: None, domain="spectrum")


@pytest.mark.parametrize("budget,max_acc", [(Budget("snr_db", 10), 0.3),
                                            (Budget("linf_db", -20), 0.5)])
def test_hop_skip_jump_fools_the_model_within_budget(tone_model, budget, max_acc):
    model, x, y = tone_model
    oracle = Oracle(model)
    counter = blackbox.QueryCounter(oracle)
    max_queries = 300
    x_adv = blackbox.hop_skip_jump(oracle, x, budget=budget, y=y, max_queries=max_queries,
                                   seed=0, counter=counter)
    assert_within_budget(x, x_adv, budget)
    adv = accuracy(model, x_adv, y)
    assert adv <= max_acc, adv
    assert counter.queries == oracle.rows
    assert len(x) * max_queries * 0.8 < counter.queries <= len(x) * max_queries


def test_hop_skip_jump_projects_onto_small_budgets(tone_model):
    # At 40 dB SNR a short decision-based attack finds nothing inside the ball: the best
    # adversarial points are projected into it and the model is right again.
    model, x, y = tone_model
    budget = Budget("snr_db", 40)
    x_adv = blackbox.hop_skip_jump(Oracle(model), x[::3], budget=budget, y=y[::3],
                                   max_queries=120, seed=0)
    assert_within_budget(x[::3], x_adv, budget)
    assert np.any(x_adv.numpy() != x[::3].numpy())
    assert accuracy(model, x_adv, y[::3]) >= 0.8


def test_hop_skip_jump_targeted_with_starting_points(tone_model):
    model, x, y = tone_model
    target = (y.numpy() + 2) % 3
    others, other_y = tone_dataset(10, seed=7)
    x_init = np.stack([others[np.flatnonzero(other_y == t)[i % 10]]
                       for i, t in enumerate(target)])
    counter = blackbox.QueryCounter(Oracle(model))
    x_adv = blackbox.hop_skip_jump(Oracle(model), x, budget=Budget("snr_db", 10), y=target,
                                   targeted=True, x_init=x_init, init_trials=0,
                                   batch_starts=False, max_queries=300, seed=0,
                                   counter=counter)
    hit = np.mean(np.argmax(model(x_adv).numpy(), -1) == target)
    assert hit >= 0.5, hit
    assert counter.queries <= len(x) * 300


def test_hop_skip_jump_without_a_start_returns_x(tone_model):
    _, x, _ = tone_model

    def constant(batch):
        return tf.tile(tf.constant([[2.0, 0.0, 0.0]]), [tf.shape(batch)[0], 1])

    budget = Budget("snr_db", 10)
    x_adv = blackbox.hop_skip_jump(constant, x[:4], budget=budget, max_queries=50,
                                   batch_starts=True)
    np.testing.assert_array_equal(x_adv.numpy(), x[:4].numpy())
    x_adv = blackbox.hop_skip_jump(constant, x[:4], budget=budget, y=[1, 1, 2, 2],
                                   targeted=True, max_queries=50)
    np.testing.assert_array_equal(x_adv.numpy(), x[:4].numpy())


def test_hop_skip_jump_is_deterministic(tone_model):
    model, x, y = tone_model
    x, y = x[::5], y[::5]
    budget = Budget("snr_db", 10)
    runs = [blackbox.hop_skip_jump(Oracle(model), x, budget=budget, y=y, max_queries=150,
                                   seed=seed).numpy() for seed in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_substitute_training_and_transfer(tone_model):
    model, x, y = tone_model
    oracle = Oracle(model)
    counter = blackbox.QueryCounter(oracle)
    # The attacker's own audio: other tones, never the test set, and no labels.
    seed_x, _ = tone_dataset(5, seed=2)

    def build():
        keras.utils.set_random_seed(1)
        config = ModelConfig(name="cnn", sample_rate=8000, segment_s=0.5, n_mels=16,
                             conv_filters=(8,), dense_units=16, dropout=0.0, specaugment=False)
        return build_model(config, TONE_LABELS)

    rounds = 2
    substitute = blackbox.train_substitute(oracle, seed_x, build_fn=build, rounds=rounds,
                                           epochs=20, batch_size=16, learning_rate=3e-3,
                                           seed=0, counter=counter)
    assert counter.queries == len(seed_x) * 2 ** rounds == oracle.rows
    agree = np.mean(np.argmax(substitute(x).numpy(), -1) == np.argmax(model(x).numpy(), -1))
    assert agree >= 0.6, agree          # chance is 1/3

    budget = Budget("linf_db", -14)
    before = counter.queries
    x_adv = blackbox.transfer_attack(oracle, substitute, x, budget=budget, y=y,
                                     attack_fn=pgd, counter=counter)
    assert counter.queries == before      # labels given: no target queries
    assert_within_budget(x, x_adv, budget)
    assert accuracy(model, x_adv, y) <= accuracy(model, x, y) - 0.3

    x_adv = blackbox.transfer_attack(oracle, substitute, x[:6], budget=budget,
                                     attack_fn=pgd, counter=counter, steps=2)
    assert counter.queries == before + 6 == oracle.rows      # the target labelled x
    assert_within_budget(x[:6], x_adv, budget)
    with pytest.raises(ValueError, match="target"):
        blackbox.transfer_attack(oracle, substitute, x, budget=budget, attack_fn=pgd,
                                 targeted=True)
