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


def write_flags(workdir: str, anchor_flag: str = "workdir") -> str:
    """Writes the app's resolved flags to ``workdir/flags.txt`` (a valid flagfile).

    Args:
      workdir: the job's output folder (created).
      anchor_flag: a flag the app defines; every flag of the module that defines it is
        written, so the file reproduces the run with ``--flagfile``.

    Returns:
      The file's path.
    """
    fv = flags.FLAGS
    module = fv.find_module_defining_flag(anchor_flag)
    lines = [fl.serialize() for fl in sorted(fv.get_flags_for_module(module),
                                             key=lambda fl: fl.name)]
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "flags.txt")
    with open(path, "w") as f:
        f.write("\n".join(line for line in lines if line) + "\n")
    return path


def training_config(workdir: str, data_dir: str = ""):
    """The training run's ExperimentConfig, rebuilt from ``workdir/flags.txt``."""
    from trainers import train

    path = os.path.join(workdir, "flags.txt")
    if not os.path.exists(path):
        raise app.UsageError(f"{workdir} is not a ser-train workdir (no flags.txt)")
    fv = flags.FlagValues()
    train.define_flags(fv)
    argv = ["ser-train", f"--flagfile={path}", f"--workdir={workdir}", "--verbose=0"]
    if data_dir:
        argv.append(f"--data_dir={data_dir}")
    fv(argv)
    return train.build_config(fv)


def floats(values, name: str) -> tuple[float, ...]:
    """A list flag's values as floats, or a usage error naming the flag."""
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} takes numbers, got {','.join(values)}") from None
