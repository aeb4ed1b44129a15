"""ser-export and ser-predict end to end: a tiny CNN-LSTM trained by ser-train on the
synthetic corpus, exported, checked, and asked about files of every rate and layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_wav, write_wav_encoded

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(synthetic_corpus, tmp_path_factory):
    """A CNN-LSTM trained by ser-train (test speaker s01), exported by ser-export."""
    from ser_tf.data.corpora import write_manifest

    root = tmp_path_factory.mktemp("export_run")
    manifest = root / "manifest.csv"
    write_manifest(synthetic_corpus, manifest)
    workdir = root / "w"
    done = _run("trainers.train", "--corpus=manifest", f"--data_dir={manifest}",
                "--protocol=speakers", "--test_speakers=s01", "--val_speakers=1",
                "--model=cnn_lstm", "--segment_s=0.5", "--n_mels=24", "--conv_filters=4,8",
                "--chunk_frames=16", "--chunk_hop=8", "--chunk_units=8", "--lstm_units=4",
                "--batch_size=8", "--epochs=2", "--patience=0", "--verbose=0",
                f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run("export.export", f"--workdir={workdir}", "--variants=float32,int8",
                "--calibration_clips=8", "--int8_float_layers=bilstm",
                "--transfer_linf_db=-30", "--blackbox_attack=hsj", "--blackbox_db=20",
                "--blackbox_clips=2", "--latency_utterances=2", "--progress=false")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


def test_ser_export_writes_checked_artifacts_and_a_model_card(exported, synthetic_corpus):
    workdir, stdout = exported
    out = workdir / "export"
    assert "float32" in stdout and "agree" in stdout
    for name in ("savedmodel/saved_model.pb", "savedmodel/assets.extra/serving.json",
                 "model_float32.tflite", "model_int8.tflite", "serving.json", "labels.txt",
                 "MODEL_CARD.md", "export_report.json"):
        assert (out / name).exists(), name
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert (out / "labels.txt").read_text().split() == metrics["labels"]
    report = json.loads((out / "export_report.json").read_text())
    assert report["synthetic"] is True and report["test_speakers"] == ["s01"]
    names = [a["name"] for a in report["artifacts"]]
    assert names == ["keras", "savedmodel", "float32", "int8"]
    test_files = [u for u in synthetic_corpus if u.speaker == "s01"]
    assert report["n_utterances"] == len(test_files)
    rows = {a["name"]: a for a in report["artifacts"]}
    assert rows["savedmodel"]["agreement"] == 1.0
    assert rows["float32"]["agreement"] == 1.0 and rows["float32"]["max_abs_diff"] < 1e-4
    assert rows["int8"]["ops"]["int8_ops"] > 0 and rows["int8"]["ops"]["flex_ops"] == []
    assert report["int8_float_layers"] == ["bilstm"]
    assert set(rows["int8"]["robust"]) == {"transfer pgd -30 dB", "hsj SNR 20 dB"}
    for row in rows.values():
        assert row["size_bytes"] > 0 and row["latency"]["window_ms_median"] > 0
    # The Keras row matches what ser-train measured on the same test utterances.
    assert rows["keras"]["uar"] == pytest.approx(metrics["uar"], abs=1e-6)
    card = (out / "MODEL_CARD.md").read_text()
    assert "SYNTHETIC" in card and "| int8 |" in card
    assert "- Training: standard (no defense)." in card


def test_ser_export_rejects_bad_requests(exported, tmp_path):
    workdir, _ = exported
    done = _run("export.export", f"--workdir={tmp_path}")
    assert done.returncode != 0 and "not a ser-train workdir" in done.stderr
    done = _run("export.export", f"--workdir={workdir}", "--variants=int4")
    assert done.returncode != 0 and "unknown TFLite variants ['int4']" in done.stderr
    done = _run("export.export", f"--workdir={workdir}", "--transfer_attack=spsa")
    assert done.returncode != 0 and "white-box L-inf" in done.stderr
    done = _run("export.export", f"--workdir={workdir}", "--transfer_linf_db=loud")
    assert done.returncode != 0 and "--transfer_linf_db takes numbers" in done.stderr
    done = _run("export.export", f"--workdir={workdir}", "--int8_float_layers=lstm")
    assert done.returncode != 0 and "['lstm'] are not layers of the classifier" in done.stderr
    # A misspelt layer is caught before the corpus is read: with the data gone, the error
    # is still the layer name, not the missing data.
    done = _run("export.export", f"--workdir={workdir}", "--int8_float_layers=lstm",
                f"--data_dir={tmp_path / 'gone.csv'}")
    assert done.returncode != 0 and "['lstm'] are not layers of the classifier" in done.stderr
    done = _run("export.export", f"--workdir={workdir}", "--variants=float32",
                "--int8_float_layers=bilstm")
    assert done.returncode != 0 and "apply only to the int8 variant" in done.stderr


@pytest.fixture(scope="module")
def audio_files(synthetic_corpus, tmp_path_factory):
    """One test utterance written at 8, 16, 44.1 and 48 kHz, as stereo, as 24-bit, and a
    corrupt file."""
    import tensorflow as tf

    from ser_tf.data.resample import resample

    folder = tmp_path_factory.mktemp("predict")
    utt = next(u for u in synthetic_corpus if u.speaker == "s01")
    audio, rate = tf.audio.decode_wav(tf.io.read_file(utt.path))
    wave = audio.numpy()[:, 0]
    files = {}
    for target in (8000, 16000, 44100, 48000):
        x = wave if target == int(rate) else resample(wave, int(rate), target).numpy()
        files[f"{target}"] = write_wav(folder / f"utt_{target}.wav", x, target)
    files["stereo"] = write_wav(folder / "stereo.wav", np.stack([wave, 0.5 * wave], 1),
                                int(rate))
    files["pcm24"] = write_wav_encoded(folder / "pcm24.wav", wave, int(rate), "pcm24")
    corrupt = folder / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage")
    files["corrupt"] = str(corrupt)
    return files


@pytest.mark.parametrize("artifact", ["savedmodel", "model_float32.tflite",
                                      "model_int8.tflite"])
def test_ser_predict_reads_any_rate_and_layout_and_survives_a_bad_file(exported, audio_files,
                                                                       artifact):
    workdir, _ = exported
    model = workdir / "export" / artifact
    names = ["8000", "16000", "44100", "48000", "stereo", "pcm24", "corrupt"]
    done = _run("trainers.predict", f"--model={model}", "--json",
                *[audio_files[n] for n in names], timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # one file failed
    rows = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [r["file"] for r in rows] == [audio_files[n] for n in names]
    good, bad = rows[:-1], rows[-1]
    assert "label" not in bad and bad["error"]
    assert "function_node" not in bad["error"] and "Condition" not in bad["error"]
    labels = {"anger", "neutral", "sadness"}
    for r in good:
        assert r["label"] in labels
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert r["probabilities"][r["label"]] == max(r["probabilities"].values())
    # The same speech at every rate and layout gets (nearly) the same probabilities; the
    # 8 kHz copy has lost everything above 4 kHz, so it may move further.

    def probs(r):
        return np.array([r["probabilities"][c] for c in sorted(labels)])

    reference = probs(good[1])  # the corpus's own rate
    for name, r in zip(names, good):
        assert np.abs(probs(r) - reference).max() < (0.2 if name == "8000" else 0.02), name


def test_ser_predict_text_output_and_a_missing_model(exported, audio_files, tmp_path):
    workdir, _ = exported
    done = _run("trainers.predict", f"--model={workdir}/export/model_float32.tflite",
                audio_files["16000"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(audio_files["16000"] + ": ")
    done = _run("trainers.predict", f"--model={tmp_path}/nothing.tflite", audio_files["16000"])
    assert done.returncode == 2 and "no model at" in done.stderr
