"""White-box attacks and budgets on real tensors through a real (tiny, trained) SER model."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from ser_tf.attacks import budget as B
from ser_tf.attacks import whitebox as W

# -- budgets ---------------------------------------------------------------------------------


def test_budget_parse_and_radius():
    assert B.Budget.parse("linf_db:-40") == B.Budget("linf_db", -40.0)
    assert B.Budget("linf_db", -40).radius == pytest.approx(0.01)
    assert B.Budget("snr_db", 20).radius == pytest.approx(0.1)
    assert B.Budget("linf", 0.5).radius == 0.5
    assert B.Budget("snr_db", 20).norm == 2 and B.Budget("linf", 1).norm == np.inf
    assert B.Budget("l2", 3).domain == "features" and B.Budget("snr_db", 3).domain == "waveform"
    for bad, match in (("linf_db", "not KIND:VALUE"), ("db:-40", "unknown budget kind"),
                       ("linf:x", "not a number"), ("l2:-1", "must be positive"),
                       ("linf_db:nan", "finite")):
        with pytest.raises(ValueError, match=match):
            B.Budget.parse(bad)


def test_project_enforces_ball_and_range_per_example():
    rng = np.random.default_rng(0)
    levels = np.array([[0.9], [0.1], [0.01]], np.float32)
    x = rng.uniform(-1, 1, (3, 500)).astype(np.float32) * levels
    wild = x + rng.normal(0, 1.0, x.shape).astype(np.float32)
    for budget in (B.Budget("linf_db", -30), B.Budget("snr_db", 20)):
        out = B.project(x, wild, budget).numpy()
        got = B.achieved(x, out)
        if budget.kind == "linf_db":
            assert np.all(got["linf_db"] <= -30 + 1e-3)
        else:
            assert np.all(got["snr_db"] >= 20 - 1e-3)
        assert out.min() >= -1.0 and out.max() <= 1.0
    # Inside the ball, projection changes nothing.
    near = x + 1e-4 * x
    np.testing.assert_allclose(B.project(x, near, B.Budget("linf_db", -30)).numpy(), near,
                               atol=1e-7)


def test_achieved_figures_match_definitions():
    x = np.array([[0.5, -0.5, 0.25, 0.0]])
    adv = x + np.array([[0.005, 0.0, 0.0, 0.0]])
    got = B.achieved(x, adv)
    assert got["linf_db"][0] == pytest.approx(-40.0)
    assert got["snr_db"][0] == pytest.approx(10 * np.log10((0.25 + 0.25 + 0.0625) / 0.005 ** 2))
    unchanged = B.achieved(x, x)
    assert unchanged["l2"][0] == 0 and unchanged["snr_db"][0] == np.inf


# -- white-box attacks on the tone model ---------------------------------------------------------

LINF = B.Budget("linf_db", -20)
L2 = B.Budget("snr_db", 15)

GRADIENT_ATTACKS = [
    ("fgsm", W.fgsm, LINF, {}),
    ("fgm", W.fgm, L2, {}),
    ("bim", W.bim, LINF, {"steps": 5}),
    ("pgd_linf", W.pgd, LINF, {"steps": 5}),
    ("pgd_l2", W.pgd, L2, {"steps": 5, "restarts": 2}),
    ("mim", W.mim, LINF, {"steps": 5}),
    ("cw_l2", W.carlini_wagner_l2, L2, {"steps": 30, "search_steps": 3}),
]


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model(x), -1) == np.asarray(y)))


def _loss(model, x, y) -> float:
    logits = model(x, training=False)
    return float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)))


@pytest.mark.parametrize("name,attack,budget,options", GRADIENT_ATTACKS,
                         ids=[a[0] for a in GRADIENT_ATTACKS])
def test_untargeted_attack_keeps_shape_budget_range_and_fools(tone_model, name, attack,
                                                              budget, options):
    model, x, y = tone_model
    x_adv = attack(model, x, budget=budget, y=y, **options)
    assert x_adv.shape == x.shape and x_adv.dtype == tf.float32
    got = B.achieved(x.numpy(), x_adv.numpy())
    if budget.kind == "linf_db":
        assert np.nanmax(got["linf_db"]) <= budget.value + 1e-3
    else:
        assert np.nanmin(got["snr_db"]) >= budget.value - 1e-3
    assert x_adv.numpy().min() >= -1.0 and x_adv.numpy().max() <= 1.0
    assert _loss(model, x_adv, y) > _loss(model, x, y)
    clean, robust = _accuracy(model, x, y), _accuracy(model, x_adv, y)
    assert robust <= clean - 0.3, f"{name}: accuracy {clean:.2f} -> {robust:.2f}"


@pytest.mark.parametrize("name,attack,budget,options",
                         [a for a in GRADIENT_ATTACKS if a[0] in ("pgd_linf", "cw_l2")],
                         ids=["pgd_linf", "cw_l2"])
def test_targeted_attack_reaches_the_target_more_often_than_chance(tone_model, name, attack,
                                                                   budget, options):
    model, x, y = tone_model
    target = (y + 1) % 3
    x_adv = attack(model, x, budget=budget, y=target, targeted=True, **options)
    hit = float(np.mean(np.argmax(model(x_adv), -1) == target.numpy()))
    assert hit > 0.6, f"{name}: target reached on {hit:.2f} (chance 0.33)"


def test_default_labels_are_the_models_predictions(tone_model):
    model, x, y = tone_model
    tf.random.set_seed(0)
    with_pred = W.pgd(model, x, budget=LINF, steps=3)
    tf.random.set_seed(0)
    with_true = W.pgd(model, x, budget=LINF, y=np.argmax(model(x), -1), steps=3)
    np.testing.assert_allclose(with_pred.numpy(), with_true.numpy(), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("static", [True, False])
def test_concurrent_halves_give_each_example_its_own_logits_and_gradient(
        tone_model, batch, static):
    """Split batches (how the attacks run on a CPU) change no logit and no gradient, odd
    and single-example batches included, with the batch size known or unknown when
    traced."""
    model, x, y = tone_model
    x, y = x[:batch], y[:batch]
    spec = tf.TensorSpec([batch if static else None] + x.shape[1:].as_list())

    def logits_and_gradient(fn):
        @tf.function(input_signature=[spec, tf.TensorSpec(spec.shape[:1], tf.int32)])
        def run(v, labels):
            with tf.GradientTape() as tape:
                tape.watch(v)
                logits = fn(v)
                loss = tf.reduce_sum(W._loss(logits, labels))
            return logits, tape.gradient(loss, v)
        return [t.numpy() for t in run(x, tf.cast(y, tf.int32))]

    whole = logits_and_gradient(lambda v: model(v, training=False))
    split = logits_and_gradient(W.concurrent_halves(lambda v: model(v, training=False)))
    assert split[0].shape == (batch, whole[0].shape[1]) and np.abs(whole[1]).max() > 0
    np.testing.assert_allclose(split[0], whole[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(split[1], whole[1], rtol=1e-4, atol=1e-6 * np.abs(whole[1]).max())


def test_attacks_call_the_model_on_halves_exactly_when_batches_are_split(tone_model, monkeypatch):
    model, x, y = tone_model
    calls = []

    def model_fn(v):
        calls.append(v.shape[0])
        return model(v, training=False)

    monkeypatch.setattr(W, "_split_batches", lambda: True)
    W.fgsm(model_fn, x[:6], budget=LINF, y=y[:6])
    assert calls and set(calls) == {3}
    calls.clear()
    monkeypatch.setattr(W, "_split_batches", lambda: False)
    W.fgsm(model_fn, x[:6], budget=LINF, y=y[:6])
    assert calls and set(calls) == {6}


def test_linf_pgd_takes_cleverhans_steps_in_the_scaled_space(tone_model):
    """pgd runs L-inf steps in input units with a fused step kernel; the reference is
    CleverHans' own composition in the scaled space (its fast gradient step, clip_eta and
    the range clip), from the same random start."""
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method
    from cleverhans.tf2.utils import clip_eta, random_lp_vector

    model, x, y = tone_model
    steps = 4
    tf.random.set_seed(3)
    ours = W.pgd(model, x, budget=LINF, y=y, steps=steps).numpy()
    tf.random.set_seed(3)
    p = B.scaled_problem(model, x, LINF)
    z = p.z
    adv = tf.clip_by_value(z + clip_eta(random_lp_vector(tf.shape(z), np.inf, p.eps),
                                        np.inf, p.eps), p.clip_min, p.clip_max)
    for _ in range(steps):
        adv = fast_gradient_method(p.model_fn, adv, 2.5 / steps * p.eps, np.inf, y=y,
                                   clip_min=p.clip_min, clip_max=p.clip_max)
        adv = tf.clip_by_value(z + clip_eta(adv - z, np.inf, p.eps), p.clip_min, p.clip_max)
    reference = B.project(x, p.unscale(adv), LINF).numpy()
    # Equal up to float rounding (the scaled space rounds z * scale differently from x).
    step = (2.5 / steps * B.epsilon(x, LINF)).numpy()
    assert np.all(np.abs(ours - reference) < 1e-3 * step)


def test_pgd_is_reproducible_under_the_global_seed(tone_model):
    model, x, y = tone_model
    runs = []
    for _ in range(2):
        tf.random.set_seed(7)
        runs.append(W.pgd(model, x, budget=L2, y=y, steps=2).numpy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_cw_finds_smaller_perturbations_than_pgd_at_equal_success(tone_model):
    model, x, y = tone_model
    budget = B.Budget("snr_db", 10)
    cw = W.carlini_wagner_l2(model, x, budget=budget, y=y, steps=60, search_steps=4)
    tf.random.set_seed(0)
    pg = W.pgd(model, x, budget=budget, y=y, steps=10)
    pred_cw = np.argmax(model(cw), -1) != y.numpy()
    pred_pg = np.argmax(model(pg), -1) != y.numpy()
    both = pred_cw & pred_pg
    assert both.sum() >= 10, "too few examples fooled by both attacks to compare"
    snr_cw = B.achieved(x.numpy(), cw.numpy())["snr_db"][both]
    snr_pg = B.achieved(x.numpy(), pg.numpy())["snr_db"][both]
    # A higher SNR is a smaller perturbation.
    assert np.median(snr_cw) > np.median(snr_pg) + 3.0


def test_feature_domain_attack_on_the_classifier(tone_model):
    model, x, y = tone_model
    feats = model.features(x)
    budget = B.Budget("linf", 0.5)

    def classifier(f):
        return model.classify(f, training=False)

    adv = W.pgd(classifier, feats, budget=budget, y=y, steps=5)
    assert adv.shape == feats.shape
    assert float(tf.reduce_max(tf.abs(adv - feats))) <= 0.5 + 1e-5
    assert _accuracy(classifier, adv, y) < _accuracy(classifier, feats, y) - 0.3


def test_attacks_compile_in_tf_function(tone_model):
    model, x, y = tone_model

    @tf.function
    def run(x, y):
        return (W.pgd(model, x, budget=LINF, y=y, steps=3),
                W.carlini_wagner_l2(model, x, budget=L2, y=y, steps=5, search_steps=2))

    pg, cw = run(x, y)
    assert pg.shape == x.shape and cw.shape == x.shape
    assert _accuracy(model, pg, y) < _accuracy(model, x, y)


def test_bad_arguments_raise_clear_errors(tone_model):
    model, x, y = tone_model
    with pytest.raises(ValueError, match="L-inf attack"):
        W.fgsm(model, x, budget=L2)
    with pytest.raises(ValueError, match="L2 budget"):
        W.carlini_wagner_l2(model, x, budget=LINF)
    with pytest.raises(ValueError, match="target labels"):
        W.pgd(model, x, budget=LINF, targeted=True)
    with pytest.raises(ValueError, match="step_size"):
        W.pgd(model, x, budget=LINF, step_size=2.5)
    with pytest.raises(ValueError, match="soft labels need y"):
        W.pgd(model, x, budget=LINF, soft_labels=True)
    with pytest.raises(ValueError, match="restarts=1 with soft labels"):
        W.pgd(model, x, budget=LINF, y=tf.nn.softmax(model(x)), soft_labels=True, restarts=2)


def test_soft_label_pgd_ascends_the_kl_divergence_from_the_given_distribution(tone_model):
    model, x, _ = tone_model
    small = B.Budget("linf_db", -40.0)
    p = tf.nn.softmax(model(x))

    def kl(adv):
        log_q = tf.nn.log_softmax(model(adv))
        return float(tf.reduce_mean(tf.reduce_sum(p * (tf.math.log(p + 1e-12) - log_q), -1)))

    tf.random.set_seed(0)
    noise = B.project(x, x + tf.random.uniform(x.shape, -1.0, 1.0), small)
    adv = W.pgd(model, x, budget=small, y=p, soft_labels=True, steps=5)
    assert float(tf.reduce_max(tf.abs(adv - x) / tf.reduce_max(tf.abs(x), 1, keepdims=True))) \
        <= small.radius * (1 + 1e-5)
    assert kl(adv) > 10 * max(kl(noise), 1e-3)
