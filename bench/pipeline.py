"""Input-pipeline throughput: the ser_tf tf.data pipeline against a librosa loop.

The work, per file: decode, resample to 16 kHz, 64-band log-mel spectrogram (25 ms
window, 10 ms hop). The contenders:

* ``ser_tf``: what ``decode_corpus`` runs, minus its ``Dataset.cache``, with the log-mel
  spectrogram computed in the decoding's own map function: each file's header is read in
  Python (``group_by_header``: sample rate, WAV sample format and where the samples are,
  a few bytes per file), then ``decoding_dataset(paths, groups, AudioConfig(16000,
  trim_db=None, normalize="none"), transform=log-mel)``: per group of alike files a
  ``tf.data.Dataset`` of paths and layouts -> ``map(log-mel of load_waveform(path,
  config, rate=r, wav_format=f, wav_layout=l), decode_parallelism())`` (two calls per
  core; the WAV decoder for that sample format alone, reading the samples where the
  header said, and a resampler built for that rate; the format-sniffing decoder for
  other containers) -> ``ignore_errors``,
  the groups concatenated -> the features without their index -> ``prefetch``, iterated
  with ``single_pass_options()`` (as ``decode_corpus`` iterates). The header reading is
  timed in every pass;
* ``ser_tf run-time dispatch``: ``load_waveform(path, config)``, which sniffs the format
  and finds the rate per file in-graph and dispatches over the common rates (what a
  one-off file gets; no header reading in Python), with the log-mel in the same map, the
  same parallelism and options;
* ``tfio resample``: the dispatch pipeline with ``tfio.audio.resample`` in place of the
  ser_tf resampler (what a user of tensorflow-io alone gets);
* ``plain tfio (reference)``, at 16 kHz only: ``map(tfio.audio.decode_wav)`` then
  ``map(log-mel)``, tf.data's default options, none of ser_tf's checks (the plain tfio
  pipeline the issue quotes);
* ``librosa``: ``librosa.load(path, sr=16000, res_type="soxr_hq")`` +
  ``librosa.feature.melspectrogram`` + log in a plain Python loop (what a user writes).

The log-mel spectrogram is computed per utterance (a batch of one) by every ser_tf
contender: computing it on padded or packed batches of waveforms was measured and did not
lower the CPU time per utterance (the cost is per frame: the FFTs) while the batching
step stalled the pipeline.

What is timed: one full pass over the files, from the header reading (ser_tf) or the
creation of the iterator to the last feature matrix in Python's hands (each element
fetched by a ``for`` loop, as a user's loop or a custom training loop would). The pass is
a first pass in the sense that nothing is cached between files or passes by the pipeline
(no ``Dataset.cache``); the files themselves are in the OS page cache for every
contender, because an untimed warm-up pass of each runs first (it also absorbs
librosa's lazy imports). Building the datasets (tracing the map functions)
is timed separately. Passes of the contenders are interleaved round-robin, in a rotating
order, and medians are reported, so a busy spell on the shared machine hits all of them.

Besides wall-clock utterances per second, the report gives the process's CPU time per
utterance (all threads; TF's idle worker threads spin, so this slightly overstates TF's
real work). On a machine shared with other jobs the CPU figure is the steadier of the two:
librosa uses one core, tf.data uses all it can get, so wall-clock ratios shift with how
many cores the other jobs leave free.

The input files: the 535 EmoDB utterances (16 kHz) and copies of them at 48 kHz and
44.1 kHz written once by :func:`bench.resample_quality.make_resampled_copies` into a cache
folder (``.bench_cache/`` in the repository root by default).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from bench.resample_quality import EMODB_WAV_DIR, make_resampled_copies, quality_report  # noqa: E402,E501
from ser_tf.data.audio import (AudioConfig, WavLayout, decode_audio, decode_wav,  # noqa: E402
                               load_waveform, read_audio_header, to_mono)
from ser_tf.data.pipeline import (DecodeGroup, decoding_dataset, group_by_header,  # noqa: E402,E501
                                  decode_parallelism, single_pass_options)
from ser_tf.frontend import LogMelFrontend  # noqa: E402

TARGET_RATE = 16000
N_MELS = 64
# 25 ms / 10 ms at 16 kHz; the FFT size is the next power of two, as in LogMelFrontend.
N_FFT, WIN_LENGTH, HOP_LENGTH = 512, 400, 160
# Log floor shared by both contenders (LogMelFrontend's default).
LOG_FLOOR = 1e-6
# Minimum ratio ser_tf / librosa per input rate (from the issue).
TARGETS = {16000: 3.0, 48000: 1.5, 44100: 1.5}
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[1] / ".bench_cache"
# Quality metrics of bench.resample_quality.quality_report worth a row in BENCHMARKS.md.
QUALITY_METRICS = ("alias_db_worst", "alias_db_10khz", "passband_ripple_db",
                   "gain_db_at_0.9nyq", "delay_ms", "logmel_mae_db_vs_soxr",
                   "logmel_corr_vs_soxr")

AUTOTUNE = tf.data.AUTOTUNE


def _log(message: str) -> None:
    """Progress on stderr, so that a long run visibly moves."""
    print(f"[bench.pipeline] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- inputs


def _spread(files: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` files spread evenly over the sorted list (several speakers)."""
    if limit is None or limit >= len(files):
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]


def corpus_files(rate: int, cache_dir: str | os.PathLike | None = None,
                 max_files: int | None = None) -> list[str]:
    """Paths of the EmoDB files at ``rate`` (the originals, or cached resampled copies).

    Args:
      rate: wanted sample rate; the originals are used when it is theirs, otherwise
        copies are made once with :func:`make_resampled_copies` (soxr VHQ, 16-bit PCM).
      cache_dir: folder for the copies (default ``.bench_cache/`` in the repo root).
      max_files: use at most this many files, spread evenly (None: all).

    Returns:
      Sorted absolute paths.

    Raises:
      FileNotFoundError: EmoDB is not at :data:`EMODB_WAV_DIR`.
    """
    import soundfile as sf

    originals = sorted(str(p) for p in EMODB_WAV_DIR.glob("*.wav"))
    if not originals:
        raise FileNotFoundError(f"no EmoDB WAV files in {EMODB_WAV_DIR} "
                                "(set SER_TF_EMODB to the corpus folder)")
    if sf.info(originals[0]).samplerate == rate:
        return _spread(originals, max_files)
    folder = Path(cache_dir or DEFAULT_CACHE_DIR) / f"emodb_{rate}"
    done = make_resampled_copies(EMODB_WAV_DIR, folder, rate)
    if done["written"]:
        _log(f"wrote {done['written']} copies at {rate} Hz into {folder}")
    return _spread(sorted(str(p) for p in folder.glob("*.wav")), max_files)


def _audio_seconds(paths: Sequence[str]) -> float:
    import soundfile as sf

    return float(sum(sf.info(p).duration for p in paths))


# ------------------------------------------------------------------------ contenders


def _frontend() -> LogMelFrontend:
    return LogMelFrontend(TARGET_RATE, frame_ms=25.0, hop_ms=10.0, n_mels=N_MELS,
                          log_floor=LOG_FLOOR)


def _log_mel_of(frontend: LogMelFrontend) -> Callable[[tf.Tensor], tf.Tensor]:
    # The frontend is a batch layer; each waveform is a batch of one.
    return lambda wave: frontend(wave[None])[0]


def _config() -> AudioConfig:
    return AudioConfig(sample_rate=TARGET_RATE, trim_db=None, normalize="none")


def _one_pass(ds: tf.data.Dataset) -> tf.data.Dataset:
    """A ser_tf contender's dataset as ser_tf runs a pass over files."""
    return ds.prefetch(AUTOTUNE).with_options(single_pass_options())


def ser_tf_dataset(paths: Sequence[str], groups: Sequence[DecodeGroup]) -> tf.data.Dataset:
    """The ser_tf pipeline as ``decode_corpus`` runs it, uncached, with log-mel per file.

    Args:
      paths: the files.
      groups: the files grouped by their headers (:func:`group_by_header`).

    Returns:
      A dataset of log-mel ``[frames, 64, 1]``, one per file.
    """
    ds = decoding_dataset(paths, groups, _config(), transform=_log_mel_of(_frontend()))
    # The features alone, like every other contender's elements: a tuple costs the Python
    # loop taking it 0.1-0.15 ms more per element (tf.data's nesting of the structure).
    return _one_pass(ds.map(lambda index, features: features))


def _dispatch_dataset(paths: Sequence[str],
                      load: Callable[[tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
    log_mel = _log_mel_of(_frontend())
    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    return _one_pass(ds.map(lambda path: log_mel(load(path)),
                            num_parallel_calls=decode_parallelism()))


def ser_tf_dispatch_dataset(paths: Sequence[str]) -> tf.data.Dataset:
    """ser_tf with the rate found per file at run time (``load_waveform(path, config)``:
    an in-graph dispatch over the common rates; what a one-off file gets)."""
    config = _config()
    return _dispatch_dataset(paths, lambda path: load_waveform(path, config))


def _tfio_load(path: tf.Tensor) -> tf.Tensor:
    """``load_waveform`` (no trimming, no normalisation) with tfio's resampler."""
    import tensorflow_io as tfio

    audio, rate = decode_audio(path)
    wave = to_mono(audio)
    out = tfio.audio.resample(wave[:, None], rate, TARGET_RATE)[:, 0]
    # tfio's output has an unknown rank; the frontend needs to know it is 1-D.
    return tf.ensure_shape(out, [None])


def tfio_dataset(paths: Sequence[str]) -> tf.data.Dataset:
    """The run-time dispatch pipeline with ``tfio.audio.resample`` as the resampler."""
    return _dispatch_dataset(paths, _tfio_load)


def tfio_plain_dataset(paths: Sequence[str]) -> tf.data.Dataset:
    """The plain tensorflow-io pipeline for files already at 16 kHz: ``tfio.audio.decode_wav``
    (int16) -> float mono, no checks, no conditioning, then the same log-mel in a second
    ``map``, tf.data's default options. The reference the issue quotes (about 3x librosa on
    the machine it was measured on)."""
    import tensorflow_io as tfio

    def load(path):
        audio = tfio.audio.decode_wav(tf.io.read_file(path), dtype=tf.int16)
        return tf.reduce_mean(tf.cast(audio, tf.float32) / 32768.0, axis=-1)

    ds = tf.data.Dataset.from_tensor_slices(list(paths)).map(load, num_parallel_calls=AUTOTUNE)
    return ds.map(_log_mel_of(_frontend()), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def librosa_features(paths: Sequence[str], features: bool = True) -> int:
    """The librosa loop a user writes; returns the number of files processed.

    Args:
      paths: files to process.
      features: also compute the log-mel spectrogram (False: load and resample only,
        for the breakdown).
    """
    import librosa

    for path in paths:
        wave, _ = librosa.load(path, sr=TARGET_RATE, res_type="soxr_hq")
        if features:
            mel = librosa.feature.melspectrogram(y=wave, sr=TARGET_RATE, n_fft=N_FFT,
                                                 win_length=WIN_LENGTH, hop_length=HOP_LENGTH,
                                                 n_mels=N_MELS)
            np.log(mel + LOG_FLOOR)
    return len(paths)


class _Drain:
    """Iterates a dataset to the end in Python, one element at a time, like a user's loop.

    Each call also records its start-up time (creating the iterator and getting the first
    element): tf.data instantiates the map functions anew for every iterator, so every
    pass pays it, and for big functions it is a large part of a pass over a few hundred
    files.
    """

    def __init__(self, ds: tf.data.Dataset, before: Callable[[], object] | None = None):
        """
        Args:
          ds: the dataset.
          before: work that belongs to every pass and runs first (ser_tf's header
            reading); it counts in the pass's time and in its start-up.
        """
        self.ds = ds
        self.before = before
        self.startup_s: list[float] = []
        self.startup_cpu_s: list[float] = []

    def __call__(self) -> int:
        start, start_cpu = time.perf_counter(), time.process_time()
        if self.before is not None:
            self.before()
        iterator = iter(self.ds)
        count = 0
        for _ in iterator:
            if not count:
                self.startup_s.append(time.perf_counter() - start)
                self.startup_cpu_s.append(time.process_time() - start_cpu)
            count += 1
        return count


def _stage_datasets(paths: Sequence[str], rate: int) -> dict[str, tf.data.Dataset]:
    """Cumulative prefixes of the ser_tf pipeline, to see where its time goes.

    Each stage is the previous one plus one step; the differences between consecutive
    stages (in CPU ms per utterance) are the cost of each step. Every file here is 16-bit
    PCM WAV.
    """
    import tensorflow_io as tfio

    config = _config()
    source = tf.data.Dataset.from_tensor_slices(list(paths))

    def mapped(fn) -> tf.data.Dataset:
        return _one_pass(source.map(fn, num_parallel_calls=decode_parallelism()))

    def raw_decode(path):
        # The floor: tfio's WAV decoder alone, samples left as int16.
        return tfio.audio.decode_wav(tf.io.read_file(path), dtype=tf.int16)

    groups = group_by_header(paths)
    layout_of = {i: layout for group in groups for i, layout in zip(group.members, group.layouts)}
    layouts = np.asarray([layout_of[i] for i in range(len(paths))], np.int64)
    with_layouts = tf.data.Dataset.from_tensor_slices((list(paths),) + tuple(layouts.T))
    return {
        "read + tfio decode_wav, int16 (floor)": mapped(raw_decode),
        "decode_wav (float32, format and layout from the header)": _one_pass(
            with_layouts.map(lambda p, *known: decode_wav(p, "pcm16", WavLayout(*known)),
                             num_parallel_calls=decode_parallelism())),
        "load_waveform, rate, format and layout known (= decoding_dataset)": _one_pass(
            decoding_dataset(paths, groups, config).map(lambda index, wave: wave)),
        "+ log-mel (= ser_tf without the header reading)": ser_tf_dataset(paths, groups),
        "decode_wav, header parsed in-graph (format from the header)": mapped(
            lambda p: decode_wav(p, "pcm16")),
        "decode_audio (format sniffing, in-graph header parsing)": mapped(
            lambda p: decode_audio(p)[0]),
        "load_waveform, rate dispatched at run time": mapped(
            lambda p: load_waveform(p, config)),
    }


def map_function_graphs(rate: int = 48000) -> dict[str, dict[str, float]]:
    """Size of the graph functions tf.data instantiates at every pass, and what that costs.

    Each map function is traced as a ``tf.function`` of a scalar path; its GraphDef
    (nested functions included) is measured and the first call on one file is timed,
    which is dominated by instantiating (optimising) the function, as a new tf.data
    iterator does.

    Args:
      rate: rate of the file used for the first call (picks the branch that runs).

    Returns:
      name -> ``{"functions", "nodes", "graphdef_mb", "first_call_s", "next_call_ms"}``.
    """
    config = _config()
    file = corpus_files(rate, max_files=1)[0]
    # The path, then the file's layout (as int64 tensors, as a corpus pipeline passes it).
    args = [tf.constant(file)] + [tf.constant(v, tf.int64)
                                  for v in read_audio_header(file).wav_layout]
    candidates = {
        'decode_wav(path, "pcm16", layout)': lambda p, *known: decode_wav(
            p, "pcm16", WavLayout(*known)),
        'decode_wav(path, "pcm16")': lambda p, *_: decode_wav(p, "pcm16"),
        "decode_audio": lambda p, *_: decode_audio(p)[0],
        f'load_waveform(rate={rate}, wav_format="pcm16", wav_layout) (ser_tf)': (
            lambda p, *known: load_waveform(p, config, rate=rate, wav_format="pcm16",
                                            wav_layout=WavLayout(*known))),
        f'load_waveform(rate={rate}, wav_format="pcm16")': lambda p, *_: load_waveform(
            p, config, rate=rate, wav_format="pcm16"),
        f"load_waveform(rate={rate})": lambda p, *_: load_waveform(p, config, rate=rate),
        "load_waveform (run-time rate dispatch)": lambda p, *_: load_waveform(p, config),
        f'log-mel of load_waveform(rate={rate}, wav_format="pcm16", wav_layout) (ser_tf '
        'with its transform)': lambda p, *known: log_mel(load_waveform(
            p, config, rate=rate, wav_format="pcm16", wav_layout=WavLayout(*known))),
        "log-mel alone (of a waveform)": None,
    }
    log_mel = _log_mel_of(_frontend())
    specs = [tf.TensorSpec([], tf.string)] + [tf.TensorSpec([], tf.int64)] * (len(args) - 1)
    out = {}
    for name, fn in candidates.items():
        fn_args, fn_specs = args, specs
        if fn is None:  # the frontend alone, on the file's waveform
            fn, fn_args = log_mel, [load_waveform(args[0], config)]
            fn_specs = [tf.TensorSpec([None], tf.float32)]
        concrete = tf.function(fn, autograph=False).get_concrete_function(*fn_specs)
        graph = concrete.graph.as_graph_def()
        start = time.perf_counter()
        concrete(*fn_args)
        first = time.perf_counter() - start
        start = time.perf_counter()
        concrete(*fn_args)
        out[name] = {"functions": len(graph.library.function),
                     "nodes": len(graph.node) + sum(len(f.node_def)
                                                    for f in graph.library.function),
                     "graphdef_mb": graph.ByteSize() / 1e6, "first_call_s": first,
                     "next_call_ms": 1000 * (time.perf_counter() - start)}
    return out


# ---------------------------------------------------------------------------- timing


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int,
                     label: str = "") -> dict[str, dict[str, float]]:
    """Wall and CPU time of each run: one untimed warm-up, then ``repeats`` rounds.

    Every round runs each contender once; the order rotates from round to round so no
    contender always follows the same one (caches, CPU frequency, a neighbour's job).

    Args:
      runs: name -> callable doing one full pass.
      repeats: timed rounds.
      label: prefix of the progress lines.

    Returns:
      name -> ``{"wall_s", "cpu_s", "warmup_s", "wall_all"}``: medians over the rounds,
      the warm-up pass's wall time and every round's wall time.
    """
    names = list(runs)
    warmup = {}
    for name in names:
        start = time.perf_counter()
        runs[name]()
        warmup[name] = time.perf_counter() - start
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        _log(f"{label}round {r + 1}/{repeats}: " + ", ".join(
            f"{n} {wall[n][-1]:.2f} s" for n in names))
    return {n: {"wall_s": statistics.median(wall[n]), "cpu_s": statistics.median(cpu[n]),
                "warmup_s": warmup[n], "wall_all": wall[n]} for n in names}


def _rates(times: dict[str, dict[str, float]], n: int, audio_s: float,
           runs: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """Per-run metrics from :func:`time_interleaved`'s timings of ``n`` files."""
    out = {}
    for name, t in times.items():
        metrics = {"utt_per_s": n / t["wall_s"], "cpu_ms_per_utt": 1000 * t["cpu_s"] / n,
                   # Other jobs only ever add time: the fastest pass is the closest to
                   # what the pipeline does on cores of its own.
                   "best_utt_per_s": n / min(t["wall_all"]),
                   "audio_x_realtime": audio_s / t["wall_s"], "wall_s": t["wall_s"],
                   "first_pass_s": t["warmup_s"], "wall_all": t["wall_all"]}
        run = runs[name]
        if isinstance(run, _Drain) and len(run.startup_s) > 1:
            # The warm-up pass's start-up (first instantiation) is left out, as its time is.
            startup = statistics.median(run.startup_s[1:])
            startup_cpu = statistics.median(run.startup_cpu_s[1:])
            metrics["startup_s"] = startup
            metrics["steady_utt_per_s"] = (n - 1) / max(t["wall_s"] - startup, 1e-9)
            metrics["steady_cpu_ms_per_utt"] = 1000 * (t["cpu_s"] - startup_cpu) / (n - 1)
        out[name] = metrics
    return out


# ---------------------------------------------------------------------------- report


def _rate_report(rate: int, paths: list[str], repeats: int, tfio_rates: Sequence[int],
                 breakdown: bool) -> dict:
    n, audio_s = len(paths), _audio_seconds(paths)
    _log(f"{rate} Hz: {n} files, {audio_s / 60:.1f} min of audio")
    build: dict[str, float] = {}
    start = time.perf_counter()
    ours = ser_tf_dataset(paths, group_by_header(paths))
    build["ser_tf"] = time.perf_counter() - start
    start = time.perf_counter()
    dispatch = ser_tf_dispatch_dataset(paths)
    build["ser_tf run-time dispatch"] = time.perf_counter() - start
    runs: dict[str, Callable[[], object]] = {
        # Every timed pass reads the headers again: decode_corpus does it on every call.
        "ser_tf": _Drain(ours, before=lambda: group_by_header(paths)),
        "ser_tf run-time dispatch": _Drain(dispatch),
        "librosa": lambda: librosa_features(paths)}
    if rate in tfio_rates:
        start = time.perf_counter()
        runs["tfio resample"] = _Drain(tfio_dataset(paths))
        build["tfio resample"] = time.perf_counter() - start
    if rate == TARGET_RATE:
        start = time.perf_counter()
        runs["plain tfio (reference)"] = _Drain(tfio_plain_dataset(paths))
        build["plain tfio (reference)"] = time.perf_counter() - start
    methods = _rates(time_interleaved(runs, repeats, f"{rate} Hz "), n, audio_s, runs)
    librosa_rate = methods["librosa"]["utt_per_s"]
    for metrics in methods.values():
        metrics["x_librosa"] = metrics["utt_per_s"] / librosa_rate
        metrics["best_x_librosa"] = (metrics["best_utt_per_s"]
                                     / methods["librosa"]["best_utt_per_s"])
        metrics["cpu_x_librosa"] = (methods["librosa"]["cpu_ms_per_utt"]
                                    / metrics["cpu_ms_per_utt"])
    report = {"rate": rate, "files": n, "audio_s": audio_s, "build_s": build,
              "methods": methods, "ratio": methods["ser_tf"]["x_librosa"],
              "target": TARGETS.get(rate)}
    report["met"] = None if report["target"] is None else report["ratio"] >= report["target"]
    _log(f"{rate} Hz: ser_tf {methods['ser_tf']['utt_per_s']:.0f} utt/s, librosa "
         f"{librosa_rate:.0f} utt/s: x{report['ratio']:.2f} (target {report['target']})")
    if breakdown:
        stage_runs: dict[str, Callable[[], object]] = {
            "group_by_header (Python header reading)": lambda: group_by_header(paths)}
        stage_runs.update({name: _Drain(ds)
                           for name, ds in _stage_datasets(paths, rate).items()})
        stage_runs["librosa.load only"] = lambda: librosa_features(paths, features=False)
        stage_runs["librosa.load + log-mel = librosa loop"] = lambda: librosa_features(paths)
        report["breakdown"] = _rates(
            time_interleaved(stage_runs, repeats, f"{rate} Hz breakdown "), n, audio_s,
            stage_runs)
    return report


def pipeline_report(rates: Sequence[int] = (16000, 48000, 44100), repeats: int = 3, *,
                    max_files: int | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    tfio_rates: Sequence[int] = (48000,), breakdown: bool = True,
                    quality: bool = True, num_speech_files: int = 5) -> dict:
    """Utterances per second of the ser_tf pipeline and a librosa loop, per input rate.

    Args:
      rates: input sample rates; EmoDB's own 16 kHz files, resampled copies otherwise.
      repeats: timed passes per contender (interleaved); medians are reported.
      max_files: use at most this many files per rate (None: all 535).
      cache_dir: folder for the resampled copies (default ``.bench_cache/``).
      tfio_rates: rates at which the pipeline with ``tfio.audio.resample`` also runs
        (slow: about 100 utt/s at 48 kHz and many times slower at 44.1 kHz).
      breakdown: also time cumulative prefixes of the pipeline (where the time goes).
      quality: fold in :func:`bench.resample_quality.quality_report` for every rate
        that is resampled.
      num_speech_files: EmoDB files for the quality report's log-mel comparison.

    Returns:
      ``{"description", "repeats", "rates": [per-rate report], "quality": [...]}``; each
      per-rate report holds ``files``, ``audio_s``, ``build_s`` (dataset construction,
      tracing included), ``methods`` (name -> ``utt_per_s``, ``cpu_ms_per_utt``,
      ``x_librosa``, ``cpu_x_librosa``, ...), ``ratio`` (ser_tf / librosa, wall clock),
      ``target``, ``met`` and optionally ``breakdown`` (stage -> the same metrics).
    """
    report: dict = {
        "description": "decode + resample to 16 kHz + 64-mel log spectrogram per file",
        "repeats": repeats, "rates": [], "quality": [],
        "threads": {"cpu_count": os.cpu_count(),
                    "tf_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "tf_inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
    }
    for rate in rates:
        paths = corpus_files(rate, cache_dir, max_files)
        report["rates"].append(_rate_report(rate, paths, repeats, tfio_rates, breakdown))
    if breakdown:
        resampled = [r for r in rates if r != TARGET_RATE]
        report["graphs"] = map_function_graphs(resampled[0] if resampled else TARGET_RATE)
        report["graphs_rate"] = resampled[0] if resampled else TARGET_RATE
    if quality:
        for rate in rates:
            if rate != TARGET_RATE:
                _log(f"resampler quality {rate} -> {TARGET_RATE}")
                report["quality"].append(quality_report(rate, TARGET_RATE, num_speech_files))
    return report


# ------------------------------------------------------------------------- markdown


def _rate_name(rate: int) -> str:
    khz = f"{rate / 1000:g} kHz"
    return f"{khz} (no resampling)" if rate == TARGET_RATE else f"{khz} -> 16 kHz"


def _cell(metrics: dict, key: str, fmt: str) -> str:
    value = metrics.get(key)
    return "-" if value is None else format(value, fmt)


def to_markdown(report: dict) -> str:
    """Renders :func:`pipeline_report`'s result as Markdown tables."""
    lines = [
        "What runs: decode + resample to 16 kHz + 64-mel log spectrogram (25 ms / 10 ms), "
        "per file. **ser_tf** (what `decode_corpus` runs, without its `Dataset.cache`): "
        "`group_by_header` reads each file's header in Python (sample rate, WAV sample "
        "format and where the samples are), then `decoding_dataset(..., transform=log-mel)`: "
        "per group of alike files `tf.data` of paths and layouts -> one "
        "`map(LogMelFrontend(load_waveform(path, config, rate=r, wav_format=f, "
        "wav_layout=l)), two calls per core)` (AudioConfig 16 kHz, no trimming, no "
        "normalisation; the WAV decoder for that sample format alone, reading the samples "
        "where the header said, and a resampler built for that rate) -> "
        "`ignore_errors`, groups concatenated -> features without their index -> "
        "`prefetch`, with `single_pass_options()` (tf.data's autotuner off, ops "
        "single-threaded: how ser_tf runs a pass over files); the header reading is timed "
        "in every pass. **ser_tf run-time dispatch**: "
        "`load_waveform(path, config)` sniffing the format and finding the rate in-graph "
        "(no header reading in Python), log-mel in the same map, same options. **tfio "
        "resample**: that with `tfio.audio.resample`. **plain tfio (reference)**, 16 kHz "
        "only: `map(tfio.audio.decode_wav)` -> `map(log-mel)` -> `prefetch` with tf.data's "
        "defaults and none of ser_tf's checks (the plain tfio pipeline the issue quotes at "
        "about 3x librosa on the machine it was measured on). **librosa**: "
        "`librosa.load(sr=16000, res_type='soxr_hq')` "
        "+ `melspectrogram(n_fft=512, win_length=400, hop_length=160, n_mels=64)` + log in "
        "a Python loop. Every contender computes each file's log-mel on its own (log-mel "
        "on padded or packed batches of waveforms was measured: no less CPU per file).",
        "",
        "What is timed: one pass over the files, from ser_tf's header reading (or the "
        "iterator's creation) to the last feature matrix fetched by a Python `for` loop; "
        "no `Dataset.cache`, files in the OS page cache for all (an untimed warm-up pass "
        "of each runs first). "
        f"{report['rates'][0]['files'] if report['rates'] else 0} files per rate. "
        f"utt/s: medians of {report['repeats']} passes, contenders interleaved; the verdict "
        "is on this median ratio. Best pass: the fastest of those passes (other jobs only "
        "add time, so best passes are the nearest to a quiet machine). CPU ms/utt is "
        "process CPU time (all threads) per file: steadier than wall time when other "
        "jobs share the cores. librosa's loop works on one core; its BLAS threads add CPU "
        "time but no speed (same utt/s with them pinned to one thread), so its CPU column "
        "overstates its work. "
        "Pass start-up: the header reading (ser_tf), creating the iterator and getting "
        "the first element (tf.data instantiates its map functions again for every new "
        "iterator, so every pass pays it); the last column is the rate once the pass is "
        "running.",
        "",
        "| input | pipeline | utt/s | x librosa | target | verdict | CPU ms/utt "
        "| x librosa (CPU) | best pass utt/s | x librosa (best passes) | pass start-up s "
        "| utt/s after start-up |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rate_report in report["rates"]:
        rate, target = rate_report["rate"], rate_report["target"]
        for name, m in rate_report["methods"].items():
            if name == "ser_tf" and target is not None:
                verdict = "**met**" if rate_report["met"] else "**not met**"
                target_cell = f">= {target:g}x"
            else:
                verdict, target_cell = "", ""
            lines.append(
                f"| {_rate_name(rate)} | {name} | {m['utt_per_s']:.0f} "
                f"| {m['x_librosa']:.2f}x | {target_cell} | {verdict} "
                f"| {m['cpu_ms_per_utt']:.2f} | {m['cpu_x_librosa']:.2f}x "
                f"| {m['best_utt_per_s']:.0f} | {m['best_x_librosa']:.2f}x "
                f"| {_cell(m, 'startup_s', '.2f')} | {_cell(m, 'steady_utt_per_s', '.0f')} |")
    builds = "; ".join(
        f"{r['rate'] / 1000:g} kHz: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in r["build_s"].items())
        for r in report["rates"])
    lines += ["", f"Dataset construction (tracing the map functions), not in the timings: "
              f"{builds}."]

    with_breakdown = [r for r in report["rates"] if "breakdown" in r]
    if with_breakdown:
        lines += [
            "", "#### Where the time goes",
            "",
            "The ser_tf pipeline in steps, timed like the table above: its Python header "
            "reading alone, then cumulative prefixes of its tf.data pass (from the floor to "
            "`+ log-mel`, each row adds one step to the row above it; the CPU difference "
            "between rows is that step's cost); then, for comparison, the WAV decoder "
            "parsing the header in-graph (what ser_tf ran before its header reading kept "
            "where the samples are), the general decoder that sniffs the format and parses "
            "the header in-graph, and the full run-time dispatch; and librosa's load alone. "
            "The last column leaves out the pass start-up (its CPU time too): the per-file "
            "cost once the pass runs.",
            "",
            "| input | stage | utt/s | CPU ms/utt | pass start-up s "
            "| CPU ms/utt after start-up |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in with_breakdown:
            for stage, m in r["breakdown"].items():
                lines.append(f"| {_rate_name(r['rate'])} | {stage} | {m['utt_per_s']:.0f} "
                             f"| {m['cpu_ms_per_utt']:.2f} | {_cell(m, 'startup_s', '.2f')} "
                             f"| {_cell(m, 'steady_cpu_ms_per_utt', '.2f')} |")

    graphs = report.get("graphs")
    if graphs:
        lines += [
            "", f"Map-function graphs (traced as `tf.function` of a path, or of the waveform "
            "for the log-mel alone; first call = "
            f"instantiation + one {report['graphs_rate'] / 1000:g} kHz file, paid again by "
            "each new tf.data iterator):", "",
            "| function | nested functions | nodes | GraphDef MB | first call s "
            "| next call ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, g in graphs.items():
            lines.append(f"| {name} | {g['functions']} | {g['nodes']} | "
                         f"{g['graphdef_mb']:.2f} | {g['first_call_s']:.2f} "
                         f"| {g['next_call_ms']:.1f} |")

    for q in report.get("quality", []):
        methods = list(q["methods"])
        lines += [
            "", f"#### Resampler quality {q['rate_in'] / 1000:g} kHz -> "
            f"{q['rate_out'] / 1000:g} kHz (`bench.resample_quality.quality_report`)", "",
            "| metric | " + " | ".join(methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for key in QUALITY_METRICS:
            if not any(key in q["methods"][m] for m in methods):
                continue
            cells = []
            for m in methods:
                value = q["methods"][m].get(key)
                cells.append("-" if value is None else (
                    f"{value:.4f}" if "corr" in key else f"{value:.3g}"))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines += ["", f"Notes: {q['notes']}. alias_db_*: level of tones above 8 kHz "
                  "after conversion (dB re. the tone, lower is better); delay_ms: group "
                  "delay of the output."]
    return "\n".join(lines)
