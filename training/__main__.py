"""``python -m training --data DIR --out OUT_DIR [options]``: train, evaluate, export.

Exit status: 0 on success, 2 when the data or the options are unusable (the message
says why), 1 on any other failure.
"""

from __future__ import annotations

import os

# Before anything imports TensorFlow: keep its C++ start-up chatter out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import logging
import sys
from pathlib import Path

from training.augment import Augmentation
from training.data import DatasetError
from training.run import DEFAULTS, IMBALANCE_OPTIONS, RunConfig

ARCHS = tuple(DEFAULTS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description=(
            "Train an image classifier on a folder of labelled images (one sub-folder per "
            "class, or train/ plus test/ or validation/ splits), evaluate it on the held-out "
            "test split, write metrics.json, plots and report.md to OUT/<run id>/, and "
            "publish the model to MODEL_DIR/<name>/ where workers serve it by name."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--data", required=True, type=Path, help="folder of class folders or of split folders")
    a("--out", required=True, type=Path, help="runs folder; this run writes OUT/<run id>/")
    a("--name", help="model name jobs will use (default: <data folder>-<arch>)")
    a("--arch", choices=ARCHS, default="cnn", help="CNN from scratch or MobileNet transfer")
    a("--image-size", type=int, help="square input size in px (cnn: 32, mobilenet: 160)")
    a("--epochs", type=int, help="epochs (mobilenet: of the frozen-backbone phase)")
    a("--batch-size", type=int, help="cnn: 128, mobilenet: 32")
    a("--optimizer", choices=("adam", "sgd"), help="cnn: sgd (Nesterov), mobilenet: adam")
    a("--lr", type=float, help="peak learning rate (adam: 1e-3, sgd: 0.05)")
    a("--schedule", choices=("onecycle", "plateau", "constant"), default="onecycle",
      help="onecycle: warm-up then cosine decay; plateau: reduce on val-loss plateau")  # fmt: skip
    a("--warmup-epochs", type=float, default=1.0)
    a("--patience", type=int, default=8, help="early stopping patience on validation loss")
    a("--label-smoothing", type=float, default=0.1)
    a("--seed", type=int, default=0)
    a("--imbalance", choices=IMBALANCE_OPTIONS, default="weights",
      help="how imbalanced classes are handled (only when they are imbalanced)")  # fmt: skip
    a("--search", type=int, default=0, metavar="TRIALS",
      help="random search over lr, batch size and depth with this many trials first")  # fmt: skip
    a("--search-epochs", type=int, default=2, help="epochs per search trial")
    a("--limit-per-class", type=int, metavar="N", help="use at most N images per class per split")
    a("--model-dir", type=Path, help="where to publish the model (default: MODEL_DIR setting)")
    a("--val-fraction", type=float, default=0.1)
    a("--test-fraction", type=float, default=0.1)
    g = p.add_argument_group("augmentation (training split only)")
    g.add_argument("--rotation", type=float, default=10.0, help="max rotation, degrees")
    g.add_argument("--zoom", type=float, default=0.1, help="max zoom, fraction")
    g.add_argument("--shift", type=float, default=0.1, help="max shift, fraction of the size")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--vflip", action=argparse.BooleanOptionalAction, default=False,
                   help="only for images without an 'up' (aerial, microscopy)")  # fmt: skip
    g.add_argument("--no-augment", action="store_true", help="no augmentation at all")
    g = p.add_argument_group("cnn")
    g.add_argument("--depth", type=int, default=3, help="stages of conv-pool-conv")
    g.add_argument("--width", type=int, default=32, help="filters of the first stage")
    g.add_argument("--dropout", type=float, default=0.1, help="after each stage")
    g.add_argument("--dense-dropout", type=float, default=0.3, help="after the dense layer")
    g.add_argument("--l2", type=float, default=5e-4)
    g.add_argument("--dense-units", type=int, default=128)
    g = p.add_argument_group("mobilenet")
    g.add_argument("--fine-tune-epochs", type=int, default=3)
    g.add_argument("--fine-tune-blocks", type=int, default=2, help="last blocks to unfreeze")
    g.add_argument("--fine-tune-lr", type=float, help="default: --lr / 10")
    g = p.add_argument_group("operation")
    g.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="fit the training into this many minutes (re-plans the schedule)",
    )
    g.add_argument("--cache-dir", type=Path, help="cache decoded images here between runs")
    g.add_argument("--run-id", help="default: <name>-<UTC time>")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    aug = Augmentation(
        rotation=0.0 if args.no_augment else args.rotation,
        zoom=0.0 if args.no_augment else args.zoom,
        shift=0.0 if args.no_augment else args.shift,
        hflip=args.hflip and not args.no_augment,
        vflip=args.vflip and not args.no_augment,
    )
    return RunConfig(
        data=args.data, out=args.out, name=args.name, arch=args.arch,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, patience=args.patience,
        label_smoothing=args.label_smoothing, seed=args.seed, imbalance=args.imbalance,
        search=args.search, search_epochs=args.search_epochs,
        limit_per_class=args.limit_per_class, model_dir=args.model_dir,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, augmentation=aug,
        depth=args.depth, width=args.width, dropout=args.dropout, l2=args.l2,
        dense_units=args.dense_units, dense_dropout=args.dense_dropout,
        fine_tune_epochs=args.fine_tune_epochs, fine_tune_blocks=args.fine_tune_blocks,
        fine_tune_lr=args.fine_tune_lr,
        time_budget_min=args.time_budget, cache_dir=args.cache_dir, run_id=args.run_id,
        progress=not args.quiet,
    )  # fmt: skip


def summary_text(result) -> str:
    s = result.summary
    h = s["headline"]
    sizes = s["data"]["sizes"]
    t = s["timing"]
    auc = "n/a" if h["macro_auc"] is None else f"{h['macro_auc']:.4f}"
    return "\n".join(
        [
            f"Run {s['run_id']} done in {t['total_s'] / 60:.1f} min "
            f"(training {t['train_s'] / 60:.1f} min)",
            f"  data:    {sizes['train']} train / {sizes['validation']} validation / "
            f"{sizes['test']} test images, {len(s['data']['class_names'])} classes, "
            f"{len(s['data']['skipped'])} skipped",
            f"  test:    accuracy {100 * h['test_accuracy']:.2f}%, macro F1 "
            f"{h['macro_f1']:.4f}, macro AUC {auc}",
            f"  model:   {result.model_path}  (serve it: MODELS=...,{s['name']})",
            f"  report:  {result.run_dir / 'report.md'}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args).resolved()
        from training.run import run

        result = run(config)
    except (DatasetError, ValueError) as exc:
        if not isinstance(exc, DatasetError) and "config" in locals():
            raise  # options were fine: a bug, keep the traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
