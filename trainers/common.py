"""Helpers shared by the absl apps: logging setup and the resolved-flags record."""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging


def setup_logging() -> None:
    """INFO-level logs to stderr, one short line each (library modules use ``logging``)."""
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.use_absl_handler()
    absl_logging.get_absl_handler().setFormatter(
        logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    # absl's own INFO lines (checkpoint sharding timings, SavedModel fingerprints) are noise
    # for users. A filter, not a level: TF's SavedModel writer resets the absl logger's level.
    handler = absl_logging.get_absl_handler()
    handler.addFilter(lambda r: not (r.name == "absl" and r.levelno < logging.WARNING))
    logging.getLogger("absl").setLevel(logging.WARNING)
    # tf.distribute logs every cross-device reduction it sets up at INFO.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def setup_strategy(fv: flags.FlagValues) -> None:
    """Makes the process's distribution strategy from ser-train's ``--strategy`` and
    ``--cpu_devices``. Call it before any TensorFlow op: multi-worker collectives must be
    set up first.

    Raises:
      app.UsageError: a bad strategy setting (e.g. no TF_CONFIG for multiworker).
    """
    from ser_tf.training import distribute

    try:
        if fv.cpu_devices:
            distribute.split_cpu(fv.cpu_devices)
        distribute.get_strategy(fv.strategy)
    except (ValueError, RuntimeError) as err:
        raise app.UsageError(str(err)) from None


def flag_lines(fv: flags.FlagValues, anchor_flag: str = "workdir") -> list[str]:
    """Every flag of the module that defines ``anchor_flag`` in ``fv``, as flagfile lines
    (sorted by name; flags without a value left out)."""
    module = fv.find_module_defining_flag(anchor_flag)
    return [line for line in (fl.serialize() for fl in sorted(
        fv.get_flags_for_module(module), key=lambda fl: fl.name)) if line]


def write_flags(workdir: str, anchor_flag: str = "workdir") -> str:
    """Writes the app's resolved flags to ``workdir/flags.txt`` (a valid flagfile).

    Args:
      workdir: the job's output folder (created).
      anchor_flag: a flag the app defines; every flag of the module that defines it is
        written, so the file reproduces the run with ``--flagfile``.

    Returns:
      The file's path.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "flags.txt")
    with open(path, "w") as f:
        f.write("\n".join(flag_lines(flags.FLAGS, anchor_flag)) + "\n")
    return path


def experiment_config(lines, workdir: str, verbose: int = 0):
    """ser-train's ExperimentConfig from flag lines (``--flag=value``, ``--flagfile=...``)
    and a workdir, parsed with ser-train's own flags.

    Raises:
      ValueError: a flag ser-train does not take, or a bad value (the message names it).
    """
    from trainers import train

    fv = flags.FlagValues()
    train.define_flags(fv)
    try:
        fv(["ser-train", *lines, f"--workdir={workdir}", f"--verbose={verbose}"])
        return train.build_config(fv)
    except (flags.Error, app.UsageError) as err:
        raise ValueError(str(err)) from None


def training_config(workdir: str, data_dir: str = ""):
    """The training run's ExperimentConfig, rebuilt from ``workdir/flags.txt``."""
    path = os.path.join(workdir, "flags.txt")
    if not os.path.exists(path):
        raise app.UsageError(f"{workdir} is not a ser-train workdir (no flags.txt)")
    lines = [f"--flagfile={path}"] + ([f"--data_dir={data_dir}"] if data_dir else [])
    try:
        return experiment_config(lines, workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from None


def floats(values, name: str) -> tuple[float, ...]:
    """A list flag's values as floats, or a usage error naming the flag."""
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} takes numbers, got {','.join(values)}") from None
