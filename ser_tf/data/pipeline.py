"""tf.data pipelines: decode a corpus once, then training crops and evaluation windows.

The flow:

1. :func:`decode_corpus` reads every file's header in Python
   (:func:`group_by_header`: sample rate and, for WAV files, sample format and where the
   samples are), then decodes each group of alike files in parallel (two files per core,
   :func:`decode_parallelism`) with a graph made for that group alone
   (:func:`decoding_dataset`: a resampler built for that rate and, for WAV files, the WAV
   decoder for that sample format reading the samples where the header said, instead of
   the format-sniffing decoder), conditions the audio
   (:func:`ser_tf.data.audio.load_waveform`) and caches the waveforms (in memory, or in a
   cache file for corpora larger than RAM), in one pass with tf.data's autotuner off
   (:func:`single_pass_options`). Small graphs matter: tf.data instantiates its map
   functions again for every iterator. The same decoding, with a per-file ``transform``
   (a feature frontend) in its map, is a feature-extraction pass. This single
   pass also finds bad audio: a file whose header cannot be read, or whose decoding fails
   (dropped by ``ignore_errors``; each element carries its utterance index, so the missing
   indices name exactly the bad files), is re-decoded alone to get the reason.
   ``on_bad_audio="skip"`` logs every bad file and goes on, ``"fail"`` raises
   :class:`BadAudioError` naming them.
2. :func:`training_dataset` selects a split from the cache, shuffles, takes a random
   fixed-length crop of each utterance (short clips are looped or zero-padded), applies
   waveform augmentation, batches and prefetches. Randomness comes from the seed only.
3. :func:`evaluation_dataset` cuts each utterance of a split into all its fixed-length
   windows (the last one aligned to the end), for utterance-level evaluation by averaging
   the logits of the windows (:func:`ser_tf.evaluation.predict.predict_utterances`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from ser_tf.data.audio import AudioConfig, WavLayout, load_waveform, read_audio_header
from ser_tf.data.corpora import Utterance
from ser_tf.data.resample import resample

log = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE
BAD_AUDIO_POLICIES = ("skip", "fail")


@dataclasses.dataclass(frozen=True)
class BadAudio:
    """A file that could not be used, and why."""

    path: str
    reason: str


class BadAudioError(RuntimeError):
    """Raised with ``on_bad_audio="fail"``; ``.bad`` lists every bad file and its reason."""

    def __init__(self, bad: Sequence[BadAudio]):
        self.bad = list(bad)
        lines = "\n".join(f"  {b.path}: {b.reason}" for b in self.bad[:20])
        more = f"\n  ... and {len(self.bad) - 20} more" if len(self.bad) > 20 else ""
        super().__init__(f"{len(self.bad)} bad audio file(s) (use --on_bad_audio=skip to "
                         f"leave them out):\n{lines}{more}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Waveform augmentation for training crops (all off by default).

    Attributes:
      gain_db: random gain, uniform in ``[-gain_db, +gain_db]`` dB.
      noise_snr_db: ``(low, high)``: add white noise at an SNR uniform in that range, or
        None for no noise.
      noise_prob: probability of adding noise to a crop.
      shift_s: random circular time shift of up to this many seconds either way.
      speed: speed-perturbation factors, one drawn uniformly per crop (e.g. ``(0.9, 1.0,
        1.1)``): the utterance is resampled so it plays that much faster, which moves
        pitch, formants and tempo together, as a different voice would (empty: off).
    """

    gain_db: float = 0.0
    noise_snr_db: tuple[float, float] | None = None
    noise_prob: float = 0.5
    shift_s: float = 0.0
    speed: tuple[float, ...] = ()

    def __post_init__(self):
        if any(not 0.5 <= f <= 2.0 for f in self.speed):
            raise ValueError(f"speed factors must lie in [0.5, 2], got {self.speed}")

    @property
    def enabled(self) -> bool:
        return bool(self.gain_db or self.noise_snr_db or self.shift_s)


@dataclasses.dataclass
class DecodedCorpus:
    """A corpus decoded once and cached.

    Attributes:
      utterances: the good utterances; position ``i`` is index ``i`` in ``dataset``.
      dataset: cached dataset of ``(index int64, waveform float32 [samples])``.
      lengths: samples per utterance after conditioning.
      bad: files left out, with reasons.
      config: the audio configuration used.
    """

    utterances: list[Utterance]
    dataset: tf.data.Dataset
    lengths: np.ndarray
    bad: list[BadAudio]
    config: AudioConfig

    def __len__(self) -> int:
        return len(self.utterances)


def error_reason(err: Exception) -> str:
    """The human part of an error raised by our in-graph checks, eager or compiled.

    Eager assertions put the message first (``"silent audio ... Condition x > y ..."``);
    compiled ones wrap it (``"{{function_node ...}} assertion failed: [silent audio ...]
    [Condition x > y ...]"``), and the WAV decoder's compiled checks report it as a string
    that failed to parse as a number. In each case this returns ``"silent audio ..."``.
    """
    message = getattr(err, "message", str(err)).strip()
    found = re.search(r"assertion failed: \[([^\]]*)\]", message)
    if found:
        return found.group(1).strip(" .:")
    # The WAV decoder's stateless checks fail by parsing their message as a number.
    found = re.search(r"could not correctly convert string: (.*)", message)
    if found:
        return found.group(1).strip(" .:")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    for marker in ("Condition x", "assertion failed"):
        text = text.split(marker)[0].strip(" .:")
    return text or type(err).__name__


def _error_reason(path: str, config: AudioConfig) -> str:
    """Decodes one file eagerly and returns why it fails ("" if it does not)."""
    try:
        load_waveform(tf.constant(path), config)
    except (tf.errors.OpError, ValueError) as err:
        return error_reason(err)
    return ""


@dataclasses.dataclass(frozen=True)
class DecodeGroup:
    """Files that decode with the same graph function.

    Attributes:
      rate: their sample rate.
      wav_format: their WAV sample format (decoded by the WAV decoder for that format
        alone), or None (the format-sniffing decoder).
      members: their indices in the list of paths, in order.
      layouts: for a WAV group, each member's :class:`WavLayout` (where its samples are,
        from its header), so its decoder does not parse the header again; else None.
    """

    rate: int
    wav_format: str | None
    members: tuple[int, ...]
    layouts: tuple[WavLayout, ...] | None = None


def group_by_header(paths: Sequence[str]) -> list[DecodeGroup]:
    """Groups files by what their headers say (read in Python, a few bytes per file).

    Args:
      paths: the files.

    Returns:
      The groups, sorted by rate, then WAV sample format. A file whose header cannot be read
      (missing, unreadable, not audio, corrupt or truncated) is in no group: it is bad,
      and decoding it alone names the reason.
    """
    members: dict[tuple[int, str], list[tuple[int, WavLayout | None]]] = {}
    for i, path in enumerate(paths):
        try:
            header = read_audio_header(path)
        except (OSError, ValueError):
            continue
        members.setdefault((header.rate, header.wav_format or ""), []).append(
            (i, header.wav_layout))
    return [DecodeGroup(rate, wav_format or None, tuple(i for i, _ in found),
                        tuple(layout for _, layout in found) if wav_format else None)
            for (rate, wav_format), found in sorted(members.items())]


def decode_parallelism() -> int:
    """Files a decoding map works on at once: twice the cores this process may run on.

    ``AUTOTUNE`` gives one call per core at most, and then a core idles whenever its call
    waits (reading its file, handing its result over); with two per core another call
    takes the core. Measured on EmoDB with 2 cores (make bench, pipeline part, one run):
    16 kHz files 1728 -> 1886 utt/s and 1.08 -> 0.92 ms of CPU time per file, 48 kHz
    files 976 -> 999 utt/s.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 * cores


def single_pass_options() -> tf.data.Options:
    """tf.data options for one pass over a corpus's files (what :func:`decode_corpus` runs,
    or a feature-extraction pass with :func:`decoding_dataset`'s ``transform``).

    * The autotuner off: its per-element bookkeeping costs CPU time on every map call, and
      its model thread made about every other iterator's teardown wait 30-70 ms (EmoDB,
      make bench, pipeline part). Without it an ``AUTOTUNE`` parallel map runs as many
      calls at once as there are cores, which is what a decoding map wants.
    * Ops single-threaded: the parallel map already keeps every core busy with one file
      each, and an op splitting one file's work over the intra-op pool (the RFFT of a
      frontend does) only adds CPU time.

    Training pipelines keep tf.data's defaults: they run beside the model's own ops.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.max_intra_op_parallelism = 1
    return options


def _decode_group(paths: Sequence[str], group: DecodeGroup, config: AudioConfig,
                  transform: Callable[[tf.Tensor], tf.Tensor] | None) -> tf.data.Dataset:
    """``(index, waveform)`` of the files of one group, with a graph made for that group
    (``(index, transform(waveform))`` with a transform).

    A WAV group's elements carry each file's layout (int64 fields of :class:`WavLayout`),
    so the decoder reads the samples straight from where the header reading found them.
    """
    def load(rate: int | None, wav_format: str | None):
        def fn(i, path, *layout):
            wav_layout = WavLayout(*layout) if layout and wav_format else None
            wave = load_waveform(path, config, rate=rate, wav_format=wav_format,
                                 wav_layout=wav_layout)
            return i, wave if transform is None else transform(wave)
        return fn

    columns = (np.asarray(group.members, np.int64), [paths[i] for i in group.members])
    if group.layouts is not None:
        columns += tuple(np.asarray(group.layouts, np.int64).T)
    ds = tf.data.Dataset.from_tensor_slices(columns)
    try:
        ds = ds.map(load(group.rate, group.wav_format), num_parallel_calls=decode_parallelism(),
                    deterministic=True)
    except ValueError:
        # A rate with no compact polyphase filter (e.g. a prime ratio): run-time dispatch.
        ds = ds.map(load(None, None), num_parallel_calls=decode_parallelism(), deterministic=True)
    return ds.ignore_errors()


def decoding_dataset(paths: Sequence[str], groups: Sequence[DecodeGroup],
                     config: AudioConfig,
                     transform: Callable[[tf.Tensor], tf.Tensor] | None = None
                     ) -> tf.data.Dataset:
    """Decodes and conditions files group by group: ``(index int64, waveform [samples])``.

    No caching: every iteration decodes the files again (:func:`decode_corpus` caches).
    The order is deterministic: group after group, each in the order of its members.
    Files that fail to decode are left out. For a single pass over the files, iterate it
    ``with_options(single_pass_options())``.

    Args:
      paths: the files.
      groups: from :func:`group_by_header` (at least one).
      config: how to condition the audio.
      transform: a per-file function of the conditioned waveform ``[samples]`` (a feature
        extraction: e.g. ``lambda w: frontend(w[None])[0]`` for a
        :class:`ser_tf.frontend.LogMelFrontend`), run in the decoding's own map function;
        the elements are then ``(index, transform(waveform))``. One map function per file
        instead of a second ``map`` after this dataset: a second parallel map stage cost
        0.15-0.2 ms of CPU time more per EmoDB file (make bench, pipeline part). A file
        whose transform fails is left out like one that fails to decode.

    Returns:
      The dataset.
    """
    if not groups:
        raise ValueError("no groups of files to decode")
    parts = [_decode_group(paths, group, config, transform) for group in groups]
    decoded = parts[0]
    for part in parts[1:]:
        decoded = decoded.concatenate(part)
    return decoded


def decode_corpus(utterances: Sequence[Utterance], config: AudioConfig, *,
                  on_bad_audio: str = "skip", cache_path: str = "",
                  progress: bool = True) -> DecodedCorpus:
    """Decodes, checks and caches every utterance (one parallel pass).

    Args:
      utterances: what to decode.
      config: how to condition the audio.
      on_bad_audio: ``"skip"`` (log each bad file, leave it out) or ``"fail"``.
      cache_path: file prefix for an on-disk cache ("" caches in memory).
      progress: show a progress bar.

    Returns:
      The decoded corpus.

    Raises:
      BadAudioError: with ``on_bad_audio="fail"`` when any file is bad.
      ValueError: bad arguments, or no usable audio at all.
    """
    if on_bad_audio not in BAD_AUDIO_POLICIES:
        raise ValueError(f"on_bad_audio must be one of {BAD_AUDIO_POLICIES}, "
                         f"got {on_bad_audio!r}")
    if not utterances:
        raise ValueError("no utterances to decode")
    paths = [u.path for u in utterances]
    groups = group_by_header(paths)
    lengths: dict[int, int] = {}
    if groups:
        decoded = decoding_dataset(paths, groups, config).cache(cache_path)
        # The pass fills the cache that ``decoded`` (no options: training pipelines are
        # built on it) shares.
        for i, wave in tqdm(decoded.with_options(single_pass_options()),
                            total=len(utterances), desc="decoding audio",
                            unit="file", disable=not progress, leave=False):
            lengths[int(i)] = int(wave.shape[0])

    bad = [BadAudio(u.path, _error_reason(u.path, config) or "could not be decoded")
           for i, u in enumerate(utterances) if i not in lengths]
    if bad and on_bad_audio == "fail":
        raise BadAudioError(bad)
    for b in bad:
        log.warning("skipping bad audio %s: %s", b.path, b.reason)
    if not lengths:
        raise ValueError(f"none of the {len(utterances)} files could be used")

    keep = sorted(lengths)
    remap = np.full(len(utterances), -1, np.int64)
    remap[keep] = np.arange(len(keep))
    remap_t = tf.constant(remap)
    dataset = decoded.map(lambda i, w: (tf.gather(remap_t, i), w))
    return DecodedCorpus([utterances[i] for i in keep], dataset,
                         np.array([lengths[i] for i in keep], np.int64), bad, config)


def waveforms(corpus: DecodedCorpus, indices: Sequence[int]) -> list[np.ndarray]:
    """The decoded waveforms of ``indices`` (in that order) as NumPy arrays."""
    indices = np.asarray(indices, np.int64)
    found = {int(i): w for i, w in _select(corpus, indices).as_numpy_iterator()}
    return [found[int(i)] for i in indices]


def _select(corpus: DecodedCorpus, indices: Sequence[int]) -> tf.data.Dataset:
    mask = np.zeros(len(corpus), bool)
    mask[np.asarray(indices, np.int64)] = True
    mask_t = tf.constant(mask)
    # Declaring the size lets Keras count steps per epoch (a filter hides it).
    return (corpus.dataset.filter(lambda i, w: tf.gather(mask_t, i))
            .apply(tf.data.experimental.assert_cardinality(int(mask.sum()))))


def fit_length(wave: tf.Tensor, length: int, offset: tf.Tensor, pad_mode: str) -> tf.Tensor:
    """Crops or extends a waveform to exactly ``length`` samples.

    Args:
      wave: ``[samples]``.
      length: output length.
      offset: scalar in [0, 1): where the crop starts within the slack (0 = start).
      pad_mode: ``"loop"`` repeats short clips, ``"zero"`` pads them with silence at the end.

    Returns:
      ``[length]`` float32.
    """
    wave = extend(wave, length, pad_mode)
    slack = tf.shape(wave)[0] - length
    start = tf.cast(tf.floor(offset * tf.cast(slack + 1, tf.float32)), tf.int32)
    start = tf.clip_by_value(start, 0, slack)
    return tf.ensure_shape(wave[start:start + length], [length])


def perturb_speed(wave: tf.Tensor, factors: Sequence[float], sample_rate: int,
                  seed: tf.Tensor) -> tf.Tensor:
    """Plays ``wave`` faster by a factor drawn uniformly from ``factors`` (stateless).

    Speeding up by ``f`` is resampling from a nominal ``f * sample_rate`` to
    ``sample_rate``; each factor is one branch with its own polyphase filter.

    Args:
      wave: ``[samples]``.
      factors: speed factors (1.0 leaves the waveform as it is).
      sample_rate: rate of ``wave``.
      seed: int tensor ``[2]``.

    Returns:
      The perturbed waveform (its length scales by ``1 / f``).
    """
    def branch(f: float):
        rate_in = int(round(f * sample_rate))
        return lambda: wave if rate_in == sample_rate else resample(wave, rate_in, sample_rate)

    pick = tf.random.stateless_uniform([], seed, 0, len(factors), tf.int32)
    out = tf.switch_case(pick, [branch(f) for f in factors])
    return tf.ensure_shape(out, [None])


_NOISE_BANK_SAMPLES = 1 << 19


@functools.lru_cache(maxsize=None)
def _noise_bank() -> np.ndarray:
    """A fixed stretch of unit white Gaussian noise, drawn once.

    Drawing fresh Gaussian samples per crop (``stateless_normal``) cost ~4 ms per 2 s crop
    on CPU, ten times the rest of the input pipeline; a random slice of a long fixed bank
    is as white and as Gaussian, and costs a copy.
    """
    rng = np.random.default_rng(20240521)
    return rng.standard_normal(_NOISE_BANK_SAMPLES).astype(np.float32)


def _noise_slice(length: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """``length`` samples of white noise from a random offset in the bank (looped if long)."""
    bank = tf.constant(_noise_bank())
    size = _NOISE_BANK_SAMPLES
    start = tf.random.stateless_uniform([], seed, 0, size, tf.int32)
    idx = (start + tf.range(length)) % size
    return tf.gather(bank, idx)


def augment_waveform(wave: tf.Tensor, config: AugmentConfig, sample_rate: int,
                     seed: tf.Tensor) -> tf.Tensor:
    """Applies random gain, circular shift and additive noise (stateless, from ``seed``).

    Args:
      wave: ``[samples]``.
      config: what to apply.
      sample_rate: rate of ``wave``.
      seed: int tensor ``[2]`` for the stateless random ops.

    Returns:
      The augmented waveform, clipped to [-1, 1].
    """
    seeds = tf.random.experimental.stateless_split(seed, 5)
    if config.shift_s:
        max_shift = int(config.shift_s * sample_rate)
        shift = tf.random.stateless_uniform([], seeds[0], -max_shift, max_shift + 1, tf.int32)
        wave = tf.roll(wave, shift, axis=0)
    if config.gain_db:
        gain = tf.random.stateless_uniform([], seeds[1], -config.gain_db, config.gain_db)
        wave = wave * 10.0 ** (gain / 20.0)
    if config.noise_snr_db:
        low, high = config.noise_snr_db
        snr = tf.random.stateless_uniform([], seeds[2], low, high)
        power = tf.reduce_mean(tf.square(wave)) + 1e-12
        noise = _noise_slice(tf.shape(wave)[0], seeds[3])
        noise *= tf.sqrt(power / 10.0 ** (snr / 10.0))
        use = tf.random.stateless_uniform([], seeds[4]) < config.noise_prob
        wave = tf.where(use, wave + noise, wave)
    return tf.clip_by_value(wave, -1.0, 1.0)


def training_dataset(corpus: DecodedCorpus, indices: Sequence[int], labels: Sequence[int], *,
                     segment_samples: int, batch_size: int, seed: int,
                     augment: AugmentConfig | None = None, pad_mode: str = "loop",
                     shuffle: bool = True, drop_remainder: bool = False,
                     norm_stats: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tf.data.Dataset:
    """Random fixed-length crops of a split, batched: ``(waves [B, S], labels [B])``.

    Each iteration (epoch) reshuffles and draws new crops and augmentation, all derived from
    ``seed``, so a run is reproducible.

    Args:
      corpus: the decoded corpus.
      indices: utterance indices of the split.
      labels: class index for every utterance of the corpus (indexed like ``corpus``).
      segment_samples: crop length.
      batch_size: batch size.
      seed: random seed.
      augment: waveform augmentation (None: none).
      pad_mode: how short clips are extended (see :func:`fit_length`).
      shuffle: shuffle the order each epoch.
      drop_remainder: drop a last incomplete batch.
      norm_stats: per-utterance feature ``(mean, variance)`` arrays ``[N, bins, C]`` for
        per-speaker normalisation (see :func:`speaker_feature_stats`); the inputs then
        become dicts ``{"waveform", "norm_mean", "norm_var"}``.

    Returns:
      The dataset.
    """
    if len(indices) == 0:
        raise ValueError("empty training split")
    attach = _stats_attacher(norm_stats)
    labels_t = tf.constant(np.asarray(labels, np.int32))
    ds = _select(corpus, indices)
    if shuffle:
        ds = ds.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    noise = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    rate = corpus.config.sample_rate

    def crop(element, rand):
        i, wave = element
        s = tf.cast(rand, tf.int64)
        offset = tf.random.stateless_uniform([], s)
        if augment is not None and augment.speed:
            # Crop a little more than the fastest factor consumes, perturb only that, then
            # take the centre: resampling the whole utterance per crop was the bottleneck.
            margin = 1024
            longer = fit_length(wave, int(math.ceil(segment_samples * max(augment.speed)))
                                + margin, offset, pad_mode)
            out = fit_length(perturb_speed(longer, augment.speed, rate, s + 2),
                             segment_samples, 0.5, pad_mode)
        else:
            out = fit_length(wave, segment_samples, offset, pad_mode)
        if augment is not None and augment.enabled:
            out = augment_waveform(out, augment, rate, s + 1)
        return attach(i, out), tf.gather(labels_t, i)

    ds = tf.data.Dataset.zip((ds, noise)).map(crop, num_parallel_calls=AUTOTUNE,
                                              deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(AUTOTUNE)


def hop_in_samples(hop_s: float, sample_rate: int) -> int:
    """The hop between evaluation windows in samples (at least one) for a hop in seconds."""
    return max(1, int(round(hop_s * sample_rate)))


def window_starts(num_samples: int, segment_samples: int, hop_samples: int) -> list[int]:
    """Start offsets of the evaluation windows of one utterance (last aligned to the end)."""
    if num_samples <= segment_samples:
        return [0]
    starts = list(range(0, num_samples - segment_samples + 1, hop_samples))
    if starts[-1] != num_samples - segment_samples:
        starts.append(num_samples - segment_samples)
    return starts


def utterance_windows(wave: tf.Tensor, segment_samples: int, hop_samples: int,
                      pad_mode: str = "loop") -> tf.Tensor:
    """The evaluation windows of one utterance, in-graph: ``[windows, segment_samples]``.

    The windows of :func:`window_starts` (every ``hop_samples``, the last aligned to the
    end; an utterance shorter than a window is extended with ``pad_mode``). Evaluation and
    served models window utterances with this one function (:func:`batch_windows` for a
    batch of utterances of one length).
    """
    return batch_windows(wave[None], segment_samples, hop_samples, pad_mode)[0]


def batch_windows(waves: tf.Tensor, segment_samples: int, hop_samples: int,
                  pad_mode: str = "loop") -> tf.Tensor:
    """:func:`utterance_windows` of each row of ``waves [B, samples]`` (utterances of one
    length, e.g. the candidates an attack builds around one utterance):
    ``[B, windows, segment_samples]``, differentiable with respect to ``waves``."""
    n = tf.shape(waves)[1]
    last = tf.maximum(n - segment_samples, 0)
    starts = tf.concat([tf.range(0, last, hop_samples), last[None]], axis=0)
    extended = extend(waves, segment_samples, pad_mode)
    return tf.gather(extended, starts[:, None] + tf.range(segment_samples)[None, :], axis=1)


def evaluation_dataset(corpus: DecodedCorpus, indices: Sequence[int], *, segment_samples: int,
                       hop_samples: int, batch_size: int,
                       pad_mode: str = "loop",
                       norm_stats: tuple[np.ndarray, np.ndarray] | None = None,
                       whole: bool = False) -> tuple[tf.data.Dataset, int]:
    """All fixed-length windows of every utterance of a split, or each utterance whole.

    Args:
      corpus: the decoded corpus.
      indices: utterance indices of the split; output positions follow this order.
      segment_samples: window length.
      hop_samples: hop between windows.
      batch_size: windows per batch (1 when ``whole``: the lengths differ).
      pad_mode: how utterances shorter than a window are extended.
      norm_stats: per-utterance ``(mean, variance)`` for per-speaker normalisation (windows
        then come as dicts, as in :func:`training_dataset`).
      whole: one input per utterance, the whole utterance at its own length, for models
        whose classifier reads any number of frames (utterance functionals): a window's
        loop padding repeats the utterance and so changes its slope and delta statistics.
        Only utterances shorter than ``hop_samples`` are extended (with ``pad_mode``), so
        that every input has frames enough for the deltas.

    Returns:
      ``(dataset, num_windows)``: the dataset yields ``(positions [B], windows [B, S])``,
      ``positions`` being each window's utterance position in ``indices``.
    """
    attach = _stats_attacher(norm_stats)
    indices = np.asarray(indices, np.int64)
    if indices.size == 0:
        raise ValueError("empty evaluation split")
    if hop_samples < 1:
        raise ValueError("hop_samples must be positive")
    position = np.full(len(corpus), -1, np.int32)
    position[indices] = np.arange(indices.size)
    position_t = tf.constant(position)
    if whole:
        def utterance(i, wave):
            extended = extend(wave, hop_samples, pad_mode)
            return tf.gather(position_t, i)[None], attach(i[None], extended[None])

        return _select(corpus, indices).map(utterance).prefetch(AUTOTUNE), int(indices.size)
    starts = [window_starts(int(corpus.lengths[i]), segment_samples, hop_samples)
              for i in indices]

    def windows(i, wave):
        pos = tf.gather(position_t, i)
        wins = utterance_windows(wave, segment_samples, hop_samples, pad_mode)
        count = tf.shape(wins)[:1]
        return tf.data.Dataset.from_tensor_slices((tf.fill(count, pos),
                                                   attach(tf.fill(count, i), wins)))

    ds = _select(corpus, indices).flat_map(windows)
    total = int(sum(len(s) for s in starts))
    return ds.batch(batch_size).prefetch(AUTOTUNE), total


def _stats_attacher(norm_stats: tuple[np.ndarray, np.ndarray] | None):
    """``f(index, wave)``: the wave alone, or a dict with its utterance's norm statistics."""
    if norm_stats is None:
        return lambda i, wave: wave
    mean_t = tf.constant(np.asarray(norm_stats[0], np.float32))
    var_t = tf.constant(np.asarray(norm_stats[1], np.float32))
    return lambda i, wave: {"waveform": wave, "norm_mean": tf.gather(mean_t, i),
                            "norm_var": tf.gather(var_t, i)}


def speaker_feature_stats(corpus: DecodedCorpus, feature_fn, *, segment_samples: int,
                          hop_samples: int, pad_mode: str = "loop", whole: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Per-speaker feature mean and variance, broadcast to each of the speaker's utterances.

    This is per-speaker normalisation: every speaker, the test speakers included, is
    standardised with statistics of its own (unlabelled) audio. It uses test-speaker audio,
    so results obtained with it are not strictly speaker-independent and must be labelled
    as such.

    Args:
      corpus: the decoded corpus.
      feature_fn: waveforms ``[B, S]`` -> features ``[B, frames, bins, C]`` (the frontend).
      segment_samples: window length.
      hop_samples: window hop.
      pad_mode: how short utterances are extended.
      whole: read each utterance whole (see :func:`evaluation_dataset`).

    Returns:
      ``(mean, variance)``, each ``[len(corpus), bins, C]`` float32.
    """
    speakers = sorted({u.speaker for u in corpus.utterances})
    mean = variance = None
    for spk in speakers:
        idx = [i for i, u in enumerate(corpus.utterances) if u.speaker == spk]
        ds, _ = evaluation_dataset(corpus, idx, segment_samples=segment_samples,
                                   hop_samples=hop_samples, batch_size=64, pad_mode=pad_mode,
                                   whole=whole)
        batches = [np.asarray(feature_fn(w)) for _, w in ds]
        feats = np.concatenate([b.reshape((-1,) + b.shape[2:]) for b in batches])
        if mean is None:
            mean = np.zeros((len(corpus),) + feats.shape[1:], np.float32)
            variance = np.ones_like(mean)
        mean[idx] = feats.mean(axis=0)
        variance[idx] = feats.var(axis=0)
    return mean, variance


def extend(wave: tf.Tensor, length: int, pad_mode: str) -> tf.Tensor:
    """Extends waveforms shorter than ``length`` samples along their last axis (loop or
    zero); longer ones are unchanged."""
    n = tf.shape(wave)[-1]
    outer = [1] * (wave.shape.rank - 1)
    if pad_mode == "loop":
        reps = tf.maximum(1, (length + n - 1) // n)
        return tf.tile(wave, tf.concat([tf.constant(outer, tf.int32), reps[None]], axis=0))
    if pad_mode == "zero":
        return tf.pad(wave, [[0, 0]] * len(outer) + [[0, tf.maximum(0, length - n)]])
    raise ValueError(f"pad_mode must be loop or zero, got {pad_mode!r}")


def central_clips(corpus: DecodedCorpus, indices: Sequence[int], *, segment_samples: int,
                  pad_mode: str = "loop") -> np.ndarray:
    """One fixed-length clip per utterance: its central ``segment_samples`` (short
    utterances extended with ``pad_mode``), as robustness evaluation attacks them.

    Returns:
      ``[len(indices), segment_samples]`` float32, in the order of ``indices``.
    """
    indices = np.asarray(indices, np.int64)
    if indices.size == 0:
        raise ValueError("no utterances to clip")
    ds = _select(corpus, indices).map(
        lambda i, w: (i, fit_length(w, segment_samples, tf.constant(0.5), pad_mode)),
        num_parallel_calls=AUTOTUNE)
    clips = {}
    for ids, batch in ds.batch(256).as_numpy_iterator():
        clips.update(zip(ids.tolist(), batch))
    return np.stack([clips[int(i)] for i in indices]).astype(np.float32)
