"""Human-facing reports: confusion-matrix and spectrogram plots, text summaries.

Plots are rendered with matplotlib's Agg backend to PNG bytes, which the jobs write to files
and to TensorBoard (``tf.summary.image`` after :func:`png_to_tensor`).
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_matrix_png(cm: Sequence[Sequence[int]], labels: Sequence[str],
                         title: str = "") -> bytes:
    """Row-normalised confusion matrix (recall per cell) with counts, as PNG bytes."""
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = 1.0 + 0.7 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall")
    if title:
        ax.set_title(title)
    return _to_png(fig)


def spectrograms_png(features: np.ndarray, titles: Sequence[str]) -> bytes:
    """A grid of feature maps ``[n, frames, bins]`` (time on x, bins on y), as PNG bytes."""
    n = len(features)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(np.asarray(features[k]).T, origin="lower", aspect="auto", cmap="magma")
            ax.set_title(titles[k], fontsize=8)
    return _to_png(fig)


def png_to_tensor(png: bytes) -> tf.Tensor:
    """PNG bytes -> ``[1, H, W, 4]`` uint8 tensor for ``tf.summary.image``."""
    return tf.image.decode_png(png, channels=4)[None]


def format_metrics(metrics: dict, title: str = "") -> str:
    """A short plain-text summary of a metrics dict (accuracy, UAR, per class, per group)."""
    lines = [title] if title else []
    uar = f"UAR {metrics['uar']:.3f}"
    acc = f"accuracy {metrics['accuracy']:.3f}"
    if "uar_std" in metrics:
        uar += f" ± {metrics['uar_std']:.3f}"
        acc += f" ± {metrics['accuracy_std']:.3f}"
        lines.append(f"  {len(metrics['folds'])} folds (mean ± std): {uar}, {acc}")
        metrics = metrics.get("pooled", metrics)
        lines.append(f"  pooled over folds: UAR {metrics['uar']:.3f}, "
                     f"accuracy {metrics['accuracy']:.3f}")
    else:
        lines.append(f"  {uar}, {acc} (n={metrics['n']})")
    if "per_class_recall" in metrics:
        recalls = ", ".join(f"{k} {v:.2f}" for k, v in metrics["per_class_recall"].items()
                            if v is not None)
        lines.append(f"  recall per class: {recalls}")
    for key in ("gender", "language"):
        groups = metrics.get("by_group", {}).get(key, {})
        if groups:
            parts = ", ".join(f"{g} {m['uar']:.3f}" for g, m in groups.items())
            lines.append(f"  UAR by {key}: {parts}")
    return "\n".join(lines)


def robustness_png(robustness: dict, metric: str = "accuracy") -> bytes:
    """Robustness curves as PNG bytes: ``metric`` against budget, one line per attack.

    One panel per (domain, budget kind) of ``robustness["attacks"]`` (the
    ``robustness.json`` schema); the clean figure is a dashed line. Budgets run from weak
    to strong left to right (dB below peak rising, SNR falling, feature radii rising).
    """
    panels: dict[tuple[str, str], dict[str, list]] = {}
    for row in robustness["attacks"]:
        key = (row["domain"], row["budget"]["kind"])
        panels.setdefault(key, {}).setdefault(row["name"], []).append(
            (row["budget"]["value"], row[metric]))
    if not panels:
        raise ValueError("no attack results to plot")
    titles = {"linf_db": "L-inf, dB below each utterance's peak",
              "snr_db": "L2, SNR (dB)", "linf": "L-inf (normalised feature units)",
              "l2": "L2 (normalised feature units)"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8), squeeze=False)
    for ax, ((domain, kind), lines) in zip(axes.flat, sorted(panels.items())):
        for name, points in sorted(lines.items()):
            values, scores = zip(*sorted(points))
            ax.plot(values, scores, marker="o", label=name)
        ax.axhline(robustness["clean"][metric], color="black", linestyle="--", label="clean")
        if kind == "snr_db":
            ax.invert_xaxis()
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel(titles[kind])
        ax.set_ylabel(metric if metric != "uar" else "UAR")
        ax.set_title(f"{domain} domain")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _to_png(fig)


def format_robustness(robustness: dict, title: str = "") -> str:
    """A plain-text table of a ``robustness.json``: one line per attack and budget."""
    clean = robustness["clean"]
    lines = [title] if title else []
    lines.append(f"  clean: accuracy {clean['accuracy']:.3f}, UAR {clean['uar']:.3f} "
                 f"(n={clean['n']})")
    lines.append(f"  {'attack':<10} {'domain':<9} {'budget':<14} {'acc':>6} {'UAR':>6} "
                 f"{'success':>8} {'SNR dB':>7} {'queries':>9}")
    for row in robustness["attacks"]:
        snr = row.get("mean_snr_db")
        queries = row.get("queries_per_example")
        success = row.get("success_rate")
        lines.append(
            f"  {row['name']:<10} {row['domain']:<9} {row['label']:<14} "
            f"{row['accuracy']:>6.3f} {row['uar']:>6.3f} "
            f"{'' if success is None else f'{success:.3f}':>8} "
            f"{'' if snr is None else f'{snr:.1f}':>7} "
            f"{'' if queries is None else f'{queries:.0f}':>9}")
    return "\n".join(lines)
