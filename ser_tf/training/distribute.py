"""Distributed training with TensorFlow's own engine: one strategy per process, for every
trainer.

``ser-train --strategy=NAME`` picks it:

* ``default``: no distribution (one device).
* ``mirrored``: :class:`tf.distribute.MirroredStrategy`, synchronous data parallelism over
  this machine's GPUs, or over its logical CPU devices where there is no GPU
  (``--cpu_devices=N`` splits the CPU into ``N`` of them: a way to run and test the
  distributed code paths on a CPU-only machine).
* ``multiworker``: :class:`tf.distribute.MultiWorkerMirroredStrategy` over the workers
  named in ``TF_CONFIG`` (every worker runs the same command with its own ``TF_CONFIG``).

What holds under every strategy:

* ``--batch_size`` is the global batch; each step splits it over the replicas (it must
  divide evenly, and the last incomplete batch of an epoch is dropped when there is more
  than one replica, so every replica steps in lock-step).
* Gradients are summed over replicas after each replica scaled its own by
  ``1 / replicas`` (:func:`minimize`): the update is the one of the global batch.
* Metrics are Keras metrics, aggregated over replicas (and workers) at the end of each
  epoch before they reach the history, TensorBoard and model selection.
* Only the chief writes the run's outputs. Every other worker runs exactly the same
  program (checkpoint saves included: they may take part in collective ops), writing into
  a private ``.worker_K`` folder inside each workdir (:func:`worker_dir`), which is removed
  when the experiment ends. Resuming reads the chief's checkpoints on every worker, so a
  cluster restarted after a worker was killed continues from the last finished epoch.

The strategy is made once per process (:func:`get_strategy`):
``MultiWorkerMirroredStrategy`` must exist before TensorFlow runs its first op, which is
why the app creates it before decoding any audio.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from typing import Callable

import tensorflow as tf

log = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multiworker")

_strategy: tuple[str, tf.distribute.Strategy] | None = None


def split_cpu(devices: int) -> None:
    """Splits the physical CPU into ``devices`` logical devices (``/cpu:0`` ...), for
    ``mirrored`` on a machine without GPUs. Call before TensorFlow initialises its devices.

    Raises:
      ValueError: fewer than one device.
      RuntimeError: TensorFlow's devices are already initialised with another split.
    """
    if devices < 1:
        raise ValueError(f"--cpu_devices must be >= 1, got {devices}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == devices:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(devices)])
    except RuntimeError as err:
        raise RuntimeError(f"cannot split the CPU into {devices} devices: TensorFlow is "
                           f"already initialised ({err})") from None


def cluster_spec() -> dict:
    """``TF_CONFIG``'s cluster and task, checked.

    Raises:
      ValueError: ``TF_CONFIG`` is missing, not JSON, or does not name this task in its
        cluster.
    """
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        raise ValueError("--strategy=multiworker needs TF_CONFIG: set it on every worker to "
                         '{"cluster": {"worker": ["host0:port", "host1:port"]}, '
                         '"task": {"type": "worker", "index": K}} (see BUILD.md)')
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        members = cluster[task["type"]]
        if not 0 <= int(task["index"]) < len(members):
            raise KeyError("index")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"TF_CONFIG is not a cluster spec with this task in it ({err!r}): "
                         f"{raw}") from None
    return spec


def loopback_tf_configs(workers: int) -> list[str]:
    """``TF_CONFIG`` values for ``workers`` processes on this machine (free loopback
    ports), one per worker index: for trying multi-worker training without a cluster."""
    socks = [socket.socket() for _ in range(workers)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        cluster = {"worker": [f"localhost:{s.getsockname()[1]}" for s in socks]}
    finally:
        for s in socks:
            s.close()
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": k}})
            for k in range(workers)]


def _make(name: str) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return tf.distribute.MirroredStrategy([d.name for d in gpus])
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        if len(cpus) == 1:
            log.warning("--strategy=mirrored on one CPU device: one replica (no GPU here; "
                        "--cpu_devices=N splits the CPU into N devices)")
        return tf.distribute.MirroredStrategy(
            cpus, cross_device_ops=tf.distribute.ReductionToOneDevice(cpus[0]))
    if name == "multiworker":
        cluster_spec()
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    raise ValueError(f"unknown strategy {name!r}; choose from {STRATEGIES}")


def get_strategy(name: str = "default") -> tf.distribute.Strategy:
    """The process's strategy, made on first use.

    Raises:
      ValueError: an unknown name, a bad ``TF_CONFIG``, or a second, different strategy in
        the same process.
    """
    global _strategy
    if _strategy is None:
        strategy = _make(name)
        _strategy = (name, strategy)
        if name != "default":
            log.info("strategy %s: %d replica(s) in sync%s", name,
                     strategy.num_replicas_in_sync,
                     "" if is_chief(strategy) else f" (worker {task_id(strategy)})")
    elif _strategy[0] != name:
        raise ValueError(f"this process already distributes with {_strategy[0]!r}; one "
                         f"strategy per process (asked for {name!r})")
    return _strategy[1]


def task_id(strategy: tf.distribute.Strategy | None = None) -> int:
    """This worker's index in the cluster (0 outside multi-worker training)."""
    resolver = getattr(strategy or current(), "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes the outputs: the ``chief`` task, else worker 0, else the
    only process."""
    resolver = getattr(strategy or current(), "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and not has_chief and int(resolver.task_id) == 0


def current() -> tf.distribute.Strategy:
    """The process's strategy (the default one if none was made)."""
    return _strategy[1] if _strategy is not None else tf.distribute.get_strategy()


def replicas() -> int:
    """Replicas in sync of the current strategy (1 without distribution)."""
    return int(current().num_replicas_in_sync)


def minimize(optimizer, tape: tf.GradientTape, loss: tf.Tensor, variables, *,
             before_update: Callable[[], None] | None = None) -> None:
    """One optimizer update from a replica's ``loss`` (the mean over the replica's
    examples) recorded on ``tape``.

    The gradients are scaled by ``1 / replicas`` before they are applied, so that summed
    over replicas (the strategy's all-reduce in ``apply_gradients``) they are the gradients
    of the mean over the global batch. Every training step of the project updates its
    weights through here; call it in replica context (a train step), after the tape.
    ``before_update`` runs between taking the gradients and applying them (adversarial
    weight perturbation puts the weights back there).
    """
    variables = list(variables)
    grads = tape.gradient(loss, variables)
    if before_update is not None:
        before_update()
    n = tf.distribute.get_strategy().num_replicas_in_sync
    if n > 1:
        grads = [_scaled(g, 1.0 / n) for g in grads]
    optimizer.apply_gradients(zip(grads, variables))


def _scaled(grad, factor: float):
    """A gradient times ``factor``: dense, sparse (``IndexedSlices``, e.g. an embedding's
    rows) or None (a variable the loss does not reach)."""
    if grad is None:
        return None
    if isinstance(grad, tf.IndexedSlices):
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


def first_replica(value):
    """This worker's first replica's part of a distributed value (the value itself when it
    is not distributed)."""
    return current().experimental_local_results(value)[0]


def check_batch(batch_size: int, what: str = "--batch_size") -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over the replicas."""
    n = replicas()
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} is the global batch: it must divide by the "
                         f"{n} replicas in sync")


def distributed(dataset: tf.data.Dataset):
    """A training dataset as the current strategy's replicas take it: with more than one
    replica, distributed over them with element-wise sharding over workers (the data is in
    memory, there are no files to shard); otherwise the dataset itself."""
    strategy = current()
    if strategy.num_replicas_in_sync == 1:
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA)
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def worker_dir(path: str) -> str:
    """Where this process writes what belongs in ``path``: ``path`` itself on the chief,
    ``path/.worker_K`` on worker ``K``."""
    return path if is_chief() else os.path.join(path, f".worker_{task_id()}")


def remove_worker_dirs(root: str) -> None:
    """Removes this worker's private folders under ``root`` (nothing on the chief)."""
    if is_chief() or not os.path.isdir(root):
        return
    name = f".worker_{task_id()}"
    for parent, dirs, _ in os.walk(root, topdown=True):
        if name in dirs:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            dirs.remove(name)
