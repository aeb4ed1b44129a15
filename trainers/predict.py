"""ser-predict: the emotion of audio files, from an exported SavedModel or TFLite model.

Examples:
  ser-predict --model=runs/synthetic/export/savedmodel clip.wav other.flac
  ser-predict --model=runs/synthetic/export/model_int8.tflite --json *.wav

Any length, any sample rate, mono or stereo, any format the pipeline decodes (WAV, FLAC,
Ogg Vorbis, MP3). Each file is decoded, mixed down, resampled to the model's rate and
conditioned as in training; long files are windowed and the windows averaged. A file that
cannot be read gets its own error line and the others are still predicted; the exit status
is 1 when any file failed.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "A SavedModel folder or .tflite file written by "
                    "ser-export (its serving.json beside it).")
flags.DEFINE_bool("json", False, "Print one JSON object per file instead of text.")
flags.DEFINE_integer("threads", 1, "Interpreter threads (TFLite).")
flags.mark_flag_as_required("model")


def _text(path: str, prediction) -> str:
    probs = sorted(prediction.probabilities.items(), key=lambda kv: -kv[1])
    return (f"{path}: {prediction.label} ({prediction.probabilities[prediction.label]:.2f})  "
            + "  ".join(f"{c} {p:.3f}" for c, p in probs))


def main(argv):
    files = argv[1:]
    if not files:
        raise app.UsageError("give one or more audio files")
    import logging

    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    from ser_tf.serving.runtime import InputError, load_predictor, read_audio

    try:
        predictor = load_predictor(FLAGS.model, num_threads=FLAGS.threads)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for path in files:
        try:
            prediction = predictor.predict(read_audio(path, predictor.sample_rate))
        except InputError as err:
            failed += 1
            if FLAGS.json:
                print(json.dumps({"file": path, "error": str(err)}))
            else:
                print(f"{path}: error: {err}", file=sys.stderr)
            continue
        if FLAGS.json:
            print(json.dumps({"file": path, **prediction.to_dict()}))
        else:
            print(_text(path, prediction))
    return 1 if failed else 0


def run():
    """Console-script entry point (``ser-predict``)."""
    app.run(main)


if __name__ == "__main__":
    run()
