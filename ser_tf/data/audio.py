"""Audio decoding and conditioning as graph functions (usable inside ``tf.data``).

Decoding recognises the container (WAV, FLAC, Ogg Vorbis, MP3) from its magic bytes, reads
the sample rate and sample format from its header in-graph, and decodes, so one graph
function decodes any file and tf.data can run it in parallel. WAV files are decoded by our
own decoder made of TensorFlow core ops (``tf.io.decode_raw`` of the ``data`` chunk, found
by walking the RIFF chunks in any order): 8-bit unsigned, 16, 24 and 32-bit integer and
32-bit float PCM, plain or WAVE_FORMAT_EXTENSIBLE. FLAC, Ogg Vorbis and MP3 are decoded by
tensorflow-io's stateless decoders. The rest (down-mix, resampling to the model's rate,
silence trimming, level normalisation) is plain TF so it runs in parallel in ``tf.data``
and inside ``tf.function``.

Where the files are known before the pipeline runs (a corpus), :func:`read_audio_header`
reads each header in Python (a few bytes per file) so that :func:`load_waveform` can be
specialised per group of files: a resampler built for their rate alone and, for WAV files
(most corpora), the WAV decoder for their sample format alone (:func:`decode_wav`),
reading the samples where the header reading found them (:class:`WavLayout`), instead of
the format-sniffing decoder. tf.data instantiates its map functions again for every
iterator, so a small graph is also a fast start; for the same reason the checks of
:func:`load_waveform` and :func:`condition` on the decoded audio are stateless ops rather
than Assert ops.

Bad audio (unreadable, not audio, truncated, empty, silent, non-finite) raises a TF error
whose message names the problem; :mod:`ser_tf.data.pipeline` turns those into a per-file
report (``--on_bad_audio=skip|fail``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from typing import Callable, NamedTuple

import tensorflow as tf
import tensorflow_io as tfio

from ser_tf.data.resample import resample

# Input rates resampled by the fast polyphase path (ser_tf.data.resample); any other rate
# falls back to tfio.audio.resample, which is correct but slow.
COMMON_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """How raw files become model input waveforms.

    Attributes:
      sample_rate: the model's rate; every file is resampled to it.
      trim_db: trim leading/trailing audio quieter than this many dB below the peak frame
        (None: no trimming).
      normalize: ``"peak"`` (scale the peak to ``level_db`` dBFS), ``"rms"`` (scale the RMS
        to ``level_db`` dBFS) or ``"none"``.
      level_db: target level for normalisation in dBFS.
      min_duration_s: audio shorter than this after trimming is reported as bad.
      resample_quality: ``"hq"`` or ``"fast"`` (see :func:`ser_tf.data.resample.resample`).
    """

    sample_rate: int = 16000
    trim_db: float | None = 30.0
    normalize: str = "peak"
    level_db: float = -1.0
    min_duration_s: float = 0.1
    resample_quality: str = "hq"

    def __post_init__(self):
        if self.normalize not in ("peak", "rms", "none"):
            raise ValueError(f"normalize must be peak, rms or none, got {self.normalize!r}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")


def _bytes(contents: tf.Tensor, offset, length: int) -> tf.Tensor:
    """``length`` bytes of ``contents`` from ``offset`` as int64 (zeros past the end)."""
    raw = tf.io.decode_raw(tf.strings.substr(contents, offset, length), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return tf.pad(raw, [[0, length - tf.shape(raw)[0]]])


def _le(contents: tf.Tensor, offset, length: int) -> tf.Tensor:
    """Little-endian unsigned integer of ``length`` bytes at ``offset``."""
    b = _bytes(contents, offset, length)
    return tf.reduce_sum(b * tf.constant([1 << (8 * k) for k in range(length)], tf.int64))


def _flac_rate(contents: tf.Tensor):
    """``(rate, bits)`` from a FLAC file's STREAMINFO block."""
    b = _bytes(contents, 18, 4)
    rate = b[0] * 4096 + b[1] * 16 + b[2] // 16
    bits = (b[2] % 2) * 16 + b[3] // 16 + 1
    return rate, bits


def _vorbis_rate(contents: tf.Tensor) -> tf.Tensor:
    """Sample rate from an Ogg Vorbis identification header (first page)."""
    packet = 27 + _le(contents, 26, 1)
    tf.debugging.assert_equal(tf.strings.substr(contents, packet, 7), "\x01vorbis",
                              message="Ogg file is not Vorbis audio")
    return _le(contents, packet + 12, 4)


# MPEG audio sample rates by [version bits][rate index] (version 1 is reserved).
_MP3_RATES = [[11025, 12000, 8000, 0], [0, 0, 0, 0], [22050, 24000, 16000, 0],
              [44100, 48000, 32000, 0]]


def _mp3_rate(contents: tf.Tensor) -> tf.Tensor:
    """Sample rate from the first MPEG audio frame header (after any ID3v2 tag)."""
    tag = tf.strings.substr(contents, 0, 3) == "ID3"
    syncsafe = _bytes(contents, 6, 4)
    tag_size = (syncsafe[0] * (1 << 21) + syncsafe[1] * (1 << 14) + syncsafe[2] * 128
                + syncsafe[3] + 10
                + tf.where(_le(contents, 5, 1) // 16 % 2 == 1, tf.constant(10, tf.int64), 0))
    start = tf.where(tag, tag_size, tf.constant(0, tf.int64))
    window = _bytes(contents, start, 4096)
    sync = tf.logical_and(tf.equal(window[:-2], 0xFF), tf.equal(window[1:-1] // 32, 7))
    valid = tf.logical_and(sync, tf.not_equal((window[1:-1] // 8) % 4, 1))
    valid = tf.logical_and(valid, tf.not_equal((window[2:] // 4) % 4, 3))
    tf.debugging.assert_equal(tf.reduce_any(valid), True,
                              message="corrupt MP3: no frame header found")
    first = tf.argmax(tf.cast(valid, tf.int32))
    version = (window[first + 1] // 8) % 4
    index = (window[first + 2] // 4) % 4
    return tf.gather_nd(tf.constant(_MP3_RATES, tf.int64), tf.stack([version, index]))


def _scaled(audio: tf.Tensor, scale: float, offset: float = 0.0) -> tf.Tensor:
    """``(audio + offset) * scale`` in float32."""
    audio = tf.cast(audio, tf.float32)
    return (audio + offset if offset else audio) * scale


# WAV sample formats: name -> (encoding, bits per sample, offset, scale); the samples, read
# as integers (floats for "float32"), go to float32 in [-1, 1] as (x + offset) * scale.
# "pcm32" serves 24-bit and 32-bit integer samples, both read left-aligned in an int32
# (a 24-bit sample times 256), so one scale fits both.
_WAV_SAMPLE_FORMATS = {
    "pcm16": (1, (16,), 0.0, 1 / 32768.0),
    "pcm32": (1, (24, 32), 0.0, 1 / 2147483648.0),
    "pcm8": (1, (8,), -128.0, 1 / 128.0),
    "float32": (3, (32,), 0.0, 1.0),
}


def _wav_sample_format(encoding: int, bits: int) -> str | None:
    """The sample format (a key of the WAV decoders) of a WAV ``fmt `` chunk's encoding
    (1 PCM, 3 IEEE float; the sub-format for WAVE_FORMAT_EXTENSIBLE) and bit depth;
    None if unsupported."""
    return next((name for name, (enc, depths, _, _) in _WAV_SAMPLE_FORMATS.items()
                 if enc == encoding and bits in depths), None)


def _is_wav_format(encoding: tf.Tensor, bits: tf.Tensor, sample_format: str) -> tf.Tensor:
    """Whether a WAV encoding and bit depth (int32 tensors) make ``sample_format``."""
    expected, depths, _, _ = _WAV_SAMPLE_FORMATS[sample_format]
    bits_match = (tf.equal(bits, depths[0]) if len(depths) == 1
                  else tf.reduce_any(tf.equal(bits, depths)))
    return tf.logical_and(tf.equal(encoding, expected), bits_match)


def _fail_unless(ok: tf.Tensor, message: str) -> tf.Tensor:
    """0 (int32) if the scalar bool ``ok`` holds; else fails with ``message``.

    Eagerly the error is ``tf.debugging.assert_equal``'s, which reads ``message``. In a
    graph it comes from parsing ``message`` as a number ("StringToNumberOp could not
    correctly convert string: <message>"): a stateless check, where an Assert is stateful
    and a stateful op, or a cond holding one, costs a ``tf.data`` map function on every
    call (the WAV decoder runs once per file).
    """
    if tf.executing_eagerly():
        tf.debugging.assert_equal(ok, True, message=message)
        return tf.constant(0)
    return tf.strings.to_number(tf.where(ok, "0", message), tf.int32)


def _fail_on_first(checks: list[tuple[tf.Tensor, str]]) -> tf.Tensor:
    """0 (int32) if every ``(ok, message)`` check holds; else fails with the message of the
    first that does not. One op, so the error named is the same on every run (separate
    checks in a graph fail in no fixed order)."""
    if tf.executing_eagerly():
        for ok, message in checks:
            _fail_unless(ok, message)
        return tf.constant(0)
    verdict = tf.constant("0")
    for ok, message in reversed(checks):
        verdict = tf.where(ok, verdict, message)
    return tf.strings.to_number(verdict, tf.int32)


def _checked(wave: tf.Tensor, checks: list[tuple[tf.Tensor, str]]) -> tf.Tensor:
    """The 1-D ``wave``, available only once every ``(ok, message)`` check holds; else fails
    with the first failing check's message (:func:`_fail_on_first`: stateless, so no
    Assert op or cond in the map functions that run once per file).

    The check's 0 is the start of a slice of the whole wave (which TF forwards without a
    copy): a data dependency, since a control dependency on a stateless op is pruned from
    tf.data's optimised functions and the check would never run.
    """
    start = _fail_on_first(checks)
    # tf.slice with a 1-element start: fewer graph nodes than ``wave[start:]`` (which packs
    # begin, end and strides), and nodes count again in every tf.data iterator's start-up.
    return tf.slice(wave, tf.reshape(start, [1]), [-1])


# What the WAV header checks say, alike from the in-graph parser and the Python reader.
_NO_FMT = "corrupt WAV: no fmt chunk, or one with no channels"
_NO_DATA = ("corrupt or truncated WAV: no data chunk, or one running past the end of the "
            "file")

# RIFF chunk ids as the little-endian int32 their four bytes read as.
_FMT_ID = int.from_bytes(b"fmt ", "little", signed=True)
_DATA_ID = int.from_bytes(b"data", "little", signed=True)


def _words(contents: tf.Tensor, offset, length: int, dtype) -> tf.Tensor:
    """``length`` bytes of ``contents`` from ``offset`` (at most its length) as
    little-endian ``dtype`` words; bytes past the end of ``contents`` read as zeros."""
    raw = tf.strings.substr(contents, offset, length)
    return tf.io.decode_raw(raw, dtype, little_endian=True, fixed_length=length)


def _walk_wav_chunks(contents: tf.Tensor, size: tf.Tensor):
    """Finds the ``fmt `` and ``data`` chunks of a RIFF/WAVE file by walking its chunks.

    The chunks may come in any order, with others (``LIST``, ``fact``, ...) before or
    between them; a chunk of odd size is followed by a pad byte. The first ``fmt `` and the
    first ``data`` chunk count; the walk stops once both are found, or at a chunk that
    runs past the end of the file.

    Returns:
      int32 ``(fmt body offset, data body offset, data size)``; where a chunk is missing,
      the fmt body offset is ``size`` (its fields then read as zeros) and the data size -1.
    """
    missing = tf.constant(-1)

    def searching(offset, fmt, data, data_size):
        del data_size
        return tf.logical_and(offset + 8 <= size, tf.logical_or(fmt < 0, data < 0))

    def next_chunk(offset, fmt, data, data_size):
        chunk_id, chunk_size = tf.unstack(_words(contents, offset, 8, tf.int32))
        fmt = tf.where(tf.logical_and(fmt < 0, tf.equal(chunk_id, _FMT_ID)), offset, fmt)
        is_data = tf.logical_and(data < 0, tf.equal(chunk_id, _DATA_ID))
        data = tf.where(is_data, offset, data)
        data_size = tf.where(is_data, chunk_size, data_size)
        # Sizes of 2 GiB and more read as negative int32: they run past the end too.
        inside = tf.logical_and(chunk_size >= 0, chunk_size <= size - offset - 8)
        offset = tf.where(inside, offset + 8 + chunk_size + chunk_size % 2, size)
        return offset, fmt, data, data_size

    _, fmt, data, data_size = tf.while_loop(
        searching, next_chunk, (tf.constant(12), missing, missing, missing),
        maximum_iterations=64)
    return tf.where(fmt < 0, size, fmt + 8), data + 8, data_size


class WavLayout(NamedTuple):
    """Where a RIFF/WAVE file's samples are and how they are laid out: int32 scalar tensors
    in-graph, Python ints as :func:`read_audio_header` reads them.

    Attributes:
      encoding: 1 integer PCM, 3 IEEE float (for WAVE_FORMAT_EXTENSIBLE, its sub-format).
      channels: samples per frame.
      rate: sample rate in Hz.
      bits: bits per sample (the container size: 24 for packed 24-bit samples).
      data_offset: offset of the first sample (the ``data`` chunk's body).
      data_size: size of the ``data`` chunk's body in bytes.
    """

    encoding: tf.Tensor
    channels: tf.Tensor
    rate: tf.Tensor
    bits: tf.Tensor
    data_offset: tf.Tensor
    data_size: tf.Tensor


def _wav_layout_at(contents: tf.Tensor, fmt_body, data_offset, data_size) -> WavLayout:
    """The layout, the ``fmt `` chunk's body at ``fmt_body`` (zeros past the end)."""
    # The body as 16-bit words: format tag, channels, rate (2 words), byte rate (2), block
    # align, bits per sample, extension size, valid bits, channel mask (2) and the
    # sub-format GUID, whose first word is the encoding of WAVE_FORMAT_EXTENSIBLE.
    words = tf.unstack(tf.cast(_words(contents, fmt_body, 26, tf.uint16), tf.int32))
    tag = words[0]
    return WavLayout(tf.where(tag == 0xFFFE, words[12], tag), words[1],
                     words[2] + words[3] * 65536, words[7], data_offset, data_size)


def _wav_layout(contents: tf.Tensor, accepts: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
                refusal: str) -> WavLayout:
    """Finds a RIFF/WAVE file's ``fmt `` and ``data`` chunks and reads its format.

    Most files hold the ``fmt `` chunk (of even size) then the ``data`` chunk, and are
    valid: that is checked and read straight away in a few graph nodes (the decoders run
    once per file). Any other file takes the other branch of a (stateless) cond: walking
    its chunks (:func:`_walk_wav_chunks`), then checking what it found.

    Args:
      contents: the file's bytes.
      accepts: ``(encoding, bits) -> bool tensor``, whether the sample format is wanted.
      refusal: the error message for a sample format ``accepts`` refuses.

    Returns:
      The layout.

    Raises (in-graph), with a message naming the problem: no ``fmt `` chunk (or one with
    no channels); no ``data`` chunk, or one running past the end of the file (a truncated
    file); a sample format ``accepts`` refuses.
    """
    size = tf.strings.length(contents)

    def problems(layout: WavLayout) -> list[tuple[tf.Tensor, str]]:
        return [
            (layout.channels > 0, _NO_FMT),
            (tf.logical_and(layout.data_size >= 0,
                            layout.data_size <= size - layout.data_offset), _NO_DATA),
            (accepts(layout.encoding, layout.bits), refusal),
        ]

    # "RIFF", its size, "WAVE", then the first chunk's id and size.
    _, _, _, fmt_id, fmt_size = tf.unstack(_words(contents, 0, 20, tf.int32))
    after_fmt = tf.clip_by_value(20 + fmt_size, 0, size)
    data_id, data_size = tf.unstack(_words(contents, after_fmt, 8, tf.int32))
    straight = _wav_layout_at(contents, tf.minimum(20, size), after_fmt + 8, data_size)
    fine = [tf.equal(fmt_id, _FMT_ID), tf.equal(data_id, _DATA_ID)]
    fine += [ok for ok, _ in problems(straight)]

    def walked():
        layout = _wav_layout_at(contents, *_walk_wav_chunks(contents, size))
        return tf.stack(layout) + _fail_on_first(problems(layout))

    packed = tf.cond(tf.reduce_all(tf.stack(fine)), lambda: tf.stack(straight), walked)
    return WavLayout(*tf.unstack(packed, len(WavLayout._fields)))


def _int24_left_aligned(data: tf.Tensor) -> tf.Tensor:
    """Packed little-endian 24-bit samples -> int32, times 256 (left-aligned)."""
    b = tf.cast(tf.reshape(tf.io.decode_raw(data, tf.int8), [-1, 3]), tf.int32)
    # The two low bytes are unsigned; the top byte carries the sign.
    return (tf.bitwise.bitwise_and(b[:, 0], 0xFF) * 256
            + tf.bitwise.bitwise_and(b[:, 1], 0xFF) * 65536 + b[:, 2] * 16777216)


def _wav_samples(contents: tf.Tensor, layout: WavLayout, sample_format: str) -> tf.Tensor:
    """The samples of a WAV file -> float32 ``[frames, channels]``, the format known.

    A partial frame at the end of the ``data`` chunk is dropped.
    """
    _, depths, offset, scale = _WAV_SAMPLE_FORMATS[sample_format]
    width = depths[0] // 8 if len(depths) == 1 else layout.bits // 8
    frame = layout.channels * width
    frames = layout.data_size // frame
    data = tf.strings.substr(contents, layout.data_offset, frames * frame)
    if sample_format == "pcm32":
        samples = tf.cond(tf.equal(width, 4),
                          lambda: tf.io.decode_raw(data, tf.int32, little_endian=True),
                          lambda: _int24_left_aligned(data))
    else:
        dtype = {"pcm8": tf.uint8, "pcm16": tf.int16, "float32": tf.float32}[sample_format]
        samples = tf.io.decode_raw(data, dtype, little_endian=True)
    audio = tf.reshape(samples, [frames, layout.channels])
    return audio if sample_format == "float32" else _scaled(audio, scale, offset)


def _container(contents: tf.Tensor) -> tf.Tensor:
    """Index of the container (0 WAV, 1 FLAC, 2 Ogg, 3 MP3) from the magic bytes.

    Raises (in-graph) with a clear message for anything else.
    """
    magic = tf.strings.substr(contents, 0, 4)
    is_wav = tf.logical_and(magic == "RIFF", tf.strings.substr(contents, 8, 4) == "WAVE")
    first = _bytes(contents, 0, 2)
    is_mp3 = tf.logical_or(tf.strings.substr(contents, 0, 3) == "ID3",
                           tf.logical_and(first[0] == 0xFF, first[1] // 32 == 7))
    kinds = tf.stack([is_wav, magic == "fLaC", magic == "OggS", is_mp3])
    tf.debugging.assert_equal(tf.reduce_any(kinds), True, message=(
        "not an audio file this pipeline decodes (WAV, FLAC, Ogg Vorbis, MP3)"))
    return tf.cast(tf.argmax(tf.cast(kinds, tf.int32)), tf.int32)


@dataclasses.dataclass(frozen=True)
class AudioHeader:
    """What a file's header says, read in Python by :func:`read_audio_header`.

    Attributes:
      container: ``"wav"``, ``"flac"``, ``"ogg"`` or ``"mp3"``.
      rate: sample rate in Hz.
      wav_format: for WAV files, the sample format (``"pcm16"``, ``"pcm32"`` for 24 and
        32 bit, ``"pcm8"`` or ``"float32"``), with which :func:`load_waveform` can decode
        the file without sniffing; None for other containers and unsupported WAV
        encodings.
      wav_layout: with ``wav_format``, where the samples are (Python ints), with which
        :func:`decode_wav` skips parsing the header in-graph too; else None.
    """

    container: str
    rate: int
    wav_format: str | None = None
    wav_layout: WavLayout | None = None


class AudioHeaderError(ValueError):
    """The file's header is missing, unreadable or not one of the supported formats."""


# How many bytes of a file the header reader looks at (and the MP3 frame-sync search window,
# as in the in-graph parser).
_HEAD_BYTES = 4096


def _read_at(f, offset: int, length: int) -> bytes:
    """``length`` bytes of the open file ``f`` from ``offset`` (fewer at the end)."""
    f.seek(offset)
    return f.read(length)


def _wav_chunks(f, size: int) -> tuple[int, int, int]:
    """``(fmt chunk offset, data body offset, data body size)``, walking the chunks as the
    in-graph parser does (:func:`_walk_wav_chunks`: the first of each counts, at most 64
    chunks, a chunk running past the end of the file ends the walk).

    Raises:
      AudioHeaderError: no ``fmt `` chunk; no ``data`` chunk, or one running past the end
        of the file (a truncated file), with the in-graph decoder's messages.
    """
    offset, fmt, data, data_size = 12, -1, -1, -1
    for _ in range(64):
        if offset + 8 > size or (fmt >= 0 and data >= 0):
            break
        chunk_id, chunk_size = struct.unpack("<4sI", _read_at(f, offset, 8))
        if chunk_id == b"fmt " and fmt < 0:
            fmt = offset
        if chunk_id == b"data" and data < 0:
            data, data_size = offset + 8, chunk_size
        if chunk_size > size - offset - 8:
            break
        offset += 8 + chunk_size + chunk_size % 2
    if fmt < 0 or fmt + 24 > size:
        raise AudioHeaderError(_NO_FMT)
    if data < 0 or data_size > size - data:
        raise AudioHeaderError(_NO_DATA)
    return fmt, data, data_size


def _mp3_header_rate(f, head: bytes) -> int:
    """Sample rate of the first MPEG audio frame header (after any ID3v2 tag)."""
    start = 0
    if head[:3] == b"ID3":
        s = head[6:10].ljust(4, b"\0")
        start = (s[0] << 21) + (s[1] << 14) + (s[2] << 7) + s[3] + 10
        if len(head) > 5 and head[5] & 0x10:  # a footer follows the tag
            start += 10
    window = _read_at(f, start, _HEAD_BYTES).ljust(_HEAD_BYTES, b"\0")
    j = window.find(b"\xff")
    while 0 <= j < _HEAD_BYTES - 2:
        b1, b2 = window[j + 1], window[j + 2]
        if b1 >> 5 == 7 and (b1 >> 3) & 3 != 1 and (b2 >> 2) & 3 != 3:
            return _MP3_RATES[(b1 >> 3) & 3][(b2 >> 2) & 3]
        j = window.find(b"\xff", j + 1)
    raise AudioHeaderError("corrupt MP3: no frame header found")


def _parse_header(f, size: int) -> AudioHeader:
    """:func:`read_audio_header` of the open file ``f`` of ``size`` bytes."""
    head = f.read(_HEAD_BYTES)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        fmt_offset, data_offset, data_size = _wav_chunks(f, size)
        fmt = _read_at(f, fmt_offset, 34).ljust(34, b"\0")
        encoding, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt[8:24])
        if encoding == 0xFFFE:  # WAVE_FORMAT_EXTENSIBLE: the encoding is in the sub-format
            encoding = struct.unpack("<H", fmt[32:34])[0]
        if channels == 0:
            raise AudioHeaderError(_NO_FMT)
        wav_format = _wav_sample_format(encoding, bits)
        layout = (WavLayout(encoding, channels, rate, bits, data_offset, data_size)
                  if wav_format else None)
        return AudioHeader("wav", rate, wav_format, layout)
    if head[:4] == b"fLaC":
        b = head[18:22].ljust(4, b"\0")
        return AudioHeader("flac", (b[0] << 12) + (b[1] << 4) + (b[2] >> 4))
    if head[:4] == b"OggS":
        packet = 27 + (head[26] if len(head) > 26 else 0)
        if head[packet:packet + 7] != b"\x01vorbis":
            raise AudioHeaderError("Ogg file is not Vorbis audio")
        rate_bytes = head[packet + 12:packet + 16].ljust(4, b"\0")
        return AudioHeader("ogg", struct.unpack("<I", rate_bytes)[0])
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] >> 5 == 7):
        return AudioHeader("mp3", _mp3_header_rate(f, head))
    raise AudioHeaderError(
        "not an audio file this pipeline decodes (WAV, FLAC, Ogg Vorbis, MP3)")


def read_audio_header(path: str | os.PathLike) -> AudioHeader:
    """Reads a file's container and sample rate from its first bytes, in Python.

    The same parsing as the in-graph decoder (:func:`decode_audio`), without TensorFlow:
    a few small reads per file (tens of microseconds), so a corpus can be grouped by rate
    and format before its tf.data pipeline is built.

    Args:
      path: the file.

    Returns:
      The header's facts.

    Raises:
      OSError: the file cannot be opened or read.
      AudioHeaderError: not a supported container, or a corrupt or truncated header.
    """
    with open(path, "rb") as f:
        header = _parse_header(f, os.fstat(f.fileno()).st_size)
    if header.rate <= 0:
        raise AudioHeaderError(f"corrupt {header.container} header: sample rate {header.rate}")
    return header


def decode_audio(path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Decodes an audio file of any supported format (WAV, FLAC, Ogg Vorbis, MP3).

    The container is recognised from its magic bytes, its header parsed in-graph for the
    sample rate and sample format, and the samples decoded: WAV by our decoder of TF core
    ops, the others by tensorflow-io's stateless decoders. (tfio's ``AudioIOTensor`` reads
    rate and type for us but holds a shared resource per op, which races when tf.data
    decodes files in parallel.)

    Args:
      path: scalar string tensor, the file's path.

    Returns:
      ``(audio, rate)``: float32 ``[samples, channels]`` in [-1, 1] and the int64 rate.

    Raises:
      tf.errors.OpError: the file is missing, unreadable, not audio, corrupt or truncated.
    """
    contents = tf.io.read_file(path)
    kind = _container(contents)

    def wav():
        formats = list(_WAV_SAMPLE_FORMATS)

        def supported(encoding, bits):
            return tf.reduce_any(tf.stack([_is_wav_format(encoding, bits, f)
                                           for f in formats]))

        layout = _wav_layout(contents, supported, "unsupported WAV encoding (need PCM "
                                                  "8/16/24/32-bit or 32-bit float)")
        cases = tf.stack([_is_wav_format(layout.encoding, layout.bits, f) for f in formats])
        branch = tf.cast(tf.argmax(tf.cast(cases, tf.int32)), tf.int32)
        decoders = [functools.partial(_wav_samples, contents, layout, f) for f in formats]
        return tf.switch_case(branch, decoders), tf.cast(layout.rate, tf.int64)

    def flac():
        rate, bits = _flac_rate(contents)
        audio = tf.cond(bits <= 16,
                        lambda: _scaled(tfio.audio.decode_flac(contents, dtype=tf.int16),
                                        1 / 32768.0),
                        lambda: _scaled(tfio.audio.decode_flac(contents, dtype=tf.int32),
                                        1 / 2147483648.0))
        return audio, rate

    def vorbis():
        return tfio.audio.decode_vorbis(contents), _vorbis_rate(contents)

    def mp3():
        return tfio.audio.decode_mp3(contents), _mp3_rate(contents)

    audio, rate = tf.switch_case(kind, [wav, flac, vorbis, mp3])
    audio = tf.ensure_shape(tf.cast(audio, tf.float32), [None, None])
    return audio, tf.cast(rate, tf.int64)


def to_mono(audio: tf.Tensor) -> tf.Tensor:
    """Down-mixes ``[samples, channels]`` to ``[samples]`` by averaging the channels."""
    return tf.reduce_mean(audio, axis=-1)


def resample_to(waveform: tf.Tensor, rate: tf.Tensor, target_rate: int,
                quality: str = "hq") -> tf.Tensor:
    """Resamples a mono waveform from a rate known only at run time to ``target_rate``.

    Common rates take the fast polyphase path (one compiled branch per rate, selected
    in-graph); others use ``tfio.audio.resample``.

    Args:
      waveform: ``[samples]`` float32.
      rate: scalar integer tensor, the waveform's rate.
      target_rate: the wanted rate (static).
      quality: quality of the polyphase path.

    Returns:
      ``[samples']`` float32 at ``target_rate``.
    """
    rate = tf.cast(rate, tf.int64)
    tf.debugging.assert_positive(rate, message="audio sample rate must be positive")
    rates = tf.constant(COMMON_RATES, tf.int64)
    matches = tf.equal(rates, rate)

    def fast(r: int):
        return lambda: resample(waveform, r, target_rate, quality=quality)

    def general():
        out = tfio.audio.resample(waveform[:, None], rate, target_rate)
        return out[:, 0]

    index = tf.where(tf.reduce_any(matches),
                     tf.cast(tf.argmax(tf.cast(matches, tf.int32)), tf.int32),
                     len(COMMON_RATES))
    out = tf.switch_case(index, [fast(r) for r in COMMON_RATES] + [general])
    return tf.ensure_shape(out, [None])


def trim_silence(waveform: tf.Tensor, top_db: float, frame_length: int = 1024,
                 hop_length: int = 256) -> tf.Tensor:
    """Removes leading and trailing frames quieter than ``top_db`` below the loudest frame.

    Frame energies are RMS over ``frame_length`` windows every ``hop_length`` samples (the
    rule ``librosa.effects.trim`` uses); the kept span runs from the first to the end of the
    last loud frame. Silent input comes back empty.

    Args:
      waveform: ``[samples]`` float32.
      top_db: threshold in dB below the peak frame.
      frame_length: analysis frame in samples.
      hop_length: hop between frames in samples.

    Returns:
      The trimmed waveform.
    """
    n = tf.shape(waveform)[0]
    padded = tf.pad(waveform, [[0, tf.maximum(0, frame_length - n)]])
    frames = tf.signal.frame(padded, frame_length, hop_length, pad_end=True)
    rms = tf.sqrt(tf.reduce_mean(tf.square(frames), axis=-1))
    peak = tf.reduce_max(rms)
    loud = tf.where(rms > tf.maximum(peak * 10.0 ** (-top_db / 20.0), 1e-10))[:, 0]
    empty = tf.equal(tf.size(loud), 0)
    start = tf.where(empty, 0, tf.cast(tf.reduce_min(loud), tf.int32) * hop_length)
    stop = tf.where(empty, 0, tf.minimum(
        n, (tf.cast(tf.reduce_max(loud), tf.int32)) * hop_length + frame_length))
    return waveform[start:stop]


def normalize_level(waveform: tf.Tensor, mode: str, level_db: float) -> tf.Tensor:
    """Scales a waveform so its peak or RMS sits at ``level_db`` dBFS (``mode="none"``: as is)."""
    if mode == "none":
        return waveform
    target = 10.0 ** (level_db / 20.0)
    if mode == "peak":
        current = tf.reduce_max(tf.abs(waveform))
    else:
        current = tf.sqrt(tf.reduce_mean(tf.square(waveform)))
    scaled = waveform * (target / tf.maximum(current, 1e-8))
    # RMS normalisation may push peaks past full scale; keep samples in the valid range.
    return tf.clip_by_value(scaled, -1.0, 1.0)


def decode_wav(path: tf.Tensor, sample_format: str,
               layout: WavLayout | None = None) -> tf.Tensor:
    """Decodes a WAV file whose sample format is known (from :func:`read_audio_header`).

    The lean path: the WAV decoder for that sample format alone, without the container and
    format dispatch of :func:`decode_audio` (a much smaller graph); same output as
    :func:`decode_audio` for the file. With the file's ``layout`` too, the header is not
    parsed in-graph at all: the samples are read where the layout says, after one check
    that the file still holds them (a cheaper function per file, and faster to instantiate,
    which every new tf.data iterator does).

    Args:
      path: scalar string tensor, the file's path.
      sample_format: ``"pcm16"``, ``"pcm32"`` (24 and 32 bit), ``"pcm8"`` or ``"float32"``.
      layout: the file's ``read_audio_header(path).wav_layout`` (ints or int tensors),
        taken on trust but for the file's length; None parses the header in-graph.

    Returns:
      float32 ``[samples, channels]`` in [-1, 1].

    Raises:
      ValueError: unknown ``sample_format``.
      tf.errors.OpError: the file is missing, unreadable, corrupt, truncated or not in that
        format.
    """
    if sample_format not in _WAV_SAMPLE_FORMATS:
        raise ValueError(f"sample_format must be one of {sorted(_WAV_SAMPLE_FORMATS)}, "
                         f"got {sample_format!r}")
    contents = tf.io.read_file(path)
    if layout is None:
        layout = _wav_layout(
            contents, functools.partial(_is_wav_format, sample_format=sample_format),
            f"WAV sample format differs from the one probed ({sample_format})")
    else:
        layout = WavLayout(*layout)
        layout = layout._replace(**{  # only the fields the decoder reads
            f: tf.cast(getattr(layout, f), tf.int32)
            for f in ("channels", "bits", "data_offset", "data_size")})
        fits = layout.data_offset + layout.data_size <= tf.strings.length(contents)
        # The check's 0 joins the offset: the samples are read only once it has passed.
        offset = layout.data_offset + _fail_unless(fits, (
            "corrupt or truncated WAV: the data chunk runs past the end of the file "
            "(shorter than when its header was read)"))
        layout = layout._replace(data_offset=offset)
    return _wav_samples(contents, layout, sample_format)


def load_waveform(path: tf.Tensor, config: AudioConfig, rate: int | None = None,
                  wav_format: str | None = None,
                  wav_layout: WavLayout | None = None) -> tf.Tensor:
    """File -> conditioned mono waveform at ``config.sample_rate`` (graph function).

    Decode, down-mix, check, resample, trim, check length, normalise level.

    Args:
      path: scalar string tensor.
      config: how to condition the audio.
      rate: the file's sample rate if known in advance (from :func:`read_audio_header`):
        the resampler is then built for that rate alone, a much smaller and faster graph
        than the run-time dispatch over every common rate used when it is None.
      wav_format: the sample format of a WAV file, if known in advance
        (``read_audio_header(path).wav_format``): the file is then decoded by
        :func:`decode_wav` alone, skipping the format sniffing and header parsing, and
        ``rate`` is taken on trust. Needs ``rate``.
      wav_layout: where that WAV file's samples are (``read_audio_header(path).wav_layout``,
        ints or int tensors): the header is then not parsed in-graph (:func:`decode_wav`).
        Needs ``wav_format``.

    Raises:
      ValueError: ``wav_format`` without ``rate``, ``wav_layout`` without ``wav_format``,
        or an unknown ``wav_format``.
      tf.errors.InvalidArgumentError: the audio is empty, silent, too short or not finite
        (the message says which); decoding errors propagate from the decoder.
    """
    if wav_layout is not None and wav_format is None:
        raise ValueError("wav_layout needs the file's wav_format")
    if wav_format is not None:
        if rate is None:
            raise ValueError("wav_format needs the file's rate")
        audio, file_rate = decode_wav(path, wav_format, wav_layout), None
    else:
        audio, file_rate = decode_audio(path)
    wave = to_mono(audio)
    checks = [(tf.size(wave) > 0, "empty audio (no samples)")]
    if wav_format in (None, "float32"):  # integer samples are always finite
        checks.append((tf.reduce_all(tf.math.is_finite(wave)), "audio has NaN or Inf samples"))
    wave = _checked(wave, checks)
    if rate is None:
        wave = resample_to(wave, file_rate, config.sample_rate, config.resample_quality)
    else:
        if file_rate is not None:
            wave = _checked(wave, [(tf.equal(file_rate, rate),
                                    "sample rate differs from the one probed")])
        wave = resample(wave, rate, config.sample_rate, quality=config.resample_quality)
    return condition(wave, config)


def condition(wave: tf.Tensor, config: AudioConfig) -> tf.Tensor:
    """A mono waveform at ``config.sample_rate`` -> the model's input conditioning.

    Checks it is not silent, trims silence, checks the length left, normalises the level:
    the last steps of :func:`load_waveform`, and what served models apply to raw audio,
    so that training and serving condition audio with the same ops.

    Raises:
      tf.errors.InvalidArgumentError: silent, or too short after trimming.
    """
    # Each check gates what follows it, so bad audio fails with its own message rather than
    # in whichever op on it happens to run first.
    wave = _checked(wave, [(tf.reduce_max(tf.abs(wave)) > 1e-6,
                            "silent audio (all samples zero)")])
    if config.trim_db is not None:
        wave = trim_silence(wave, config.trim_db)
    min_samples = int(config.min_duration_s * config.sample_rate)
    wave = _checked(wave, [(tf.size(wave) >= max(1, min_samples),
                            "audio too short after trimming")])
    return normalize_level(wave, config.normalize, config.level_db)
