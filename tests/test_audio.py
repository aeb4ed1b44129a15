"""Decoding, down-mixing, resampling, trimming and bad-audio detection on real files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import soundfile
import tensorflow as tf
import tensorflow_io as tfio

from conftest import sine, write_wav, write_wav_encoded
from ser_tf.data.audio import (AudioConfig, AudioHeader, AudioHeaderError, WavLayout,
                               decode_audio, decode_wav, load_waveform, normalize_level,
                               read_audio_header, trim_silence)


def _header(path) -> AudioHeader:
    """The file's header without its WAV layout (checked by decoding with it)."""
    return dataclasses.replace(read_audio_header(path), wav_layout=None)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def test_decode_wav_keeps_samples_channels_and_rate(tmp_path):
    left, right = sine(440, 22050, 0.5, 0.5), sine(880, 22050, 0.5, 0.25)
    path = write_wav(tmp_path / "st.wav", np.stack([left, right], 1), 22050)
    audio, rate = decode_audio(tf.constant(path))
    assert int(rate) == 22050
    assert audio.shape == (len(left), 2) and audio.dtype == tf.float32
    np.testing.assert_allclose(audio.numpy()[:, 0], left, atol=1.0 / 32767)
    np.testing.assert_allclose(audio.numpy()[:, 1], right, atol=1.0 / 32767)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_decode_other_containers(tmp_path, fmt):
    rate = 16000
    path = _encode_other(tmp_path / f"a.{fmt}", fmt, rate)
    audio, got_rate = decode_audio(tf.constant(path))
    assert int(got_rate) == rate
    assert abs(_peak_hz(audio.numpy()[:, 0], rate) - 500) < 5
    assert np.max(np.abs(audio.numpy())) == pytest.approx(0.5, abs=0.05)


def test_decode_mp3(tmp_path):
    rate = 16000
    x = sine(500, rate, 0.5, 0.5).astype(np.float32)
    try:
        data = tfio.audio.encode_mp3(tf.constant(x[:, None]), rate).numpy()
    except (tf.errors.OpError, NotImplementedError):
        pytest.skip("no MP3 encoder (libmp3lame) on this machine to make a test file")
    path = tmp_path / "a.mp3"
    path.write_bytes(data)
    audio, got_rate = decode_audio(tf.constant(str(path)))
    assert int(got_rate) == rate
    assert abs(_peak_hz(audio.numpy()[:, 0], rate) - 500) < 10


@pytest.mark.parametrize("rate_in", [48000, 44100, 8000, 16000, 37000])
def test_load_waveform_resamples_and_keeps_frequency(tmp_path, rate_in):
    # 37 kHz is not a common rate: it takes the general (tfio) path.
    path = write_wav(tmp_path / "s.wav", sine(1000, rate_in, 1.0, 0.5), rate_in)
    cfg = AudioConfig(sample_rate=16000, trim_db=None, normalize="none")
    wave = load_waveform(tf.constant(path), cfg).numpy()
    assert abs(len(wave) - 16000) <= 2
    assert abs(_peak_hz(wave, 16000) - 1000) < 3
    assert np.max(np.abs(wave[400:-400])) == pytest.approx(0.5, abs=0.02)


def test_stereo_is_downmixed(tmp_path):
    x = sine(300, 16000, 0.5, 0.4)
    path = write_wav(tmp_path / "st.wav", np.stack([x, -x * 0.5], 1), 16000)
    wave = load_waveform(tf.constant(path), AudioConfig(trim_db=None, normalize="none"))
    np.testing.assert_allclose(wave.numpy(), 0.25 * x, atol=2e-4)


def test_trim_silence_removes_leading_and_trailing_quiet():
    rate = 16000
    x = np.concatenate([np.zeros(8000), sine(300, rate, 1.0, 0.5), np.zeros(4000)])
    trimmed = trim_silence(tf.constant(x, tf.float32), top_db=30).numpy()
    assert 16000 <= len(trimmed) <= 16000 + 2 * 1024
    # At most one analysis frame (1024 samples) of silence is kept at each edge.
    assert np.argmax(np.abs(trimmed) > 0.05) < 1024
    assert len(trimmed) - 1 - np.flatnonzero(np.abs(trimmed) > 0.05)[-1] < 1024


@pytest.mark.parametrize("mode,level", [("peak", -1.0), ("rms", -20.0)])
def test_normalize_level(mode, level):
    x = tf.constant(sine(300, 16000, 0.5, 0.1), tf.float32)
    y = normalize_level(x, mode, level).numpy()
    got = np.max(np.abs(y)) if mode == "peak" else np.sqrt(np.mean(y ** 2))
    assert 20 * np.log10(got) == pytest.approx(level, abs=0.05)


def _make_bad_files(tmp_path):
    good = sine(300, 16000, 0.5, 0.5)
    full = open(write_wav(tmp_path / "full.wav", good, 16000), "rb").read()
    files = {
        "empty": b"",
        "not_audio": b"this is a text file, not audio\n" * 20,
        "corrupt": b"RIFF" + np.random.default_rng(0).bytes(600),
        "truncated": full[:30],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.wav"
        paths[name].write_bytes(data)
    paths["silent"] = write_wav(tmp_path / "silent.wav", np.zeros(8000), 16000)
    paths["no_samples"] = write_wav(tmp_path / "no_samples.wav", np.zeros(0), 16000)
    paths["missing"] = tmp_path / "missing.wav"
    (tmp_path / "dir.wav").mkdir()
    paths["unreadable"] = tmp_path / "dir.wav"
    return {k: str(v) for k, v in paths.items()}


def test_every_bad_audio_case_raises(tmp_path):
    for name, path in _make_bad_files(tmp_path).items():
        with pytest.raises((tf.errors.OpError, ValueError)):
            load_waveform(tf.constant(path), AudioConfig())
            pytest.fail(f"{name} did not raise")


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_header_rate_and_static_rate_paths_match_the_dispatch(tmp_path, rate):
    path = write_wav(tmp_path / "s.wav", sine(700, rate, 0.5, 0.5), rate)
    assert _header(path) == AudioHeader("wav", rate, wav_format="pcm16")
    cfg = AudioConfig(trim_db=None, normalize="none")
    dynamic = load_waveform(tf.constant(path), cfg).numpy()
    static = load_waveform(tf.constant(path), cfg, rate=rate).numpy()
    lean = load_waveform(tf.constant(path), cfg, rate=rate, wav_format="pcm16").numpy()
    np.testing.assert_allclose(static, dynamic, atol=1e-6)
    np.testing.assert_array_equal(lean, static)
    with pytest.raises(tf.errors.InvalidArgumentError, match="differs"):
        load_waveform(tf.constant(path), cfg, rate=22050)
    with pytest.raises(ValueError, match="needs"):
        load_waveform(tf.constant(path), cfg, wav_format="pcm16")
    with pytest.raises(ValueError, match="wav_layout needs"):
        load_waveform(tf.constant(path), cfg, rate=rate,
                      wav_layout=read_audio_header(path).wav_layout)


def _encode_other(path, fmt: str, rate: int = 16000) -> str:
    """A 500 Hz tone written as FLAC or Ogg Vorbis by tfio's encoders."""
    x = sine(500, rate, 0.5, 0.5).astype(np.float32)
    if fmt == "flac":
        data = tfio.audio.encode_flac(tf.constant((x * 32767).astype(np.int16)[:, None]), rate)
    else:
        # libvorbis has no mono 16 kHz mode; encode the same tone as stereo.
        data = tfio.audio.encode_vorbis(tf.constant(np.stack([x, x], 1)), rate)
    path.write_bytes(data.numpy())
    return str(path)


@pytest.mark.parametrize("extensible", [False, True])
@pytest.mark.parametrize("encoding,wav_format", [("pcm8", "pcm8"), ("pcm16", "pcm16"),
                                                 ("pcm24", "pcm32"), ("pcm32", "pcm32"),
                                                 ("float32", "float32")])
def test_header_wav_format_and_lean_decode_match_the_general_decoder(tmp_path, encoding,
                                                                     wav_format, extensible):
    x = sine(440, 22050, 0.4, 0.5)
    path = write_wav_encoded(tmp_path / "a.wav", x, 22050, encoding, extensible=extensible)
    assert _header(path) == AudioHeader("wav", 22050, wav_format)
    general, _ = decode_audio(tf.constant(path))
    lean = decode_wav(tf.constant(path), wav_format)
    np.testing.assert_array_equal(lean.numpy(), general.numpy())
    layout = read_audio_header(path).wav_layout
    np.testing.assert_array_equal(decode_wav(tf.constant(path), wav_format, layout).numpy(),
                                  general.numpy())
    np.testing.assert_allclose(lean.numpy()[:, 0], x, atol=1 / 127 if encoding == "pcm8" else 1e-4)
    cfg = AudioConfig(trim_db=None, normalize="none")
    np.testing.assert_array_equal(
        load_waveform(tf.constant(path), cfg, rate=22050, wav_format=wav_format).numpy(),
        load_waveform(tf.constant(path), cfg, rate=22050).numpy())
    np.testing.assert_array_equal(
        load_waveform(tf.constant(path), cfg, rate=22050, wav_format=wav_format,
                      wav_layout=layout).numpy(),
        load_waveform(tf.constant(path), cfg, rate=22050).numpy())


def test_header_walks_chunks_before_fmt(tmp_path):
    path = write_wav_encoded(tmp_path / "a.wav", sine(440, 8000, 0.2), 8000, "pcm16",
                             list_chunk_first=True)
    assert _header(path) == AudioHeader("wav", 8000, "pcm16")


@pytest.mark.parametrize("fmt,rate", [("flac", 16000), ("flac", 44100), ("ogg", 16000),
                                      ("ogg", 48000)])
def test_header_of_other_containers(tmp_path, fmt, rate):
    path = _encode_other(tmp_path / f"a.{fmt}", fmt, rate)
    assert read_audio_header(path) == AudioHeader(fmt, rate)


def test_header_of_mp3(tmp_path):
    x = sine(500, 16000, 0.5, 0.5).astype(np.float32)
    try:
        data = tfio.audio.encode_mp3(tf.constant(x[:, None]), 16000).numpy()
    except (tf.errors.OpError, NotImplementedError):
        pytest.skip("no MP3 encoder (libmp3lame) on this machine to make a test file")
    path = tmp_path / "a.mp3"
    # An ID3v2 tag in front: the frame search starts after it.
    path.write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x05" + b"\x00" * 5 + data)
    assert read_audio_header(path) == AudioHeader("mp3", 16000)


def test_header_errors_name_the_problem(tmp_path):
    bad = _make_bad_files(tmp_path)
    for name in ("empty", "not_audio"):
        with pytest.raises(AudioHeaderError, match="not an audio file"):
            read_audio_header(bad[name])
    for name in ("corrupt", "truncated"):
        with pytest.raises(AudioHeaderError):
            read_audio_header(bad[name])
    for name in ("missing", "unreadable"):
        with pytest.raises(OSError):
            read_audio_header(bad[name])
    # Readable headers whose audio is bad: found when decoding.
    for name in ("silent", "no_samples"):
        assert read_audio_header(bad[name]).wav_format == "pcm16"
    zero_rate = write_wav_encoded(tmp_path / "zero.wav", sine(440, 8000, 0.1), 0, "pcm16")
    with pytest.raises(AudioHeaderError, match="sample rate 0"):
        read_audio_header(zero_rate)
    with pytest.raises(ValueError, match="sample_format"):
        decode_wav(tf.constant(bad["silent"]), "pcm12")


_WAV_FORMAT_OF = {"pcm8": "pcm8", "pcm16": "pcm16", "pcm24": "pcm32", "pcm32": "pcm32",
                  "float32": "float32"}


def _decode_both_ways(path: str, wav_format: str) -> np.ndarray:
    """The file decoded by decode_audio, the lean decode_wav, and decode_wav reading the
    samples where the Python header reader found them (the layout as tensors, as a corpus
    pipeline passes it), eagerly and in a tf.data map (graph), checked identical; the one
    result."""
    eager, _ = decode_audio(tf.constant(path))
    layout = read_audio_header(path).wav_layout
    assert layout is not None
    mapped = tf.data.Dataset.from_tensors(path)
    with_layout = tf.data.Dataset.from_tensors((path,) + tuple(np.int64(v) for v in layout))
    graph_general = next(iter(mapped.map(lambda p: decode_audio(p)[0])))
    graph_lean = next(iter(mapped.map(lambda p: decode_wav(p, wav_format))))
    graph_layout = next(iter(with_layout.map(
        lambda p, *known: decode_wav(p, wav_format, WavLayout(*known)))))
    for other in (decode_wav(tf.constant(path), wav_format), graph_general, graph_lean,
                  decode_wav(tf.constant(path), wav_format, layout), graph_layout):
        np.testing.assert_array_equal(other.numpy(), eager.numpy())
    return eager.numpy()


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("encoding", ["pcm8", "pcm16", "pcm24", "pcm32", "float32"])
def test_every_wav_sample_format_decodes_sample_for_sample(tmp_path, encoding, channels):
    # 2205 frames: an odd-sized data chunk (and its pad byte) for mono 8 and 24-bit.
    x = np.stack([sine(440, 22050, 0.1, 0.9), sine(300, 22050, 0.1, -0.6)], 1)[:, :channels]
    x[:4] = [[-1.0] * channels, [1.0] * channels, [0.0] * channels, [-0.5] * channels]
    path = write_wav_encoded(tmp_path / "a.wav", x if channels > 1 else x[:, 0], 22050,
                             encoding)
    got = _decode_both_ways(path, _WAV_FORMAT_OF[encoding])
    expected, _ = soundfile.read(path, dtype="float64", always_2d=True)
    assert got.shape == (len(x), channels) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected.astype(np.float32))
    # The writer scales by 2^(bits-1) - 1, the decoder by 2^(bits-1).
    np.testing.assert_allclose(got, x, atol=2 / 127 if encoding == "pcm8" else 2 / 32767)


@pytest.mark.parametrize("encoding", ["pcm16", "pcm24", "float32"])
@pytest.mark.parametrize("layout", ["list_chunk_first", "chunk_before_data", "extensible",
                                    "all"])
def test_wav_chunk_layouts_decode_alike(tmp_path, encoding, layout):
    x = sine(440, 8000, 0.1, 0.5)[:799]  # odd: 24-bit data has a pad byte
    options = {"list_chunk_first": layout in ("list_chunk_first", "all"),
               "chunk_before_data": layout in ("chunk_before_data", "all"),
               "extensible": layout in ("extensible", "all")}
    path = write_wav_encoded(tmp_path / "a.wav", x, 8000, encoding, **options)
    plain = write_wav_encoded(tmp_path / "plain.wav", x, 8000, encoding)
    assert _header(path) == AudioHeader("wav", 8000, _WAV_FORMAT_OF[encoding])
    got = _decode_both_ways(path, _WAV_FORMAT_OF[encoding])
    np.testing.assert_array_equal(got, _decode_both_ways(plain, _WAV_FORMAT_OF[encoding]))
    np.testing.assert_array_equal(got, soundfile.read(path, dtype="float32",
                                                      always_2d=True)[0])


def _raw_wav(data: bytes, data_size: int | None = None, channels: int = 1,
             fmt: bool = True) -> bytes:
    """A 16-bit PCM WAV file holding ``data``, its data chunk claiming ``data_size`` bytes."""
    import struct

    body = struct.pack("<HHIIHH", 1, channels, 8000, 16000 * channels, 2 * channels, 16)
    chunks = (b"fmt " + struct.pack("<I", 16) + body) if fmt else b""
    chunks += b"data" + struct.pack("<I", len(data) if data_size is None else data_size) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_partial_last_frame_is_dropped(tmp_path):
    frames = np.arange(-6, 6, dtype="<i2").reshape(6, 2)
    path = tmp_path / "a.wav"
    path.write_bytes(_raw_wav(frames.tobytes() + b"\x01\x02", channels=2))
    got = _decode_both_ways(str(path), "pcm16")
    np.testing.assert_array_equal(got, frames / 32768.0)


@pytest.mark.parametrize("case,message", [
    ("truncated", "running past the end"), ("no_data", "no data chunk"),
    ("no_fmt", "no fmt chunk"), ("wrong_format", "sample format differs")])
def test_bad_wav_files_fail_with_a_clear_message(tmp_path, case, message):
    samples = np.arange(100, dtype="<i2").tobytes()
    data = {"truncated": _raw_wav(samples, data_size=400),
            "no_data": _raw_wav(b"")[:-8],
            "no_fmt": _raw_wav(samples, fmt=False),
            "wrong_format": open(write_wav_encoded(tmp_path / "f.wav", sine(440, 8000, 0.1),
                                                   8000, "float32"), "rb").read()}[case]
    path = tmp_path / "bad.wav"
    path.write_bytes(data)
    if case != "wrong_format":  # the header reader refuses it alike
        with pytest.raises(AudioHeaderError, match=message):
            read_audio_header(path)
    decoders = [lambda p: decode_wav(p, "pcm16")]
    if case != "wrong_format":
        decoders.append(lambda p: decode_audio(p)[0])
    for decode in decoders:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            decode(tf.constant(str(path)))
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            next(iter(tf.data.Dataset.from_tensors(str(path)).map(decode)))


def test_layout_decode_fails_on_a_file_cut_after_its_header_was_read(tmp_path):
    path = write_wav(tmp_path / "a.wav", sine(440, 8000, 0.2, 0.5), 8000)
    layout = read_audio_header(path).wav_layout
    assert layout.data_offset + layout.data_size == len(open(path, "rb").read())
    with open(path, "r+b") as f:
        f.truncate(layout.data_offset + layout.data_size // 2)
    message = "data chunk runs past the end of the file"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        decode_wav(tf.constant(path), "pcm16", layout)
    with_layout = tf.data.Dataset.from_tensors((path,) + tuple(np.int64(v) for v in layout))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        next(iter(with_layout.map(lambda p, *known: decode_wav(p, "pcm16", WavLayout(*known)))))
