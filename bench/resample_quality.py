"""Quality and speed of ``ser_tf.data.resample`` against soxr and ``tfio.audio.resample``.

Bench code: needs the ``bench`` extra (librosa, soxr, soundfile; scipy comes with
librosa). Every report is a plain, JSON-serialisable dict so that the benchmark runner can
render it; ``python -m bench.resample_quality`` prints them for 48k -> 16k and
44.1k -> 16k.

Methods compared (each maps a 1-D float32 numpy array at ``rate_in`` to ``rate_out``):

* ``ser_tf hq`` / ``ser_tf fast``: :func:`ser_tf.data.resample.resample` under a
  ``tf.function`` with an unknown-length input signature (as in a tf.data pipeline);
* ``soxr HQ``: ``soxr.resample(..., quality="HQ")``, what ``librosa.resample`` uses by
  default (``res_type="soxr_hq"``);
* ``tfio``: ``tfio.audio.resample`` under a ``tf.function``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from ser_tf.data.resample import QUALITY_PRESETS, resample  # noqa: E402

# Same override as the tests (tests/conftest.py): SER_TF_EMODB is the corpus folder.
EMODB_WAV_DIR = Path(os.environ.get(
    "SER_TF_EMODB", Path(__file__).resolve().parents[2] / "shared" / "data" / "emodb")) / "wav"

Resampler = Callable[[np.ndarray], np.ndarray]


def _ours(rate_in: int, rate_out: int, quality: str = "hq",
          method: str = "conv") -> Resampler:
    fn = tf.function(lambda x: resample(x, rate_in, rate_out, quality=quality, method=method),
                     input_signature=[tf.TensorSpec([None], tf.float32)])
    return lambda x: fn(np.asarray(x, np.float32)).numpy()


def _soxr(rate_in: int, rate_out: int, quality: str = "HQ") -> Resampler:
    import soxr

    return lambda x: soxr.resample(np.asarray(x, np.float32), rate_in, rate_out,
                                   quality=quality)


def _tfio(rate_in: int, rate_out: int) -> Resampler:
    import tensorflow_io as tfio

    fn = tf.function(lambda x: tfio.audio.resample(x, rate_in, rate_out),
                     input_signature=[tf.TensorSpec([None], tf.float32)])
    return lambda x: fn(np.asarray(x, np.float32)).numpy()


def _methods(rate_in: int, rate_out: int) -> dict[str, Resampler]:
    methods = {f"ser_tf {q}": _ours(rate_in, rate_out, q) for q in QUALITY_PRESETS}
    methods["soxr HQ"] = _soxr(rate_in, rate_out)
    methods["tfio"] = _tfio(rate_in, rate_out)
    return methods


# --------------------------------------------------------------------------- tones


def _tone_fit(y: np.ndarray, freq: float, rate: int, trim: int) -> complex:
    """Complex amplitude of ``freq`` in ``y[trim:-trim]`` by least squares (phase at t=0).

    Fitting the known frequency ignores whatever else is in the output (aliases,
    noise), which a plain RMS would count.
    """
    k = np.arange(trim, len(y) - trim)
    w = 2 * np.pi * freq * k / rate
    basis = np.stack([np.cos(w), np.sin(w)], 1)
    (c, s), *_ = np.linalg.lstsq(basis, y[trim:len(y) - trim].astype(np.float64), rcond=None)
    # a*sin(wt + phi) = a*sin(phi)*cos(wt) + a*cos(phi)*sin(wt)
    return complex(s, c)


def _rms_db(y: np.ndarray, trim: int, amplitude: float = 1.0) -> float:
    mid = y[trim:len(y) - trim].astype(np.float64)
    return float(20 * np.log10(np.sqrt(np.mean(mid**2)) / (amplitude / math.sqrt(2)) + 1e-20))


def _tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    return np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate).astype(np.float32)


def _aliasing(fn: Resampler, rate_in: int, rate_out: int, freqs: np.ndarray) -> list[float]:
    """Output level (dB re. the input tone) of tones that the output rate cannot carry."""
    trim = rate_out // 20  # 50 ms: away from the edges, where every method ramps
    return [_rms_db(fn(_tone(f, rate_in, 0.5)), trim) for f in freqs]


def _passband(fn: Resampler, rate_in: int, rate_out: int,
              freqs: np.ndarray) -> list[float]:
    trim = rate_out // 20
    return [float(20 * np.log10(abs(_tone_fit(fn(_tone(f, rate_in, 0.5)), f, rate_out, trim))))
            for f in freqs]


def _group_delay(fn: Resampler, rate_in: int, rate_out: int) -> float:
    """Delay of ``fn``'s output in output samples (positive: late).

    The test signal is a sum of 40 random tones below 0.8 x the lower Nyquist frequency,
    so it can be evaluated exactly at any time: the integer lag comes from the peak of
    the cross-correlation between the output and the signal evaluated at the output
    times, and the fraction from the delay ``d`` minimising the squared error between
    the output and the signal evaluated at times ``(k - d) / rate_out``.
    """
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(0)
    top = 0.8 * min(rate_in, rate_out) / 2
    freqs = rng.uniform(100.0, top, 40)
    phases = rng.uniform(0, 2 * np.pi, 40)

    def signal(t: np.ndarray) -> np.ndarray:
        return np.sin(2 * np.pi * freqs[None, :] * t[:, None] + phases).sum(1) / 8.0

    x = signal(np.arange(rate_in) / rate_in).astype(np.float32)
    y = fn(x).astype(np.float64)
    k = np.arange(len(y))
    trim = rate_out // 10
    mid = slice(trim, len(y) - trim)
    ref = signal(k / rate_out)
    n = 1 << (2 * len(y) - 1).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(y[mid], n) * np.conj(np.fft.rfft(ref[mid], n)), n)
    lags = np.concatenate([np.arange(0, n // 2), np.arange(-n // 2, 0)])
    lag = int(lags[np.argmax(xcorr)])

    def error(d: float) -> float:
        return float(np.sum((y[mid] - signal((k[mid] - d) / rate_out)) ** 2))

    return float(minimize_scalar(error, bounds=(lag - 1.0, lag + 1.0), method="bounded",
                                 options={"xatol": 1e-5}).x)


# ------------------------------------------------------------------------ log-mel


def _log_mel(y: np.ndarray, rate: int = 16000) -> np.ndarray:
    """64-band log-mel power spectrogram (dB) computed with ``tf.signal``.

    25 ms Hann windows every 10 ms, 512-point FFT, mel bands from 20 Hz to 8 kHz.
    """
    stft = tf.signal.stft(tf.constant(y, tf.float32), 400, 160, 512, pad_end=False)
    weights = tf.signal.linear_to_mel_weight_matrix(64, 257, rate, 20.0, rate / 2)
    mel = tf.matmul(tf.abs(stft) ** 2, weights).numpy().astype(np.float64)
    return 10 * np.log10(np.maximum(mel, 1e-10))


def _compare_log_mel(a: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(mean |dB difference|, Pearson correlation) with both floored at ref.max() - 80 dB.

    The floor (as librosa's ``top_db=80``) keeps near-silent bins, whose dB values are
    dominated by rounding noise, from swamping the comparison.
    """
    frames = min(len(a), len(ref))
    floor = ref.max() - 80.0
    a, ref = np.maximum(a[:frames], floor), np.maximum(ref[:frames], floor)
    return float(np.mean(np.abs(a - ref))), float(np.corrcoef(a.ravel(), ref.ravel())[0, 1])


def _speech_files(count: int) -> list[Path]:
    files = sorted(EMODB_WAV_DIR.glob("*.wav"))
    if not files:
        return []
    # Evenly spread over the sorted list: several speakers and emotions.
    return [files[i] for i in np.linspace(0, len(files) - 1, count).astype(int)]


def _log_mel_agreement(methods: dict[str, Resampler], rate_in: int, rate_out: int,
                       num_files: int) -> dict[str, dict[str, float]]:
    import soundfile as sf
    import soxr

    files = _speech_files(num_files)
    if not files or rate_out != 16000:
        return {}
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    for path in files:
        original, rate = sf.read(str(path), dtype="float64")
        if original.ndim > 1:
            original = original.mean(1)
        assert rate == 16000, (path, rate)
        upsampled = soxr.resample(original, 16000, rate_in, quality="VHQ").astype(np.float32)
        outputs = {name: fn(upsampled) for name, fn in methods.items()}
        ref_soxr = _log_mel(outputs["soxr HQ"])
        ref_orig = _log_mel(original)
        for name, y in outputs.items():
            mae_s, corr_s = _compare_log_mel(_log_mel(y), ref_soxr)
            mae_o, corr_o = _compare_log_mel(_log_mel(y), ref_orig)
            for key, value in (("logmel_mae_db_vs_soxr", mae_s), ("logmel_corr_vs_soxr", corr_s),
                               ("logmel_mae_db_vs_original", mae_o),
                               ("logmel_corr_vs_original", corr_o)):
                scores[name].setdefault(key, []).append(value)
    return {name: {k: float(np.mean(v)) for k, v in s.items()} for name, s in scores.items()}


# ------------------------------------------------------------------------ reports


def quality_report(rate_in: int, rate_out: int, num_speech_files: int = 5) -> dict:
    """Aliasing, passband, group delay and log-mel agreement of each method.

    Args:
      rate_in: input rate in Hz (the conversion is measured downwards or upwards).
      rate_out: output rate in Hz; the log-mel comparison runs only for 16 kHz.
      num_speech_files: EmoDB files for the log-mel comparison (16 kHz originals,
        upsampled to ``rate_in`` with soxr VHQ, then converted back by each method).

    Returns:
      ``{"rate_in", "rate_out", "notes", "methods": {name: metrics}}`` where metrics are:
      ``alias_db_10khz`` (level of a 10 kHz tone after conversion, dB re. the tone; only
      when 10 kHz is above the output Nyquist and below the input Nyquist),
      ``alias_db_worst`` (worst over 16 tones from 1.01x the output Nyquist to 0.97x the
      input Nyquist), ``passband_ripple_db`` (max - min gain over 16 tones from 100 Hz
      to 0.8 x the lower Nyquist), ``gain_db_at_0.9nyq``, ``delay_samples`` /
      ``delay_ms`` (group delay at the output rate), and the ``logmel_*`` agreement
      scores (mean absolute dB difference and correlation of 64-band log-mel
      spectrograms vs soxr HQ's output and vs the 16 kHz original).
    """
    methods = _methods(rate_in, rate_out)
    nyquist = min(rate_in, rate_out) / 2
    report: dict = {"rate_in": rate_in, "rate_out": rate_out, "methods": {}}
    passband_freqs = np.linspace(100.0, 0.8 * nyquist, 16)
    alias_freqs = (np.linspace(1.01 * rate_out / 2, 0.97 * rate_in / 2, 16)
                   if rate_out < rate_in else np.array([]))
    for name, fn in methods.items():
        metrics: dict[str, float] = {}
        if rate_out < rate_in:
            if rate_out / 2 < 10000 < rate_in / 2:
                metrics["alias_db_10khz"] = _aliasing(fn, rate_in, rate_out, [10000.0])[0]
            metrics["alias_db_worst"] = max(_aliasing(fn, rate_in, rate_out, alias_freqs))
        gains = _passband(fn, rate_in, rate_out, passband_freqs)
        metrics["passband_ripple_db"] = float(max(gains) - min(gains))
        metrics["gain_db_at_0.9nyq"] = _passband(fn, rate_in, rate_out, [0.9 * nyquist])[0]
        delay = _group_delay(fn, rate_in, rate_out)
        metrics["delay_samples"] = delay
        metrics["delay_ms"] = 1000.0 * delay / rate_out
        report["methods"][name] = metrics
    for name, scores in _log_mel_agreement(methods, rate_in, rate_out,
                                           num_speech_files).items():
        report["methods"][name].update(scores)
    report["notes"] = (
        "log-mel: tf.signal STFT 25 ms/10 ms Hann, 512-pt FFT, 64 mel bands 20-8000 Hz, "
        "10*log10(power) floored at the reference's max - 80 dB; speech = "
        f"{num_speech_files} EmoDB files upsampled 16k -> {rate_in} with soxr VHQ, then "
        "converted back by each method")
    return report


def _interleaved_medians(runs: dict[str, Callable[[], object]],
                         repeats: int) -> dict[str, float]:
    """Median wall time of each run, timed round-robin.

    On a shared machine the load changes over seconds; timing every method once per
    round spreads those changes over all methods instead of penalising whichever ran
    during a busy spell.
    """
    for fn in runs.values():
        fn()  # warm-up: tracing, constant folding, allocator
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed_report(rate_in: int, rate_out: int, seconds: float = 3.0, n: int = 16,
                 repeats: int = 5) -> dict:
    """Throughput of each method on ``n`` utterances of ``seconds`` of noise.

    Args:
      rate_in: input rate in Hz.
      rate_out: output rate in Hz.
      seconds: length of each utterance.
      n: utterances per timed round (and the batch size of the batched runs).
      repeats: timed rounds (every method once per round); the median is reported.

    Returns:
      ``{"rate_in", "rate_out", "seconds", "n", "threads", "methods": {name:
      {"audio_s_per_s", "x_soxr"}}}``: seconds of audio converted per wall-clock second
      and the ratio to soxr HQ. ``ser_tf`` runs as a compiled ``tf.function`` called
      eagerly, either once per utterance (``1 utt/call``) or once on the ``[n, time]``
      batch; soxr, librosa and tfio run once per utterance. Outputs are fetched to NumPy
      in every case.
    """
    import librosa
    import tensorflow_io as tfio

    rng = np.random.default_rng(0)
    batch = (0.1 * rng.standard_normal((n, int(seconds * rate_in)))).astype(np.float32)
    utts = list(batch)

    def per_utt(fn: Resampler) -> Callable[[], object]:
        return lambda: [fn(x) for x in utts]

    def batched(quality: str, method: str = "conv") -> Callable[[], object]:
        fn = tf.function(
            lambda x: resample(x, rate_in, rate_out, quality=quality, method=method),
            input_signature=[tf.TensorSpec([None, None], tf.float32)])
        return lambda: fn(batch).numpy()

    tfio_fn = tf.function(lambda x: tfio.audio.resample(x, rate_in, rate_out),
                          input_signature=[tf.TensorSpec([None], tf.float32)])
    runs = {
        "ser_tf hq, 1 utt/call": per_utt(_ours(rate_in, rate_out, "hq")),
        f"ser_tf hq, batch of {n}": batched("hq"),
        "ser_tf fast, 1 utt/call": per_utt(_ours(rate_in, rate_out, "fast")),
        f"ser_tf fast, batch of {n}": batched("fast"),
        "ser_tf hq matmul, 1 utt/call": per_utt(_ours(rate_in, rate_out, "hq", "matmul")),
        f"ser_tf hq matmul, batch of {n}": batched("hq", "matmul"),
        "soxr HQ": per_utt(_soxr(rate_in, rate_out)),
        "librosa (soxr_hq)": per_utt(
            lambda x: librosa.resample(x, orig_sr=rate_in, target_sr=rate_out)),
        "tfio": per_utt(lambda x: tfio_fn(x).numpy()),
    }
    total = n * seconds
    results = {name: {"audio_s_per_s": total / t}
               for name, t in _interleaved_medians(runs, repeats).items()}
    for metrics in results.values():
        metrics["x_soxr"] = metrics["audio_s_per_s"] / results["soxr HQ"]["audio_s_per_s"]
    return {"rate_in": rate_in, "rate_out": rate_out, "seconds": seconds, "n": n,
            "threads": {"cpu_count": os.cpu_count(),
                        "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                        "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                        "note": "0 = TF default (all cores); soxr and librosa use one"},
            "methods": results}


def make_resampled_copies(src_dir: str | os.PathLike, dst_dir: str | os.PathLike,
                          rate: int) -> dict:
    """Writes 16-bit WAV copies of every ``*.wav`` in ``src_dir`` at ``rate`` (soxr VHQ).

    Files already in ``dst_dir`` are kept (the copies are deterministic); new ones are
    written to a temporary name and renamed, so an interrupted run never leaves a
    truncated file that a later run would skip.

    Args:
      src_dir: folder of source WAV files (any rate, mono or multichannel).
      dst_dir: output folder (created if needed); file names are kept.
      rate: output sample rate in Hz.

    Returns:
      ``{"dst_dir", "rate", "written", "skipped"}``.
    """
    import soundfile as sf
    import soxr

    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    for path in sorted(src.glob("*.wav")):
        target = dst / path.name
        if target.exists():
            skipped += 1
            continue
        audio, src_rate = sf.read(str(path), dtype="float64", always_2d=True)
        if src_rate != rate:
            audio = soxr.resample(audio, src_rate, rate, quality="VHQ")
        # Int16 has one more negative step than positive; clip so that overshoot of the
        # band-limited signal near full scale saturates instead of wrapping.
        audio = np.clip(audio, -1.0, 32767 / 32768)
        fd, tmp = tempfile.mkstemp(suffix=".wav", dir=dst)
        os.close(fd)
        try:
            sf.write(tmp, audio, rate, subtype="PCM_16", format="WAV")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        written += 1
    return {"dst_dir": str(dst), "rate": rate, "written": written, "skipped": skipped}


def _format_table(report: dict) -> str:
    rows = report["methods"]
    keys = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
    width = max(len(k) for k in keys) + 2
    names = list(rows)
    lines = ["".ljust(width) + "".join(f"{name:>30}" for name in names)]
    for key in keys:
        cells = []
        for name in names:
            value = rows[name].get(key)
            cells.append(f"{value:>30.4g}" if isinstance(value, float) else f"{'-':>30}")
        lines.append(key.ljust(width) + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Prints the quality and speed reports (``python -m bench.resample_quality``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="48000:16000,44100:16000",
                        help="comma-separated rate_in:rate_out pairs")
    parser.add_argument("--seconds", type=float, default=3.0, help="utterance length (speed)")
    parser.add_argument("--n", type=int, default=16, help="utterances per round (speed)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (speed)")
    parser.add_argument("--speech-files", type=int, default=5,
                        help="EmoDB files for the log-mel comparison")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", help="also write all reports to this JSON file")
    args = parser.parse_args(argv)

    reports = []
    for pair in args.pairs.split(","):
        rate_in, rate_out = (int(v) for v in pair.split(":"))
        quality = quality_report(rate_in, rate_out, args.speech_files)
        print(f"\n== quality {rate_in} -> {rate_out} ==\n{_format_table(quality)}")
        print(quality["notes"])
        reports.append(quality)
        if not args.skip_speed:
            speed = speed_report(rate_in, rate_out, args.seconds, args.n, args.repeats)
            print(f"\n== speed {rate_in} -> {rate_out}: {args.n} x {args.seconds:g} s, "
                  f"audio seconds per second (median of {args.repeats}) ==")
            for name, metrics in speed["methods"].items():
                print(f"  {name:36s} {metrics['audio_s_per_s']:9.0f}   "
                      f"x{metrics['x_soxr']:.2f} soxr")
            reports.append(speed)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
