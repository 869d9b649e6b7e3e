"""One training run, end to end: data, (search), fit, evaluate, report, export.

``run(RunConfig(...))`` is what ``python -m training`` calls. A run writes into
``<out>/<run_id>/`` (``run_id`` = model name + UTC time unless given):

- ``metrics.json``: settings, data summary, per-phase history, test metrics, timings;
- ``report.md`` with ``training_curves.png``, ``confusion_matrix.png``, ``roc.png``;
- ``history.csv`` and ``checkpoints/<phase>-best.keras``;

and publishes the model to ``<model_dir>/<name>/`` for the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from training.augment import Augmentation
from training.data import class_weights, load_dataset, oversample

log = logging.getLogger(__name__)

IMBALANCE_OPTIONS = ("weights", "oversample", "none")
# Per-architecture defaults for settings left as None.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"image_size": 32, "epochs": 30, "batch_size": 128, "optimizer": "sgd"},
    "mobilenet": {"image_size": 160, "epochs": 5, "batch_size": 32, "optimizer": "adam"},
}
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}


@dataclass
class RunConfig:
    """Everything a run needs; ``None`` means the architecture's default (``DEFAULTS``)."""

    data: Path
    out: Path
    name: str | None = None
    arch: str = "cnn"
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    patience: int = 8
    label_smoothing: float = 0.1
    seed: int = 0
    imbalance: str = "weights"
    search: int = 0
    search_epochs: int = 2
    limit_per_class: int | None = None
    model_dir: Path | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    augmentation: Augmentation = field(default_factory=Augmentation)
    # CNN
    depth: int = 3
    width: int = 32
    dropout: float = 0.1
    l2: float = 5e-4
    dense_units: int = 128
    dense_dropout: float = 0.3
    # MobileNet
    fine_tune_epochs: int = 3
    fine_tune_blocks: int = 2
    fine_tune_lr: float | None = None
    # Operation
    time_budget_min: float | None = None
    cache_dir: Path | None = None
    run_id: str | None = None
    progress: bool = True

    def resolved(self) -> RunConfig:
        """A copy with defaults filled in and values checked."""
        from training.export import check_name
        from training.models import ARCHITECTURES
        from training.train import OPTIMIZERS, SCHEDULES

        if self.arch not in ARCHITECTURES:
            raise ValueError(f"--arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        d = DEFAULTS[self.arch]
        c = dataclasses.replace(
            self,
            data=Path(self.data),
            out=Path(self.out),
            image_size=self.image_size or d["image_size"],
            epochs=self.epochs or d["epochs"],
            batch_size=self.batch_size or d["batch_size"],
            optimizer=self.optimizer or d["optimizer"],
        )
        if c.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
        if c.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {c.schedule!r}")
        if c.imbalance not in IMBALANCE_OPTIONS:
            raise ValueError(f"--imbalance must be one of {IMBALANCE_OPTIONS}")
        if c.lr is None:
            c.lr = DEFAULT_LR[c.optimizer]
        if c.fine_tune_lr is None:
            c.fine_tune_lr = c.lr / 10
        if c.name is None:
            slug = re.sub(r"[^a-z0-9]+", "-", c.data.resolve().name.lower()).strip("-") or "data"
            c.name = f"{slug}-{c.arch}"
        check_name(c.name)
        if c.model_dir is None:
            c.model_dir = Path(_configured_model_dir())
        if c.run_id is None:
            c.run_id = f"{c.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
        f = Filled.of(c)
        if f.image_size < 8 or f.epochs < 1 or f.batch_size < 1:
            raise ValueError("--image-size must be >= 8, --epochs and --batch-size >= 1")
        return c

    def settings(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("data", "out", "model_dir", "cache_dir"):
            out[key] = None if out[key] is None else str(out[key])
        out.pop("progress")
        return out


class Filled(NamedTuple):
    """The settings ``RunConfig.resolved`` fills in, as the set values they then are."""

    name: str
    image_size: int
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    fine_tune_lr: float
    model_dir: Path
    run_id: str

    @classmethod
    def of(cls, c: RunConfig) -> Filled:
        values = [getattr(c, name) for name in cls._fields]
        if any(v is None for v in values):
            raise ValueError("a RunConfig's settings are filled by resolved(), not yet here")
        return cls(*values)


def _configured_model_dir() -> str:
    from shared.config import Config

    try:
        return Config.from_env().model_dir
    except ValueError:  # an unrelated bad variable must not stop a training run
        return Config().model_dir


@dataclass
class RunResult:
    run_dir: Path
    model_path: Path
    summary: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.summary["metrics"]


def _build_fn(c: RunConfig, num_classes: int):
    from training.models import build_cnn, build_mobilenet

    f = Filled.of(c)
    size = (f.image_size, f.image_size)

    def build(overrides: dict[str, Any]):
        if c.arch == "cnn":
            params = {
                "depth": c.depth,
                "width": c.width,
                "l2": c.l2,
                "dropout": c.dropout,
                "dense_units": c.dense_units,
                "dense_dropout": c.dense_dropout,
            }
            return build_cnn(num_classes, size, **{**params, **overrides})
        return build_mobilenet(num_classes, size, **overrides)

    return build


def run(config: RunConfig) -> RunResult:
    """Train, evaluate, report and export; see the module docstring."""
    from training import evaluate as ev
    from training.export import code_version, export_model
    from training.models import unfreeze_top
    from training.report import PLOTS, write_report
    from training.train import FitOptions, fit_phase, make_dataset, seed_everything

    started = time.monotonic()
    c = config.resolved()
    f = Filled.of(c)
    run_dir = c.out / f.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(c.seed)

    log.info("loading %s at %dx%d", c.data, f.image_size, f.image_size)
    ds = load_dataset(
        c.data,
        (f.image_size, f.image_size),
        seed=c.seed,
        val_fraction=c.val_fraction,
        test_fraction=c.test_fraction,
        limit=c.limit_per_class,
        cache_dir=c.cache_dir,
    )
    loaded = time.monotonic()
    log.info(
        "%d classes; train %d, validation %d, test %d images (%s); %d skipped; %.0fs",
        ds.num_classes, len(ds.train), len(ds.validation), len(ds.test), ds.layout,
        len(ds.skipped), loaded - started,
    )  # fmt: skip

    weights, ratio = class_weights(ds.train.y, ds.num_classes)
    class_weight, index, handling = None, None, "none needed"
    if weights is not None:
        if c.imbalance == "weights":
            class_weight, handling = weights, "class weights"
        elif c.imbalance == "oversample":
            index, handling = oversample(ds.train.y, c.seed), "oversampling"
        else:
            handling = "nothing (--imbalance none)"
        log.info("classes are imbalanced (ratio %.2f): handled by %s", ratio, handling)

    build = _build_fn(c, ds.num_classes)
    base_options = FitOptions(
        epochs=f.epochs,
        batch_size=f.batch_size,
        optimizer=f.optimizer,
        lr=f.lr,
        schedule=c.schedule,
        warmup_epochs=c.warmup_epochs,
        patience=c.patience,
        label_smoothing=c.label_smoothing,
        augmentation=c.augmentation,
        progress=c.progress,
    )

    search = None
    overrides: dict[str, Any] = {}
    if c.search:
        from training.search import random_search

        log.info("random search: %d trials of %d epochs", c.search, c.search_epochs)
        search = random_search(
            c.arch, build, ds, base_options, run_dir, trials=c.search, epochs=c.search_epochs,
            class_weight=class_weight, index=index, seed=c.seed,
        )  # fmt: skip
        best = search["best"]
        base_options.lr = float(best["lr"])
        base_options.batch_size = int(best["batch_size"])
        if "depth" in best:
            overrides["depth"] = int(best["depth"])
        log.info("best trial: %s", best)
        seed_everything(c.seed)

    train_start = time.monotonic()
    deadline = train_start + 60 * c.time_budget_min if c.time_budget_min else None
    model = build(overrides)
    phases = []

    def fit(phase: str, opts: FitOptions) -> None:
        phases.append(
            fit_phase(model, phase, ds.train, ds.validation, ds.num_classes, opts, run_dir,
                      class_weight=class_weight, index=index, seed=c.seed)
        )  # fmt: skip

    if c.arch == "cnn":
        fit("train", dataclasses.replace(base_options, deadline=deadline))
    else:
        fine = c.fine_tune_epochs if c.fine_tune_blocks > 0 else 0
        head_deadline = None
        if deadline is not None:
            share = f.epochs / (f.epochs + 2.0 * fine)  # a fine-tuning epoch costs about 2x
            head_deadline = train_start + share * (deadline - train_start)
        fit("head", dataclasses.replace(base_options, deadline=head_deadline))
        if fine:
            trainable = unfreeze_top(model, c.fine_tune_blocks)
            log.info("fine-tuning the last %d blocks (%d layers)", c.fine_tune_blocks, trainable)
            opts = dataclasses.replace(
                base_options, epochs=fine, lr=f.fine_tune_lr, warmup_epochs=0.0, deadline=deadline
            )
            fit("fine-tune", opts)
    trained = time.monotonic()

    test_ds = make_dataset(ds.test, ds.num_classes, base_options.batch_size)
    probs = model.predict(test_ds, verbose=0)
    metrics = ev.evaluate(ds.test.y, probs, ds.class_names)
    phase_dicts = [p.to_dict() for p in phases]
    ev.plot_history(phase_dicts, run_dir / PLOTS["training_curves"])
    ev.plot_confusion(metrics, run_dir / PLOTS["confusion_matrix"])
    ev.plot_roc(metrics, run_dir / PLOTS["roc"])
    evaluated = time.monotonic()

    data_summary = {
        **ds.summary(),
        "imbalance_ratio": ratio,
        "imbalance_handling": handling,
        "class_weights": class_weight,
    }
    code = code_version()
    settings = c.settings()
    settings["final"] = {"lr": base_options.lr, "batch_size": base_options.batch_size,
                         **overrides}  # fmt: skip
    metadata = {
        "arch": c.arch,
        "class_names": ds.class_names,
        "input_size": [f.image_size, f.image_size],
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_id": f.run_id,
        "metrics": _headline(metrics),
        "data": {k: data_summary[k] for k in ("source", "layout", "fingerprint", "sizes")},
        "code": code,
        "training": settings,
        "report": str((run_dir / "report.md").resolve()),
    }
    model_path = export_model(model, f.model_dir, f.name, metadata)
    finished = time.monotonic()
    summary = {
        "run_id": f.run_id,
        "name": f.name,
        "arch": c.arch,
        "created_at": metadata["created_at"],
        "settings": settings,
        "data": data_summary,
        "code": code,
        "phases": phase_dicts,
        "search": search,
        "metrics": metrics,
        "headline": _headline(metrics),
        "timing": {
            "load_s": loaded - started,
            "train_s": trained - train_start,
            "evaluate_s": evaluated - trained,
            "total_s": finished - started,
        },
        "export": {"model_dir": str(model_path), "model_path": str(model_path / "model.keras")},
        "plots": PLOTS,
    }
    write_report(run_dir, summary)
    return RunResult(run_dir=run_dir, model_path=model_path, summary=summary)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "test_count": metrics["test_count"],
        "test_accuracy": metrics["accuracy"],
        "macro_precision": metrics["macro"]["precision"],
        "macro_recall": metrics["macro"]["recall"],
        "macro_f1": metrics["macro"]["f1"],
        "macro_auc": metrics["macro"]["auc"],
    }
