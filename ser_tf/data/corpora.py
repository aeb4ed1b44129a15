"""Corpus adapters: list the utterances of a speech emotion corpus with their metadata.

Every adapter returns a list of :class:`Utterance` records built from the corpus's own
file-name conventions, with emotions mapped onto the common vocabulary :data:`EMOTIONS`.
Adapters only read names (and, for CREMA-D, an optional demographics CSV); they never decode
audio. They exist for EmoDB, RAVDESS, CREMA-D and TESS, plus a generic CSV manifest
(:func:`manifest` / :func:`write_manifest`) that the synthetic corpus also uses;
:func:`load_corpus` picks one by name.

The second half selects classes: named subsets from the literature (:data:`CLASS_SETS`),
merge maps (:func:`parse_merge`), filtering (:func:`select_classes`) and counts for logs
(:func:`summarize`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, Union

# The common emotion vocabulary every corpus is mapped onto.
EMOTIONS = ("neutral", "calm", "happiness", "sadness", "anger", "fear", "disgust",
            "surprise", "boredom")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One labelled utterance of a corpus.

    Attributes:
      path: absolute path of the audio file.
      emotion: label in the common vocabulary (:data:`EMOTIONS`).
      speaker: speaker id, unique within the corpus (e.g. ``"03"`` for EmoDB).
      gender: ``"female"``, ``"male"`` or ``"unknown"``.
      language: ISO 639-1 code (``"de"``, ``"en"``, ...).
      corpus: corpus name (``"emodb"``, ``"ravdess"``, ``"synthetic"``, ...).
    """

    path: str
    emotion: str
    speaker: str
    gender: str
    language: str
    corpus: str


# --------------------------------------------------------------------------------------
# Errors, constants and shared helpers.
# --------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# Extensions treated as audio; every other file (README, CSV, .txt, ...) is ignored.
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".mp3"})

GENDERS = ("female", "male", "unknown")

MANIFEST_COLUMNS = ("path", "emotion", "speaker", "gender", "language", "corpus")
MANIFEST_REQUIRED = ("path", "emotion", "speaker")
MANIFEST_NAME = "manifest.csv"


class LabelError(ValueError):
    """A file or manifest row whose name or label does not follow the corpus convention."""


def _allowed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _check_codes(corpus: str, path: Path, checks: Iterable[tuple[str, str, Iterable[str]]]
                 ) -> None:
    """Raises a LabelError naming the file for the first ``(field, value, allowed)`` whose
    value is not allowed."""
    for field, value, allowed in checks:
        if value not in allowed:
            raise LabelError(f"{corpus}: unknown {field} {value!r} in {path}; "
                             f"allowed: {_allowed(allowed)}")


def _check_dir(data_dir: PathLike, corpus: str, layout: str) -> Path:
    """Returns ``data_dir`` as an absolute Path, or raises a FileNotFoundError that explains
    which corpus was being read and what layout was expected."""
    path = Path(os.path.abspath(os.fspath(data_dir)))
    if not path.exists():
        raise FileNotFoundError(
            f"{corpus}: data directory {path} does not exist; expected {layout}")
    if not path.is_dir():
        raise FileNotFoundError(
            f"{corpus}: {path} is not a directory; expected {layout}")
    return path


def _is_audio(path: Path) -> bool:
    # Hidden files are skipped: macOS copies leave '._03a01Fa.wav' AppleDouble stubs beside
    # the real files, which would otherwise look like malformed audio names.
    return (path.is_file() and not path.name.startswith(".")
            and path.suffix.lower() in AUDIO_EXTENSIONS)


def _audio_files(folders: Iterable[Path], recursive: bool = False) -> list[Path]:
    """Audio files directly in (or, if ``recursive``, anywhere under) ``folders``."""
    files: list[Path] = []
    for folder in folders:
        candidates = folder.rglob("*") if recursive else folder.iterdir()
        files.extend(p for p in candidates if _is_audio(p))
    return sorted(files, key=str)


def _no_audio(corpus: str, searched: Sequence[Path], layout: str) -> FileNotFoundError:
    where = ", ".join(str(p) for p in searched)
    return FileNotFoundError(
        f"{corpus}: no audio files ({_allowed(AUDIO_EXTENSIONS)}) found in {where}; "
        f"expected {layout}")


def _abspath(path: PathLike) -> str:
    # abspath rather than resolve(): keep the user's spelling of symlinked folders.
    return os.path.abspath(os.fspath(path))


def _sorted(utterances: Iterable[Utterance]) -> list[Utterance]:
    return sorted(utterances, key=lambda u: u.path)


# --------------------------------------------------------------------------------------
# Berlin EmoDB.
# --------------------------------------------------------------------------------------

EMODB_EMOTIONS = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear",
                  "F": "happiness", "T": "sadness", "N": "neutral"}
EMODB_SPEAKERS = {"03": "male", "08": "female", "09": "female", "10": "male", "11": "male",
                  "12": "male", "13": "female", "14": "female", "15": "male", "16": "female"}
# speaker (2 digits), text id (letter + 2 digits), emotion letter, version letter.
_EMODB_NAME = re.compile(r"^(\d\d)([a-z]\d\d)([A-Z])([a-z])$")
_EMODB_LAYOUT = ("the EmoDB root holding wav/ or the wav folder itself, "
                 "with files named like 03a01Fa.wav")


def emodb(data_dir: PathLike) -> list[Utterance]:
    """Lists the Berlin Database of Emotional Speech (EmoDB).

    Args:
      data_dir: the corpus root that holds ``wav/``, or the ``wav`` folder itself.

    Returns:
      Utterances sorted by path; ``speaker`` is the two-digit speaker id, language ``"de"``.

    Raises:
      FileNotFoundError: ``data_dir`` is missing or holds no audio.
      LabelError: a file name does not follow ``SSTTTEV.wav`` or has an unknown emotion
        letter or speaker id.
    """
    root = _check_dir(data_dir, "emodb", _EMODB_LAYOUT)
    folder = root / "wav" if (root / "wav").is_dir() else root
    files = _audio_files([folder])
    if not files:
        raise _no_audio("emodb", [folder], _EMODB_LAYOUT)
    utterances = []
    for path in files:
        match = _EMODB_NAME.match(path.stem)
        if match is None:
            raise LabelError(
                f"emodb: file name {path} does not follow the EmoDB convention "
                "SSTTTEV (speaker, text, emotion, version), e.g. 03a01Fa.wav")
        speaker, _, code, _ = match.groups()
        _check_codes("emodb", path, (("emotion code", code, EMODB_EMOTIONS),
                                     ("speaker id", speaker, EMODB_SPEAKERS)))
        utterances.append(Utterance(path=_abspath(path), emotion=EMODB_EMOTIONS[code],
                                    speaker=speaker, gender=EMODB_SPEAKERS[speaker],
                                    language="de", corpus="emodb"))
    return _sorted(utterances)


# --------------------------------------------------------------------------------------
# RAVDESS (speech, audio only).
# --------------------------------------------------------------------------------------

RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happiness", "04": "sadness",
                    "05": "anger", "06": "fear", "07": "disgust", "08": "surprise"}
_RAVDESS_MODALITIES = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
_RAVDESS_CHANNELS = {"01": "speech", "02": "song"}
_RAVDESS_INTENSITIES = {"01", "02"}
_RAVDESS_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
_RAVDESS_ACTOR_DIR = re.compile(r"^actor_\d+$", re.IGNORECASE)
_RAVDESS_LAYOUT = ("the RAVDESS speech folder holding Actor_XX/ folders (or the files "
                   "directly), with files named like 03-01-05-01-02-01-12.wav")


def ravdess(data_dir: PathLike) -> list[Utterance]:
    """Lists the audio-only speech part of RAVDESS.

    Song (vocal channel 02) and video modalities (01, 02) are skipped; how many were skipped
    is logged at INFO.

    Args:
      data_dir: folder holding ``Actor_XX/`` folders, or the audio files directly.

    Returns:
      Utterances sorted by path; ``speaker`` is the two-digit actor number (odd = male,
      even = female), language ``"en"``.

    Raises:
      FileNotFoundError: ``data_dir`` is missing or holds no audio-only speech.
      LabelError: a file name is not ``MM-VV-EE-II-SS-RR-AA`` or has an unknown code.
    """
    root = _check_dir(data_dir, "ravdess", _RAVDESS_LAYOUT)
    folders = [root] + sorted(p for p in root.iterdir()
                              if p.is_dir() and _RAVDESS_ACTOR_DIR.match(p.name))
    files = _audio_files(folders)
    if not files:
        raise _no_audio("ravdess", [root], _RAVDESS_LAYOUT)
    utterances = []
    skipped = {"song": 0, "video": 0}
    for path in files:
        match = _RAVDESS_NAME.match(path.stem)
        if match is None:
            raise LabelError(
                f"ravdess: file name {path} does not follow the RAVDESS convention "
                "MM-VV-EE-II-SS-RR-AA (modality, vocal channel, emotion, intensity, "
                "statement, repetition, actor), e.g. 03-01-05-01-02-01-12.wav")
        modality, channel, code, intensity, _, _, actor = match.groups()
        _check_codes("ravdess", path, (("modality code", modality, _RAVDESS_MODALITIES),
                                       ("vocal channel code", channel, _RAVDESS_CHANNELS),
                                       ("emotion code", code, RAVDESS_EMOTIONS),
                                       ("intensity code", intensity, _RAVDESS_INTENSITIES)))
        if actor == "00":
            raise LabelError(f"ravdess: actor 00 in {path}; actors are numbered from 01")
        # Video files are counted as video even when they are song: they are dropped either way.
        if modality != "03":
            skipped["video"] += 1
            continue
        if channel != "01":
            skipped["song"] += 1
            continue
        utterances.append(Utterance(path=_abspath(path), emotion=RAVDESS_EMOTIONS[code],
                                    speaker=actor,
                                    gender="male" if int(actor) % 2 else "female",
                                    language="en", corpus="ravdess"))
    if any(skipped.values()):
        logger.info("ravdess: kept %d audio-only speech files, skipped %d song and %d video "
                    "files", len(utterances), skipped["song"], skipped["video"])
    if not utterances:
        raise FileNotFoundError(
            f"ravdess: no audio-only speech files (modality 03, vocal channel 01) in {root}; "
            f"found only {skipped['song']} song and {skipped['video']} video files")
    return _sorted(utterances)


# --------------------------------------------------------------------------------------
# CREMA-D.
# --------------------------------------------------------------------------------------

CREMAD_EMOTIONS = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happiness",
                   "NEU": "neutral", "SAD": "sadness"}
_CREMAD_LEVELS = {"LO", "MD", "HI", "XX"}
_CREMAD_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_CREMAD_DEMOGRAPHICS = "VideoDemographics.csv"
_CREMAD_LAYOUT = ("the CREMA-D root holding AudioWAV/ (and VideoDemographics.csv) or the "
                  "AudioWAV folder itself, with files named like 1001_DFA_ANG_XX.wav")


def _cremad_genders(csv_path: Path) -> dict[str, str]:
    genders = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            actor = (row.get("ActorID") or "").strip()
            sex = (row.get("Sex") or "").strip().lower()
            if actor:
                genders[actor] = sex if sex in ("female", "male") else "unknown"
    return genders


def cremad(data_dir: PathLike) -> list[Utterance]:
    """Lists CREMA-D.

    Genders come from ``VideoDemographics.csv`` (columns ``ActorID``, ``Sex``, ...) looked up
    in ``data_dir`` and then its parent; without it every gender is ``"unknown"`` and one
    warning is logged.

    Args:
      data_dir: the corpus root holding ``AudioWAV/``, or the ``AudioWAV`` folder itself.

    Returns:
      Utterances sorted by path; ``speaker`` is the four-digit actor id, language ``"en"``.

    Raises:
      FileNotFoundError: ``data_dir`` is missing or holds no audio.
      LabelError: a file name is not ``AAAA_SSS_EEE_LL`` or has an unknown emotion or level.
    """
    root = _check_dir(data_dir, "cremad", _CREMAD_LAYOUT)
    folder = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
    files = _audio_files([folder])
    if not files:
        raise _no_audio("cremad", [folder], _CREMAD_LAYOUT)
    csv_path = next((d / _CREMAD_DEMOGRAPHICS for d in (root, root.parent)
                     if (d / _CREMAD_DEMOGRAPHICS).is_file()), None)
    if csv_path is None:
        genders: dict[str, str] = {}
        logger.warning("cremad: %s not found in %s or its parent; genders set to 'unknown'",
                       _CREMAD_DEMOGRAPHICS, root)
    else:
        genders = _cremad_genders(csv_path)
    utterances = []
    for path in files:
        match = _CREMAD_NAME.match(path.stem)
        if match is None:
            raise LabelError(
                f"cremad: file name {path} does not follow the CREMA-D convention "
                "AAAA_SSS_EEE_LL (actor, sentence, emotion, level), e.g. 1001_DFA_ANG_XX.wav")
        actor, _, code, level = match.groups()
        _check_codes("cremad", path, (("emotion code", code, CREMAD_EMOTIONS),
                                      ("level code", level, _CREMAD_LEVELS)))
        utterances.append(Utterance(path=_abspath(path), emotion=CREMAD_EMOTIONS[code],
                                    speaker=actor, gender=genders.get(actor, "unknown"),
                                    language="en", corpus="cremad"))
    if csv_path is not None:
        missing = sorted({u.speaker for u in utterances} - set(genders))
        if missing:
            logger.warning("cremad: %d actors missing from %s, gender 'unknown': %s",
                           len(missing), csv_path, ", ".join(missing))
    return _sorted(utterances)


# --------------------------------------------------------------------------------------
# TESS.
# --------------------------------------------------------------------------------------

# Keys are lower case: the published files mix 'Fear'/'fear' and similar.
TESS_EMOTIONS = {"angry": "anger", "disgust": "disgust", "fear": "fear", "happy": "happiness",
                 "neutral": "neutral", "ps": "surprise", "sad": "sadness"}
# Some redistributions spell the 'ps' code out like the folder names do.
_TESS_ALIASES = {"pleasant_surprise": "ps", "pleasant_surprised": "ps"}
TESS_SPEAKERS = ("OAF", "YAF")
_TESS_NAME = re.compile(r"^([A-Za-z]+)_([A-Za-z]+)_([A-Za-z_]+)$")
_TESS_LAYOUT = ("the TESS folder holding files named like OAF_back_angry.wav, directly or "
                "in subfolders such as OAF_angry/")


def tess(data_dir: PathLike) -> list[Utterance]:
    """Lists the Toronto Emotional Speech Set (TESS).

    Files are searched recursively. Names are matched case-insensitively. A file name seen
    twice (some redistributions nest a second copy of the corpus) is kept once, with a
    warning, so that the copies cannot land on both sides of a split.

    Args:
      data_dir: folder holding the TESS files, directly or in subfolders.

    Returns:
      Utterances sorted by path; ``speaker`` is ``"OAF"`` or ``"YAF"`` (both female),
      language ``"en"``.

    Raises:
      FileNotFoundError: ``data_dir`` is missing or holds no audio.
      LabelError: a file name is not ``SPK_word_emotion`` or has an unknown speaker or
        emotion.
    """
    root = _check_dir(data_dir, "tess", _TESS_LAYOUT)
    files = _audio_files([root], recursive=True)
    if not files:
        raise _no_audio("tess", [root], _TESS_LAYOUT)
    utterances = []
    seen: dict[str, Path] = {}
    duplicates = 0
    for path in files:
        match = _TESS_NAME.match(path.stem)
        if match is None:
            raise LabelError(
                f"tess: file name {path} does not follow the TESS convention "
                "SPEAKER_word_emotion, e.g. OAF_back_angry.wav")
        speaker, _, code = match.groups()
        speaker, code = speaker.upper(), code.lower()
        code = _TESS_ALIASES.get(code, code)
        _check_codes("tess", path, (("speaker", speaker, TESS_SPEAKERS),
                                    ("emotion code", code, TESS_EMOTIONS)))
        key = path.name.lower()
        if key in seen:
            duplicates += 1
            continue
        seen[key] = path
        utterances.append(Utterance(path=_abspath(path), emotion=TESS_EMOTIONS[code],
                                    speaker=speaker, gender="female", language="en",
                                    corpus="tess"))
    if duplicates:
        logger.warning("tess: ignored %d files whose names repeat an earlier file under %s",
                       duplicates, root)
    return _sorted(utterances)


# --------------------------------------------------------------------------------------
# Generic CSV manifests.
# --------------------------------------------------------------------------------------

def manifest(path: PathLike, default_corpus: str | None = None) -> list[Utterance]:
    """Reads a CSV manifest (header ``path,emotion,speaker[,gender,language,corpus]``).

    Args:
      path: the CSV file. Relative audio paths resolve against its folder.
      default_corpus: corpus name for rows without one; default the CSV file's stem.

    Returns:
      Utterances sorted by path. Missing ``gender`` is ``"unknown"`` and missing
      ``language`` is ``"und"``. Audio files are not checked for existence.

    Raises:
      FileNotFoundError: the CSV is missing or lists no utterances.
      ValueError: the header lacks a required column.
      LabelError: a row has an empty required field, an emotion outside :data:`EMOTIONS` or
        a gender outside ``female``/``male``/``unknown`` (the message gives the line).
    """
    csv_path = Path(_abspath(path))
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"manifest: CSV file {csv_path} does not exist; expected a CSV with header "
            f"{','.join(MANIFEST_COLUMNS)} (gender, language and corpus optional)")
    corpus_default = default_corpus or csv_path.stem
    utterances = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in MANIFEST_REQUIRED if c not in header]
        if missing:
            raise ValueError(f"manifest: {csv_path} lacks required column(s) "
                             f"{', '.join(missing)}; header is {','.join(header)!r}")
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            where = f"{csv_path} line {line}"
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not any(values.values()):
                continue  # blank line
            for column in MANIFEST_REQUIRED:
                if not values.get(column):
                    raise LabelError(f"manifest: {where}: empty {column!r}")
            emotion = values["emotion"].lower()
            if emotion not in EMOTIONS:
                raise LabelError(f"manifest: {where}: unknown emotion {values['emotion']!r} "
                                 f"for {values['path']}; allowed: {', '.join(EMOTIONS)}")
            gender = (values.get("gender") or "unknown").lower()
            if gender not in GENDERS:
                raise LabelError(f"manifest: {where}: unknown gender {values['gender']!r} "
                                 f"for {values['path']}; allowed: {', '.join(GENDERS)}")
            audio = Path(values["path"])
            if not audio.is_absolute():
                audio = csv_path.parent / audio
            utterances.append(Utterance(
                path=_abspath(audio), emotion=emotion, speaker=values["speaker"],
                gender=gender, language=values.get("language") or "und",
                corpus=values.get("corpus") or corpus_default))
    if not utterances:
        raise FileNotFoundError(f"manifest: {csv_path} lists no utterances")
    return _sorted(utterances)


def write_manifest(utterances: Iterable[Utterance], path: PathLike) -> Path:
    """Writes utterances as a CSV manifest readable by :func:`manifest`.

    Columns are ``path,emotion,speaker,gender,language,corpus``; audio paths are written
    relative to the CSV's folder (with ``/`` separators) so the folder can be moved.

    Args:
      utterances: records to write, in the order given.
      path: the CSV file to create; missing parent folders are created.

    Returns:
      The absolute path of the CSV written.
    """
    csv_path = Path(_abspath(path))
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for u in utterances:
            try:
                rel = Path(os.path.relpath(_abspath(u.path), csv_path.parent)).as_posix()
            except ValueError:  # Windows: a different drive has no relative path.
                rel = _abspath(u.path)
            writer.writerow([rel, u.emotion, u.speaker, u.gender, u.language, u.corpus])
    return csv_path


def _manifest_csv(data_dir: PathLike, corpus: str) -> Path:
    path = Path(_abspath(data_dir))
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{corpus}: {path} does not exist; expected a manifest CSV or a folder "
            f"holding {MANIFEST_NAME}")
    return path


def _load_manifest(data_dir: PathLike) -> list[Utterance]:
    return manifest(_manifest_csv(data_dir, "manifest"))


def _load_synthetic(data_dir: PathLike) -> list[Utterance]:
    return manifest(_manifest_csv(data_dir, "synthetic"), default_corpus="synthetic")


# Corpus name -> adapter taking the data directory (or manifest path).
CORPORA: dict[str, Callable[[PathLike], list[Utterance]]] = {
    "emodb": emodb,
    "ravdess": ravdess,
    "cremad": cremad,
    "tess": tess,
    "manifest": _load_manifest,
    "synthetic": _load_synthetic,
}


def load_corpus(name: str, data_dir: PathLike) -> list[Utterance]:
    """Lists a corpus by name.

    Args:
      name: one of :data:`CORPORA` (``emodb``, ``ravdess``, ``cremad``, ``tess``,
        ``manifest``, ``synthetic``); case-insensitive.
      data_dir: the corpus folder; for ``manifest`` the CSV or a folder holding
        ``manifest.csv``; for ``synthetic`` a folder holding ``manifest.csv``.

    Returns:
      Utterances sorted by path.

    Raises:
      ValueError: unknown corpus name.
    """
    key = (name or "").strip().lower()
    if key not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)}")
    utterances = CORPORA[key](data_dir)
    logger.info("%s: %d utterances from %s", key, len(utterances), data_dir)
    return utterances


# --------------------------------------------------------------------------------------
# Class selection.
# --------------------------------------------------------------------------------------

# Named class subsets; tuple order is the label index order (alphabetical throughout, so
# that a class keeps its index across the sets that share it where possible).
CLASS_SETS: dict[str, tuple[str, ...]] = {
    "emodb7": ("anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"),
    # Facchinetti et al. 2024: EmoDB without fear and anger.
    "emodb5": ("boredom", "disgust", "happiness", "neutral", "sadness"),
    "ravdess8": ("anger", "calm", "disgust", "fear", "happiness", "neutral", "sadness",
                 "surprise"),
    # Facchinetti et al. 2024: RAVDESS without neutral, calm and anger.
    "ravdess5": ("disgust", "fear", "happiness", "sadness", "surprise"),
    "cremad6": ("anger", "disgust", "fear", "happiness", "neutral", "sadness"),
    "tess7": ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise"),
    "big4": ("anger", "happiness", "neutral", "sadness"),
}


def _check_emotion(name: str, what: str) -> str:
    if name not in EMOTIONS:
        raise ValueError(f"unknown emotion {name!r} in {what}; allowed: {', '.join(EMOTIONS)}")
    return name


def resolve_classes(spec: str | Sequence[str] | None,
                    utterances: Iterable[Utterance] | None = None) -> tuple[str, ...]:
    """Turns a class specification into an ordered tuple of emotions.

    Args:
      spec: a :data:`CLASS_SETS` name (``"emodb5"``), a comma list of emotions
        (``"anger,neutral"``, kept in the order given), a sequence of emotions, or
        empty/None for every emotion present in ``utterances`` in :data:`EMOTIONS` order.
      utterances: needed when ``spec`` is empty; otherwise used only to warn about
        requested classes that have no utterance.

    Returns:
      The classes; position = label index.

    Raises:
      ValueError: unknown set or emotion name, a repeated class, or an empty spec without
        utterances.
    """
    utterances = None if utterances is None else list(utterances)
    if isinstance(spec, str):
        spec = spec.strip()
    if not spec:
        if utterances is None:
            raise ValueError("an empty class spec needs utterances to take the classes from")
        present = {u.emotion for u in utterances}
        classes = tuple(e for e in EMOTIONS if e in present)
        if not classes:
            raise ValueError("no utterances to take the classes from")
        return classes
    if isinstance(spec, str):
        if spec.lower() in CLASS_SETS:
            classes = CLASS_SETS[spec.lower()]
        else:
            names = [n.strip().lower() for n in spec.split(",")]
            if len(names) == 1 and names[0] not in EMOTIONS:
                raise ValueError(
                    f"unknown class spec {spec!r}: neither a class set "
                    f"({', '.join(CLASS_SETS)}) nor an emotion ({', '.join(EMOTIONS)})")
            classes = tuple(_check_emotion(n, f"class spec {spec!r}") for n in names)
    else:
        classes = tuple(_check_emotion(str(n).strip().lower(), f"classes {list(spec)!r}")
                        for n in spec)
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise ValueError(f"class spec {spec!r} repeats {', '.join(repeated)}")
    if utterances is not None:
        present = {u.emotion for u in utterances}
        absent = [c for c in classes if c not in present]
        if absent:
            logger.warning("classes with no utterance: %s", ", ".join(absent))
    return classes


def parse_merge(spec: str | None) -> dict[str, str]:
    """Parses a merge map such as ``"calm:neutral,surprise:happiness"``.

    Args:
      spec: comma list of ``source:target`` emotion pairs; empty/None for no merge.

    Returns:
      ``{source: target}``.

    Raises:
      ValueError: a malformed pair, an unknown emotion, a source listed twice, a source
        merged onto itself, or a chain (a target that is also a source).
    """
    merge: dict[str, str] = {}
    if not spec or not spec.strip():
        return merge
    for item in spec.split(","):
        parts = [p.strip().lower() for p in item.split(":")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"malformed merge item {item.strip()!r} in {spec!r}; "
                             "expected source:target, e.g. calm:neutral")
        source, target = (_check_emotion(p, f"merge spec {spec!r}") for p in parts)
        if source == target:
            raise ValueError(f"merge spec {spec!r} merges {source!r} onto itself")
        if source in merge:
            raise ValueError(f"merge spec {spec!r} lists {source!r} twice")
        merge[source] = target
    # Merges are applied once, so a chain a:b,b:c would leave a on b: refuse the ambiguity.
    chained = sorted(t for t in set(merge.values()) if t in merge)
    if chained:
        raise ValueError(f"merge spec {spec!r} chains through {', '.join(chained)}; "
                         "merge each source directly onto its final class")
    return merge


def select_classes(utterances: Iterable[Utterance], classes: str | Sequence[str] | None,
                   merge: Mapping[str, str] | str | None = None) -> list[Utterance]:
    """Merges emotions, then keeps the utterances whose emotion is one of ``classes``.

    Args:
      utterances: records to filter.
      classes: anything :func:`resolve_classes` accepts (resolved after merging).
      merge: ``{source: target}`` or a :func:`parse_merge` spec, applied first.

    Returns:
      The kept utterances, in input order, with merged emotions replaced.
    """
    merge_map = parse_merge(merge) if merge is None or isinstance(merge, str) else dict(merge)
    for source, target in merge_map.items():
        _check_emotion(source, "merge map")
        _check_emotion(target, "merge map")
    merged = []
    moved: Counter[str] = Counter()
    for u in utterances:
        if u.emotion in merge_map:
            moved[f"{u.emotion}->{merge_map[u.emotion]}"] += 1
            u = dataclasses.replace(u, emotion=merge_map[u.emotion])
        merged.append(u)
    if moved:
        logger.info("merged: %s", ", ".join(f"{k} {v}" for k, v in sorted(moved.items())))
    wanted = set(resolve_classes(classes, merged))
    kept = [u for u in merged if u.emotion in wanted]
    dropped = Counter(u.emotion for u in merged if u.emotion not in wanted)
    if dropped:
        logger.info("dropped %d utterances outside the classes: %s", sum(dropped.values()),
                    ", ".join(f"{e} {dropped[e]}" for e in EMOTIONS if e in dropped))
    return kept


def summarize(utterances: Iterable[Utterance]) -> dict:
    """Counts utterances per emotion, speaker, gender, language and corpus.

    Args:
      utterances: records to count.

    Returns:
      ``{"total": n, "emotion": {...}, "speaker": {...}, "gender": {...},
      "language": {...}, "corpus": {...}}``; emotions in :data:`EMOTIONS` order, other
      keys sorted. Plain dicts and ints, ready for JSON.
    """
    utterances = list(utterances)
    summary: dict = {"total": len(utterances)}
    for field in ("emotion", "speaker", "gender", "language", "corpus"):
        counts = Counter(getattr(u, field) for u in utterances)
        order = ([e for e in EMOTIONS if e in counts] + sorted(set(counts) - set(EMOTIONS))
                 if field == "emotion" else sorted(counts))
        summary[field] = {k: counts[k] for k in order}
    return summary
