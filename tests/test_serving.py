"""Serving artifacts of a tiny trained CNN-LSTM: SavedModel, every TFLite variant, the
runtime that runs them, and the checks that compare them with the Keras model."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from conftest import TONE_LABELS, fit_tone_model, tone_dataset
from ser_tf.data.audio import AudioConfig
from ser_tf.serving import savedmodel, tflite
from ser_tf.serving.export import ExportJob, verify_artifacts, write_artifacts
from ser_tf.serving.runtime import (InputError, KerasPredictor, SavedModelPredictor,
                                    TFLitePredictor, check_waveform, load_predictor)
from ser_tf.serving.spec import ServingSpec

RATE = 8000


@pytest.fixture(scope="module")
def lstm_model():
    """A tiny CNN-LSTM (frontend, normaliser, chunk CNN, BiLSTM) trained on the tones."""
    from ser_tf.models import ModelConfig

    config = ModelConfig(name="cnn_lstm", sample_rate=RATE, segment_s=0.5, n_mels=24,
                         conv_filters=(4, 8), chunk_frames=16, hop_frames=8, chunk_units=16,
                         lstm_units=8, dropout=0.0, specaugment=False)
    model = fit_tone_model(config, epochs=12, learning_rate=5e-3)
    x_test, y_test = tone_dataset(8, seed=1)
    accuracy = float(np.mean(np.argmax(model(x_test), -1) == y_test))
    assert accuracy >= 0.8, f"the tiny CNN-LSTM did not learn (accuracy {accuracy:.2f})"
    return model


@pytest.fixture(scope="module")
def spec(lstm_model):
    return ServingSpec.for_model(lstm_model, AudioConfig(sample_rate=RATE), hop_s=0.25)


@pytest.fixture(scope="module")
def artifacts(lstm_model, spec, tmp_path_factory):
    """Every artifact, written once by the export's own writer."""
    out = tmp_path_factory.mktemp("export")
    calibration, _ = tone_dataset(10, seed=2)
    paths = write_artifacts(lstm_model, spec, str(out), tflite.VARIANTS, calibration)
    return out, paths


def test_fixed_length_model_unrolls_and_keeps_the_outputs(lstm_model):
    edge = savedmodel.fixed_length_model(lstm_model)
    lstms = [layer for layer in edge.classifier.layers if "lstm" in layer.name]
    assert lstms and all(layer.forward_layer.unroll and layer.backward_layer.unroll
                         for layer in lstms)
    assert edge.classifier.input_shape[0] == 1
    x, _ = tone_dataset(2, seed=3)
    for clip in x[:4]:
        np.testing.assert_allclose(edge(clip[None]).numpy(), lstm_model(clip[None]).numpy(),
                                   atol=1e-5)


def test_spec_round_trips_and_a_lone_tflite_file_says_what_is_missing(spec, tmp_path):
    assert ServingSpec.from_dict(spec.to_dict()) == spec
    assert ServingSpec.read(spec.write(str(tmp_path))) == spec
    lone = tmp_path / "elsewhere" / "model.tflite"
    lone.parent.mkdir()
    lone.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="serving.json"):
        ServingSpec.read(str(lone))
    with pytest.raises(ValueError, match="sample_rate|rate"):
        ServingSpec(labels=("a",), sample_rate=8000, segment_samples=10, hop_samples=5)


def _layer_dtypes(interpreter, layer: str = "frontend", ops: set | None = None) -> set:
    """Dtypes of every tensor a layer's ops read or write (shapes and the complex spectrum
    aside); with ``ops``, only the ops of those types."""
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    dtypes = set()
    for op in interpreter._get_ops_details():
        if ops is not None and op["op_name"] not in ops:
            continue
        outputs = [tensors[i] for i in op["outputs"] if i in tensors]
        if not any(f"/{layer}_" in t["name"] or f"/{layer}/" in t["name"] for t in outputs):
            continue
        for i in list(op["inputs"]) + list(op["outputs"]):
            if i in tensors and tensors[i]["dtype"] not in (np.int32, np.int64, np.complex64):
                dtypes.add(tensors[i]["dtype"])
    return dtypes


def test_every_tflite_variant_runs_with_builtin_ops_and_tracks_keras(lstm_model, spec,
                                                                     artifacts):
    out, paths = artifacts
    x, _ = tone_dataset(8, seed=4)
    reference = lstm_model(x).numpy()
    for variant in tflite.VARIANTS:
        predictor = load_predictor(paths[variant])
        assert isinstance(predictor, TFLitePredictor)
        got = predictor.window_logits(x)
        with open(paths[variant], "rb") as f:
            ops = tflite.op_summary(f.read())
        assert ops["flex_ops"] == [], variant
        assert ops["ops"].get("RFFT2D") == 1
        # The frontend is never quantized (float16 only stores its constants in half).
        allowed = {np.float32, np.float16} if variant == "float16" else {np.float32}
        assert _layer_dtypes(predictor.interpreter) <= allowed, variant
        # int8 also keeps the first conv block float; the blocks after it are int8.
        if variant == "int8":
            assert _layer_dtypes(predictor.interpreter, "block1_conv") == {np.float32}
            assert np.int8 in _layer_dtypes(predictor.interpreter, "block2_conv")
        agree = np.mean(got.argmax(-1) == reference.argmax(-1))
        if variant == "float32":
            np.testing.assert_allclose(got, reference, atol=1e-4)
        elif variant == "float16":
            np.testing.assert_allclose(got, reference, atol=0.05)
        else:
            assert agree >= 0.9, (variant, agree)
        assert (ops["int8_ops"] > 10) == (variant == "int8"), (variant, ops["int8_ops"])
        assert (ops["int8_weight_ops"] > 0) == (variant in ("dynamic", "int8")), variant
    # (This model's weights are too few for the 8-bit files to be smaller than float32: the
    # quantization parameters and the float frontend's constants dominate.)
    sizes = {v: (out / f"model_{v}.tflite").stat().st_size for v in tflite.VARIANTS}
    assert sizes["float16"] < sizes["float32"]


def _arithmetic_dtypes(path, layer: str) -> set:
    """Dtypes of a layer's arithmetic ops (matmuls, gates, products, sums), read without
    delegates so every op keeps its own type. Quantize, dequantize and split ops at the
    layer's int8 borders are not arithmetic."""
    resolver = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = tf.lite.Interpreter(model_path=str(path),
                                      experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return _layer_dtypes(interpreter, layer,
                         ops={"FULLY_CONNECTED", "BATCH_MATMUL", "LOGISTIC", "TANH", "MUL", "ADD"})


def test_int8_keeps_the_named_classifier_layers_in_float(lstm_model, spec, artifacts,
                                                         tmp_path):
    calibration, _ = tone_dataset(10, seed=2)
    with pytest.raises(ValueError, match=r"\['lstm'\] are not layers of the classifier"):
        write_artifacts(lstm_model, spec, str(tmp_path), ("int8",), calibration, ("lstm",))
    assert np.int8 in _arithmetic_dtypes(artifacts[1]["int8"], "bilstm")
    paths = write_artifacts(lstm_model, spec, str(tmp_path), ("int8",), calibration,
                            ("bilstm",))
    assert _arithmetic_dtypes(paths["int8"], "bilstm") == {np.float32}
    assert np.int8 in _arithmetic_dtypes(paths["int8"], "embed")  # the chunk encoder's Dense
    kept = load_predictor(paths["int8"])
    x, _ = tone_dataset(8, seed=4)
    agree = np.mean(kept.window_logits(x).argmax(-1) == lstm_model(x).numpy().argmax(-1))
    assert agree >= 0.9, agree


def test_savedmodel_serves_raw_audio_like_keras_and_rejects_bad_input(lstm_model, spec,
                                                                      artifacts):
    _, paths = artifacts
    keras_predictor = KerasPredictor(lstm_model, spec)
    served = SavedModelPredictor(paths["savedmodel"])
    assert served.spec == spec
    x, _ = tone_dataset(1, seed=5, seconds=1.3)  # several windows each
    for wave in x:
        want, windows = keras_predictor.utterance_logits(wave)
        got, served_windows = served.utterance_logits(wave)
        assert windows == served_windows == len(spec_windows(spec, wave))
        np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_allclose(served.window_logits(keras_predictor.windows(wave)),
                                   lstm_model(keras_predictor.windows(wave)).numpy(),
                                   atol=1e-4)
    signature = tf.saved_model.load(paths["savedmodel"]).signatures["serving_default"]
    out = signature(waveform=tf.constant(x[0]))
    assert out["label"].numpy().decode() == TONE_LABELS[int(out["label_index"])]
    assert float(tf.reduce_sum(out["probabilities"])) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="float"):
        signature(waveform=tf.constant((x[0] * 32767).astype(np.int16)))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 1-D"):
        signature(waveform=tf.constant(np.stack([x[0], x[0]])))
    with pytest.raises(tf.errors.InvalidArgumentError, match="no samples"):
        signature(waveform=tf.zeros([0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="silent"):
        signature(waveform=tf.zeros([4000]))


def spec_windows(spec: ServingSpec, wave: np.ndarray) -> list[int]:
    from ser_tf.data.audio import condition
    from ser_tf.data.pipeline import window_starts

    n = int(tf.size(condition(tf.constant(wave), spec.audio)))
    return window_starts(n, spec.segment_samples, spec.hop_samples)


def test_predictors_check_their_input(spec):
    with pytest.raises(InputError, match="divide by 32768"):
        check_waveform(np.zeros(10, np.int16), RATE)
    with pytest.raises(InputError, match="mix the channels down"):
        check_waveform(np.zeros((10, 2), np.float32), RATE)
    with pytest.raises(InputError, match="no samples"):
        check_waveform(np.zeros(0, np.float32), RATE)
    with pytest.raises(InputError, match="NaN"):
        check_waveform(np.array([0.1, np.nan], np.float32), RATE)
    assert check_waveform(np.zeros((1, 5)), RATE).shape == (5,)  # [1, n] is mono


def test_conversion_failures_are_clear_errors(tmp_path):
    with pytest.raises(tflite.ConversionError, match="float32 conversion .* failed"):
        tflite.convert(str(tmp_path), "float32")
    with pytest.raises(ValueError, match="calibration"):
        tflite.convert(str(tmp_path), "int8")
    with pytest.raises(ValueError, match="unknown TFLite variant"):
        tflite.convert(str(tmp_path), "int4")


def test_verification_measures_every_artifact_against_keras(lstm_model, spec, artifacts):
    _, paths = artifacts
    waves, y = tone_dataset(3, seed=6, seconds=0.8)
    keras_predictor = KerasPredictor(lstm_model, spec)
    clips = np.stack([keras_predictor.windows(w)[0] for w in waves])
    job = ExportJob(transfer_linf_db=(-30.0,), blackbox_clips=3, latency_utterances=2,
                    progress=False)
    keras_path = paths["savedmodel"]  # stands in for model.keras: only its size is read
    report = verify_artifacts(lstm_model, spec, paths, list(waves), clips, y, TONE_LABELS,
                              job, keras_path)
    predictions = report.pop("_predictions")
    names = [r["name"] for r in report["artifacts"]]
    assert names == ["keras", "savedmodel", *tflite.VARIANTS]
    keras_row = report["artifacts"][0]
    assert keras_row["agreement"] == 1.0 and keras_row["max_abs_diff"] == 0.0
    for row in report["artifacts"]:
        assert set(row["robust"]) == {"transfer pgd -30 dB", "spsa -40 dB"}
        assert row["robust"]["spsa -40 dB"]["queries_per_example"] > 0
        assert row["latency"]["utterance_ms_median"] > 0 and row["latency"]["threads"] == 1
        assert 0 <= row["uar"] <= 1 and row["size_bytes"] > 0
        clean = predictions[row["name"]]["clean"][1]
        assert row["agreement"] == pytest.approx(
            np.mean(clean == predictions["keras"]["clean"][1]))
    # The white-box attack crafted on Keras fools Keras itself at -30 dB.
    assert keras_row["robust"]["transfer pgd -30 dB"]["accuracy"] < keras_row["accuracy"]
    assert report["artifacts"][2]["checks"][0]["check"] == "agreement >= 0.999"
