"""Runs the benchmarks and writes BENCHMARKS.md (``make bench``).

``python -m bench.run [--out=BENCHMARKS.md] [--quick] [--only=pipeline,training]``

The generated text goes between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``;
everything outside those markers (hand-written results, such as the EmoDB accuracy
figures) is kept as it is. Inside, each report has its own pair of markers
(``<!-- bench:NAME:begin -->`` ...), so ``--only=pipeline`` replaces the pipeline section
and keeps the training section of the previous run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
REPORTS = ("pipeline", "training", "attack", "defenses", "distribute")
TITLES = {"pipeline": "Input pipeline: ser_tf tf.data vs a librosa loop",
          "training": "Training throughput: ser_tf tf.data path vs NumPy arrays",
          "attack": "Attack throughput: ser_tf PGD-10 vs IBM ART and the gradient bound",
          "defenses": "Defended training cost: each method's epoch time vs standard training",
          "distribute": "Data-parallel training: one replica vs two (--strategy)"}
DEFAULT_TITLE = "# Benchmarks\n"


def _log(message: str) -> None:
    print(f"[bench.run] {message}", file=sys.stderr, flush=True)


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on."""
    import tensorflow as tf

    info = {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "cpu": cpu_model(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "platform": platform.platform()}
    for module in ("keras", "tensorflow_io", "librosa", "soxr"):
        try:
            info[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not listed
            pass
    return info


def command_line(argv: list[str]) -> str:
    """The command as the user typed it: ``make bench`` when make ran us with its flags."""
    if os.environ.get("MAKELEVEL") and argv == ["--out=BENCHMARKS.md"]:
        return "make bench"
    return "python -m bench.run" + "".join(" " + shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------- the file


def split_existing(text: str) -> tuple[str, str, dict[str, str]]:
    """Splits an existing BENCHMARKS.md into (before, after, generated sections).

    Args:
      text: the file's content ("" if there is none).

    Returns:
      The text before the begin marker, the text after the end marker, and the
      previously generated sections by name (markers included). A file without markers
      is all "before" (the generated region is appended to it).

    Raises:
      ValueError: only one marker, or the markers out of order (the file would be
        damaged by guessing).
    """
    has_begin, has_end = BEGIN in text, END in text
    if not has_begin and not has_end:
        return text, "", {}
    if has_begin != has_end or text.count(BEGIN) != 1 or text.count(END) != 1 \
            or text.index(BEGIN) > text.index(END):
        raise ValueError(f"malformed benchmark markers: need exactly one {BEGIN} followed by "
                         f"one {END}; fix the file by hand")
    before, rest = text.split(BEGIN, 1)
    region, after = rest.split(END, 1)
    sections = {}
    for name in REPORTS:
        begin, end = _section_markers(name)
        match = re.search(re.escape(begin) + r".*?" + re.escape(end), region, re.S)
        if match:
            sections[name] = match.group(0)
    return before, after, sections


def render_region(header: str, sections: dict[str, str]) -> str:
    """The generated region, markers included, sections in :data:`REPORTS` order."""
    body = [header] + [sections[name] for name in REPORTS if name in sections]
    return BEGIN + "\n" + "\n\n".join(b.strip("\n") for b in body) + "\n" + END


def write_benchmarks(path: Path, header: str, new_sections: dict[str, str]) -> None:
    """Writes the generated region into ``path``, keeping everything outside it.

    Sections not in ``new_sections`` keep their previous generated text.
    """
    text = path.read_text() if path.exists() else ""
    before, after, sections = split_existing(text)
    sections.update(new_sections)
    if not before.strip() and not after.strip():
        before = DEFAULT_TITLE + "\n"
    elif not before.endswith("\n\n") and before:
        before = before.rstrip("\n") + "\n\n"
    if not after.startswith("\n"):
        after = "\n" + after
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(before + render_region(header, sections) + after)
    os.replace(tmp, path)  # never leave a half-written file over the hand-written parts


# --------------------------------------------------------------------------- sections


def _header(info: dict, command: str, when: str, load: tuple[float, float],
            quick: bool) -> str:
    versions = ", ".join(f"{k} {info[k]}" for k in
                         ("tensorflow", "keras", "tensorflow_io", "librosa", "soxr")
                         if k in info)
    lines = [
        "## Generated benchmarks",
        "",
        "This section is written by `make bench` (`python -m bench.run`); edit outside the "
        "`bench:begin` / `bench:end` markers only.",
        "",
        f"- When: {when} (last run; each section says when it was measured)",
        f"- Machine: {info['nproc']} CPU cores (nproc), {info['cpu']}; "
        f"Python {info['python']}, {versions}",
        f"- Command: `{command}`",
        f"- Load average (1 min) at start / end of the run: {load[0]:.2f} / {load[1]:.2f} "
        "(other jobs share this machine; compare ratios, not absolute rates)",
    ]
    if quick:
        lines.append("- **Quick smoke run (`--quick`): fewer files and repeats; not "
                     "representative. Run `make bench` for the real figures.**")
    return "\n".join(lines)


def _section(name: str, body: str, when: str, command: str, seconds: float,
             quick: bool, machine: str) -> str:
    begin, end = _section_markers(name)
    note = " **(quick smoke run, not representative)**" if quick else ""
    # Each section names its machine: sections of other runs, perhaps on other CPUs, stay.
    return "\n".join([begin, f"### {TITLES[name]}", "",
                      f"_Measured {when} on {machine} by `{command}` in {seconds:.0f} s."
                      f"{note}_", "", body, end])


def _run_pipeline(quick: bool, repeats: int | None) -> tuple[dict, str]:
    from bench import pipeline

    if quick:
        report = pipeline.pipeline_report(repeats=repeats or 1, max_files=64,
                                          num_speech_files=2)
    else:
        report = pipeline.pipeline_report(repeats=repeats or 3)
    return report, pipeline.to_markdown(report)


def _run_training(quick: bool, repeats: int | None) -> tuple[dict, str]:
    from bench import training

    if quick:
        report = training.training_report(epochs=2, repeats=repeats or 1, max_files=96)
    else:
        report = training.training_report(epochs=3, repeats=repeats or 3)
    return report, training.to_markdown(report)


def _run_attack(quick: bool, repeats: int | None) -> tuple[dict, str]:
    from bench import attack

    reports, bodies = {}, []
    for title, flagfile in (("EmoDB CNN-LSTM", "configs/emodb_cnn_lstm.flags"),
                            ("Default CNN-LSTM", None)):
        if quick:
            report = attack.attack_report_subprocess(repeats=repeats or 1, flagfile=flagfile,
                                                     examples=32, art_examples=8)
        else:
            report = attack.attack_report_subprocess(repeats=repeats or 5, flagfile=flagfile)
        reports[title] = report
        bodies.append(f"#### {title}\n\n{attack.to_markdown(report)}")
    return reports, "\n\n".join(bodies)


def _run_defenses(quick: bool, repeats: int | None) -> tuple[dict, str]:
    from bench import defenses

    if quick:
        report = defenses.defenses_report(epochs=2, repeats=repeats or 1, max_files=48,
                                          steps=2, stage_steps=3)
    else:
        report = defenses.defenses_report(repeats=repeats or 2)
    return report, defenses.to_markdown(report)


def _run_distribute(quick: bool, repeats: int | None) -> tuple[dict, str]:
    from bench import distribute

    if quick:
        report = distribute.distribute_report(epochs=2, repeats=repeats or 1, files=64)
    else:
        report = distribute.distribute_report(repeats=repeats or 2)
    return report, distribute.to_markdown(report)


RUNNERS: dict[str, Callable[[bool, int | None], tuple[dict, str]]] = {
    "pipeline": _run_pipeline, "training": _run_training, "attack": _run_attack,
    "defenses": _run_defenses, "distribute": _run_distribute}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.run``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="BENCHMARKS.md",
                        help="Markdown file to write (hand-written parts are kept)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer files, epochs and repeats (minutes less; "
                             "figures are labelled as not representative)")
    parser.add_argument("--only", default=",".join(REPORTS),
                        help=f"comma-separated reports to run, of: {', '.join(REPORTS)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per contender (default 3, 1 with --quick)")
    parser.add_argument("--json", default="",
                        help="also write the raw reports to this JSON file")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(REPORTS))
    if unknown or not only:
        parser.error(f"--only takes names from {', '.join(REPORTS)}; got {args.only!r}")
    out = Path(args.out)
    # Fail on a damaged file before spending minutes measuring.
    if out.exists():
        split_existing(out.read_text())

    import tensorflow as tf

    # tfio's resample logs a long warning each time it is traced (its known while_loop
    # fallback, which this benchmark measures on purpose).
    tf.get_logger().setLevel(logging.ERROR)
    command = command_line(argv)
    info = machine_info()
    load_start = os.getloadavg()[0]
    _log(f"{info['nproc']} cores, {info['cpu']}, TF {info['tensorflow']}; load average "
         f"{load_start:.2f}; running {', '.join(only)}{' (quick)' if args.quick else ''}")
    raw, sections = {"machine": info, "command": command}, {}
    failed = []
    for name in only:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        start = time.perf_counter()
        try:
            report, body = RUNNERS[name](args.quick, args.repeats)
        except Exception:  # noqa: BLE001 - report it, keep the sections already measured
            _log(f"{name} FAILED:\n{traceback.format_exc()}")
            failed.append(name)
            continue
        seconds = time.perf_counter() - start
        raw[name] = report
        sections[name] = _section(name, body, when, command, seconds, args.quick,
                                  f"{info['nproc']} cores of {info['cpu']}")
        _log(f"{name} done in {seconds:.0f} s")
        # Written after every report, so a later failure does not lose this one.
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = _header(info, command, now, (load_start, os.getloadavg()[0]), args.quick)
        write_benchmarks(out, header, sections)
        _log(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2, default=float))
        _log(f"wrote {args.json}")
    if failed:
        _log(f"failed: {', '.join(failed)} (their previous sections, if any, are kept)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
