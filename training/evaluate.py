"""Test-split evaluation (scikit-learn) and plots (matplotlib, Agg backend).

``evaluate`` turns true class ids and predicted probabilities into plain JSON-ready
numbers: accuracy, per-class and macro/weighted precision, recall, F1 and support, the
confusion matrix (rows = true class, columns = predicted), and one-vs-rest ROC curves
with their AUC. A class with no test examples has no ROC curve (its AUC is ``None``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def evaluate(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Metrics of predictions ``probs`` (``N x k``) against class ids ``y_true``."""
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
        roc_curve,
    )

    k = len(class_names)
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(y_true), k):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(y_true)} x {k}")
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=avg, zero_division=0
        )
        averages[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    cm = confusion_matrix(y_true, y_pred, labels=labels)

    onehot = np.eye(k, dtype=np.int64)[y_true]
    roc: dict[str, Any] = {}
    aucs = []
    for i, name in enumerate(class_names):
        positives = int(onehot[:, i].sum())
        if positives == 0 or positives == len(y_true):
            roc[name] = {"auc": None, "fpr": [], "tpr": []}
            continue
        fpr, tpr, _ = roc_curve(onehot[:, i], probs[:, i])
        auc = float(roc_auc_score(onehot[:, i], probs[:, i]))
        aucs.append(auc)
        roc[name] = {"auc": auc, "fpr": _thin(fpr), "tpr": _thin(tpr)}

    per_class = {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "test_count": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "correct": int((y_true == y_pred).sum()),
        "per_class": per_class,
        "macro": {**averages["macro"], "auc": float(np.mean(aucs)) if aucs else None},
        "weighted": averages["weighted"],
        "confusion_matrix": {"labels": class_names, "matrix": cm.tolist()},
        "roc": roc,
    }


def _thin(values: np.ndarray, limit: int = 400) -> list[float]:
    """At most ``limit`` points of a curve (ends kept), rounded: enough to plot it."""
    if len(values) > limit:
        idx = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))
        values = values[idx]
    return [round(float(v), 5) for v in values]


# --- plots ------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(phases: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation, phases one after another."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for n, phase in enumerate(phases):
        hist = phase["history"]
        epochs = np.arange(1, len(hist.get("loss", [])) + 1) + offset
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            suffix = f" ({phase['phase']})" if len(phases) > 1 else ""
            if key in hist:
                ax.plot(epochs, hist[key], "-o", ms=3, color=f"C{2 * n}", label=f"train{suffix}")
            if f"val_{key}" in hist:
                ax.plot(
                    epochs, hist[f"val_{key}"], "-s", ms=3, color=f"C{2 * n + 1}",
                    label=f"validation{suffix}",
                )  # fmt: skip
            if n > 0:
                ax.axvline(offset + 0.5, color="grey", ls="--", lw=1)
        offset += len(epochs)
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Loss")
    axes[1].set_title("Accuracy")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(metrics: dict[str, Any], path: Path) -> Path:
    """The confusion matrix as a heat map with counts, rows = true class."""
    plt = _pyplot()
    names = metrics["confusion_matrix"]["labels"]
    cm = np.array(metrics["confusion_matrix"]["matrix"])
    k = len(names)
    size = max(4.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(cm, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (accuracy {metrics['accuracy']:.3f})")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                color="white" if cm[i, j] > threshold else "black",
            )  # fmt: skip
    return _save(plt, fig, path)


def plot_roc(metrics: dict[str, Any], path: Path) -> Path:
    """One-vs-rest ROC curve per class, with its AUC in the legend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, (name, curve) in enumerate(metrics["roc"].items()):
        if curve["auc"] is None:
            continue
        ax.plot(curve["fpr"], curve["tpr"], color=f"C{i % 10}", lw=1.2,
                label=f"{name} (AUC {curve['auc']:.3f})")  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    macro = metrics["macro"]["auc"]
    ax.set_title(f"ROC, one vs rest (macro AUC {macro:.3f})" if macro else "ROC, one vs rest")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)
