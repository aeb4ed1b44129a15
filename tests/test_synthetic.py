"""Tests of the synthetic emotional-speech corpus (ser_tf.data.synthetic).

Besides files, manifest, determinism and reuse, these check that the audio carries the
acoustic correlates it claims (pitch, loudness, spectral tilt, rate measured with simple
estimators written here, independent of the generator's internals) and that a speaker-
independent split is learnable but not trivial with a nearest-centroid classifier.
"""

from __future__ import annotations

import csv
import json
import os
import wave

import numpy as np
import pytest

from ser_tf.data import synthetic
from ser_tf.data.corpora import EMOTIONS, Utterance

SR = 16000


def read_wav(path: str) -> tuple[np.ndarray, int]:
    with wave.open(path, "rb") as f:
        assert f.getnchannels() == 1
        assert f.getsampwidth() == 2
        pcm = f.readframes(f.getnframes())
        return np.frombuffer(pcm, "<i2").astype(np.float64) / 32768.0, f.getframerate()


def frame(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    n = 1 + max(0, (len(x) - length) // hop)
    return x[np.arange(length)[None, :] + hop * np.arange(n)[:, None]]


def track_pitch(x: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 500.0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Autocorrelation pitch tracker: (f0 per frame, voiced mask, frame energy in dB).

    The autocorrelation is taken of the magnitude spectrum (not the power spectrum) to
    flatten strong low harmonics, is corrected for the window's own autocorrelation, and
    the first peak within 85 % of the best is taken, since multiples of the period score
    about as high as the period itself.
    """
    length, hop = int(0.04 * sr), int(0.02 * sr)
    window = np.hanning(length)
    frames = frame(x, length, hop)
    frames = (frames - frames.mean(axis=1, keepdims=True)) * window
    nfft = 2 * length  # >= 2 * length - 1: no circular wrap of the lags used
    ac = np.fft.irfft(np.abs(np.fft.rfft(frames, nfft)), nfft)[:, :length]
    window_ac = np.correlate(window, window, "full")[length - 1:]
    lo, hi = int(sr / fmax), int(sr / fmin)
    ac = ac[:, lo:hi] / (ac[:, :1] + 1e-12) / (window_ac[lo:hi] / window_ac[0])
    best = ac.max(axis=1)
    peak = np.zeros_like(ac, dtype=bool)
    peak[:, 1:-1] = (ac[:, 1:-1] >= ac[:, :-2]) & (ac[:, 1:-1] >= ac[:, 2:])
    lag = np.argmax(peak & (ac >= 0.85 * best[:, None]), axis=1) + lo
    energy = 10.0 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    voiced = (best > 0.35) & (energy > energy.max() - 35.0)
    return sr / lag, voiced, energy


def hf_ratio_db(x: np.ndarray, sr: int, voiced: np.ndarray) -> float:
    """Energy above 2 kHz relative to below, in dB, over the voiced frames."""
    length, hop = int(0.04 * sr), int(0.02 * sr)
    spectra = np.abs(np.fft.rfft(frame(x, length, hop) * np.hanning(length), axis=1)) ** 2
    spectra = spectra[voiced]
    freqs = np.fft.rfftfreq(length, 1.0 / sr)
    return float(10.0 * np.log10(spectra[:, freqs >= 2000].sum()
                                 / spectra[:, freqs < 2000].sum()))


def measure(path: str) -> dict[str, float | np.ndarray]:
    x, sr = read_wav(path)
    f0, voiced, energy = track_pitch(x, sr)
    assert voiced.sum() >= 5, f"{path}: no voicing found"
    log_f0 = np.log(f0[voiced])
    return {
        "f0": f0[voiced],
        "log_f0": float(np.median(log_f0)),
        "f0_range_st": float(np.subtract(*np.percentile(log_f0, [90, 10])) * 12 / np.log(2)),
        "rms_db": float(10.0 * np.log10(np.mean(x ** 2))),
        "hf_db": hf_ratio_db(x, sr, voiced),
        # Voiced stretches per second: a syllable-rate proxy.
        "rate": float(np.sum(np.diff(voiced.astype(int)) == 1) / (len(x) / sr)),
        "voiced_fraction": float(voiced.mean()),
    }


FEATURES = ("log_f0", "f0_range_st", "rms_db", "hf_db", "rate", "voiced_fraction")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The separability-sized corpus: 6 speakers x 7 emotions x 6 utterances."""
    out = tmp_path_factory.mktemp("synthetic_corpus")
    utterances = synthetic.generate_corpus(out, n_speakers=6, utterances_per_speaker=6,
                                           min_duration_s=1.0, max_duration_s=2.0, seed=0)
    return out, utterances


@pytest.fixture(scope="module")
def measured(corpus):
    _, utterances = corpus
    return [(u, measure(u.path)) for u in utterances]


def small(out, **kwargs):
    args = dict(emotions=("anger", "sadness"), n_speakers=2, utterances_per_speaker=2,
                min_duration_s=0.5, max_duration_s=0.8, seed=0)
    args.update(kwargs)
    return synthetic.generate_corpus(out, **args)


# --- files and manifest ------------------------------------------------------------------

def test_files_written_readable_at_rate_and_length(corpus):
    out, utterances = corpus
    assert len(utterances) == 6 * 7 * 6
    lengths = []
    for u in utterances:
        assert os.path.isabs(u.path) and os.path.dirname(u.path) == str(out)
        with wave.open(u.path, "rb") as f:
            assert (f.getnchannels(), f.getsampwidth(), f.getframerate()) == (1, 2, SR)
            assert f.getcomptype() == "NONE"
            lengths.append(f.getnframes() / SR)
    assert 1.0 - 1 / SR <= min(lengths) and max(lengths) <= 2.0 + 1 / SR
    assert max(lengths) - min(lengths) > 0.5  # durations do vary
    x, _ = read_wav(utterances[0].path)
    assert np.abs(x).max() > 0.05  # not silent, and not clipped
    assert np.abs(x).max() < 0.99


def test_manifest_matches_returned_utterances(corpus):
    out, utterances = corpus
    assert [u.path for u in utterances] == sorted(u.path for u in utterances)
    with open(os.path.join(out, "manifest.csv"), newline="") as f:
        header = f.readline().strip()
        rows = list(csv.reader(f))
    assert header == "path,emotion,speaker,gender,language,corpus"
    from_manifest = sorted(
        (Utterance(os.path.join(str(out), p), e, s, g, lang, c)
         for p, e, s, g, lang, c in rows), key=lambda u: u.path)
    assert from_manifest == utterances
    for (path, emotion, speaker, *_), u in zip(sorted(rows), utterances):
        assert not os.path.isabs(path)
        # The file name encodes speaker, emotion and index.
        name_speaker, name_emotion, index = os.path.splitext(path)[0].split("_")
        assert (name_speaker, name_emotion) == (speaker, emotion) and index.isdigit()
    assert {u.corpus for u in utterances} == {"synthetic"}
    assert {u.language for u in utterances} == {"synthetic"}
    assert {u.emotion for u in utterances} == set(synthetic.DEFAULT_EMOTIONS)
    assert set(synthetic.DEFAULT_EMOTIONS) <= set(EMOTIONS)


def test_record_labels_corpus_as_synthetic(corpus):
    out, utterances = corpus
    with open(os.path.join(out, "synthetic.json")) as f:
        record = json.load(f)
    assert record["synthetic"] is True
    assert "not real speech" in record["description"].lower()
    assert record["generator_version"] == synthetic.GENERATOR_VERSION
    assert record["params"]["seed"] == 0 and record["params"]["n_speakers"] == 6
    assert record["params"]["emotions"] == list(synthetic.DEFAULT_EMOTIONS)
    assert record["n_utterances"] == len(utterances)


def test_both_genders_and_consistent_speakers(corpus):
    _, utterances = corpus
    genders = {}
    for u in utterances:
        assert genders.setdefault(u.speaker, u.gender) == u.gender
    assert sorted(genders.values()).count("female") == 3
    assert sorted(genders.values()).count("male") == 3
    per_speaker = {s: sum(u.speaker == s for u in utterances) for s in genders}
    assert set(per_speaker.values()) == {7 * 6}


# --- determinism and reuse ---------------------------------------------------------------

def file_bytes(utterances):
    out = {}
    for u in utterances:
        with open(u.path, "rb") as f:
            out[os.path.basename(u.path)] = f.read()
    return out


def test_same_seed_gives_identical_bytes(tmp_path):
    a = file_bytes(small(tmp_path / "a"))
    b = file_bytes(small(tmp_path / "b"))
    assert len(a) == 8 and a == b
    with open(tmp_path / "a" / "manifest.csv", "rb") as fa, \
            open(tmp_path / "b" / "manifest.csv", "rb") as fb:
        assert fa.read() == fb.read()


def test_different_seed_gives_different_audio(tmp_path):
    a = file_bytes(small(tmp_path / "a", seed=0))
    b = file_bytes(small(tmp_path / "b", seed=1))
    assert a.keys() == b.keys()
    assert all(a[name] != b[name] for name in a)


def test_file_does_not_depend_on_the_other_emotions(tmp_path):
    # Each file has its own random stream: generating a subset gives the same files.
    both = file_bytes(small(tmp_path / "a"))
    anger = file_bytes(small(tmp_path / "b", emotions=("anger",)))
    assert anger and all(both[name] == data for name, data in anger.items())


def test_second_call_reuses_files(tmp_path):
    first = small(tmp_path)
    names = [u.path for u in first] + [str(tmp_path / n)
                                       for n in ("manifest.csv", "synthetic.json")]
    stamps = {p: os.stat(p).st_mtime_ns for p in names}
    second = small(tmp_path)
    assert second == first
    assert {p: os.stat(p).st_mtime_ns for p in names} == stamps


def test_changed_parameters_regenerate_and_drop_stale_files(tmp_path):
    first = small(tmp_path, utterances_per_speaker=3)
    second = small(tmp_path, utterances_per_speaker=2, seed=5)
    assert len(first) == 12 and len(second) == 8
    wavs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".wav"))
    assert wavs == sorted(os.path.basename(u.path) for u in second)
    with open(tmp_path / "synthetic.json") as f:
        assert json.load(f)["params"]["seed"] == 5


def test_missing_file_triggers_regeneration(tmp_path):
    first = small(tmp_path)
    os.remove(first[0].path)
    assert small(tmp_path) == first
    assert os.path.isfile(first[0].path)


# --- arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(emotions=("anger", "contempt")), "allowed: neutral"),
    (dict(emotions=()), "allowed"),
    (dict(emotions=("anger", "anger")), "repeat"),
    (dict(n_speakers=1), "n_speakers"),
    (dict(utterances_per_speaker=0), "utterances_per_speaker"),
    (dict(min_duration_s=0.0), "min_duration_s"),
    (dict(max_duration_s=100.0), "max_duration_s"),
    (dict(min_duration_s=2.0, max_duration_s=1.0), "must not exceed"),
    (dict(sample_rate=4000), "sample_rate"),
    (dict(sample_rate=96000), "sample_rate"),
])
def test_bad_arguments_raise(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        small(tmp_path, **kwargs)
    assert not os.path.exists(tmp_path / "synthetic.json")


def test_bad_argument_types_raise(tmp_path):
    with pytest.raises(TypeError):
        small(tmp_path, n_speakers=2.5)
    with pytest.raises(TypeError):
        small(tmp_path, sample_rate="16000")


def test_make_speakers():
    speakers = synthetic.make_speakers(5, seed=3)
    assert [s.speaker for s in speakers] == ["s01", "s02", "s03", "s04", "s05"]
    assert [s.gender for s in speakers] == ["female", "male", "female", "male", "female"]
    for s in speakers:
        low, high = (180, 240) if s.gender == "female" else (95, 135)
        assert low <= s.base_f0 <= high
    # Adding speakers keeps the first ones.
    assert synthetic.make_speakers(7, seed=3)[:5] == speakers
    assert synthetic.make_speakers(5, seed=4) != speakers
    with pytest.raises(ValueError):
        synthetic.make_speakers(1)


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050])
def test_synthesize_utterance_shape_and_range(sample_rate):
    speaker = synthetic.make_speakers(2)[1]
    audio = synthetic.synthesize_utterance("fear", speaker, duration_s=0.75,
                                           sample_rate=sample_rate,
                                           rng=np.random.default_rng(0))
    assert audio.dtype == np.float32 and audio.shape == (round(0.75 * sample_rate),)
    assert np.all(np.isfinite(audio)) and np.abs(audio).max() <= 1.0
    assert np.sqrt(np.mean(audio.astype(np.float64) ** 2)) > 1e-3


def test_synthesize_utterance_rejects_unknown_emotion():
    speaker = synthetic.make_speakers(2)[0]
    with pytest.raises(ValueError, match="allowed: .*anger"):
        synthetic.synthesize_utterance("joy", speaker, duration_s=1.0, sample_rate=SR,
                                       rng=np.random.default_rng(0))


def test_every_common_emotion_can_be_synthesised():
    speaker = synthetic.make_speakers(2)[0]
    for emotion in EMOTIONS:
        audio = synthetic.synthesize_utterance(emotion, speaker, duration_s=0.5,
                                               sample_rate=SR, rng=np.random.default_rng(1))
        assert audio.shape == (SR // 2,)


# --- acoustics ---------------------------------------------------------------------------

def per_speaker_emotion(measured, key, reduce):
    groups: dict[tuple[str, str], list] = {}
    for u, m in measured:
        groups.setdefault((u.speaker, u.emotion), []).append(m[key])
    return {k: reduce(v) for k, v in groups.items()}


def test_f0_follows_emotion_and_gender(measured):
    f0 = per_speaker_emotion(measured, "f0", lambda v: float(np.median(np.concatenate(v))))
    speakers = sorted({s for s, _ in f0})
    for s in speakers:
        high = min(f0[s, "anger"], f0[s, "happiness"])
        low = max(f0[s, "sadness"], f0[s, "boredom"])
        assert high > 1.15 * low, (s, {e: round(f0[s, e]) for _, e in f0 if _ == s})
    gender = {u.speaker: u.gender for u, _ in measured}
    for emotion in synthetic.DEFAULT_EMOTIONS:
        female = [f0[s, emotion] for s in speakers if gender[s] == "female"]
        male = [f0[s, emotion] for s in speakers if gender[s] == "male"]
        assert min(female) > max(male), emotion


def test_loudness_and_spectral_tilt_follow_emotion(measured):
    rms = per_speaker_emotion(measured, "rms_db", np.mean)
    tilt = per_speaker_emotion(measured, "hf_db", np.mean)
    for s in sorted({s for s, _ in rms}):
        assert rms[s, "anger"] > rms[s, "sadness"] + 3.0, s
        # Anger is bright (relatively more energy above 2 kHz), sadness dark.
        assert tilt[s, "anger"] > tilt[s, "sadness"] + 3.0, s


def test_speaking_rate_follows_emotion(measured):
    rate = per_speaker_emotion(measured, "rate", np.mean)
    mean = {e: np.mean([r for (_, emo), r in rate.items() if emo == e])
            for e in synthetic.DEFAULT_EMOTIONS}
    assert min(mean["anger"], mean["fear"]) > max(mean["sadness"], mean["boredom"])


def nearest_centroid_accuracy(features, labels, speakers, folds):
    """Accuracy over folds of held-out speakers, features z-scored on the training part."""
    correct = 0
    classes = sorted(set(labels))
    for held_out in folds:
        test = np.isin(speakers, held_out)
        train = ~test
        mean, std = features[train].mean(0), features[train].std(0) + 1e-9
        z = (features - mean) / std
        centroids = np.stack([z[train & (labels == c)].mean(0) for c in classes])
        distances = ((z[test][:, None, :] - centroids[None]) ** 2).sum(-1)
        predicted = np.array(classes)[distances.argmin(1)]
        correct += int((predicted == labels[test]).sum())
    return correct / len(labels)


def test_speaker_independent_separability_is_moderate(measured):
    """Learnable but not trivial: simple prosodic features, nearest centroid, unseen speakers.

    Features are z-normalised per speaker (a standard SER step that needs no labels of
    the test speaker); folds hold out one female and one male speaker at a time.
    """
    features = np.array([[m[k] for k in FEATURES] for _, m in measured])
    labels = np.array([u.emotion for u, _ in measured])
    speakers = np.array([u.speaker for u, _ in measured])
    names = sorted(set(speakers))
    folds = [names[i:i + 2] for i in range(0, len(names), 2)]
    normalised = features.copy()
    for s in names:
        rows = speakers == s
        normalised[rows] = (features[rows] - features[rows].mean(0)) / (
            features[rows].std(0) + 1e-9)
    chance = 1.0 / len(set(labels))
    raw = nearest_centroid_accuracy(features, labels, speakers, folds)
    normalised_acc = nearest_centroid_accuracy(normalised, labels, speakers, folds)
    print(f"nearest-centroid held-out-speaker accuracy: raw {raw:.3f}, "
          f"speaker-normalised {normalised_acc:.3f} (chance {chance:.3f})")
    assert 2.5 * chance < normalised_acc < 0.8
    assert 1.75 * chance < raw < 0.8
