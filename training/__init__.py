"""The training pipeline: a folder of labelled images in, an evaluated model the workers serve out.

Run it with ``python -m training --data DIR --out OUT_DIR`` (see ``docs/training.md``).
The steps live in small modules, each usable on its own:

- ``data``: find the class folders and splits, decode images into memory, split, weigh classes;
- ``augment``: random flips, rotation, zoom and shift, for the training split only;
- ``models``: the CNN and the MobileNet transfer-learning network;
- ``train``: optimizer, learning-rate schedule, early stopping, checkpoints, progress;
- ``search``: an optional KerasTuner random search;
- ``evaluate``: test-split metrics and plots (scikit-learn, matplotlib);
- ``report``: ``metrics.json`` and ``report.md``;
- ``export``: ``<model_dir>/<name>/model.keras`` + ``metadata.json``, which the worker loads;
- ``run``: all of the above, in order.

Importing this package does not import tensorflow; ``data``, ``augment``, ``report`` and
``export`` do not need it at import time either (``train`` and ``search`` do).
"""
