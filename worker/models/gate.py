"""``python -m worker.models.gate --photos DIR``: measure and record a reduced precision's
accuracy gate for a model on this CPU (``worker.models.runtimes``).

A command of its own, not ``runtimes``' ``__main__``: it loads models through the
registry, which imports ``runtimes`` through the model base; run as ``runtimes``'
``__main__`` it would import that module a second time and close an import cycle.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from shared.config import Config
from worker.models.registry import ModelRegistry
from worker.models.runtimes import GATE_MIN_PHOTOS, cpu_model, gate, load_photos, photo_paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.models.gate", description=__doc__)
    parser.add_argument("--photos", type=Path, required=True, help="folder of real photos")
    parser.add_argument("--limit", type=int, default=GATE_MIN_PHOTOS)
    parser.add_argument("--model", default=None, help="model name (default: DEFAULT_MODEL)")
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args(argv)
    config = Config.from_env().replace(runtime="keras")
    model = ModelRegistry(config).get(args.model or config.default_model)
    model.setup()
    images = load_photos(photo_paths(args.photos, args.limit), model.input_size)
    result = gate(model, args.precision, images)
    print(json.dumps({**asdict(result), "passed": result.passed, "cpu": cpu_model()}))


if __name__ == "__main__":
    main()
