"""A synthetic emotional-speech corpus: speech-like signals, NOT real speech.

This module generates a small labelled corpus so that training, evaluation and the fast
tests can run on a fresh machine that has no real corpus. Every artefact it produces says
it is synthetic: the corpus and language fields of its utterances are ``"synthetic"``, and
the ``synthetic.json`` written beside the audio records the generator and its parameters.
Numbers measured on it say nothing about accuracy on real emotional speech.

The signals are built the way a source-filter (formant) synthesiser builds a voice:

* An utterance is a sequence of words of one to three syllables separated by pauses.
  A syllable is an optional consonant (a fricative noise burst, or a plosive closure and
  burst) followed by a voiced vowel nucleus.
* The voiced source is a train of glottal pulses at an F0 contour made of the speaker's
  level, a declination across the utterance, a pitch accent per syllable (larger on
  stressed ones), slow drift, cycle-to-cycle jitter and shimmer, and, for some voices and
  emotions, creaky endings (irregular pulses at about half the F0).
* The pulses are shaped in the frequency domain by a glottal spectral tilt and by up to five
  formant resonances of one of five vowels, scaled by the speaker's vocal-tract factor;
  aspiration noise filtered by the same vocal tract adds breathiness.
* The mix gets an amplitude envelope per syllable, the speaker's recording gain and
  channel colouring, and a low noise floor.

Emotions move the acoustic correlates reported in the speech-emotion literature (e.g.
high and wide F0, fast, loud and bright speech for anger and happiness; low, narrow,
slow, soft and dark speech for sadness and boredom; high F0 with much jitter and
breathiness for fear; slow speech with falling, creaky contours for disgust); see
:data:`EMOTION_PROFILES`. Speakers differ in F0, vocal-tract length, rate, voice quality,
gain, channel, noise and in how strongly they express emotion, and every utterance draws
its own random deviations, so that classes overlap as they do in acted corpora
(happiness/anger and boredom/sadness are close) and a speaker-independent split is
learnable but far from trivial.

Generation is deterministic: each file is drawn from a random stream derived from the
seed, the speaker, the emotion and the utterance index only, so the files are
byte-identical for a seed (with the same numpy) whatever the order or the subset generated.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import math
import os
import wave
import zlib
from typing import Iterable, Sequence

import numpy as np

from ser_tf.data.corpora import EMOTIONS, Utterance

# Bump whenever a change alters the generated audio or the file layout: a corpus on disk
# made by another version is then regenerated instead of reused.
GENERATOR_VERSION = "1"

CORPUS_NAME = "synthetic"
LANGUAGE = "synthetic"
MANIFEST_NAME = "manifest.csv"
INFO_NAME = "synthetic.json"
MANIFEST_FIELDS = ("path", "emotion", "speaker", "gender", "language", "corpus")

# The EmoDB emotion set, in the common vocabulary's names.
DEFAULT_EMOTIONS = ("anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness")

_MIN_SAMPLE_RATE = 8000   # the formants and fricatives need content up to ~4 kHz
_MAX_SAMPLE_RATE = 48000
_MIN_DURATION_S = 0.3     # room for at least one syllable between the silences
_MAX_DURATION_S = 30.0

# Reference level of a syllable of unit RMS, before speaker gain and emotional loudness:
# low enough that loud (angry) speech rarely needs the peak limiter.
_REFERENCE_DBFS = -26.0
_PEAK_LIMIT = 0.98

_LN_SEMITONE = math.log(2.0) / 12.0

# Formants F1..F5 (Hz) of five vowels for an average adult male vocal tract; a speaker's
# formant_factor scales them (shorter tracts, e.g. most female voices, have higher ones).
_VOWELS = {
    "a": (730.0, 1090.0, 2440.0, 3400.0, 4400.0),
    "e": (530.0, 1840.0, 2480.0, 3500.0, 4500.0),
    "i": (280.0, 2250.0, 2950.0, 3600.0, 4600.0),
    "o": (570.0, 840.0, 2410.0, 3400.0, 4400.0),
    "u": (310.0, 870.0, 2240.0, 3300.0, 4300.0),
}
_VOWEL_NAMES = tuple(sorted(_VOWELS))
_FORMANT_BANDWIDTHS = (80.0, 100.0, 140.0, 200.0, 280.0)


@dataclasses.dataclass(frozen=True)
class EmotionProfile:
    """How an emotion moves the acoustic correlates, relative to the speaker's neutral voice.

    Multiplicative fields are 1 and additive fields 0 for ``neutral``; a speaker's
    ``expressiveness`` scales the deviation from neutral (as an exponent for the
    multiplicative fields, as a factor for the additive ones).

    Attributes:
      f0_scale: mean F0 relative to the speaker's neutral level.
      f0_range_scale: size of the pitch accents relative to the speaker's.
      rate_scale: syllables per second relative to the speaker's.
      pause_scale: length of the pauses between words relative to the speaker's.
      loudness_db: level change (vocal effort).
      tilt_db_per_octave: change of the source's spectral slope (positive is brighter).
      jitter_scale: cycle-to-cycle F0 perturbation relative to the speaker's.
      shimmer_scale: cycle-to-cycle amplitude perturbation relative to the speaker's.
      breathiness_scale: aspiration noise relative to the speaker's.
      creak: added probability that a word ends in creaky voice.
      declination_st: F0 fall across the utterance, in semitones.
      final_rise: probability that the utterance ends on a rising contour.
      attack_scale: syllable onset time relative to neutral (short is abrupt).
    """

    f0_scale: float = 1.0
    f0_range_scale: float = 1.0
    rate_scale: float = 1.0
    pause_scale: float = 1.0
    loudness_db: float = 0.0
    tilt_db_per_octave: float = 0.0
    jitter_scale: float = 1.0
    shimmer_scale: float = 1.0
    breathiness_scale: float = 1.0
    creak: float = 0.0
    declination_st: float = 2.5
    final_rise: float = 0.1
    attack_scale: float = 1.0


# Directions follow the usual summaries of vocal emotion expression (e.g. Murray & Arnott
# 1993; Banse & Scherer 1996): the magnitudes are chosen by hand so that the classes are
# separable only in part, with anger/happiness and boredom/sadness deliberately close.
EMOTION_PROFILES: dict[str, EmotionProfile] = {
    "neutral": EmotionProfile(),
    "anger": EmotionProfile(
        f0_scale=1.32, f0_range_scale=1.8, rate_scale=1.12, pause_scale=0.7,
        loudness_db=6.0, tilt_db_per_octave=4.0, jitter_scale=1.3, shimmer_scale=1.3,
        breathiness_scale=0.6, declination_st=3.5, final_rise=0.05, attack_scale=0.6),
    "happiness": EmotionProfile(
        f0_scale=1.28, f0_range_scale=1.9, rate_scale=1.08, pause_scale=0.8,
        loudness_db=3.5, tilt_db_per_octave=2.5, jitter_scale=1.1, shimmer_scale=1.1,
        breathiness_scale=1.0, declination_st=1.5, final_rise=0.35, attack_scale=0.8),
    "fear": EmotionProfile(
        f0_scale=1.42, f0_range_scale=1.3, rate_scale=1.25, pause_scale=0.8,
        loudness_db=1.0, tilt_db_per_octave=1.0, jitter_scale=3.0, shimmer_scale=2.0,
        breathiness_scale=2.0, declination_st=0.5, final_rise=0.3, attack_scale=0.8),
    "sadness": EmotionProfile(
        f0_scale=0.92, f0_range_scale=0.5, rate_scale=0.75, pause_scale=1.8,
        loudness_db=-6.0, tilt_db_per_octave=-4.0, jitter_scale=1.5, shimmer_scale=1.3,
        breathiness_scale=2.0, creak=0.1, declination_st=2.0, final_rise=0.05,
        attack_scale=1.6),
    "boredom": EmotionProfile(
        f0_scale=0.93, f0_range_scale=0.55, rate_scale=0.82, pause_scale=1.4,
        loudness_db=-3.0, tilt_db_per_octave=-2.5, jitter_scale=1.0, shimmer_scale=1.0,
        breathiness_scale=1.3, creak=0.15, declination_st=3.0, final_rise=0.05,
        attack_scale=1.3),
    "disgust": EmotionProfile(
        f0_scale=0.97, f0_range_scale=1.2, rate_scale=0.8, pause_scale=1.3,
        loudness_db=0.5, tilt_db_per_octave=-0.5, jitter_scale=1.6, shimmer_scale=1.4,
        breathiness_scale=1.2, creak=0.25, declination_st=4.5, final_rise=0.05,
        attack_scale=1.1),
    "calm": EmotionProfile(
        f0_scale=0.96, f0_range_scale=0.8, rate_scale=0.88, pause_scale=1.3,
        loudness_db=-3.0, tilt_db_per_octave=-1.5, jitter_scale=0.9, shimmer_scale=0.9,
        breathiness_scale=1.4, creak=0.05, declination_st=2.5, final_rise=0.1,
        attack_scale=1.3),
    "surprise": EmotionProfile(
        f0_scale=1.38, f0_range_scale=2.2, rate_scale=1.05, pause_scale=0.9,
        loudness_db=3.0, tilt_db_per_octave=2.0, jitter_scale=1.2, shimmer_scale=1.1,
        breathiness_scale=1.1, declination_st=0.0, final_rise=0.7, attack_scale=0.8),
}
assert set(EMOTION_PROFILES) == set(EMOTIONS), "every common emotion needs a profile"


@dataclasses.dataclass(frozen=True)
class SpeakerProfile:
    """A synthetic speaker: the voice that every emotion of theirs starts from.

    Attributes:
      speaker: speaker id (``"s01"``, ...).
      gender: ``"female"`` or ``"male"``.
      base_f0: mean F0 of neutral speech, Hz.
      formant_factor: vocal-tract scale applied to the vowel formants (>1: shorter tract).
      gain_db: recording gain.
      noise_db: level of the recording's noise floor, dBFS.
      f0_range_st: size of a stressed syllable's pitch accent in neutral speech, semitones.
      syllable_rate: syllables per second in neutral speech.
      pause_s: mean pause between words in neutral speech, seconds.
      jitter: cycle-to-cycle period perturbation (standard deviation, fraction of a period).
      shimmer: cycle-to-cycle pulse amplitude perturbation (standard deviation, fraction).
      breathiness: aspiration noise relative to voicing (RMS ratio).
      tilt_db_per_octave: speaker's offset to the source's spectral slope.
      creak: probability that a word ends in creaky voice in neutral speech.
      channel_tilt_db_per_octave: colouring of the recording channel around 1 kHz.
      expressiveness: scale of the speaker's emotional deviations from neutral.
    """

    speaker: str
    gender: str
    base_f0: float
    formant_factor: float
    gain_db: float
    noise_db: float
    f0_range_st: float = 3.0
    syllable_rate: float = 4.8
    pause_s: float = 0.14
    jitter: float = 0.006
    shimmer: float = 0.04
    breathiness: float = 0.08
    tilt_db_per_octave: float = 0.0
    creak: float = 0.05
    channel_tilt_db_per_octave: float = 0.0
    expressiveness: float = 1.0


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def make_speakers(n_speakers: int, seed: int = 0) -> list[SpeakerProfile]:
    """Draws synthetic speakers, alternating female and male.

    Speaker ``i`` depends only on ``seed`` and ``i``, so asking for more speakers keeps
    the first ones unchanged.

    Args:
      n_speakers: number of speakers, at least 2 (so that both genders are present).
      seed: random seed.

    Returns:
      Speakers ``s01``, ``s02``, ...; even positions (``s01``, ``s03``, ...) are female.

    Raises:
      ValueError: if ``n_speakers < 2`` or ``seed < 0``.
    """
    _check_int("n_speakers", n_speakers, 2)
    _check_int("seed", seed, 0)
    width = max(2, len(str(n_speakers)))
    speakers = []
    for i in range(n_speakers):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i, 0x5BEA]))
        female = i % 2 == 0
        speakers.append(SpeakerProfile(
            speaker=f"s{i + 1:0{width}d}",
            gender="female" if female else "male",
            base_f0=float(rng.uniform(180.0, 240.0) if female else rng.uniform(95.0, 135.0)),
            formant_factor=float(rng.uniform(1.10, 1.22) if female else rng.uniform(0.92, 1.04)),
            gain_db=float(rng.uniform(-4.0, 4.0)),
            noise_db=float(rng.uniform(-72.0, -58.0)),
            f0_range_st=float(rng.uniform(2.5, 4.0)),
            syllable_rate=float(rng.uniform(4.2, 5.4)),
            pause_s=float(rng.uniform(0.10, 0.18)),
            jitter=float(rng.uniform(0.004, 0.009)),
            shimmer=float(rng.uniform(0.03, 0.06)),
            breathiness=float(rng.uniform(0.06, 0.12) if female else rng.uniform(0.03, 0.08)),
            tilt_db_per_octave=float(rng.uniform(-1.5, 1.5)),
            creak=float(rng.uniform(0.0, 0.08) if female else rng.uniform(0.04, 0.15)),
            channel_tilt_db_per_octave=float(rng.uniform(-1.5, 1.5)),
            expressiveness=float(rng.uniform(0.85, 1.2)),
        ))
    return speakers


@dataclasses.dataclass
class _Voice:
    """One utterance's voice settings: the speaker's, moved by the emotion and by chance."""

    f0_hz: float
    range_st: float
    syllable_s: float
    pause_s: float
    level_db: float
    tilt_db_per_octave: float
    jitter: float
    shimmer: float
    breathiness: float
    creak: float
    declination_st: float
    final_rise: float
    attack_s: float
    formant_factor: float


def _utterance_voice(profile: EmotionProfile, speaker: SpeakerProfile,
                     rng: np.random.Generator) -> _Voice:
    e = speaker.expressiveness

    def scale(value: float, sd: float) -> float:
        # Emotional factor, weighted by expressiveness, times per-utterance log-normal noise.
        return value ** e * math.exp(rng.normal(0.0, sd))

    return _Voice(
        f0_hz=speaker.base_f0 * scale(profile.f0_scale, 0.06),
        range_st=speaker.f0_range_st * scale(profile.f0_range_scale, 0.25),
        syllable_s=1.0 / (speaker.syllable_rate * scale(profile.rate_scale, 0.10)),
        pause_s=speaker.pause_s * scale(profile.pause_scale, 0.35),
        level_db=(_REFERENCE_DBFS + speaker.gain_db + e * profile.loudness_db
                  + rng.normal(0.0, 1.5)),
        tilt_db_per_octave=(-6.0 + speaker.tilt_db_per_octave + e * profile.tilt_db_per_octave
                            + rng.normal(0.0, 1.0)),
        jitter=speaker.jitter * scale(profile.jitter_scale, 0.3),
        shimmer=speaker.shimmer * scale(profile.shimmer_scale, 0.3),
        breathiness=speaker.breathiness * scale(profile.breathiness_scale, 0.3),
        creak=min(0.9, speaker.creak + e * profile.creak),
        declination_st=max(0.0, profile.declination_st + rng.normal(0.0, 1.0)),
        final_rise=profile.final_rise,
        attack_s=0.025 * scale(profile.attack_scale, 0.2),
        formant_factor=speaker.formant_factor * math.exp(rng.normal(0.0, 0.01)),
    )


def _smooth_sizes(limit: int) -> list[int]:
    sizes = []
    p2 = 1
    while p2 <= limit:
        p3 = p2
        while p3 <= limit:
            p5 = p3
            while p5 <= limit:
                sizes.append(p5)
                p5 *= 5
            p3 *= 3
        p2 *= 2
    return sorted(sizes)


# FFT lengths with factors 2, 3 and 5 only (fast in pocketfft), so that a segment pads
# by a few percent rather than up to twice as a power of two would.
_FFT_SIZES = _smooth_sizes(1 << 22)


def _fft_size(n: int) -> int:
    return _FFT_SIZES[bisect.bisect_left(_FFT_SIZES, max(n, 256))]


def _white_spectrum(n_bins: int, rng: np.random.Generator) -> np.ndarray:
    # White noise drawn directly as an rfft spectrum: saves a forward FFT per segment.
    parts = rng.standard_normal((2, n_bins))
    return parts[0] + 1j * parts[1]


def _vocal_tract(freqs: np.ndarray, vowel: str, factor: float, nyquist: float) -> np.ndarray:
    """Complex response of a cascade of formant resonators (unity gain at DC).

    Each formant is an analogue two-pole resonator (sigma^2 + omega^2) / ((s + sigma)^2 +
    omega^2) evaluated on the FFT grid: cheap, causal-looking ringing, and the cascade
    gives formant amplitudes their natural relation without any per-formant gains.
    """
    s = 2j * np.pi * freqs
    response = np.ones_like(s)
    for formant, bandwidth in zip(_VOWELS[vowel], _FORMANT_BANDWIDTHS):
        f = formant * factor
        if f > 0.9 * nyquist:
            break
        sigma = np.pi * bandwidth
        omega = 2.0 * np.pi * f
        response *= (sigma * sigma + omega * omega) / ((s + sigma) ** 2 + omega * omega)
    return response


def _tilt(freqs: np.ndarray, db_per_octave: float, corner_hz: float) -> np.ndarray:
    # (1 + (f/fc)^2)^(k/2) tends to k * 6.02 dB/octave above the corner.
    return (1.0 + (freqs / corner_hz) ** 2) ** (db_per_octave / 12.041)


def _raised_cosine_envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack = min(attack, n // 2)
    release = min(release, n - attack)
    if attack > 0:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(attack) + 0.5) / attack)
    if release > 0:
        env[n - release:] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(release) + 0.5) / release)
    return env


def _shaped_noise(n: int, sample_rate: int, centre_hz: float, width_octaves: float,
                  floor: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a log-Gaussian band around centre_hz (a fricative's spectrum)."""
    nfft = _fft_size(n)
    freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
    octaves = np.log2(np.maximum(freqs, 1.0) / centre_hz)
    shape = np.exp(-0.5 * (octaves / width_octaves) ** 2) + floor
    shape *= freqs > 300.0  # fricatives have little energy at low frequencies
    spectrum = _white_spectrum(len(freqs), rng) * shape
    out = np.fft.irfft(spectrum, nfft)[:n]
    return out / (np.sqrt(np.mean(out * out)) + 1e-12)


def _glottal_pulses(log_f0: np.ndarray, jitter: np.ndarray, shimmer: np.ndarray,
                    n_out: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """An impulse train at the F0 contour, with jitter, shimmer and fractional timing.

    Pulses are placed where the running phase of the F0 contour crosses an integer and
    split between the two nearest samples: rounding to whole samples would by itself add
    about 0.5 % of jitter to a 250 Hz voice at 16 kHz, as much as a steady voice has.
    """
    n = len(log_f0)
    f0 = np.exp(log_f0)
    phase = np.cumsum(f0) / sample_rate + rng.uniform()
    cycles = np.arange(math.ceil(phase[0]), math.floor(phase[-1]) + 1)
    excitation = np.zeros(n_out)
    if len(cycles) == 0:
        return excitation
    index = np.arange(n, dtype=np.float64)
    positions = np.interp(cycles, phase, index)
    at = np.clip(positions.astype(np.int64), 0, n - 1)
    periods = sample_rate / f0[at]
    positions = positions + rng.standard_normal(len(cycles)) * jitter[at] * periods
    amplitudes = np.maximum(1.0 + rng.standard_normal(len(cycles)) * shimmer[at], 0.1)
    positions = np.clip(positions, 0.0, n_out - 2.0)
    base = positions.astype(np.int64)
    frac = positions - base
    excitation += np.bincount(base, amplitudes * (1.0 - frac), minlength=n_out)[:n_out]
    excitation += np.bincount(base + 1, amplitudes * frac, minlength=n_out)[:n_out]
    return excitation


def _voiced_nucleus(n: int, log_f0: np.ndarray, creak_from: int, vowel: str, voice: _Voice,
                    attack: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A unit-RMS vowel: glottal pulses and aspiration through tilt and vocal tract."""
    jitter = np.full(n, voice.jitter)
    shimmer = np.full(n, voice.shimmer)
    if creak_from < n:
        # Creaky voice: irregular pulses at about half the F0, uneven in amplitude.
        log_f0 = log_f0.copy()
        log_f0[creak_from:] -= math.log(2.0) * rng.uniform(0.7, 1.0)
        jitter[creak_from:] = max(voice.jitter, 0.06)
        shimmer[creak_from:] = max(voice.shimmer, 0.25)
    pad = int(0.02 * sample_rate)  # room for the resonators' ringing before it wraps
    nfft = _fft_size(n + pad)
    excitation = _glottal_pulses(log_f0, jitter, shimmer, nfft, sample_rate, rng)
    freqs = np.fft.rfftfreq(nfft, 1.0 / sample_rate)
    tract = _vocal_tract(freqs, vowel, voice.formant_factor, sample_rate / 2.0)
    tilt = _tilt(freqs, voice.tilt_db_per_octave, 250.0)
    voiced = np.fft.rfft(excitation) * tilt * tract
    # Aspiration: turbulence at the glottis through the same tract. It falls off less
    # steeply than the pulses (so a breathy voice gains noise between the harmonics) but
    # still follows the voice's tilt: a lax, dark voice does not become bright by it.
    noise = _white_spectrum(len(freqs), rng) * tract * tilt * _tilt(freqs, 3.0, 250.0)
    e_voiced = np.sum(np.abs(voiced) ** 2) + 1e-12
    e_noise = np.sum(np.abs(noise) ** 2) + 1e-12
    spectrum = voiced / math.sqrt(e_voiced) + voice.breathiness * noise / math.sqrt(e_noise)
    out = np.fft.irfft(spectrum, nfft)[:n]
    out /= np.sqrt(np.mean(out * out)) + 1e-12
    release = int(rng.uniform(0.03, 0.07) * sample_rate)
    return out * _raised_cosine_envelope(n, attack, release)


def _check_emotion(emotion: str) -> EmotionProfile:
    if emotion not in EMOTION_PROFILES:
        raise ValueError(f"unknown emotion {emotion!r}; allowed: {', '.join(EMOTIONS)}")
    return EMOTION_PROFILES[emotion]


def _check_sample_rate(sample_rate: object) -> None:
    _check_int("sample_rate", sample_rate, _MIN_SAMPLE_RATE)
    if sample_rate > _MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be <= {_MAX_SAMPLE_RATE}, got {sample_rate}")


def _check_duration(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (_MIN_DURATION_S <= value <= _MAX_DURATION_S):
        raise ValueError(
            f"{name} must be within [{_MIN_DURATION_S}, {_MAX_DURATION_S}] s, got {value}")
    return value


@dataclasses.dataclass
class _Syllable:
    start: int        # first sample
    length: int       # samples, consonant included
    stressed: bool
    word_final: bool


def _plan_syllables(voice: _Voice, duration_s: float, sample_rate: int,
                    rng: np.random.Generator) -> tuple[list[_Syllable], float, float]:
    """Lays out words of 1-3 syllables and the pauses between them over the utterance."""
    lead = rng.uniform(0.04, 0.15)
    end = duration_s - rng.uniform(0.04, 0.12)
    syllables: list[_Syllable] = []
    t = lead
    while t + 0.08 <= end:
        n_syllables = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
        stressed = int(rng.integers(n_syllables))
        for k in range(n_syllables):
            length_s = float(np.clip(voice.syllable_s * math.exp(rng.normal(0.0, 0.2)),
                                     0.08, 0.6))
            length_s = min(length_s, end - t)
            if length_s < 0.08:
                break
            syllables.append(_Syllable(int(t * sample_rate), int(length_s * sample_rate),
                                       k == stressed, k == n_syllables - 1))
            # A small gap between the syllables of a word.
            t += length_s + rng.uniform(0.0, 0.03)
        if syllables:
            syllables[-1].word_final = True
        t += voice.pause_s * math.exp(rng.normal(0.0, 0.4))
    return syllables, lead, end


def synthesize_utterance(emotion: str, speaker: SpeakerProfile, *, duration_s: float,
                         sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Synthesises one speech-like utterance (not real speech) of an emotion and a speaker.

    Args:
      emotion: an emotion of the common vocabulary (see :data:`EMOTION_PROFILES`).
      speaker: the voice, e.g. from :func:`make_speakers`.
      duration_s: length of the result, seconds (0.3 to 30).
      sample_rate: sampling rate, Hz (8000 to 48000).
      rng: source of randomness; the result is a deterministic function of its state.

    Returns:
      float32 mono waveform in [-1, 1] of ``round(duration_s * sample_rate)`` samples.

    Raises:
      ValueError: for an unknown emotion or an out-of-range duration or rate.
    """
    profile = _check_emotion(emotion)
    duration_s = _check_duration("duration_s", duration_s)
    _check_sample_rate(sample_rate)
    sr = int(sample_rate)
    n_total = int(round(duration_s * sr))
    voice = _utterance_voice(profile, speaker, rng)
    syllables, lead, end = _plan_syllables(voice, duration_s, sr, rng)

    log_f0_mean = math.log(voice.f0_hz)
    declination = voice.declination_st * _LN_SEMITONE / max(end - lead, 0.1)  # per second
    drift_phase = rng.uniform(0.0, 2.0 * math.pi, size=2)
    drift_rate = rng.uniform([0.5, 1.5], [0.9, 2.4])
    final_rise = rng.uniform() < voice.final_rise

    speech = np.zeros(n_total)
    for i, syllable in enumerate(syllables):
        start, n_syl = syllable.start, syllable.length
        # Stressed syllables are louder; every syllable varies a little.
        level = 10.0 ** (((2.5 if syllable.stressed else -1.0) + rng.normal(0.0, 1.6)) / 20.0)

        # Onset consonant: a fricative, a plosive (closure then burst) or none.
        consonant = int(rng.choice(3, p=[0.35, 0.3, 0.35]))
        onset = 0
        if consonant == 0:
            onset = int(min(rng.uniform(0.2, 0.35) * n_syl, 0.12 * sr))
            centre = min(rng.uniform(2500.0, 6000.0) * voice.formant_factor, 0.4 * sr)
            burst = _shaped_noise(onset, sr, centre, rng.uniform(0.3, 0.8), 0.02, rng)
            burst *= _raised_cosine_envelope(onset, onset // 3, onset // 3)
            gain = 10.0 ** (rng.uniform(-14.0, -6.0) / 20.0)
            speech[start:start + onset] += gain * level * burst
        elif consonant == 1:
            closure = int(rng.uniform(0.02, 0.05) * sr)
            onset = min(closure + int(rng.uniform(0.006, 0.015) * sr), n_syl // 3)
            n_burst = onset - closure
            if n_burst > 4:
                centre = min(rng.uniform(1000.0, 4500.0), 0.4 * sr)
                burst = _shaped_noise(n_burst, sr, centre, 1.2, 0.1, rng)
                burst *= np.exp(-np.arange(n_burst) / (0.3 * n_burst))
                gain = 10.0 ** (rng.uniform(-8.0, -2.0) / 20.0)
                speech[start + closure:start + onset] += gain * level * burst

        # Voiced nucleus: F0 = level + declination + accent + slow drift (+ final contour).
        n_v = n_syl - onset
        if n_v < int(0.04 * sr):
            continue
        v_start = start + onset
        times = (v_start + np.arange(n_v)) / sr
        u = np.linspace(0.0, 1.0, n_v)
        accent = voice.range_st * (rng.uniform(0.5, 1.0) if syllable.stressed
                                   else rng.uniform(0.0, 0.35))
        peak_shape = rng.uniform(0.6, 1.6)  # moves the accent's peak early or late
        contour_st = (voice.declination_st / 2.0
                      + accent * np.sin(np.pi * u ** peak_shape)
                      + 0.4 * np.sin(2.0 * np.pi * drift_rate[0] * times + drift_phase[0])
                      + 0.25 * np.sin(2.0 * np.pi * drift_rate[1] * times + drift_phase[1]))
        if i == len(syllables) - 1:
            # Terminal contour: a question-like rise, or the usual final fall.
            if final_rise:
                contour_st = contour_st + voice.range_st * 1.2 * u ** 2
            else:
                contour_st = contour_st - rng.uniform(1.0, 3.0) * u
        log_f0 = log_f0_mean + _LN_SEMITONE * contour_st - declination * (times - lead)
        creak_from = n_v
        if syllable.word_final and rng.uniform() < voice.creak:
            creak_from = int(n_v * rng.uniform(0.45, 0.7))
        vowel = _VOWEL_NAMES[int(rng.integers(len(_VOWEL_NAMES)))]
        attack = int(voice.attack_s * math.exp(rng.normal(0.0, 0.2)) * sr)
        nucleus = _voiced_nucleus(n_v, log_f0, creak_from, vowel, voice, attack, sr, rng)
        speech[v_start:v_start + n_v] += level * nucleus

    speech *= 10.0 ** (voice.level_db / 20.0)
    # The recording: a noise floor (pinkish above 500 Hz, like room and preamp noise; drawn
    # directly as a spectrum to save an FFT) and the channel's colouring around 1 kHz with
    # a low cut at 70 Hz, in one FFT over the whole utterance.
    nfft = _fft_size(n_total)
    freqs = np.fft.rfftfreq(nfft, 1.0 / sr)
    noise_shape = _tilt(freqs, -3.0, 500.0)
    noise_shape *= 10.0 ** (speaker.noise_db / 20.0) / np.sqrt(np.mean(noise_shape ** 2))
    noise = _white_spectrum(len(freqs), rng) * (math.sqrt(nfft / 2.0) * noise_shape)
    channel = (_tilt(freqs, speaker.channel_tilt_db_per_octave, 1000.0)
               * freqs ** 2 / (freqs ** 2 + 70.0 ** 2))
    out = np.fft.irfft((np.fft.rfft(speech, nfft) + noise) * channel, nfft)[:n_total]
    peak = float(np.max(np.abs(out))) if n_total else 0.0
    if peak > _PEAK_LIMIT:
        out *= _PEAK_LIMIT / peak  # the recording level is set so as not to clip
    return out.astype(np.float32)


def _utterance_rng(seed: int, speaker_index: int, emotion: str, index: int
                   ) -> np.random.Generator:
    # crc32 rather than hash(): str hashes are salted per process, crc32 is stable.
    entropy = [seed, speaker_index, zlib.crc32(emotion.encode("utf-8")), index, 0x5E7]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = np.clip(np.round(audio.astype(np.float64) * 32767.0), -32768, 32767)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.astype("<i2").tobytes())


def _write_manifest(path: str, rows: Iterable[Sequence[str]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows(rows)
    os.replace(tmp, path)


def _read_manifest(out_dir: str) -> list[Utterance] | None:
    """The utterances of a manifest written here, or None if it is missing or incomplete."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
                return None
            rows = list(reader)
    except OSError:
        return None
    utterances = []
    for row in rows:
        audio = os.path.join(out_dir, row["path"])
        if not os.path.isfile(audio):
            return None
        utterances.append(Utterance(
            path=audio, emotion=row["emotion"], speaker=row["speaker"], gender=row["gender"],
            language=row["language"], corpus=row["corpus"]))
    return utterances


def _read_manifest_paths(out_dir: str) -> list[str]:
    """Absolute paths listed in a manifest here (files may be missing); [] if unreadable."""
    try:
        with open(os.path.join(out_dir, MANIFEST_NAME), newline="", encoding="utf-8") as f:
            return [os.path.normpath(os.path.join(out_dir, row["path"]))
                    for row in csv.DictReader(f) if row.get("path")]
    except (OSError, KeyError):
        return []


def _load_info(out_dir: str) -> dict | None:
    try:
        with open(os.path.join(out_dir, INFO_NAME), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def generate_corpus(out_dir: str | os.PathLike, *,
                    emotions: Sequence[str] = DEFAULT_EMOTIONS,
                    n_speakers: int = 6,
                    utterances_per_speaker: int = 10,
                    sample_rate: int = 16000,
                    min_duration_s: float = 1.0,
                    max_duration_s: float = 2.5,
                    seed: int = 0) -> list[Utterance]:
    """Writes (or reuses) a synthetic emotional-speech corpus: speech-like, NOT real speech.

    The folder gets one 16-bit PCM mono WAV per utterance, named
    ``<speaker>_<emotion>_<index>.wav`` (e.g. ``s03_anger_004.wav``), a ``manifest.csv``
    (``path,emotion,speaker,gender,language,corpus``, paths relative to the folder) and a
    ``synthetic.json`` that records the generator, its version and the parameters. If that
    record already matches the arguments and every listed file exists, the files are
    reused untouched; otherwise the files of the previous corpus there are replaced.
    Other files in the folder are left alone.

    Args:
      out_dir: folder to write into (created if needed).
      emotions: emotions to generate, from the common vocabulary; default the EmoDB set.
      n_speakers: number of speakers, at least 2; genders alternate (see
        :func:`make_speakers`).
      utterances_per_speaker: utterances per speaker and per emotion.
      sample_rate: sampling rate of the files, Hz (8000 to 48000).
      min_duration_s: shortest utterance, seconds (at least 0.3).
      max_duration_s: longest utterance, seconds (at most 30); durations are uniform in
        between.
      seed: random seed; the same seed gives byte-identical files.

    Returns:
      The utterances, with absolute paths, sorted by path; corpus and language are
      ``"synthetic"``.

    Raises:
      ValueError: for unknown or repeated emotions, fewer than 2 speakers, fewer than 1
        utterance, bad durations or a bad sample rate.
    """
    emotions = tuple(emotions) if not isinstance(emotions, str) else (emotions,)
    if not emotions:
        raise ValueError(f"emotions must not be empty; allowed: {', '.join(EMOTIONS)}")
    for emotion in emotions:
        _check_emotion(emotion)
    if len(set(emotions)) != len(emotions):
        raise ValueError(f"emotions must not repeat, got {emotions}")
    _check_int("n_speakers", n_speakers, 2)
    _check_int("utterances_per_speaker", utterances_per_speaker, 1)
    _check_int("seed", seed, 0)
    _check_sample_rate(sample_rate)
    min_duration_s = _check_duration("min_duration_s", min_duration_s)
    max_duration_s = _check_duration("max_duration_s", max_duration_s)
    if min_duration_s > max_duration_s:
        raise ValueError(f"min_duration_s ({min_duration_s}) must not exceed "
                         f"max_duration_s ({max_duration_s})")

    out_dir = os.path.abspath(os.fspath(out_dir))
    params = {
        "emotions": list(emotions),
        "n_speakers": int(n_speakers),
        "utterances_per_speaker": int(utterances_per_speaker),
        "sample_rate": int(sample_rate),
        "min_duration_s": min_duration_s,
        "max_duration_s": max_duration_s,
        "seed": int(seed),
    }
    info = _load_info(out_dir)
    if (info is not None and info.get("generator_version") == GENERATOR_VERSION
            and info.get("params") == params):
        utterances = _read_manifest(out_dir)
        if utterances is not None and len(utterances) == info.get("n_utterances"):
            return sorted(utterances, key=lambda u: u.path)

    os.makedirs(out_dir, exist_ok=True)
    if info is not None:
        # A previous corpus of ours: drop its record first (so that an interrupted run is
        # never taken for complete) and its WAVs (so that no stale file lingers).
        os.remove(os.path.join(out_dir, INFO_NAME))
        old = _read_manifest_paths(out_dir)
        for path in old:
            if path.endswith(".wav") and os.path.dirname(path) == out_dir:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass

    speakers = make_speakers(n_speakers, seed)
    rows = []
    utterances = []
    for speaker_index, speaker in enumerate(speakers):
        for emotion in emotions:
            for index in range(utterances_per_speaker):
                rng = _utterance_rng(seed, speaker_index, emotion, index)
                duration = float(rng.uniform(min_duration_s, max_duration_s))
                audio = synthesize_utterance(emotion, speaker, duration_s=duration,
                                             sample_rate=sample_rate, rng=rng)
                name = f"{speaker.speaker}_{emotion}_{index:03d}.wav"
                _write_wav(os.path.join(out_dir, name), audio, sample_rate)
                rows.append((name, emotion, speaker.speaker, speaker.gender, LANGUAGE,
                             CORPUS_NAME))
                utterances.append(Utterance(
                    path=os.path.join(out_dir, name), emotion=emotion,
                    speaker=speaker.speaker, gender=speaker.gender, language=LANGUAGE,
                    corpus=CORPUS_NAME))
    rows.sort()
    _write_manifest(os.path.join(out_dir, MANIFEST_NAME), rows)
    record = {
        "synthetic": True,
        "description": ("Synthetic speech-like signals generated by ser_tf.data.synthetic "
                        "(formant synthesis with emotion-dependent prosody). Not real "
                        "speech: results on it say nothing about real emotional speech."),
        "generator": "ser_tf.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "n_utterances": len(utterances),
        "speakers": [dataclasses.asdict(s) for s in speakers],
    }
    tmp = os.path.join(out_dir, INFO_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, INFO_NAME))
    return sorted(utterances, key=lambda u: u.path)
