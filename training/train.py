"""Fitting: tf.data input pipelines, optimizer, learning-rate schedule, callbacks.

``fit_phase`` trains a compiled-here model for one phase (the whole CNN run; MobileNet's
frozen-backbone phase, then its fine-tuning phase) with

- Adam or SGD with Nesterov momentum;
- a one-cycle learning rate (linear warm-up, then cosine decay to zero), optionally
  fitted to a wall-clock budget, or reduce-on-plateau, or a constant rate;
- early stopping on validation loss that restores the best epoch's weights;
- a checkpoint of the best epoch (``checkpoints/<phase>-best.keras``) and a CSV log;
- a progress bar per epoch (tqdm) and a one-line summary after it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from training.augment import NONE, Augmentation, augment_batch
from training.data import Split

if TYPE_CHECKING:
    import tensorflow as tf

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("onecycle", "plateau", "constant")
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}


@dataclass
class FitOptions:
    """How one phase is trained."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    schedule: str = "onecycle"
    warmup_epochs: float = 1.0
    patience: int = 8
    label_smoothing: float = 0.1
    augmentation: Augmentation = field(default_factory=Augmentation)
    deadline: float | None = None  # time.monotonic() by which this phase must end
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("deadline")
        out.pop("progress")
        return out


def seed_everything(seed: int) -> None:
    """Python, NumPy and TensorFlow random generators, via Keras."""
    keras.utils.set_random_seed(seed)


# --- input pipelines -----------------------------------------------------------------


def _one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[y]


def make_dataset(
    split: Split,
    num_classes: int,
    batch_size: int,
    *,
    training: bool = False,
    augmentation: Augmentation = NONE,
    index: np.ndarray | None = None,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of ``(float32 pixels 0..255, one-hot labels)`` from in-memory uint8 images.

    Training batches are reshuffled every epoch and augmented; ``index`` (e.g. from
    ``data.oversample``) picks which examples an epoch visits. Evaluation batches keep
    the split's order.
    """
    import tensorflow as tf

    images = tf.constant(split.x)
    labels = tf.constant(_one_hot(split.y, num_classes))
    order = np.arange(len(split)) if index is None else np.asarray(index)
    ds = tf.data.Dataset.from_tensor_slices(order.astype(np.int64))
    if training:
        ds = ds.shuffle(len(order), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def gather(i):
        x = tf.cast(tf.gather(images, i), tf.float32)
        if training and augmentation.enabled:
            x = augment_batch(x, augmentation)
        return x, tf.gather(labels, i)

    ds = ds.map(gather, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# --- optimizer and schedule ----------------------------------------------------------


def make_optimizer(name: str, lr: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def compile_model(model: keras.Model, options: FitOptions) -> None:
    model.compile(
        optimizer=make_optimizer(options.optimizer, options.lr),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=options.label_smoothing),
        metrics=["accuracy"],
    )


class OneCycle(keras.callbacks.Callback):
    """Per-batch learning rate: linear warm-up to ``peak``, then cosine decay to zero.

    With a ``deadline``, the number of epochs (at most ``epochs``) is re-planned after every
    epoch from the measured epoch times so that the decay ends (and training stops) before
    the deadline; the run then ends on a fully annealed model instead of being cut off at
    a high rate.
    """

    def __init__(
        self,
        peak: float,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 1.0,
        deadline: float | None = None,
        reserve_s: float = 0.0,
    ) -> None:
        super().__init__()
        self.peak = peak
        self.planned_epochs = epochs
        self.max_epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = max(1, int(warmup_epochs * steps_per_epoch))
        self.deadline = deadline
        self.reserve_s = reserve_s
        self.step = 0
        self.epoch_times: list[float] = []
        self.replans: list[dict[str, Any]] = []
        self._epoch_start = 0.0

    def rate(self, step: int) -> float:
        total = max(self.planned_epochs * self.steps_per_epoch, self.warmup_steps + 1)
        if step < self.warmup_steps:
            return self.peak * (0.1 + 0.9 * step / self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / (total - self.warmup_steps))
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * progress))

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate.assign(self.rate(self.step))
        self.step += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_times.append(time.monotonic() - self._epoch_start)
        done = epoch + 1
        if logs is not None:
            logs["lr"] = float(self.rate(max(self.step - 1, 0)))
        if self.deadline is not None and done < self.planned_epochs:
            # The slowest recent epoch is the safer estimate on a shared machine. The plan
            # shrinks when epochs are slow and grows back (up to the epoch limit) when the
            # machine frees up; either way the cosine is stretched to end at the new plan.
            per_epoch = max(self.epoch_times[-3:])
            left = self.deadline - self.reserve_s - time.monotonic()
            fit = min(self.max_epochs, done + max(0, math.floor(left / per_epoch)))
            if fit != self.planned_epochs:
                self.replans.append({"after_epoch": done, "from": self.planned_epochs, "to": fit})
                self.planned_epochs = max(done, fit)
        if done >= self.planned_epochs:
            self.model.stop_training = True


class Progress(keras.callbacks.Callback):
    """A tqdm bar per epoch (batches, running loss/accuracy), then a summary line."""

    def __init__(
        self,
        phase: str,
        epochs: int,
        steps: int,
        enabled: bool = True,
        schedule: OneCycle | None = None,
    ) -> None:
        super().__init__()
        self.phase = phase
        self._epochs = epochs
        self.schedule = schedule  # its plan may shrink to meet a deadline
        self.steps = steps
        self.enabled = enabled
        self.bar = None
        self._start = 0.0
        self._tty = sys.stderr.isatty()

    @property
    def epochs(self) -> int:
        return self.schedule.planned_epochs if self.schedule else self._epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.steps,
            desc=f"{self.phase} epoch {epoch + 1}/{self.epochs}",
            unit="batch",
            leave=False,
            file=sys.stderr,
            mininterval=0.5 if self._tty else 60.0,
            dynamic_ncols=True,
        )

    def on_train_batch_end(self, batch, logs=None):
        if self.bar is None:
            return
        self.bar.update(1)
        if logs and batch % 10 == 0:
            self.bar.set_postfix(
                loss=f"{logs.get('loss', float('nan')):.3f}",
                acc=f"{logs.get('accuracy', float('nan')):.3f}",
                refresh=False,
            )

    def on_epoch_end(self, epoch, logs=None):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
        logs = logs or {}

        def get(key: str) -> float:
            return float(logs.get(key, float("nan")))

        lr = logs.get("lr", logs.get("learning_rate", float("nan")))
        print(
            f"{self.phase} epoch {epoch + 1}/{self.epochs}: "
            f"loss {get('loss'):.4f} acc {get('accuracy'):.4f} | "
            f"val_loss {get('val_loss'):.4f} val_acc {get('val_accuracy'):.4f} | "
            f"lr {float(lr):.2e} | {time.monotonic() - self._start:.0f}s",
            file=sys.stderr,
            flush=True,
        )


@dataclass
class PhaseResult:
    phase: str
    history: dict[str, list[float]]
    epochs_run: int
    best_epoch: int  # 1-based, within this phase
    best_val_loss: float
    best_val_accuracy: float
    seconds: float
    checkpoint: str
    replans: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_phase(
    model: keras.Model,
    phase: str,
    train: Split,
    validation: Split,
    num_classes: int,
    options: FitOptions,
    run_dir: Path,
    *,
    class_weight: dict[int, float] | None = None,
    index: np.ndarray | None = None,
    seed: int = 0,
    reserve_s: float = 0.0,
) -> PhaseResult:
    """Compile ``model`` and train it for one phase; it ends holding its best epoch's weights."""
    compile_model(model, options)
    train_ds = make_dataset(
        train,
        num_classes,
        options.batch_size,
        training=True,
        augmentation=options.augmentation,
        index=index,
        seed=seed,
    )
    val_ds = make_dataset(validation, num_classes, options.batch_size)
    steps = math.ceil((len(train) if index is None else len(index)) / options.batch_size)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    best_path = checkpoints / f"{phase}-best.keras"
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=options.patience, restore_best_weights=True
    )
    callbacks: list[Any] = [
        early,
        keras.callbacks.ModelCheckpoint(best_path, monitor="val_loss", save_best_only=True),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
    ]
    one_cycle = None
    if options.schedule == "onecycle":
        one_cycle = OneCycle(
            options.lr,
            options.epochs,
            steps,
            options.warmup_epochs,
            deadline=options.deadline,
            reserve_s=reserve_s,
        )
        callbacks.insert(0, one_cycle)
    elif options.schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2)
        )
        if options.deadline is not None:
            callbacks.append(_Deadline(options.deadline - reserve_s))
    elif options.schedule == "constant":
        if options.deadline is not None:
            callbacks.append(_Deadline(options.deadline - reserve_s))
    else:
        raise ValueError(f"unknown schedule {options.schedule!r}; choose one of {SCHEDULES}")
    callbacks.append(
        Progress(phase, options.epochs, steps, enabled=options.progress, schedule=one_cycle)
    )
    start = time.monotonic()
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=options.epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        shuffle=False,  # the dataset reshuffles itself every epoch
        verbose=0,
    )
    seconds = time.monotonic() - start
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    val_loss = hist.get("val_loss", [float("nan")])
    best = int(np.nanargmin(val_loss)) if val_loss else 0
    return PhaseResult(
        phase=phase,
        history=hist,
        epochs_run=len(val_loss),
        best_epoch=best + 1,
        best_val_loss=float(val_loss[best]),
        best_val_accuracy=float(hist.get("val_accuracy", [float("nan")])[best]),
        seconds=seconds,
        checkpoint=str(best_path),
        replans=one_cycle.replans if one_cycle else [],
    )


class _Deadline(keras.callbacks.Callback):
    """Stop after the epoch that leaves too little time for another one."""

    def __init__(self, deadline: float) -> None:
        super().__init__()
        self.deadline = deadline
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        if time.monotonic() + (time.monotonic() - self._start) > self.deadline:
            self.model.stop_training = True
