"""What a served model needs besides its graph: labels, sample rate, windows, conditioning.

Every export folder holds it as ``serving.json`` (next to the TFLite files) and the
SavedModel carries a copy in ``assets.extra/serving.json``, so an artifact found by its
path can be run the way the model was trained: the raw audio conditioned (silence trimmed,
level normalised), cut into fixed-length windows, the window logits averaged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from ser_tf.data.audio import AudioConfig
from ser_tf.data.pipeline import hop_in_samples

SPEC_FILE = "serving.json"


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """How a model's input is prepared and its output read.

    Attributes:
      labels: class names in logit order.
      sample_rate: the model's input rate in Hz.
      segment_samples: window length (the model's training input length).
      hop_samples: hop between the windows of a long utterance.
      pad_mode: how an utterance shorter than a window is extended (``loop`` or ``zero``).
      audio: the conditioning applied to raw audio at ``sample_rate`` (trim, level).
    """

    labels: Sequence[str]
    sample_rate: int
    segment_samples: int
    hop_samples: int
    pad_mode: str = "loop"
    audio: AudioConfig = AudioConfig()

    def __post_init__(self):
        if not self.labels:
            raise ValueError("a serving spec needs the class labels")
        if self.segment_samples < 1 or self.hop_samples < 1:
            raise ValueError("segment_samples and hop_samples must be positive")
        if self.audio.sample_rate != self.sample_rate:
            raise ValueError(f"audio conditioning rate {self.audio.sample_rate} differs from "
                             f"the model's {self.sample_rate}")

    @classmethod
    def for_model(cls, model, audio: AudioConfig, hop_s: float, pad_mode: str = "loop"
                  ) -> "ServingSpec":
        """The spec of a trained :class:`~ser_tf.models.SERModel` and its run's settings."""
        return cls(labels=tuple(model.labels), sample_rate=model.sample_rate,
                   segment_samples=model.segment_samples,
                   hop_samples=hop_in_samples(hop_s, model.sample_rate),
                   pad_mode=pad_mode, audio=audio)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ServingSpec":
        d = dict(d)
        d["labels"] = tuple(d["labels"])
        d["audio"] = AudioConfig(**d["audio"])
        return cls(**d)

    def write(self, folder: str) -> str:
        """Writes ``folder/serving.json``; returns its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, SPEC_FILE)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def read(cls, path: str) -> "ServingSpec":
        """Reads the spec of an artifact: a SavedModel folder, a ``.tflite`` file (the
        ``serving.json`` beside it) or a ``serving.json`` itself.

        Raises:
          FileNotFoundError: no spec where the artifact's export put it.
        """
        if os.path.isdir(path):
            candidate = os.path.join(path, "assets.extra", SPEC_FILE)
        elif path.endswith(".json"):
            candidate = path
        else:
            candidate = os.path.join(os.path.dirname(os.path.abspath(path)), SPEC_FILE)
        if not os.path.exists(candidate):
            raise FileNotFoundError(
                f"no {SPEC_FILE} for {path} (looked at {candidate}); keep the files "
                f"ser-export wrote together")
        with open(candidate) as f:
            return cls.from_dict(json.load(f))
