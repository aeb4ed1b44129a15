"""Workdir conventions shared by every job: atomic JSON outputs and fold folder names."""

from __future__ import annotations

import json
import os


def write_json(path: str, obj: dict) -> None:
    """Writes JSON atomically (temp file + rename): a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def fold_dir(workdir: str, fold_name: str, num_folds: int) -> str:
    """A fold's workdir: the workdir itself for a single split, else ``workdir/fold_XX``."""
    return workdir if num_folds == 1 else os.path.join(workdir, fold_name)


def run_flags(workdir: str) -> dict[str, str]:
    """The resolved flags of a job's run, read from ``workdir/flags.txt`` (one ``--name=value``
    per line, booleans as ``--name`` / ``--noname``): ``{name: value}``, booleans as
    ``"true"`` / ``"false"``.

    Raises:
      FileNotFoundError: ``workdir`` has no ``flags.txt``.
    """
    path = os.path.join(workdir, "flags.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} is not a ser-train workdir (no flags.txt)")
    values: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("--"):
                continue
            name, sep, value = line[2:].partition("=")
            if sep:
                values[name] = value
            elif name.startswith("no"):
                values[name[2:]] = "false"
            else:
                values[name] = "true"
    return values
