"""Distributed training: MirroredStrategy over two logical CPU devices and a two-worker
MultiWorkerMirroredStrategy on loopback ports, against one device.

Strategies are per process (and the CPU split must precede TensorFlow's start-up), so the
distributed runs are subprocesses; the one-device references run in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ser_tf.data.audio import AudioConfig
from ser_tf.data.corpora import write_manifest
from ser_tf.defenses import AdversarialConfig, GANConfig, fold_trainer
from ser_tf.attacks.budget import Budget
from ser_tf.models import ModelConfig
from ser_tf.training import distribute
from ser_tf.training.experiment import ExperimentConfig, run_experiment
from ser_tf.training.standard import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
# No dropout or SpecAugment: the only difference left between one device and two replicas
# is batch normalisation's per-replica batch statistics.
TINY = dict(segment_s=0.5, n_mels=24, conv_filters=(4, 8), chunk_frames=12, hop_frames=6,
            chunk_units=8, lstm_units=4, dropout=0.0, specaugment=False)
FLAGS = ["--segment_s=0.5", "--n_mels=24", "--conv_filters=4,8", "--chunk_frames=12",
         "--chunk_hop=6", "--chunk_units=8", "--lstm_units=4", "--dropout=0",
         "--nospecaugment", "--batch_size=6", "--val_speakers=1", "--patience=0",
         "--verbose=2", "--protocol=speakers", "--test_speakers=s01", "--corpus=manifest"]


@pytest.fixture(scope="module")
def manifest(synthetic_corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(synthetic_corpus, path)
    return str(path)


def _config(manifest, workdir, trainer="standard", method=None, epochs=3, **train):
    # 18 training utterances: three full batches of 6, nothing dropped on two replicas.
    return ExperimentConfig(
        workdir=str(workdir), corpus="manifest", data_dir=manifest, protocol="speakers",
        test_speakers=("s01",), val_speakers=1, audio=AudioConfig(),
        model=ModelConfig(**TINY), trainer=trainer, method=method,
        train=TrainConfig(epochs=epochs, batch_size=6, patience=0, **train), verbose=0)


METHODS = {
    "standard": None,
    "adversarial": AdversarialConfig(method="pgd", steps=2, budget=Budget("linf_db", -40.0),
                                     warmup_epochs=1, val_steps=2),
    "gan": GANConfig(steps=6, critic_steps=2, batch_size=6, width=8, latent_dim=8,
                     checkpoint_every=3),
}


def _python(code: str, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)


def test_strategy_names_and_cluster_specs_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="unknown strategy 'nccl'"):
        distribute._make("nccl")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        distribute.cluster_spec()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not a cluster spec"):
        distribute.cluster_spec()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1"]},
                                                "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ValueError, match="not a cluster spec"):
        distribute.cluster_spec()
    with pytest.raises(ValueError, match=">= 1"):
        distribute.split_cpu(0)
    # One device here: every batch size splits; the default strategy is the only one made.
    assert distribute.replicas() == 1
    distribute.check_batch(5)


def test_two_replicas_step_is_the_mean_of_the_two_half_batch_steps():
    """With SGD one step's weight change is -lr * gradient: under MirroredStrategy it must
    be the mean of the changes two single-device steps make on each half of the batch
    (each half with its own batch-norm statistics, as each replica has). Wrong loss
    scaling doubles it; a replica left out halves it."""
    out = _python("""
        import json
        import numpy as np, tensorflow as tf, keras
        from ser_tf.training import distribute
        distribute.split_cpu(2)
        from ser_tf.models import ModelConfig, build_model
        from ser_tf.training.standard import TrainingSteps

        cfg = ModelConfig(segment_s=0.5, n_mels=24, conv_filters=(4, 8), chunk_frames=12,
                          hop_frames=6, chunk_units=8, lstm_units=4, dropout=0.0,
                          specaugment=False)
        rng = np.random.default_rng(0)
        x = rng.normal(0, 0.1, (8, 8000)).astype("float32")
        y = np.array([0, 1, 2, 0, 1, 2, 0, 1], "int32")
        w = rng.uniform(0.5, 2.0, 8).astype("float32")

        def delta(strategy, xb, yb, wb):
            with strategy.scope():
                keras.utils.set_random_seed(1)
                model = build_model(cfg, ["a", "b", "c"], seed=1)
                model(x[:2])
                steps = TrainingSteps(model)
                steps.compile(optimizer=keras.optimizers.SGD(0.5))
                before = [v.numpy().copy() for v in model.trainable_variables]
                data = tf.data.Dataset.from_tensor_slices((xb, yb, wb)).batch(len(xb))
                if strategy.num_replicas_in_sync > 1:
                    data = strategy.experimental_distribute_dataset(data)
                for batch in data:
                    steps.step_function()(batch)
                return [v.numpy() - b for v, b in zip(model.trainable_variables, before)]

        one = tf.distribute.get_strategy()
        two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert two.num_replicas_in_sync == 2
        mirrored = delta(two, x, y, w)
        halves = [delta(one, x[:4], y[:4], w[:4]), delta(one, x[4:], y[4:], w[4:])]
        mean = [(a + b) / 2 for a, b in zip(*halves)]
        err = max(np.abs(m - r).max() / (np.abs(r).max() + 1e-12)
                  for m, r in zip(mirrored, mean))
        size = max(np.abs(r).max() for r in mean)
        print(json.dumps({"relative_error": float(err), "largest_change": float(size)}))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["largest_change"] > 1e-4  # the step did something
    assert result["relative_error"] < 1e-3, result


def test_sparse_gradients_are_scaled_like_dense_ones():
    """An embedding's gradient is ``IndexedSlices`` (the conditional GAN's label
    embedding): over two replicas, :func:`distribute.minimize` must scale it like a dense
    one, so that the update equals the single-device update of the whole batch."""
    out = _python("""
        import json
        import numpy as np, tensorflow as tf, keras
        from ser_tf.training import distribute
        distribute.split_cpu(2)

        ids = np.array([0, 1, 2, 1, 1, 0, 2, 2], "int32")

        def update(strategy):
            with strategy.scope():
                table = tf.Variable(np.arange(6, dtype="float32").reshape(3, 2))
                dense = tf.Variable(np.ones(2, "float32"))
                opt = keras.optimizers.SGD(0.1)
                opt.build([table, dense])

            def step(i):
                with tf.GradientTape(persistent=True) as tape:
                    loss = tf.reduce_mean(tf.square(tf.gather(table, i) * dense))
                assert isinstance(tape.gradient(loss, table), tf.IndexedSlices)
                distribute.minimize(opt, tape, loss, [table, dense])

            data = tf.data.Dataset.from_tensor_slices(ids).batch(len(ids))
            if strategy.num_replicas_in_sync > 1:
                data = strategy.experimental_distribute_dataset(data)
            for batch in data:
                tf.function(lambda b: strategy.run(step, args=(b,)))(batch)
            return np.concatenate([table.numpy().ravel(), dense.numpy()])

        two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        print(json.dumps({"mirrored": update(two).tolist(),
                          "one": update(tf.distribute.get_strategy()).tolist()}))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(result["mirrored"], result["one"], rtol=1e-5)
    assert not np.allclose(result["one"], list(range(6)) + [1.0, 1.0])  # it did update


@pytest.mark.slow
def test_mirrored_training_agrees_with_one_device_for_every_trainer(manifest, tmp_path):
    script = """
        import json, sys
        from ser_tf.training import distribute
        distribute.split_cpu(2)
        sys.path.insert(0, "tests")
        from test_distribute import METHODS, _config
        from ser_tf.defenses import fold_trainer
        from ser_tf.training.experiment import run_experiment

        manifest, root = sys.argv[1], sys.argv[2]
        out = {}
        for name, method in METHODS.items():
            cfg = _config(manifest, f"{root}/{name}", name, method, strategy="mirrored")
            out[name] = run_experiment(cfg, fold_trainer(cfg))
        print(json.dumps(out))
    """
    done = _python(script, manifest, str(tmp_path / "mirrored"))
    assert done.returncode == 0, done.stderr[-3000:]
    mirrored = json.loads(done.stdout.strip().splitlines()[-1])
    for name, method in METHODS.items():
        cfg = _config(manifest, tmp_path / "one" / name, name, method)
        one = run_experiment(cfg, fold_trainer(cfg))
        two = mirrored[name]
        assert two["strategy"] == "mirrored" and two["replicas"] == 2
        assert one["replicas"] == 1
        assert [h["epoch"] for h in two["history"]] == [1, 2, 3]
        for a, b in zip(one["history"], two["history"]):
            # Same data, same initial weights, same global batch: the per-epoch training
            # loss agrees to within the batch-norm statistics' difference.
            assert abs(a["loss"] - b["loss"]) < 0.05 * a["loss"], (name, a, b)
            assert np.isfinite(b["loss"])
        if name == "adversarial":
            assert "adv_accuracy" in two["history"][-1]
            assert "val_robust_uar" in two["history"][-1]
        if name == "gan":
            assert "gen_accuracy" in two["history"][-1]
            assert two["gan"]["quality"]["fd_generated_vs_real"] > 0


def _workers(manifest, workdir, epochs: int) -> list[subprocess.Popen]:
    procs = []
    for index, tf_config in enumerate(distribute.loopback_tf_configs(2)):
        env = {**ENV, "TF_CONFIG": tf_config}
        log = open(Path(workdir).parent / f"worker{index}.log", "a")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainers.train", *FLAGS, f"--data_dir={manifest}",
             f"--workdir={workdir}", f"--epochs={epochs}", "--strategy=multiworker"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


@pytest.mark.slow
def test_two_workers_train_like_one_and_write_outputs_only_on_the_chief(manifest, tmp_path):
    workdir = tmp_path / "run" / "w"
    workdir.parent.mkdir()
    codes = _wait(_workers(manifest, workdir, epochs=3), timeout=420)
    logs = "".join((tmp_path / "run" / f"worker{k}.log").read_text() for k in range(2))
    assert codes == [0, 0], logs[-3000:]
    two = json.loads((workdir / "metrics.json").read_text())
    assert two["strategy"] == "multiworker" and two["replicas"] == 2
    # Nothing of worker 1 is left behind; it said where the results are.
    assert not list(workdir.rglob(".worker_*"))
    assert "worker 1: done" in (tmp_path / "run" / "worker1.log").read_text()
    cfg = _config(manifest, tmp_path / "one", epochs=3)
    one = run_experiment(cfg, fold_trainer(cfg))
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) < 0.05 * a["loss"], (a, b)
    assert len(two["history"]) == 3


@pytest.mark.slow
def test_a_killed_worker_and_a_restarted_cluster_lose_no_epoch(manifest, tmp_path):
    workdir = tmp_path / "run" / "w"
    workdir.parent.mkdir()
    state = workdir / "checkpoints" / "state.json"
    procs = _workers(manifest, workdir, epochs=6)
    deadline = time.time() + 420
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if state.exists() and json.loads(state.read_text() or "{}").get("epoch", 0) >= 2:
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "training ended before the kill"
    first = json.loads(state.read_text())
    procs[1].send_signal(signal.SIGKILL)
    # The chief's collectives fail without its peer (or it is stopped, as a cluster
    # manager restarting the job would): either way the job is restarted as a whole.
    _wait(procs, timeout=60)
    assert not (workdir / "metrics.json").exists()

    codes = _wait(_workers(manifest, workdir, epochs=6), timeout=420)
    logs = (tmp_path / "run" / "worker0.log").read_text()
    assert codes == [0, 0], logs[-3000:]
    assert "resuming" in logs
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first["history"], metrics["history"]):
        assert before == after
