"""Tests for ser_tf.data.corpora: adapters, manifests and class selection.

The adapters only read file names, so the corpora are faked with empty files in tmp_path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from ser_tf.data import corpora
from ser_tf.data.corpora import EMOTIONS, LabelError, Utterance


def touch(folder: Path, *names: str) -> list[Path]:
    """Creates empty files ``names`` under ``folder`` (sub-paths allowed)."""
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        paths.append(path)
    return paths


def utt(path, emotion, speaker="s1", gender="female", language="en", corpus="c"):
    return Utterance(str(path), emotion, speaker, gender, language, corpus)


# --------------------------------------------------------------------------------------
# EmoDB
# --------------------------------------------------------------------------------------

def test_utterance_fields_are_unchanged():
    assert [f.name for f in corpora.dataclasses.fields(Utterance)] == [
        "path", "emotion", "speaker", "gender", "language", "corpus"]
    assert EMOTIONS == ("neutral", "calm", "happiness", "sadness", "anger", "fear", "disgust",
                        "surprise", "boredom")


@pytest.mark.parametrize("layout", ["root", "wav"])
def test_emodb_fields(tmp_path, layout):
    wav = tmp_path / "wav"
    touch(wav, "16b10Tb.wav", "03a01Fa.wav", "08a02Wc.wav", "erkennung.txt")
    touch(tmp_path, "README.md")
    data_dir = tmp_path if layout == "root" else wav
    got = corpora.emodb(data_dir)
    assert got == [
        Utterance(str(wav / "03a01Fa.wav"), "happiness", "03", "male", "de", "emodb"),
        Utterance(str(wav / "08a02Wc.wav"), "anger", "08", "female", "de", "emodb"),
        Utterance(str(wav / "16b10Tb.wav"), "sadness", "16", "female", "de", "emodb"),
    ]


def test_emodb_every_code_and_speaker(tmp_path):
    codes = {"W": "anger", "L": "boredom", "E": "disgust", "A": "fear", "F": "happiness",
             "T": "sadness", "N": "neutral"}
    genders = {"03": "male", "08": "female", "09": "female", "10": "male", "11": "male",
               "12": "male", "13": "female", "14": "female", "15": "male", "16": "female"}
    names = [f"{s}a05{c}a.wav" for s in genders for c in codes]
    touch(tmp_path, *names)
    got = corpora.emodb(tmp_path)
    assert len(got) == 70
    for u in got:
        stem = Path(u.path).stem
        assert u.emotion == codes[stem[5]]
        assert u.speaker == stem[:2]
        assert u.gender == genders[stem[:2]]
    assert [u.path for u in got] == sorted(u.path for u in got)
    assert all(os.path.isabs(u.path) for u in got)


def test_emodb_relative_dir_gives_absolute_paths(tmp_path, monkeypatch):
    touch(tmp_path / "wav", "03a01Fa.wav")
    monkeypatch.chdir(tmp_path)
    (u,) = corpora.emodb("wav")
    assert u.path == str(tmp_path / "wav" / "03a01Fa.wav")


def test_emodb_unknown_emotion_names_file(tmp_path):
    touch(tmp_path, "03a01Fa.wav", "03a01Xa.wav")
    with pytest.raises(LabelError, match=r"'X'.*03a01Xa\.wav.*allowed: A, E, F, L, N, T, W"):
        corpora.emodb(tmp_path)


def test_emodb_unknown_speaker_names_file(tmp_path):
    touch(tmp_path, "04a01Fa.wav")
    with pytest.raises(LabelError, match=r"'04'.*04a01Fa\.wav.*allowed: 03, 08"):
        corpora.emodb(tmp_path)


def test_emodb_malformed_name(tmp_path):
    touch(tmp_path, "recording.wav")
    with pytest.raises(LabelError, match=r"recording\.wav.*03a01Fa"):
        corpora.emodb(tmp_path)


def test_emodb_missing_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"emodb.*does not exist.*wav/"):
        corpora.emodb(tmp_path / "nope")
    touch(tmp_path, "notes.txt")
    with pytest.raises(FileNotFoundError, match=r"emodb: no audio files"):
        corpora.emodb(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a directory"):
        corpora.emodb(tmp_path / "notes.txt")


def test_hidden_and_uppercase_extension_files(tmp_path):
    touch(tmp_path, "._03a01Fa.wav", "03a01Fa.WAV", "03a02Fa.flac")
    got = corpora.emodb(tmp_path)
    assert [Path(u.path).name for u in got] == ["03a01Fa.WAV", "03a02Fa.flac"]


def _emodb_dir() -> Path:
    env = os.environ.get("SER_TF_EMODB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "emodb"


@pytest.mark.emodb
def test_real_emodb_counts():
    data_dir = _emodb_dir()
    if not data_dir.is_dir():
        pytest.skip(f"EmoDB not found at {data_dir} (set SER_TF_EMODB to its folder)")
    got = corpora.load_corpus("emodb", data_dir)
    summary = corpora.summarize(got)
    assert summary["total"] == 535
    assert summary["emotion"] == {"anger": 127, "boredom": 81, "disgust": 46, "fear": 69,
                                  "happiness": 71, "neutral": 79, "sadness": 62}
    assert set(summary["speaker"]) == {"03", "08", "09", "10", "11", "12", "13", "14", "15",
                                       "16"}
    assert summary["language"] == {"de": 535}
    assert len(corpora.select_classes(got, "emodb5")) == 535 - 127 - 69


# --------------------------------------------------------------------------------------
# RAVDESS
# --------------------------------------------------------------------------------------

def test_ravdess_fields_and_skipping(tmp_path, caplog):
    touch(tmp_path,
          "Actor_01/03-01-01-01-01-01-01.wav",   # neutral, male
          "Actor_01/03-01-02-02-01-02-01.wav",   # calm
          "Actor_12/03-01-08-02-02-01-12.wav",   # surprise, female
          "Actor_12/03-02-03-01-01-01-12.wav",   # song: skipped
          "Actor_12/01-01-05-01-01-01-12.wav",   # audio-video: skipped
          "Actor_12/02-01-05-01-01-01-12.wav",   # video-only: skipped
          "03-01-05-02-01-01-07.wav",            # directly in data_dir: anger
          "Actor_12/notes.txt")
    with caplog.at_level(logging.INFO, logger="ser_tf.data.corpora"):
        got = corpora.ravdess(tmp_path)
    assert got == [
        Utterance(str(tmp_path / "03-01-05-02-01-01-07.wav"), "anger", "07", "male", "en",
                  "ravdess"),
        Utterance(str(tmp_path / "Actor_01/03-01-01-01-01-01-01.wav"), "neutral", "01",
                  "male", "en", "ravdess"),
        Utterance(str(tmp_path / "Actor_01/03-01-02-02-01-02-01.wav"), "calm", "01", "male",
                  "en", "ravdess"),
        Utterance(str(tmp_path / "Actor_12/03-01-08-02-02-01-12.wav"), "surprise", "12",
                  "female", "en", "ravdess"),
    ]
    assert "skipped 1 song and 2 video" in caplog.text


def test_ravdess_every_emotion(tmp_path):
    expected = {"01": "neutral", "02": "calm", "03": "happiness", "04": "sadness",
                "05": "anger", "06": "fear", "07": "disgust", "08": "surprise"}
    touch(tmp_path, *[f"Actor_02/03-01-{c}-01-01-01-02.wav" for c in expected])
    got = corpora.ravdess(tmp_path)
    assert {Path(u.path).stem.split("-")[2]: u.emotion for u in got} == expected
    assert {u.gender for u in got} == {"female"}


def test_ravdess_errors(tmp_path):
    touch(tmp_path, "Actor_01/03-01-09-01-01-01-01.wav")
    with pytest.raises(LabelError, match=r"emotion code '09'.*03-01-09-01-01-01-01\.wav"
                                         r".*allowed: 01, 02, 03, 04, 05, 06, 07, 08"):
        corpora.ravdess(tmp_path)


def test_ravdess_malformed_and_bad_modality(tmp_path):
    touch(tmp_path / "a", "Actor_01/03-01-01-01-01-01.wav")
    with pytest.raises(LabelError, match=r"03-01-01-01-01-01\.wav.*MM-VV-EE-II-SS-RR-AA"):
        corpora.ravdess(tmp_path / "a")
    touch(tmp_path / "b", "Actor_01/04-01-01-01-01-01-01.wav")
    with pytest.raises(LabelError, match=r"modality code '04'"):
        corpora.ravdess(tmp_path / "b")


def test_ravdess_only_song_is_empty(tmp_path):
    touch(tmp_path, "Actor_01/03-02-01-01-01-01-01.wav")
    with pytest.raises(FileNotFoundError, match=r"no audio-only speech.*1 song"):
        corpora.ravdess(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ravdess.*Actor_XX"):
        corpora.ravdess(tmp_path / "missing")


# --------------------------------------------------------------------------------------
# CREMA-D
# --------------------------------------------------------------------------------------

CREMAD_FILES = ("AudioWAV/1001_DFA_ANG_XX.wav", "AudioWAV/1002_IEO_HAP_HI.wav",
                "AudioWAV/1003_TIE_SAD_LO.wav", "AudioWAV/1001_ITS_NEU_XX.wav",
                "AudioWAV/1002_MTI_DIS_MD.wav", "AudioWAV/1003_WSI_FEA_XX.wav")
DEMOGRAPHICS = ("ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n"
                "1002,21,Female,Caucasian,Not Hispanic\n")


@pytest.mark.parametrize("layout", ["root", "audiowav"])
def test_cremad_with_demographics(tmp_path, layout, caplog):
    touch(tmp_path, *CREMAD_FILES)
    (tmp_path / "VideoDemographics.csv").write_text(DEMOGRAPHICS)
    data_dir = tmp_path if layout == "root" else tmp_path / "AudioWAV"
    with caplog.at_level(logging.WARNING, logger="ser_tf.data.corpora"):
        got = corpora.cremad(data_dir)
    wav = tmp_path / "AudioWAV"
    assert got == [
        Utterance(str(wav / "1001_DFA_ANG_XX.wav"), "anger", "1001", "male", "en", "cremad"),
        Utterance(str(wav / "1001_ITS_NEU_XX.wav"), "neutral", "1001", "male", "en",
                  "cremad"),
        Utterance(str(wav / "1002_IEO_HAP_HI.wav"), "happiness", "1002", "female", "en",
                  "cremad"),
        Utterance(str(wav / "1002_MTI_DIS_MD.wav"), "disgust", "1002", "female", "en",
                  "cremad"),
        Utterance(str(wav / "1003_TIE_SAD_LO.wav"), "sadness", "1003", "unknown", "en",
                  "cremad"),
        Utterance(str(wav / "1003_WSI_FEA_XX.wav"), "fear", "1003", "unknown", "en",
                  "cremad"),
    ]
    # Actor 1003 is absent from the CSV: one warning naming it.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1003" in warnings[0].getMessage()


def test_cremad_without_demographics_warns_once(tmp_path, caplog):
    touch(tmp_path, *CREMAD_FILES)
    with caplog.at_level(logging.WARNING, logger="ser_tf.data.corpora"):
        got = corpora.cremad(tmp_path)
    assert len(got) == 6
    assert {u.gender for u in got} == {"unknown"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "VideoDemographics.csv" in warnings[0].getMessage()


def test_cremad_errors(tmp_path):
    touch(tmp_path / "a", "1001_DFA_XYZ_XX.wav")
    with pytest.raises(LabelError, match=r"'XYZ'.*1001_DFA_XYZ_XX\.wav"
                                         r".*allowed: ANG, DIS, FEA, HAP, NEU, SAD"):
        corpora.cremad(tmp_path / "a")
    touch(tmp_path / "b", "1001-DFA-ANG-XX.wav")
    with pytest.raises(LabelError, match=r"1001-DFA-ANG-XX\.wav.*AAAA_SSS_EEE_LL"):
        corpora.cremad(tmp_path / "b")
    touch(tmp_path / "c", "1001_DFA_ANG_ZZ.wav")
    with pytest.raises(LabelError, match=r"level code 'ZZ'"):
        corpora.cremad(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"cremad.*AudioWAV"):
        corpora.cremad(tmp_path / "missing")
    (tmp_path / "d" / "AudioWAV").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cremad: no audio files"):
        corpora.cremad(tmp_path / "d")


# --------------------------------------------------------------------------------------
# TESS
# --------------------------------------------------------------------------------------

def test_tess_fields_and_case_variants(tmp_path):
    touch(tmp_path,
          "OAF_angry/OAF_back_angry.wav",
          "OAF_Fear/OAF_bar_fear.wav",
          "OAF_Pleasant_surprise/OAF_base_ps.wav",
          "YAF_pleasant_surprised/YAF_dog_ps.wav",
          "YAF_fear/YAF_dog_Fear.wav",
          "YAF_disgust/YAF_bite_disgust.wav",
          "YAF_happy/YAF_bath_happy.wav",
          "YAF_neutral/yaf_bean_neutral.wav",
          "YAF_sad/YAF_bone_sad.wav",
          "README.txt")
    got = corpora.tess(tmp_path)
    by_name = {Path(u.path).name: u for u in got}
    assert {n: u.emotion for n, u in by_name.items()} == {
        "OAF_back_angry.wav": "anger", "OAF_bar_fear.wav": "fear",
        "OAF_base_ps.wav": "surprise", "YAF_dog_ps.wav": "surprise",
        "YAF_dog_Fear.wav": "fear", "YAF_bite_disgust.wav": "disgust",
        "YAF_bath_happy.wav": "happiness", "yaf_bean_neutral.wav": "neutral",
        "YAF_bone_sad.wav": "sadness"}
    assert by_name["OAF_bar_fear.wav"] == Utterance(
        str(tmp_path / "OAF_Fear" / "OAF_bar_fear.wav"), "fear", "OAF", "female", "en", "tess")
    assert by_name["yaf_bean_neutral.wav"].speaker == "YAF"
    assert {u.gender for u in got} == {"female"}
    assert {u.language for u in got} == {"en"}
    assert [u.path for u in got] == sorted(u.path for u in got)


def test_tess_flat_and_duplicate_copies(tmp_path, caplog):
    touch(tmp_path, "OAF_back_angry.wav", "copy/OAF_back_angry.wav", "YAF_dog_sad.wav")
    with caplog.at_level(logging.WARNING, logger="ser_tf.data.corpora"):
        got = corpora.tess(tmp_path)
    assert [u.path for u in got] == [str(tmp_path / "OAF_back_angry.wav"),
                                     str(tmp_path / "YAF_dog_sad.wav")]
    assert "ignored 1 files" in caplog.text


def test_tess_errors(tmp_path):
    touch(tmp_path / "a", "OAF_back_bored.wav")
    with pytest.raises(LabelError, match=r"'bored'.*OAF_back_bored\.wav.*allowed: angry"):
        corpora.tess(tmp_path / "a")
    touch(tmp_path / "b", "MAF_back_angry.wav")
    with pytest.raises(LabelError, match=r"speaker 'MAF'.*allowed: OAF, YAF"):
        corpora.tess(tmp_path / "b")
    touch(tmp_path / "c", "angry.wav")
    with pytest.raises(LabelError, match=r"angry\.wav.*SPEAKER_word_emotion"):
        corpora.tess(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=r"tess.*OAF_back_angry"):
        corpora.tess(tmp_path / "missing")


# --------------------------------------------------------------------------------------
# Manifests and load_corpus
# --------------------------------------------------------------------------------------

def test_manifest_defaults_and_relative_paths(tmp_path):
    csv_path = tmp_path / "sets" / "mine.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("speaker,emotion,path\n"
                        "s2,Anger,audio/b.wav\n"
                        "\n"
                        f"s1,neutral,{tmp_path / 'abs.wav'}\n")
    got = corpora.manifest(csv_path)
    assert got == [
        Utterance(str(tmp_path / "abs.wav"), "neutral", "s1", "unknown", "und", "mine"),
        Utterance(str(tmp_path / "sets" / "audio" / "b.wav"), "anger", "s2", "unknown",
                  "und", "mine"),
    ]


def test_manifest_round_trip(tmp_path):
    data = tmp_path / "data"
    utterances = [
        utt(data / "b" / "x.wav", "sadness", "spk2", "male", "de", "synthetic"),
        utt(data / "a.wav", "anger", "spk1", "female", "en", "synthetic"),
        utt(tmp_path / "elsewhere" / "c.wav", "calm", "spk3", "unknown", "und", "other"),
    ]
    csv_path = corpora.write_manifest(utterances, data / "manifest.csv")
    assert csv_path == data / "manifest.csv"
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "path,emotion,speaker,gender,language,corpus"
    assert lines[1:] == ["b/x.wav,sadness,spk2,male,de,synthetic",
                         "a.wav,anger,spk1,female,en,synthetic",
                         "../elsewhere/c.wav,calm,spk3,unknown,und,other"]
    assert corpora.manifest(csv_path) == sorted(utterances, key=lambda u: u.path)
    # Relative paths let the folder move.
    moved = tmp_path / "moved"
    data.rename(moved)
    assert [u.path for u in corpora.manifest(moved / "manifest.csv")] == [
        str(tmp_path / "elsewhere" / "c.wav"), str(moved / "a.wav"), str(moved / "b" / "x.wav")]


def test_manifest_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,emotion,speaker\na.wav,anger,s1\nb.wav,angry,s1\n")
    with pytest.raises(LabelError, match=r"bad\.csv line 3.*'angry'.*b\.wav.*allowed: neutral"):
        corpora.manifest(bad)
    bad.write_text("path,emotion,speaker,gender\na.wav,anger,s1,x\n")
    with pytest.raises(LabelError, match=r"line 2.*gender 'x'"):
        corpora.manifest(bad)
    bad.write_text("path,emotion,speaker\na.wav,anger,\n")
    with pytest.raises(LabelError, match=r"line 2.*empty 'speaker'"):
        corpora.manifest(bad)
    bad.write_text("path,label,speaker\na.wav,anger,s1\n")
    with pytest.raises(ValueError, match=r"lacks required column\(s\) emotion"):
        corpora.manifest(bad)
    bad.write_text("path,emotion,speaker\n")
    with pytest.raises(FileNotFoundError, match=r"lists no utterances"):
        corpora.manifest(bad)
    with pytest.raises(FileNotFoundError, match=r"manifest.*does not exist"):
        corpora.manifest(tmp_path / "none.csv")


def test_load_corpus_dispatch(tmp_path):
    touch(tmp_path / "emodb" / "wav", "03a01Fa.wav")
    assert corpora.load_corpus("EmoDB", tmp_path / "emodb")[0].corpus == "emodb"
    touch(tmp_path / "tess", "OAF_back_angry.wav")
    assert corpora.load_corpus("tess", tmp_path / "tess")[0].speaker == "OAF"
    touch(tmp_path / "ravdess", "Actor_01/03-01-01-01-01-01-01.wav")
    assert corpora.load_corpus("ravdess", tmp_path / "ravdess")[0].emotion == "neutral"
    touch(tmp_path / "cremad", "1001_DFA_ANG_XX.wav")
    assert corpora.load_corpus("cremad", tmp_path / "cremad")[0].speaker == "1001"

    syn = tmp_path / "syn"
    syn.mkdir()
    (syn / "manifest.csv").write_text("path,emotion,speaker\na.wav,fear,s1\n")
    (u,) = corpora.load_corpus("synthetic", syn)
    assert (u.corpus, u.path) == ("synthetic", str(syn / "a.wav"))
    (u,) = corpora.load_corpus("manifest", syn)
    assert u.corpus == "manifest"
    (u,) = corpora.load_corpus("manifest", syn / "manifest.csv")
    assert u.emotion == "fear"
    with pytest.raises(FileNotFoundError, match=r"synthetic.*manifest\.csv"):
        corpora.load_corpus("synthetic", tmp_path / "emodb")


def test_load_corpus_unknown_name():
    with pytest.raises(ValueError, match=r"unknown corpus 'iemocap'.*emodb, ravdess, cremad, "
                                         r"tess, manifest, synthetic"):
        corpora.load_corpus("iemocap", ".")


# --------------------------------------------------------------------------------------
# Class sets, merging, selection, summaries
# --------------------------------------------------------------------------------------

def test_class_sets():
    sets = corpora.CLASS_SETS
    assert sets["emodb7"] == ("anger", "boredom", "disgust", "fear", "happiness", "neutral",
                              "sadness")
    assert sets["emodb5"] == ("boredom", "disgust", "happiness", "neutral", "sadness")
    assert set(sets["ravdess8"]) == {"neutral", "calm", "happiness", "sadness", "anger",
                                     "fear", "disgust", "surprise"}
    assert sets["ravdess5"] == ("disgust", "fear", "happiness", "sadness", "surprise")
    assert set(sets["cremad6"]) == {"anger", "disgust", "fear", "happiness", "neutral",
                                    "sadness"}
    assert set(sets["tess7"]) == set(sets["cremad6"]) | {"surprise"}
    assert sets["big4"] == ("anger", "happiness", "neutral", "sadness")
    for name, classes in sets.items():
        assert set(classes) <= set(EMOTIONS), name
        assert len(set(classes)) == len(classes), name
        assert list(classes) == sorted(classes), name


def test_resolve_classes():
    data = [utt("a", "sadness"), utt("b", "anger"), utt("c", "neutral"), utt("d", "anger")]
    assert corpora.resolve_classes("emodb5") == corpora.CLASS_SETS["emodb5"]
    assert corpora.resolve_classes(" BIG4 ") == corpora.CLASS_SETS["big4"]
    assert corpora.resolve_classes("sadness, Anger") == ("sadness", "anger")
    assert corpora.resolve_classes("fear") == ("fear",)
    assert corpora.resolve_classes(["neutral", "calm"]) == ("neutral", "calm")
    # Empty: what is present, in EMOTIONS order.
    assert corpora.resolve_classes(None, data) == ("neutral", "sadness", "anger")
    assert corpora.resolve_classes("", data) == ("neutral", "sadness", "anger")
    with pytest.raises(ValueError, match=r"'angry'.*allowed: neutral, calm"):
        corpora.resolve_classes("angry,sadness")
    with pytest.raises(ValueError, match=r"neither a class set.*emodb7"):
        corpora.resolve_classes("emodb9")
    with pytest.raises(ValueError, match=r"repeats anger"):
        corpora.resolve_classes("anger,anger")
    with pytest.raises(ValueError, match=r"needs utterances"):
        corpora.resolve_classes(None)


def test_parse_merge():
    assert corpora.parse_merge("calm:neutral, Surprise : happiness") == {
        "calm": "neutral", "surprise": "happiness"}
    assert corpora.parse_merge("") == {}
    assert corpora.parse_merge(None) == {}
    with pytest.raises(ValueError, match=r"malformed merge item 'calm'"):
        corpora.parse_merge("calm")
    with pytest.raises(ValueError, match=r"malformed"):
        corpora.parse_merge("calm:neutral:sadness")
    with pytest.raises(ValueError, match=r"unknown emotion 'quiet'"):
        corpora.parse_merge("quiet:neutral")
    with pytest.raises(ValueError, match=r"onto itself"):
        corpora.parse_merge("calm:calm")
    with pytest.raises(ValueError, match=r"lists 'calm' twice"):
        corpora.parse_merge("calm:neutral,calm:sadness")
    with pytest.raises(ValueError, match=r"chains through neutral"):
        corpora.parse_merge("calm:neutral,neutral:sadness")


def test_select_classes(caplog):
    data = [utt("1", "calm"), utt("2", "neutral"), utt("3", "anger"), utt("4", "fear"),
            utt("5", "fear"), utt("6", "surprise")]
    with caplog.at_level(logging.INFO, logger="ser_tf.data.corpora"):
        got = corpora.select_classes(data, ("neutral", "anger"), merge="calm:neutral")
    assert got == [utt("1", "neutral"), utt("2", "neutral"), utt("3", "anger")]
    assert "fear 2" in caplog.text and "surprise 1" in caplog.text
    # Mapping merge, spec classes, no merge.
    got = corpora.select_classes(data, "fear,surprise", {"surprise": "fear"})
    assert [(u.path, u.emotion) for u in got] == [("4", "fear"), ("5", "fear"), ("6", "fear")]
    assert corpora.select_classes(data, "anger") == [utt("3", "anger")]
    # Empty classes after merging: every merged emotion present.
    got = corpora.select_classes(data, None, "calm:neutral")
    assert [u.emotion for u in got] == ["neutral", "neutral", "anger", "fear", "fear",
                                        "surprise"]
    with pytest.raises(ValueError, match=r"unknown emotion 'x'"):
        corpora.select_classes(data, "anger", {"x": "anger"})
    assert data[0].emotion == "calm"  # input untouched


def test_summarize():
    data = [utt("1", "anger", "b", "male", "de", "emodb"),
            utt("2", "neutral", "a", "female", "de", "emodb"),
            utt("3", "anger", "a", "female", "en", "tess")]
    assert corpora.summarize(data) == {
        "total": 3,
        "emotion": {"neutral": 1, "anger": 2},
        "speaker": {"a": 2, "b": 1},
        "gender": {"female": 2, "male": 1},
        "language": {"de": 2, "en": 1},
        "corpus": {"emodb": 2, "tess": 1},
    }
    assert list(corpora.summarize(data)["emotion"]) == ["neutral", "anger"]
    assert corpora.summarize([])["total"] == 0
