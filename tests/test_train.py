"""The standard trainer end to end on tiny synthetic data: outputs, resume, determinism."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ser_tf.data.audio import AudioConfig
from ser_tf.data.corpora import write_manifest
from ser_tf.models import ModelConfig
from ser_tf.training.experiment import ExperimentConfig, run_experiment
from ser_tf.training.standard import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ModelConfig(segment_s=0.5, n_mels=24, conv_filters=(4, 8), chunk_frames=12,
                         hop_frames=6, chunk_units=8, lstm_units=4)
TINY_FLAGS = ["--segment_s=0.5", "--n_mels=24", "--conv_filters=4,8", "--chunk_frames=12",
              "--chunk_hop=6", "--chunk_units=8", "--lstm_units=4", "--batch_size=8",
              "--val_speakers=1", "--verbose=2"]


@pytest.fixture(scope="module")
def manifest(synthetic_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(synthetic_corpus, path)
    return str(path)


def _config(manifest, workdir, **train):
    return ExperimentConfig(workdir=str(workdir), corpus="manifest", data_dir=manifest,
                            protocol="speakers", test_speakers=("s01",), val_speakers=1,
                            audio=AudioConfig(), model=TINY_MODEL,
                            train=TrainConfig(**{"epochs": 2, "batch_size": 8, **train}),
                            verbose=0)


def test_run_writes_every_output_and_is_deterministic(manifest, tmp_path):
    a = run_experiment(_config(manifest, tmp_path / "a", seed=3))
    for name in ("metrics.json", "model.keras", "predictions.csv", "confusion_matrix.png",
                 "checkpoints/state.json", "checkpoints/best.weights.h5"):
        assert (tmp_path / "a" / name).exists(), name
    assert list((tmp_path / "a" / "tb").glob("*/events.out.tfevents.*"))
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for key in ("accuracy", "uar", "per_class_recall", "confusion_matrix", "labels", "n",
                "by_group"):
        assert key in saved
    assert set(saved["by_group"]) == {"gender", "speaker", "language"}
    assert saved["by_group"]["speaker"].keys() == {"s01"}
    assert saved["synthetic"] is True and saved["bad_audio"]["count"] == 0
    assert len(saved["history"]) == 2
    model = keras.models.load_model(tmp_path / "a" / "model.keras", safe_mode=True)
    assert list(model.labels) == saved["labels"]

    b = run_experiment(_config(manifest, tmp_path / "b", seed=3))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["confusion_matrix"] == b["confusion_matrix"]
    # A finished run is not redone: same metrics, no new training.
    again = run_experiment(_config(manifest, tmp_path / "a", seed=3))
    assert again["history"] == a["history"]


def test_refit_retrains_on_validation_speakers_for_the_selected_epochs(manifest, tmp_path):
    m = run_experiment(_config(manifest, tmp_path, epochs=3, refit=True))
    refit_state = json.loads((tmp_path / "refit" / "checkpoints" / "state.json").read_text())
    assert m["refit_epochs"] == m["best_epoch"] == len(refit_state["history"])
    assert m["n_refit_train"] == m["n_train"] + m["n_val"]
    assert len(m["history"]) == 3  # the selection run's history is what metrics keep
    # The refit model is the one saved, not the selection run's best epoch.
    saved = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    x = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32) * 0.1
    for run, expect_equal in (("refit", True), ("", False)):
        other = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
        other.load_weights(tmp_path / run / "checkpoints" / "best.weights.h5")
        same = np.allclose(other(x).numpy(), saved(x).numpy(), atol=1e-6)
        assert same == expect_equal, run


def test_ema_saves_the_averaged_weights_and_trains_on_the_raw_ones(manifest, tmp_path):
    # No validation speakers: the last epoch is the one saved, so the saved model must be
    # that epoch's moving average, while the checkpoint (what training resumes from) holds
    # the raw weights and the averages beside them.
    cfg = dataclasses.replace(_config(manifest, tmp_path, epochs=2, ema=0.8, patience=0),
                              val_speakers=0)
    run_experiment(cfg)
    saved = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    reader = tf.train.load_checkpoint(str(tmp_path / "checkpoints"))
    tensors = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
               if k.endswith("VARIABLE_VALUE")}
    optimizer = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
    raw = {k: v for k, v in tensors.items() if k.startswith("model/")}
    moved = 0
    for weight in saved.trainable_weights:
        value = weight.numpy()
        assert any(v.shape == value.shape and np.allclose(v, value, atol=1e-7)
                   for v in optimizer.values()), weight.path
        assert not any(v.shape == value.shape and np.array_equal(v, value)
                       for v in raw.values()) or not value.any(), weight.path
        moved += 1
    assert moved == len(saved.trainable_weights) > 10
    with pytest.raises(ValueError, match="ema must be in"):
        run_experiment(dataclasses.replace(_config(manifest, tmp_path / "bad", ema=1.0)))


def test_mixup_trains_on_blends_and_their_mixed_losses():
    from ser_tf.models import build_model
    from ser_tf.training.standard import TrainingSteps

    model = build_model(dataclasses.replace(TINY_MODEL, dropout=0.0, specaugment=False),
                        ["a", "b", "c"], seed=0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(8, model.segment_samples)).astype(np.float32) * 0.1)
    y = tf.constant([0, 1, 2, 0, 1, 2, 0, 1])
    w = tf.constant([1.0, 2.0, 0.5, 1.0, 2.0, 0.5, 1.0, 2.0])
    model(x)
    steps = TrainingSteps(model, mixup=0.4)
    steps.compile(optimizer=keras.optimizers.SGD(0.0))

    tf.random.set_seed(3)
    blends, lam, partner = (t.numpy() for t in steps._blend(x))
    # Convex blends of two batch members, each keeping the larger share.
    assert sorted(partner) == list(range(8)) and np.all((lam >= 0.5) & (lam <= 1.0))
    assert 0.5 < lam.min() and lam.max() < 1.0
    np.testing.assert_allclose(blends, lam[:, None] * x.numpy()
                               + (1 - lam[:, None]) * x.numpy()[partner], atol=1e-6)
    # One step: its loss is the blends' cross-entropy against both labels, mixed.
    logits = model(blends, training=True)
    xent = [tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits).numpy()
            for labels in (y, tf.gather(y, partner))]
    expected = np.mean(lam * w.numpy() * xent[0]
                       + (1 - lam) * w.numpy()[partner] * xent[1])
    tf.random.set_seed(3)
    got = steps.train_step((x, y, w))["loss"]
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_mixup_is_refused_where_it_cannot_apply(manifest, tmp_path):
    from ser_tf.defenses import AdversarialConfig, ConvexConfig, DistillConfig, fold_trainer

    with pytest.raises(ValueError, match="mixup alpha"):
        TrainConfig(mixup=-1.0)
    spk = _config(manifest, tmp_path / "s", mixup=0.4, speaker_norm=True)
    with pytest.raises(ValueError, match="--speaker_norm"):
        run_experiment(spk)
    # Methods with steps of their own (or, for the convex fit, none) refuse it rather than
    # train without it.
    for trainer, method in [("adversarial", AdversarialConfig()), ("convex", ConvexConfig()),
                            ("distill", DistillConfig(teacher_dir=str(tmp_path / "none")))]:
        cfg = dataclasses.replace(_config(manifest, tmp_path / trainer, mixup=0.4),
                                  trainer=trainer, method=method)
        with pytest.raises(ValueError, match="--mixup is for standard training"):
            run_experiment(cfg, fold_trainer(cfg))


def test_loso_writes_fold_workdirs_and_summary(manifest, tmp_path):
    cfg = dataclasses.replace(_config(manifest, tmp_path, epochs=1), protocol="loso")
    m = run_experiment(cfg)
    folds = sorted(p.name for p in tmp_path.glob("fold_*"))
    assert folds == ["fold_s01", "fold_s02", "fold_s03", "fold_s04"]
    assert len(m["folds"]) == 4 and "uar_std" in m and m["pooled"]["n"] == m["n_utterances"]
    assert np.isclose(m["uar"], np.mean([f["uar"] for f in m["folds"]]))
    assert set(m["by_group"]["speaker"]) == {"s01", "s02", "s03", "s04"}


def test_training_one_fold_of_a_protocol_writes_it_where_the_full_run_would(manifest,
                                                                            tmp_path):
    # ser-attack and ser-export look for fold_XX/ of a cross-validation run: a run of
    # selected folds must put them there too, not into the workdir itself.
    cfg = dataclasses.replace(_config(manifest, tmp_path, epochs=1), protocol="loso",
                              only_folds=("fold_s02",))
    m = run_experiment(cfg)
    assert sorted(p.name for p in tmp_path.glob("fold_*")) == ["fold_s02"]
    assert (tmp_path / "fold_s02" / "model.keras").exists()
    assert not (tmp_path / "model.keras").exists()
    assert m["fold"] == "fold_s02"


def test_bad_audio_is_counted_in_metrics(manifest, tmp_path):
    lines = Path(manifest).read_text().splitlines()
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00")
    src = Path(manifest).parent
    rows = [lines[0]] + [",".join([str(src / ln.split(",")[0])] + ln.split(",")[1:])
                         for ln in lines[1:]]
    rows.append(f"{bad},anger,s02,male,synthetic,synthetic")
    csv_path = tmp_path / "with_bad.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    m = run_experiment(dataclasses.replace(_config(str(csv_path), tmp_path / "w", epochs=1)))
    assert m["bad_audio"]["count"] == 1
    assert m["bad_audio"]["files"][0]["path"] == str(bad)


def _train_cmd(manifest, workdir, epochs):
    return [sys.executable, "-m", "trainers.train", "--corpus=manifest", f"--data_dir={manifest}",
            "--protocol=speakers", "--test_speakers=s01", f"--workdir={workdir}",
            f"--epochs={epochs}", "--patience=0", *TINY_FLAGS]


def test_kill_9_mid_training_then_resume_loses_nothing(manifest, tmp_path):
    workdir = tmp_path / "w"
    state = workdir / "checkpoints" / "state.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_train_cmd(manifest, workdir, 6), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text() or "{}").get("epoch", 0) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be interrupted"
    first = json.loads(state.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "metrics.json").exists()

    done = subprocess.run(_train_cmd(manifest, workdir, 6), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stderr
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    # Epochs finished before the kill are kept as they were, not re-run.
    for before, after in zip(first["history"], metrics["history"]):
        assert before == after
    assert (workdir / "flags.txt").read_text().count("--epochs=6") == 1


def test_speaker_norm_standardises_each_speaker_and_is_labelled(manifest, tmp_path):
    from ser_tf.data.pipeline import decode_corpus, speaker_feature_stats
    from ser_tf.frontend import LogMelFrontend
    from ser_tf.data import corpora

    corpus = decode_corpus(corpora.manifest(manifest), AudioConfig(), progress=False)
    frontend = LogMelFrontend(16000, n_mels=24)
    mean, var = speaker_feature_stats(corpus, frontend, segment_samples=8000,
                                      hop_samples=4000)
    assert mean.shape == (len(corpus), 24, 1)
    by_speaker = {}
    for i, u in enumerate(corpus.utterances):
        by_speaker.setdefault(u.speaker, set()).add(mean[i].tobytes())
    assert all(len(v) == 1 for v in by_speaker.values())
    assert len({next(iter(v)) for v in by_speaker.values()}) == len(by_speaker)
    m = run_experiment(dataclasses.replace(
        _config(manifest, tmp_path, epochs=1),
        train=TrainConfig(epochs=1, batch_size=8, speaker_norm=True)))
    assert m["speaker_normalization"].startswith("PER-SPEAKER")


@pytest.mark.parametrize("flagfile", sorted(p.name for p in (ROOT / "configs").glob("*.flags")))
def test_every_flagfile_builds_a_valid_experiment(flagfile, monkeypatch, tmp_path):
    from absl import flags

    from trainers import train

    monkeypatch.chdir(ROOT)  # flagfiles include each other by repository-relative paths
    fv = flags.FlagValues()
    train.define_flags(fv)
    fv(["ser-train", f"--flagfile=configs/{flagfile}", f"--workdir={tmp_path}"])
    cfg = train.build_config(fv)
    assert cfg.trainer == fv.trainer
    assert (cfg.method is None) == (cfg.trainer == "standard")


def test_adversarial_flags_reach_the_config_and_awp_refuses_several_replicas(tmp_path):
    from absl import flags

    from ser_tf.defenses import fold_trainer
    from trainers import train

    def config(*args):
        fv = flags.FlagValues()
        train.define_flags(fv)
        fv(["ser-train", f"--workdir={tmp_path}", "--trainer=adversarial", *args])
        return train.build_config(fv)

    method = config("--adv_steps=3", "--adv_awp=5e-3").method
    assert (method.steps, method.awp_gamma) == (3, 5e-3)
    with pytest.raises(ValueError, match="--adv_awp runs on one replica"):
        fold_trainer(config("--adv_awp=5e-3", "--strategy=mirrored"))
    assert config("--strategy=mirrored").method.awp_gamma == 0.0
