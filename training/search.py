"""An optional random search (KerasTuner) over learning rate, batch size and depth.

Each trial trains a fresh model for a few epochs on the training split and is scored
by its best validation accuracy; the test split is never looked at. The budget is a
number of trials. Depth is the CNN's number of stages; MobileNet has a fixed backbone,
so its search covers learning rate and batch size only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import numpy as np

from training.data import Dataset
from training.train import FitOptions, OneCycle, compile_model, make_dataset

LR_RANGES = {"adam": (1e-4, 3e-3), "sgd": (1e-2, 2e-1)}
BATCH_SIZES = {"cnn": [64, 128, 256], "mobilenet": [16, 32, 64]}
DEPTHS = (2, 4)


class _HyperModel(kt.HyperModel):
    def __init__(
        self,
        arch: str,
        build: Callable[[dict[str, Any]], keras.Model],
        dataset: Dataset,
        options: FitOptions,
        class_weight: dict[int, float] | None,
        index: np.ndarray | None,
        seed: int,
    ) -> None:
        super().__init__(name=f"{arch}_search")
        self.arch = arch
        self._make_model = build
        self.dataset = dataset
        self.options = options
        self.class_weight = class_weight
        self.index = index
        self.seed = seed

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        low, high = LR_RANGES[self.options.optimizer]
        lr = hp.Float("lr", low, high, sampling="log")
        hp.Choice("batch_size", BATCH_SIZES[self.arch])
        params: dict[str, Any] = {}
        if self.arch == "cnn":
            params["depth"] = hp.Int("depth", *DEPTHS)
        model = self._make_model(params)
        opts = FitOptions(**{**self.options.__dict__, "lr": lr})
        compile_model(model, opts)
        return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, **kwargs):
        ds = self.dataset
        batch_size = hp.get("batch_size")
        epochs = kwargs.pop("epochs", 2)
        train = make_dataset(
            ds.train,
            ds.num_classes,
            batch_size,
            training=True,
            augmentation=self.options.augmentation,
            index=self.index,
            seed=self.seed,
        )
        val = make_dataset(ds.validation, ds.num_classes, batch_size)
        n = len(ds.train) if self.index is None else len(self.index)
        steps = -(-n // batch_size)
        callbacks = [*kwargs.pop("callbacks", []), OneCycle(hp.get("lr"), epochs, steps)]
        return model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            callbacks=callbacks,
            class_weight=self.class_weight,
            shuffle=False,
            verbose=0,
        )


class _RandomSearch(kt.RandomSearch):
    """``RandomSearch`` without KerasTuner's TensorBoard hook.

    With the TensorFlow backend, KerasTuner 1.4 imports ``tensorboard`` before every trial
    to patch TensorBoard callbacks; this pipeline uses none, and ``tensorboard`` is not a
    dependency of ``tensorflow-cpu``, so the hook is skipped.
    """

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        return None


def random_search(
    arch: str,
    build: Callable[[dict[str, Any]], keras.Model],
    dataset: Dataset,
    options: FitOptions,
    run_dir: Path,
    *,
    trials: int,
    epochs: int,
    class_weight: dict[int, float] | None = None,
    index: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``trials`` random trials; returns ``{"best": values, "trials": [...]}``."""
    hypermodel = _HyperModel(arch, build, dataset, options, class_weight, index, seed)
    tuner = _RandomSearch(
        hypermodel,
        objective=kt.Objective("val_accuracy", direction="max"),
        max_trials=trials,
        seed=seed,
        directory=str(run_dir / "search"),
        project_name="random_search",
        overwrite=True,
        max_consecutive_failed_trials=1,
    )
    tuner.search(epochs=epochs, verbose=0)
    best = tuner.get_best_hyperparameters(1)[0].values
    done = [
        {"trial_id": t.trial_id, "values": dict(t.hyperparameters.values), "score": t.score}
        for t in tuner.oracle.trials.values()
    ]
    done.sort(key=lambda t: -(t["score"] or 0.0))
    return {"trials_budget": trials, "epochs_per_trial": epochs, "best": best, "trials": done}
