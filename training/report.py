"""The run's written results: ``metrics.json`` and a Markdown report that shows the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLOTS = {
    "training_curves": "training_curves.png",
    "confusion_matrix": "confusion_matrix.png",
    "roc": "roc.png",
}


def write_json(path: Path, data: Any) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    """The human-readable report of a run (``summary`` = the content of metrics.json)."""
    m = summary["metrics"]
    data = summary["data"]
    lines = [
        f"# Training run `{summary['run_id']}`",
        "",
        f"Model **{summary['name']}** ({summary['arch']}), input "
        f"{data['image_size'][0]}x{data['image_size'][1]}, {len(data['class_names'])} classes.",
        "",
        "| | |",
        "|---|---|",
        f"| Test accuracy | **{_pct(m['accuracy'])}** ({m['correct']}/{m['test_count']}) |",
        f"| Macro precision / recall / F1 | {_num(m['macro']['precision'])} / "
        f"{_num(m['macro']['recall'])} / {_num(m['macro']['f1'])} |",
        f"| Macro ROC AUC (one vs rest) | {_num(m['macro']['auc'], 4)} |",
        f"| Training time | {summary['timing']['train_s'] / 60:.1f} min "
        f"(whole run {summary['timing']['total_s'] / 60:.1f} min) |",
        f"| Data | `{data['source']}` ({data['layout']}), fingerprint `{data['fingerprint']}` |",
        f"| Split sizes | train {data['sizes']['train']}, validation "
        f"{data['sizes']['validation']}, test {data['sizes']['test']} |",
        f"| Code | {summary['code'].get('git_commit') or 'unknown'}"
        f"{' (modified)' if summary['code'].get('git_dirty') else ''} |",
        f"| Model file | `{summary['export']['model_path']}` |",
        "",
        "## Training",
        "",
        f"![training curves]({PLOTS['training_curves']})",
        "",
        "| Phase | Epochs run | Best epoch | Best val loss | Val accuracy there | Time |",
        "|---|---|---|---|---|---|",
    ]
    for phase in summary["phases"]:
        lines.append(
            f"| {phase['phase']} | {phase['epochs_run']} | {phase['best_epoch']} | "
            f"{phase['best_val_loss']:.4f} | {_pct(phase['best_val_accuracy'])} | "
            f"{phase['seconds'] / 60:.1f} min |"
        )
    lines += ["", "Settings:", "", "```json", json.dumps(summary["settings"], indent=2), "```"]
    if summary.get("search"):
        lines += ["", "## Hyper-parameter search", "", "| Trial | Settings | Val accuracy |"]
        lines.append("|---|---|---|")
        for t in summary["search"]["trials"]:
            lines.append(f"| {t['trial_id']} | `{json.dumps(t['values'])}` | {_pct(t['score'])} |")
        lines += ["", f"Best: `{json.dumps(summary['search']['best'])}`"]
    if data.get("class_weights"):
        lines += [
            "",
            f"Classes are imbalanced (ratio {data['imbalance_ratio']:.2f}); handled by "
            f"{data['imbalance_handling']}.",
        ]
    if data.get("skipped"):
        lines += ["", f"{len(data['skipped'])} unreadable image(s) were skipped:", ""]
        lines += [f"- `{p}`" for p in data["skipped"][:50]]
    lines += [
        "",
        "## Test split",
        "",
        "| Class | Precision | Recall | F1 | Support | AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in m["per_class"].items():
        auc = m["roc"][name]["auc"]
        lines.append(
            f"| {name} | {_num(c['precision'])} | {_num(c['recall'])} | {_num(c['f1'])} | "
            f"{c['support']} | {_num(auc, 4)} |"
        )
    lines.append(
        f"| **macro** | {_num(m['macro']['precision'])} | {_num(m['macro']['recall'])} | "
        f"{_num(m['macro']['f1'])} | {m['test_count']} | {_num(m['macro']['auc'], 4)} |"
    )
    lines += [
        "",
        f"![confusion matrix]({PLOTS['confusion_matrix']})",
        "",
        f"![ROC curves]({PLOTS['roc']})",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``report.md`` into ``run_dir``; returns both paths."""
    metrics_path = write_json(run_dir / "metrics.json", summary)
    report_path = run_dir / "report.md"
    report_path.write_text(markdown(summary), encoding="utf-8")
    return metrics_path, report_path
