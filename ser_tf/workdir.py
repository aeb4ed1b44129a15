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
