"""The tf.data pipeline over real files: decode-once cache, bad-audio policy, crops, windows."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import sine, write_wav, write_wav_encoded
from ser_tf.data.audio import AudioConfig, read_audio_header
from ser_tf.data.corpora import Utterance
from ser_tf.frontend import LogMelFrontend
from ser_tf.data.pipeline import (AugmentConfig, BadAudioError, DecodeGroup, augment_waveform,
                                  batch_windows, decode_corpus, decoding_dataset,
                                  error_reason, evaluation_dataset, fit_length,
                                  group_by_header, training_dataset, utterance_windows,
                                  window_starts)
from test_audio import _encode_other, _make_bad_files

CFG = AudioConfig(trim_db=None, normalize="none")


def _utt(path, emotion="anger", speaker="a"):
    return Utterance(str(path), emotion, speaker, "female", "xx", "test")


@pytest.fixture()
def tone_corpus(tmp_path):
    """Five files of different lengths and rates, each a distinct tone."""
    specs = [(200, 16000, 0.5), (300, 48000, 1.3), (400, 44100, 2.2), (500, 8000, 0.9),
             (600, 16000, 3.1)]
    utts = [_utt(write_wav(tmp_path / f"t{k}.wav", sine(f, r, d), r), speaker=f"s{k}")
            for k, (f, r, d) in enumerate(specs)]
    return decode_corpus(utts, CFG, progress=False), specs


def test_decode_corpus_decodes_every_rate_and_indexes_each_file(tone_corpus):
    corpus, specs = tone_corpus
    assert len(corpus) == 5 and not corpus.bad
    expected = [int(round(d * 16000)) for _, _, d in specs]
    assert np.all(np.abs(corpus.lengths - expected) <= 2)
    got = {int(i): w.numpy() for i, w in corpus.dataset}
    assert sorted(got) == list(range(5))
    for k, (freq, _, _) in enumerate(specs):
        wave = got[k]
        assert len(wave) == corpus.lengths[k]
        spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        assert np.argmax(spec) * 16000 / len(wave) == pytest.approx(freq, abs=3)


def test_bad_audio_skip_names_each_file_and_fail_raises(tmp_path, caplog):
    bad = _make_bad_files(tmp_path)
    good = [_utt(write_wav(tmp_path / f"g{k}.wav", sine(300, 16000, 0.5), 16000))
            for k in range(2)]
    utts = good[:1] + [_utt(p) for p in bad.values()] + good[1:]
    with caplog.at_level("WARNING"):
        corpus = decode_corpus(utts, AudioConfig(), on_bad_audio="skip", progress=False)
    assert [u.path for u in corpus.utterances] == [g.path for g in good]
    assert sorted(b.path for b in corpus.bad) == sorted(bad.values())
    for path in bad.values():
        assert path in caplog.text
    reasons = {b.path: b.reason for b in corpus.bad}
    assert "silent" in reasons[bad["silent"]]
    assert "No such file" in reasons[bad["missing"]] or "not found" in reasons[
        bad["missing"]].lower()
    with pytest.raises(BadAudioError) as err:
        decode_corpus(utts, AudioConfig(), on_bad_audio="fail", progress=False)
    for path in bad.values():
        assert path in str(err.value)
    assert len(err.value.bad) == len(bad)


@pytest.fixture()
def mixed_files(tmp_path):
    """Files of every kind the lean and general paths take, with their tone frequencies."""
    specs = [
        ("a.wav", 16000, "pcm16", 200), ("b.flac", 16000, None, 500),
        ("c.wav", 48000, "pcm24", 300), ("d.wav", 16000, "float32", 400),
        ("e.wav", 16000, "pcm8", 600), ("f.ogg", 16000, None, 500),
        ("g.wav", 44100, "pcm16", 700), ("h.wav", 16000, "pcm16", 800),
    ]
    paths, freqs = [], []
    for name, rate, encoding, freq in specs:
        if encoding is None:
            paths.append(_encode_other(tmp_path / name, name[-4:].strip("."), rate))
        else:
            paths.append(write_wav_encoded(tmp_path / name, sine(freq, rate, 0.5), rate,
                                           encoding))
        freqs.append(freq)
    return paths, freqs


def test_group_by_header_groups_alike_files_and_leaves_out_bad_ones(tmp_path, mixed_files):
    paths, _ = mixed_files
    bad = _make_bad_files(tmp_path)
    groups = group_by_header(paths + [bad[k] for k in ("not_audio", "missing", "truncated")])
    assert [dataclasses.replace(g, layouts=None) for g in groups] == [
        DecodeGroup(16000, None, (1, 5)), DecodeGroup(16000, "float32", (3,)),
        DecodeGroup(16000, "pcm16", (0, 7)), DecodeGroup(16000, "pcm8", (4,)),
        DecodeGroup(44100, "pcm16", (6,)), DecodeGroup(48000, "pcm32", (2,)),
    ]
    # WAV groups carry each member's layout, read from its header; the others none.
    for group in groups:
        if group.wav_format is None:
            assert group.layouts is None
        else:
            assert group.layouts == tuple(read_audio_header(paths[i]).wav_layout
                                          for i in group.members)
    with pytest.raises(ValueError, match="no groups"):
        decoding_dataset(paths, [], CFG)


def test_decode_corpus_decodes_every_format_in_order(mixed_files):
    paths, freqs = mixed_files
    corpus = decode_corpus([_utt(p) for p in paths], CFG, progress=False)
    assert not corpus.bad and [u.path for u in corpus.utterances] == paths
    got = {int(i): w.numpy() for i, w in corpus.dataset}
    assert sorted(got) == list(range(len(paths)))
    for k, freq in enumerate(freqs):
        wave = got[k]
        assert len(wave) == corpus.lengths[k]
        assert abs(len(wave) - 8000) <= 2
        spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        assert np.argmax(spec) * 16000 / len(wave) == pytest.approx(freq, abs=3)
    # Uncached, the same waveforms come out, group after group, on every pass.
    uncached = decoding_dataset(paths, group_by_header(paths), CFG)
    for _ in range(2):
        order = []
        for i, wave in uncached:
            order.append(int(i))
            np.testing.assert_array_equal(wave.numpy(), got[int(i)])
        assert order == [1, 5, 3, 0, 7, 4, 6, 2]
    # The decoding pass ran with the single-pass options on a wrapper; the corpus's own
    # dataset, on which training pipelines are built, keeps tf.data's defaults and is
    # served from the cache that pass filled: the files are no longer needed.
    assert corpus.dataset.options().autotune.enabled is None
    for path in paths:
        os.remove(path)
    assert sorted(int(i) for i, _ in corpus.dataset) == list(range(len(paths)))


def test_decoding_dataset_applies_a_transform_in_its_map_and_drops_files_it_fails(
        mixed_files):
    paths, freqs = mixed_files
    groups = group_by_header(paths)
    waves = {int(i): w.numpy() for i, w in decoding_dataset(paths, groups, CFG)}
    frontend = LogMelFrontend(16000, n_mels=16)

    def log_mel(wave):
        return frontend(wave[None])[0]

    got = {int(i): f.numpy() for i, f in decoding_dataset(paths, groups, CFG, log_mel)}
    assert sorted(got) == sorted(waves)
    for i, wave in waves.items():
        np.testing.assert_allclose(got[i], log_mel(tf.constant(wave)).numpy(), rtol=1e-5,
                                   atol=1e-5)

    # A file whose transform fails is left out like a file that fails to decode: here the
    # tones above 550 Hz (the spectrum's peak; half a second at 16 kHz, so 2 Hz per bin).
    def low_tones_only(wave):
        peak_hz = 2 * tf.argmax(tf.abs(tf.signal.rfft(wave)), output_type=tf.int32)
        tf.debugging.assert_less(peak_hz, 550, message="tone too high")
        return peak_hz

    kept = {int(i) for i, _ in decoding_dataset(paths, groups, CFG, low_tones_only)}
    assert kept == {k for k, freq in enumerate(freqs) if freq < 550}


def test_bad_policy_and_empty_input_rejected(tmp_path):
    with pytest.raises(ValueError, match="on_bad_audio"):
        decode_corpus([_utt(tmp_path / "x.wav")], CFG, on_bad_audio="ignore")
    with pytest.raises(ValueError, match="no utterances"):
        decode_corpus([], CFG)


def test_error_reason_reads_eager_and_compiled_assertions():
    def check(x):
        tf.debugging.assert_greater(tf.reduce_max(x), 1.0, message="silent audio (all zero)")
        return x

    with pytest.raises(tf.errors.InvalidArgumentError) as eager:
        check(tf.zeros([3]))
    with pytest.raises(tf.errors.InvalidArgumentError) as compiled:
        tf.function(check)(tf.zeros([3]))
    assert "function_node" in compiled.value.message or "[" in compiled.value.message
    assert error_reason(eager.value) == error_reason(compiled.value) == \
        "silent audio (all zero)"
    assert error_reason(ValueError("plain message\nmore")) == "plain message"
    parse = tf.errors.InvalidArgumentError(None, None, "{{function_node f}} StringToNumberOp "
                                           "could not correctly convert string: no fmt chunk")
    assert error_reason(parse) == "no fmt chunk"


def test_fit_length_loops_pads_and_crops():
    x = tf.range(5, dtype=tf.float32)
    np.testing.assert_array_equal(fit_length(x, 12, 0.0, "loop"),
                                  [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])
    np.testing.assert_array_equal(fit_length(x, 7, 0.0, "zero"), [0, 1, 2, 3, 4, 0, 0])
    np.testing.assert_array_equal(fit_length(x, 3, 0.999, "zero"), [2, 3, 4])
    np.testing.assert_array_equal(fit_length(x, 3, 0.0, "loop"), [0, 1, 2])


def test_training_dataset_shapes_labels_and_determinism(tone_corpus):
    corpus, _ = tone_corpus
    labels = np.arange(5)

    def batches(seed):
        ds = training_dataset(corpus, [0, 1, 2, 3], labels, segment_samples=8000,
                              batch_size=3, seed=seed)
        return [(x.numpy(), y.numpy()) for x, y in ds]

    a, b, c = batches(1), batches(1), batches(2)
    assert [x.shape for x, _ in a] == [(3, 8000), (1, 8000)]
    assert sorted(np.concatenate([y for _, y in a]).tolist()) == [0, 1, 2, 3]
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not all(np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # A new epoch draws new crops and order.
    ds = training_dataset(corpus, [1, 2, 3, 4], labels, segment_samples=4000, batch_size=4,
                          seed=0)
    e1, e2 = [x.numpy() for x, _ in ds], [x.numpy() for x, _ in ds]
    assert not np.array_equal(e1[0], e2[0])


def test_augmentation_gain_noise_shift():
    x = tf.constant(sine(300, 16000, 1.0, 0.3), tf.float32)
    seed = tf.constant([3, 4], tf.int64)
    gain = augment_waveform(x, AugmentConfig(gain_db=6.0), 16000, seed).numpy()
    ratio = np.max(np.abs(gain)) / 0.3
    assert 10 ** (-6 / 20) - 1e-3 <= ratio <= 10 ** (6 / 20) + 1e-3
    noisy = augment_waveform(x, AugmentConfig(noise_snr_db=(10.0, 10.0), noise_prob=1.0),
                             16000, seed).numpy()
    snr = 10 * np.log10(np.mean(x.numpy() ** 2) / np.mean((noisy - x.numpy()) ** 2))
    assert snr == pytest.approx(10.0, abs=0.5)
    shifted = augment_waveform(x, AugmentConfig(shift_s=0.1), 16000, seed).numpy()
    lags = [k for k in range(-1600, 1601) if np.allclose(np.roll(x.numpy(), k), shifted)]
    assert len(lags) >= 1


def test_window_starts():
    assert window_starts(100, 200, 50) == [0]
    assert window_starts(200, 100, 50) == [0, 50, 100]
    assert window_starts(230, 100, 50) == [0, 50, 100, 130]


@pytest.mark.parametrize("n", [37, 100, 200, 230, 250])
@pytest.mark.parametrize("pad_mode", ["loop", "zero"])
def test_utterance_windows_are_the_window_starts(n, pad_mode):
    wave = np.arange(1, n + 1, dtype=np.float32)
    wins = utterance_windows(tf.constant(wave), 100, 50, pad_mode).numpy()
    starts = window_starts(n, 100, 50)
    assert wins.shape == (len(starts), 100)
    if n >= 100:
        np.testing.assert_array_equal(wins, np.stack([wave[s:s + 100] for s in starts]))
    else:  # one window, the utterance extended
        np.testing.assert_array_equal(wins[0, :n], wave)
        tail = np.tile(wave, 3)[n:100] if pad_mode == "loop" else np.zeros(100 - n)
        np.testing.assert_array_equal(wins[0, n:], tail)


@pytest.mark.parametrize("n", [37, 100, 230])
@pytest.mark.parametrize("pad_mode", ["loop", "zero"])
def test_batch_windows_window_every_row_like_one_utterance(n, pad_mode):
    waves = np.stack([np.arange(1, n + 1), -np.arange(1, n + 1)]).astype(np.float32)
    x = tf.constant(waves)
    with tf.GradientTape() as tape:
        tape.watch(x)
        wins = batch_windows(x, 100, 50, pad_mode)
        total = tf.reduce_sum(wins[1])
    for row in range(2):
        np.testing.assert_array_equal(
            wins[row].numpy(), utterance_windows(tf.constant(waves[row]), 100, 50,
                                                 pad_mode).numpy())
    # Differentiable: each sample of row 1 gets one per window (and loop copy) it is in.
    grad = tape.gradient(total, x).numpy()
    assert np.all(grad[0] == 0) and np.all(grad[1] >= 1)
    assert grad[1].sum() == wins.shape[1] * 100 - (0 if pad_mode == "loop" or n >= 100
                                                   else 100 - n)


def test_evaluation_windows_cover_every_utterance(tone_corpus):
    corpus, _ = tone_corpus
    idx = [4, 0, 2]
    ds, total = evaluation_dataset(corpus, idx, segment_samples=16000, hop_samples=8000,
                                   batch_size=4)
    positions, wins = [], []
    for p, w in ds:
        positions += p.numpy().tolist()
        wins.append(w.numpy())
    wins = np.concatenate(wins)
    assert len(positions) == total == wins.shape[0]
    expected = [len(window_starts(int(corpus.lengths[i]), 16000, 8000)) for i in idx]
    assert [positions.count(k) for k in range(3)] == expected
    assert wins.shape[1] == 16000
    # The short utterance (index 0, 0.5 s) is looped to fill its window.
    first = wins[positions.index(1)]
    np.testing.assert_allclose(first[:8000], first[8000:16000], atol=1e-6)


@pytest.mark.parametrize("pad_mode", ["loop", "zero"])
def test_whole_evaluation_gives_each_utterance_at_its_own_length(tone_corpus, pad_mode):
    corpus, _ = tone_corpus
    idx = [4, 0, 2]
    hop = 12000  # longer than utterance 0 (0.5 s): only that one is extended
    ds, total = evaluation_dataset(corpus, idx, segment_samples=16000, hop_samples=hop,
                                   batch_size=4, pad_mode=pad_mode, whole=True)
    got = {int(p.numpy()[0]): w.numpy()[0] for p, w in ds}
    assert total == 3 and sorted(got) == [0, 1, 2]
    for pos in (0, 2):
        assert got[pos].shape == (int(corpus.lengths[idx[pos]]),)
    wave, n = got[1], int(corpus.lengths[0])
    if pad_mode == "loop":  # whole repeats, at least one hop
        assert len(wave) == 2 * n >= hop
        np.testing.assert_array_equal(wave[n:], wave[:n])
    else:
        assert len(wave) == hop
        np.testing.assert_array_equal(wave[n:], np.zeros(hop - n, np.float32))
    # Per-speaker statistics ride along as they do with windows.
    mean = np.arange(len(corpus), dtype=np.float32)[:, None, None] * np.ones((1, 2, 1))
    ds, _ = evaluation_dataset(corpus, idx, segment_samples=16000, hop_samples=hop,
                               batch_size=4, norm_stats=(mean, mean + 1), whole=True)
    for p, x in ds:
        assert x["norm_mean"].shape == (1, 2, 1)
        assert float(x["norm_mean"][0, 0, 0]) == idx[int(p[0])]


def test_frozen_config_is_hashable():
    assert dataclasses.replace(AugmentConfig(), gain_db=1.0).enabled


def test_speed_perturbation_scales_length_and_pitch():
    from ser_tf.data.pipeline import perturb_speed

    x = tf.constant(sine(500, 16000, 1.0, 0.5), tf.float32)
    for f in (0.9, 1.1):
        y = perturb_speed(x, (f,), 16000, tf.constant([1, 2], tf.int64)).numpy()
        assert abs(len(y) - 16000 / f) <= 2
        spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        assert np.argmax(spec) * 16000 / len(y) == pytest.approx(500 * f, abs=3)
    picks = {len(perturb_speed(x, (0.9, 1.0, 1.1), 16000, tf.constant([k, 0], tf.int64)))
             for k in range(20)}
    assert len(picks) == 3
    with pytest.raises(ValueError):
        AugmentConfig(speed=(3.0,))
