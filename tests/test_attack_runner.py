"""The robustness sweep (library) and ser-attack (app) on real models, files and TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from ser_tf.attacks import runner
from ser_tf.attacks.budget import Budget
from ser_tf.evaluation.report import format_robustness, robustness_png

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class _Meta:
    gender: str
    speaker: str
    language: str = "xx"


def _meta(n: int) -> list[_Meta]:
    return [_Meta("female" if k % 2 else "male", f"s{k % 3}") for k in range(n)]


def test_sweep_lists_budgets_per_norm_and_domain():
    sweep = runner.Sweep(attacks=("pgd", "cw_l2"), domains=("waveform", "features"),
                         linf_db=(-30, -50), snr_db=(20, 40), feature_linf=(1.0,),
                         feature_l2=(3.0,))
    assert sweep.budgets("pgd", "waveform") == [Budget("linf_db", -50), Budget("linf_db", -30)]
    assert sweep.budgets("cw_l2", "waveform") == [Budget("snr_db", 40), Budget("snr_db", 20)]
    assert sweep.budgets("cw_l2", "features") == [Budget("l2", 3.0)]
    assert len(sweep.runs()) == 6
    with pytest.raises(ValueError, match="unknown attacks"):
        runner.Sweep(attacks=("deepfool",))
    with pytest.raises(ValueError, match="unknown domains"):
        runner.Sweep(domains=("spectrum",))


def test_sweep_overrides_reach_every_attack_that_takes_the_option():
    sweep = runner.Sweep(attacks=("fgsm", "mim", "pgd", "transfer_pgd", "hsj"),
                         overrides={"steps": 20, "restarts": 3},
                         options={"transfer_pgd": {"steps": 5}})
    assert sweep.attack_options("fgsm") == {}
    assert sweep.attack_options("mim") == {"steps": 20}  # iterative, no random starts
    assert sweep.attack_options("pgd") == {"steps": 20, "restarts": 3}
    assert sweep.attack_options("transfer_pgd") == {"steps": 5, "restarts": 3}  # its own wins
    assert sweep.attack_options("hsj") == {"max_queries": 1000}
    with pytest.raises(ValueError, match=r"no attack takes the options \['iterations'\]"):
        runner.Sweep(overrides={"iterations": 20})


def test_subsample_is_stratified_ordered_and_seeded():
    y = np.array([0] * 10 + [1] * 10 + [2] * 4)
    keep = runner.subsample(y, 9, seed=1)
    assert len(keep) == 9 and np.all(np.diff(keep) > 0)
    assert sorted(np.bincount(y[keep]).tolist()) == [3, 3, 3]
    np.testing.assert_array_equal(keep, runner.subsample(y, 9, seed=1))
    np.testing.assert_array_equal(runner.subsample(y, 0, seed=1), np.arange(len(y)))


def test_evaluate_every_family_with_exact_query_accounting(tone_model):
    model, x, y = tone_model
    x, y = x.numpy(), y.numpy()
    attacker_x = x[::3]
    sweep = runner.Sweep(
        attacks=("fgsm", "pgd", "cw_l2", "spsa", "hsj", "transfer_fgsm"),
        domains=("waveform", "features"), linf_db=(-20,), snr_db=(15,), feature_linf=(1.0,),
        feature_l2=(10.0,),
        options={"pgd": {"steps": 3}, "cw_l2": {"steps": 10, "search_steps": 2},
                 "spsa": {"steps": 3, "samples": 4}, "hsj": {"max_queries": 40}})
    kept = []
    clean, outcomes = runner.evaluate(model, x, y, sweep, batch_size=16, progress=False,
                                      attacker_x=attacker_x, keep_examples=2,
                                      on_result=lambda o, adv: kept.append((o, adv)))
    assert np.mean(clean == y) >= 0.9
    assert [(o.name, o.domain) for o in outcomes] == [(n, d) for n, d, _ in sweep.runs()]
    by = {(o.name, o.domain): o for o in outcomes}
    for o in outcomes:
        assert o.y_pred.shape == y.shape
        if o.family == "white-box":
            assert o.queries is None
    # SPSA: one clean query, then per step 2 * samples probes and one check of the new point;
    # examples that succeed early stop querying.
    spsa = by[("spsa", "waveform")].queries
    assert np.all(spsa > 0) and np.all(spsa <= 1 + 3 * (2 * 4 + 1))
    assert np.all(by[("hsj", "waveform")].queries <= 40)
    # The substitute's oracle labels: the attacker's clips, doubled by each of 2 rounds.
    transfer = by[("transfer_fgsm", "waveform")].queries
    np.testing.assert_allclose(transfer.sum(), len(attacker_x) * 4)
    for o, adv in kept:
        assert len(adv) == 2
        assert adv.shape[1:] == (x.shape[1:] if o.domain == "waveform"
                                 else model.features(x[:1]).shape[1:])
    # White-box PGD through the frontend fools the tone model.
    assert np.mean(by[("pgd", "waveform")].y_pred == y) < 0.5

    labels = list(model.labels)
    rob = runner.report(y, clean, outcomes, labels, _meta(len(y)))
    assert rob["clean"]["n"] == len(y)
    row = rob["attacks"][0]
    for key in ("name", "family", "domain", "budget", "accuracy", "uar", "success_rate",
                "mean_snr_db", "max_linf_db", "by_group"):
        assert key in row, key
    assert row["max_linf_db"] <= -20 + 1e-3
    assert set(row["by_group"]) == {"emotion", "gender", "speaker", "language"}
    spsa_row = next(r for r in rob["attacks"] if r["name"] == "spsa")
    assert spsa_row["queries"] == int(spsa.sum())
    assert robustness_png(rob).startswith(b"\x89PNG")
    text = format_robustness(rob)
    assert "transfer_fgsm" in text and "hsj" in text


def test_pooling_folds_equals_one_run_over_all_examples(tone_model):
    model, x, y = tone_model
    x, y = x.numpy(), y.numpy()
    sweep = runner.Sweep(attacks=("fgsm",), linf_db=(-30, -20))
    whole = runner.evaluate(model, x, y, sweep, progress=False)
    first = runner.evaluate(model, x[:13], y[:13], sweep, progress=False)
    second = runner.evaluate(model, x[13:], y[13:], sweep, progress=False)
    ys, clean, pooled = runner.pool([(y[:13], *first), (y[13:], *second)])
    np.testing.assert_array_equal(ys, y)
    np.testing.assert_array_equal(clean, whole[0])
    for a, b in zip(pooled, whole[1]):
        np.testing.assert_array_equal(a.y_pred, b.y_pred)
        np.testing.assert_allclose(a.snr_db, b.snr_db, rtol=1e-5)


def test_transfer_attacks_need_the_attackers_data(tone_model):
    model, x, y = tone_model
    with pytest.raises(ValueError, match="attacker"):
        runner.evaluate(model, x.numpy(), y.numpy(), runner.Sweep(attacks=("transfer_pgd",)),
                        progress=False)


def _utterances(x: np.ndarray, y: np.ndarray, segment: int) -> list[np.ndarray]:
    """Whole "utterances" of several lengths from tone clips of one class each: shorter than
    a window (loop-extended), exactly one window, and longer ones of several windows."""
    lengths = [segment * 3 // 4, segment, segment * 13 // 8, segment * 9 // 4]
    out = []
    for k in range(len(x)):
        same = np.flatnonzero(y == y[k])
        other = x[same[(np.searchsorted(same, k) + 1) % len(same)]]
        out.append(np.concatenate([x[k], other, x[k]])[:lengths[k % len(lengths)]])
    return out


def _mean_window_logits(model, wave: np.ndarray, hop: int) -> np.ndarray:
    """The utterance logits as evaluation computes them: every window's, averaged."""
    from ser_tf.data.pipeline import window_starts

    segment = model.segment_samples
    long = np.tile(wave, -(-segment // len(wave)))
    windows = np.stack([long[s:s + segment]
                        for s in window_starts(len(wave), segment, hop)])
    return np.asarray(model(windows)).mean(axis=0)


def test_utterance_unit_attacks_the_averaged_decision(tone_model):
    model, x, y = tone_model
    x, y = x.numpy(), y.numpy()
    segment = model.segment_samples
    utts = _utterances(x, y, segment)
    windowing = runner.Windowing(hop_samples=segment // 2)
    decide = windowing.logits(lambda w: model(w, training=False), segment)
    for wave in utts[:4]:
        np.testing.assert_allclose(decide(tf.constant(wave[None]))[0],
                                   _mean_window_logits(model, wave, segment // 2), atol=1e-4)
    # A row of exactly one window is that clip's logits: the substitute's oracle relies on it.
    np.testing.assert_allclose(decide(tf.constant(x[:3])), model(x[:3]), atol=1e-5)

    sweep = runner.Sweep(attacks=("pgd", "hsj", "transfer_fgsm"), linf_db=(-20,),
                         snr_db=(10,), options={"pgd": {"steps": 3},
                                                "hsj": {"max_queries": 30}})
    kept = []
    clean, outcomes = runner.evaluate(model, utts, y, sweep, progress=False,
                                      attacker_x=x[::3], keep_examples=2, windowing=windowing,
                                      on_result=lambda o, adv: kept.append(adv))
    expected = [np.argmax(_mean_window_logits(model, w, segment // 2)) for w in utts]
    np.testing.assert_array_equal(clean, expected)
    assert np.mean(clean == y) >= 0.9
    by = {o.name: o for o in outcomes}
    # Each utterance stays inside its own ball, relative to its whole-utterance peak.
    for o in outcomes:
        assert o.y_pred.shape == y.shape
        changed = o.l2 > 0
        assert changed.any()
        if o.budget.kind == "linf_db":
            assert o.linf_db[changed].max() <= -20 + 1e-3
        else:
            assert o.snr_db[changed].min() >= 10 - 1e-3
    assert np.all(by["hsj"].queries <= 30) and np.all(by["hsj"].queries > 0)
    assert np.mean(by["pgd"].y_pred == y) < 0.5
    for adv in kept:
        assert [len(a) for a in adv] == [len(w) for w in utts[:2]]
    # Feature maps exist per window, not per utterance.
    with pytest.raises(ValueError, match="clip"):
        runner.evaluate(model, utts, y, runner.Sweep(attacks=("fgsm",),
                                                     domains=("features",)),
                        progress=False, windowing=windowing)
    with pytest.raises(ValueError, match="hop_samples"):
        runner.Windowing(hop_samples=0)


# -- ser-attack end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(synthetic_corpus, tmp_path_factory):
    """A tiny CNN trained by ser-train on the synthetic corpus, test speaker s01."""
    from ser_tf.data.corpora import write_manifest

    root = tmp_path_factory.mktemp("attack_run")
    manifest = root / "manifest.csv"
    write_manifest(synthetic_corpus, manifest)
    workdir = root / "w"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "trainers.train", "--corpus=manifest", f"--data_dir={manifest}",
         "--protocol=speakers", "--test_speakers=s01", "--val_speakers=1", "--model=cnn",
         "--segment_s=0.5", "--n_mels=24", "--conv_filters=4,8", "--dense_units=8",
         "--batch_size=8", "--epochs=2", "--patience=0", "--verbose=0",
         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _attack(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainers.attack", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_ser_attack_writes_the_report_plots_table_audio_and_tensorboard(trained_workdir):
    w = trained_workdir
    done = _attack(f"--workdir={w}", "--attacks=fgsm,pgd,hsj,transfer_fgsm",
                   "--domains=waveform,features", "--linf_db=-40,-20", "--snr_db=20",
                   "--feature_linf=0.5", "--feature_l2=5", "--steps=2",
                   "--attacker_clips=12", "--examples=1", "--progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "robustness.json" in done.stdout and "transfer_fgsm" in done.stdout
    rob = json.loads((w / "robustness.json").read_text())
    assert rob["synthetic"] is True and rob["protocol"] == "speakers"
    assert set(rob["clean"]["by_group"]["speaker"]) == {"s01"}
    names = {(a["name"], a["domain"], a["label"]) for a in rob["attacks"]}
    assert ("pgd", "waveform", "-40 dB") in names and ("hsj", "features", "l2 5") in names
    # L-inf attacks: two waveform budgets and one feature radius; HSJ (L2): one of each.
    assert len(rob["attacks"]) == 3 + 3 + 2 + 3
    for a in rob["attacks"]:
        assert a["family"] == ("white-box" if a["name"] in ("fgsm", "pgd") else "black-box")
        if a["family"] == "black-box":
            assert a["queries"] > 0
        if a["domain"] == "waveform" and a["budget"]["kind"] == "linf_db" and a["max_linf_db"]:
            assert a["max_linf_db"] <= a["budget"]["value"] + 1e-3
    for name in ("robustness_accuracy.png", "robustness_uar.png"):
        assert (w / name).read_bytes().startswith(b"\x89PNG")
    table = (w / "robustness_by_group.csv").read_text().splitlines()
    assert table[0].startswith("attack,domain,budget,group,value")
    assert any(line.startswith("pgd,waveform,-40 dB,gender,") for line in table)
    wavs = sorted((w / "adversarial").rglob("*.wav"))
    assert any(p.name.endswith("_clean.wav") for p in wavs)
    adv = [p for p in wavs if p.parent.name == "pgd_linf_db-20"]
    audio, rate = tf.audio.decode_wav(tf.io.read_file(str(adv[0])))
    assert int(rate) == 16000 and audio.shape == (8000, 1)
    assert list((w / "tb" / "attack").glob("events.out.tfevents.*"))


def test_ser_attack_utterance_unit_starts_from_the_training_runs_figures(trained_workdir,
                                                                         tmp_path):
    out = tmp_path / "utterances"
    done = _attack(f"--workdir={trained_workdir}", f"--out_dir={out}", "--unit=utterance",
                   "--attacks=pgd,hsj", "--linf_db=-20", "--snr_db=20", "--steps=2",
                   "--restarts=2", "--examples=1", "--progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    rob = json.loads((out / "robustness.json").read_text())
    trained = json.loads((trained_workdir / "metrics.json").read_text())
    # Clean: the utterance decisions of metrics.json, not those of central clips.
    assert rob["clean"]["accuracy"] == pytest.approx(trained["accuracy"])
    assert rob["clean"]["uar"] == pytest.approx(trained["uar"])
    assert rob["unit"].startswith("each test utterance whole")
    pgd = next(a for a in rob["attacks"] if a["name"] == "pgd")
    assert pgd["max_linf_db"] <= -20 + 1e-3
    # Each attack reports the options it ran with.
    assert pgd["options"] == {"steps": 2, "restarts": 2, "eot": 1}
    hsj = next(a for a in rob["attacks"] if a["name"] == "hsj")
    assert hsj["options"] == {"max_queries": 1000}
    clean_wav = next((out / "adversarial").glob("*_clean.wav"))
    adv_wav = out / "adversarial" / "pgd_linf_db-20" / clean_wav.name.replace("_clean", "")
    lengths = [tf.audio.decode_wav(tf.io.read_file(str(p)))[0].shape[0]
               for p in (clean_wav, adv_wav)]
    # The whole utterance (0.6-1.2 s long before trimming), not the 0.5 s clip.
    assert lengths[0] == lengths[1] and lengths[0] != 8000
    done = _attack(f"--workdir={trained_workdir}", f"--out_dir={out}", "--unit=utterance",
                   "--domains=features")
    assert done.returncode != 0 and "utterance unit attacks waveforms only" in done.stderr


def test_ser_attack_out_dir_keeps_the_workdir_untouched(trained_workdir, tmp_path):
    before = sorted(p.name for p in trained_workdir.iterdir())
    out = tmp_path / "robustness"
    done = _attack(f"--workdir={trained_workdir}", f"--out_dir={out}", "--attacks=fgm",
                   "--snr_db=30", "--examples=0", "--progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    rob = json.loads((out / "robustness.json").read_text())
    assert [a["label"] for a in rob["attacks"]] == ["SNR 30 dB"]
    assert rob["attacks"][0]["mean_snr_db"] >= 30 - 1e-3
    assert (out / "robustness_uar.png").exists()
    assert sorted(p.name for p in trained_workdir.iterdir()) == before


def test_ser_attack_rejects_bad_input_clearly(trained_workdir, tmp_path):
    done = _attack(f"--workdir={tmp_path}")
    assert done.returncode != 0 and "not a ser-train workdir" in done.stderr
    done = _attack(f"--workdir={trained_workdir}", "--attacks=deepfool")
    assert done.returncode != 0 and "unknown attacks ['deepfool']" in done.stderr
    done = _attack(f"--workdir={trained_workdir}", "--linf_db=loud")
    assert done.returncode != 0 and "--linf_db takes numbers" in done.stderr
    done = _attack(f"--workdir={trained_workdir}", "--fold=fold_99")
    assert done.returncode != 0 and "unknown folds ['fold_99']" in done.stderr
    done = _attack(f"--workdir={trained_workdir}", "--restarts=0")
    assert done.returncode != 0 and "--restarts must be at least 1" in done.stderr
    done = _attack(f"--workdir={trained_workdir}", "--eot=4", f"--out_dir={tmp_path / 'e'}")
    assert done.returncode != 0 and "needs a random model" in done.stderr


def test_same_seed_same_results(tone_model):
    model, x, y = tone_model
    x, y = x.numpy()[::2], y.numpy()[::2]
    sweep = runner.Sweep(attacks=("pgd", "spsa"), linf_db=(-30,),
                         options={"pgd": {"steps": 2}, "spsa": {"steps": 2, "samples": 4}})
    runs = [runner.evaluate(model, x, y, sweep, seed=5, progress=False)[1] for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.y_pred, b.y_pred)
        np.testing.assert_array_equal(a.l2, b.l2)
