"""TFLite conversion of the edge SavedModel, in a subprocess, for four variants.

Variants (all: one fixed-length window, batch 1, float32 waveform in, float32 logits and
probabilities out):

* ``float32``: the graph as it is.
* ``float16``: weights stored as float16 (half the size), computed in float.
* ``dynamic``: dynamic-range quantization, int8 weights with float activations.
* ``int8``: full-integer quantization of the classifier, calibrated on a representative
  set of training clips, with the frontend (STFT, log-mel), the feature normaliser and the
  classifier's first conv block kept in float32. Quantizing the frontend destroys the
  model (argmax agreement 0.1-0.25, DESIGN.md): the power spectrum spans far more than 8
  bits. The first block is the one layer whose quantization moved predictions on EmoDB
  (fold 08: agreement 0.948 with it in int8, 0.983 without; keeping the LSTM or the last
  block in float instead changed nothing): its input is the normalised log-mel map, whose
  long tails waste the 8-bit range, while the blocks after it read ReLU outputs. The
  float layers' nodes are denylisted through TFLite's public quantization debugger; the
  frontend's mel and DCT
  projections are small blocks (``ser_tf.frontend.projection_blocks``) under the
  converter's weight-quantization threshold, so dynamic-range conversion leaves them in
  float as well.

Conversions run in a child process (``python -m ser_tf.serving.tflite``): the TFLite
converter and calibrator abort or segfault on some graphs, and that must be an error the
export reports, not a dead job. Built-in ops are tried first; only if the converter
rejects them are Select TF (Flex) ops allowed, which :func:`op_summary` then lists.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np

VARIANTS = ("float32", "float16", "dynamic", "int8")
# The classifier layers the int8 variant keeps in float32 by default, as regular expressions
# over layer names: the first conv block (``conv_block``'s layers).
FLOAT_BLOCKS = (r"block1_[a-z]+",)


def int8_float_layers(frontend: str = "frontend", normalizer: str = "normalizer",
                      extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Name patterns of the layers the ``int8`` variant keeps in float32.

    Always the frontend and the feature normaliser (named ``frontend`` and ``normalizer``
    by the model), and the first conv block (:data:`FLOAT_BLOCKS`); then the ``extra``
    layers, by exact name.
    """
    return (re.escape(frontend), re.escape(normalizer), *FLOAT_BLOCKS,
            *(re.escape(name) for name in extra))


FLOAT_LAYERS = int8_float_layers()


class ConversionError(RuntimeError):
    """The TFLite converter failed or crashed; the message says how and ends with its log."""


def convert(source_dir: str, variant: str, *, calibration: np.ndarray | None = None,
            float_layers: Sequence[str] = FLOAT_LAYERS, timeout_s: float = 900) -> bytes:
    """Converts an edge SavedModel to a TFLite flatbuffer in a child process.

    Args:
      source_dir: a SavedModel from :func:`ser_tf.serving.savedmodel.export_edge_savedmodel`.
      variant: one of :data:`VARIANTS`.
      calibration: ``[N, segment_samples]`` float32 representative windows (``int8`` only).
      float_layers: regular expressions matching the names of the layers ``int8`` keeps
        in float32.
      timeout_s: give up after this long.

    Returns:
      The ``.tflite`` model.

    Raises:
      ValueError: unknown variant, or ``int8`` without calibration data.
      ConversionError: the converter failed, crashed or timed out.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}; choose from {VARIANTS}")
    if variant == "int8" and (calibration is None or len(calibration) == 0):
        raise ValueError("int8 conversion needs calibration windows")
    with tempfile.TemporaryDirectory(prefix="ser_tflite_") as tmp:
        out = os.path.join(tmp, "model.tflite")
        cmd = [sys.executable, "-m", "ser_tf.serving.tflite", source_dir, variant, out,
               f"--float_layers={','.join(float_layers)}"]
        if calibration is not None and variant == "int8":
            cal = os.path.join(tmp, "calibration.npy")
            np.save(cal, np.asarray(calibration, np.float32))
            cmd.append(f"--calibration={cal}")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env=env)
        except subprocess.TimeoutExpired:
            raise ConversionError(f"TFLite {variant} conversion timed out after "
                                  f"{timeout_s:.0f} s") from None
        if proc.returncode != 0 or not os.path.exists(out):
            if proc.returncode < 0:
                how = f"crashed ({signal.Signals(-proc.returncode).name})"
            else:
                how = f"failed (exit code {proc.returncode})"
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise ConversionError(f"TFLite {variant} conversion of {source_dir} {how}:\n{tail}")
        with open(out, "rb") as f:
            return f.read()


def op_summary(content: bytes) -> dict:
    """The ops of a TFLite model: counts by name, Flex (Select TF) ops, how many ops
    compute in int8 (int8 outputs) and how many read int8 weights (hybrid ops of
    dynamic-range quantization included)."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=content)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    produced = {i for op in interpreter._get_ops_details() for i in op["outputs"]}
    counts, int8, int8_weights = collections.Counter(), 0, 0
    for op in interpreter._get_ops_details():  # the public analyzer only prints
        counts[op["op_name"]] += 1
        outputs = [tensors[i] for i in op["outputs"] if i in tensors]
        if outputs and all(t["dtype"] == np.int8 for t in outputs):
            int8 += 1
        if any(i in tensors and i not in produced and tensors[i]["dtype"] == np.int8
               for i in op["inputs"]):
            int8_weights += 1
    flex = sorted(name for name in counts if name.startswith("Flex") or name == "CUSTOM")
    return {"ops": dict(sorted(counts.items())), "total_ops": sum(counts.values()),
            "flex_ops": flex, "int8_ops": int8, "int8_weight_ops": int8_weights}


# ---------------------------------------------------------------------------------------------
# The child process.


def _float_nodes(content: bytes, float_layers: Sequence[str]) -> list[str]:
    """Output tensor names of the ops that belong to ``float_layers`` (name patterns) in a
    float model."""
    import tensorflow as tf

    pattern = re.compile(r"(^|/)(" + "|".join(float_layers) + r")(_\d+)?/")
    interpreter = tf.lite.Interpreter(model_content=content)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return [names[i] for op in interpreter._get_ops_details() for i in op["outputs"]
            if i in names and pattern.search(names[i])]


def _convert_in_process(source_dir: str, variant: str, calibration: np.ndarray | None,
                        float_layers: Sequence[str]) -> bytes:
    import tensorflow as tf

    def converter(kind: str, flex: bool):
        conv = tf.lite.TFLiteConverter.from_saved_model(source_dir)
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if kind == "int8":
            ops.insert(0, tf.lite.OpsSet.TFLITE_BUILTINS_INT8)
        if flex:
            ops.append(tf.lite.OpsSet.SELECT_TF_OPS)
        conv.target_spec.supported_ops = ops
        if kind != "float32":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if kind == "float16":
            conv.target_spec.supported_types = [tf.float16]
        if kind == "int8":
            conv.representative_dataset = lambda: ([w[None]] for w in calibration)
        return conv

    def run(flex: bool) -> bytes:
        if variant != "int8":
            return converter(variant, flex).convert()
        # Calibrate the whole graph, then quantize all but the float layers' ops (found by
        # their tensor names in the float conversion).
        nodes = _float_nodes(converter("float32", flex).convert(), float_layers)
        if not nodes:
            raise RuntimeError(f"no ops of the layers {list(float_layers)} found to keep in "
                               "float; refusing to quantize the frontend")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter("int8", flex),
            debug_dataset=lambda: ([w[None]] for w in calibration[:2]),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(
                denylisted_nodes=nodes))
        return debugger.get_nondebug_quantized_model()

    try:
        return run(flex=False)
    except Exception as err:  # the converter raises ConverterError for ops it lacks
        if "ops" not in str(err).lower():
            raise
        print(f"built-in ops only failed ({str(err).splitlines()[0]}); retrying with "
              "Select TF ops", file=sys.stderr)
        return run(flex=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert an edge SavedModel to TFLite "
                                                 "(the child process of tflite.convert).")
    parser.add_argument("source_dir")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("output")
    parser.add_argument("--calibration", default="")
    parser.add_argument("--float_layers", default=",".join(FLOAT_LAYERS))
    args = parser.parse_args(argv)
    calibration = np.load(args.calibration) if args.calibration else None
    content = _convert_in_process(args.source_dir, args.variant, calibration,
                                  [s for s in args.float_layers.split(",") if s])
    with open(args.output, "wb") as f:
        f.write(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())
