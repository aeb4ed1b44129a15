"""Speaker-independent protocols: disjointness, coverage, validation choice, errors."""

from __future__ import annotations

import pytest

from ser_tf.data.corpora import Utterance
from ser_tf.training.protocols import make_folds


def _corpus():
    utts = []
    for k in range(6):
        spk, gender = f"s{k}", "female" if k % 2 else "male"
        utts += [Utterance(f"/{spk}_{j}.wav", "anger", spk, gender, "xx", "t")
                 for j in range(k + 2)]
    return utts


@pytest.mark.parametrize("protocol,kwargs,n", [("loso", {}, 6),
                                               ("speakers", {"test_speakers": ["s1"]}, 1),
                                               ("kfold", {"folds": 3}, 3)])
def test_folds_are_speaker_disjoint_and_cover_the_corpus(protocol, kwargs, n):
    utts = _corpus()
    folds = make_folds(utts, protocol, val_speakers=2, **kwargs)
    assert len(folds) == n
    for f in folds:
        spk = {key: {utts[i].speaker for i in getattr(f, key)} for key in ("train", "val", "test")}
        assert not spk["train"] & spk["val"] and not spk["train"] & spk["test"]
        assert not spk["val"] & spk["test"]
        assert sorted(f.train + f.val + f.test) == list(range(len(utts)))
        assert len(spk["val"]) == 2
        assert {utts[i].gender for i in f.val} == {"female", "male"}
    tested = [s for f in folds for s in f.test_speakers]
    if protocol != "speakers":
        assert sorted(tested) == [f"s{k}" for k in range(6)]


def test_loso_rotates_validation_speakers():
    folds = make_folds(_corpus(), "loso", val_speakers=1)
    assert len({f.val_speakers for f in folds}) > 1


def test_protocol_errors():
    utts = _corpus()
    with pytest.raises(ValueError, match="unknown protocol"):
        make_folds(utts, "random")
    with pytest.raises(ValueError, match="unknown"):
        make_folds(utts, "speakers", test_speakers=["nobody"])
    with pytest.raises(ValueError, match="kfold"):
        make_folds(utts, "kfold", folds=7)
    with pytest.raises(ValueError, match="validation"):
        make_folds(utts[:9], "loso", val_speakers=2)
