"""Speaker-independent evaluation protocols: which speakers train, validate and test.

Every split is speaker-disjoint: no speaker's audio appears on two sides, so no copy or
crop of a test utterance (and nothing of the test speaker's voice) is seen in training or
in model selection. Protocols:

* ``loso``: leave-one-speaker-out, one fold per speaker.
* ``speakers``: one fold with the named test speakers.
* ``kfold``: k folds of speakers, balanced by utterance count.

Within each fold, validation speakers (for early stopping and model selection) are taken
from the training speakers, alternating genders where possible, rotating with the fold so
that different folds validate on different speakers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Sequence

from ser_tf.data.corpora import Utterance

PROTOCOLS = ("loso", "speakers", "kfold")


@dataclasses.dataclass(frozen=True)
class Fold:
    """One train/validation/test partition, as utterance indices.

    Attributes:
      name: fold id used for its workdir (``fold_03``, ``fold_1``, or ``main``).
      train: indices of the training utterances.
      val: indices of the validation utterances.
      test: indices of the test utterances.
      test_speakers: the held-out speakers.
      val_speakers: the validation speakers.
    """

    name: str
    train: list[int]
    val: list[int]
    test: list[int]
    test_speakers: tuple[str, ...]
    val_speakers: tuple[str, ...]


def _speakers(utterances: Sequence[Utterance]) -> list[str]:
    return sorted({u.speaker for u in utterances})


def _pick_validation(pool: Sequence[str], genders: dict[str, str], count: int,
                     rotation: int) -> tuple[str, ...]:
    """``count`` speakers from ``pool``, alternating genders, rotated by ``rotation``."""
    if count <= 0:
        return ()
    by_gender: dict[str, list[str]] = {}
    for spk in pool:
        by_gender.setdefault(genders[spk], []).append(spk)
    for group in by_gender.values():
        r = rotation % len(group)
        group[:] = group[r:] + group[:r]
    order = sorted(by_gender)
    chosen: list[str] = []
    while len(chosen) < count and any(by_gender.values()):
        for g in order:
            if by_gender[g] and len(chosen) < count:
                chosen.append(by_gender[g].pop(0))
    return tuple(sorted(chosen))


def _make_fold(name: str, utterances: Sequence[Utterance], test_speakers: Sequence[str],
               val_count: int, rotation: int) -> Fold:
    genders = {u.speaker: u.gender for u in utterances}
    pool = [s for s in _speakers(utterances) if s not in set(test_speakers)]
    if len(pool) < val_count + 1:
        raise ValueError(f"fold {name}: {len(pool)} training speakers cannot spare "
                         f"{val_count} for validation")
    val = _pick_validation(pool, genders, val_count, rotation)
    test_set, val_set = set(test_speakers), set(val)
    split = {"train": [], "val": [], "test": []}
    for i, u in enumerate(utterances):
        key = "test" if u.speaker in test_set else "val" if u.speaker in val_set else "train"
        split[key].append(i)
    return Fold(name, split["train"], split["val"], split["test"],
                tuple(sorted(test_set)), val)


def make_folds(utterances: Sequence[Utterance], protocol: str, *,
               test_speakers: Sequence[str] = (), folds: int = 5,
               val_speakers: int = 2) -> list[Fold]:
    """Builds the folds of a protocol.

    Args:
      utterances: the corpus (indices refer to this list).
      protocol: ``loso``, ``speakers`` or ``kfold``.
      test_speakers: the held-out speakers for ``speakers``.
      folds: number of folds for ``kfold``.
      val_speakers: validation speakers per fold, taken from the training speakers.

    Returns:
      The folds.

    Raises:
      ValueError: unknown protocol, unknown test speakers, or too few speakers.
    """
    speakers = _speakers(utterances)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    if len(speakers) < 3:
        raise ValueError(f"speaker-independent protocols need at least 3 speakers, "
                         f"got {speakers}")
    if protocol == "loso":
        return [_make_fold(f"fold_{s}", utterances, [s], val_speakers, k)
                for k, s in enumerate(speakers)]
    if protocol == "speakers":
        unknown = sorted(set(test_speakers) - set(speakers))
        if not test_speakers or unknown:
            raise ValueError(f"--test_speakers must name speakers of the corpus; unknown: "
                             f"{unknown or 'none given'}; known: {speakers}")
        return [_make_fold("main", utterances, list(test_speakers), val_speakers, 0)]
    if not 2 <= folds <= len(speakers):
        raise ValueError(f"kfold needs 2 <= folds <= {len(speakers)} speakers, got {folds}")
    # Greedy balancing: largest speakers first, each to the currently smallest fold.
    counts = Counter(u.speaker for u in utterances)
    groups: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for spk in sorted(speakers, key=lambda s: (-counts[s], s)):
        k = min(range(folds), key=lambda j: (sizes[j], j))
        groups[k].append(spk)
        sizes[k] += counts[spk]
    return [_make_fold(f"fold_{k + 1}", utterances, sorted(g), val_speakers, k)
            for k, g in enumerate(groups)]
