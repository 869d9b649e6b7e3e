"""``python -m worker.models.gate``, run exactly as docs/deploy.md writes it (with a small
sample and fp32, which every CPU runs): it measures the gate and prints its verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.models.runtimes import GATE_MIN_PHOTOS

pytest.importorskip("openvino")

ROOT = Path(__file__).resolve().parents[3]


def test_the_documented_gate_command_measures_and_prints_the_verdict(
    photos_dir: Path, tmp_path: Path
) -> None:
    documented = (ROOT / "docs" / "deploy.md").read_text()
    assert "python -m worker.models.gate --photos DIR" in documented
    env = {**os.environ, "RUNTIME_CACHE_DIR": str(tmp_path)}  # KERAS_HOME: tests/conftest.py
    cmd = [sys.executable, "-m", "worker.models.gate", "--photos", str(photos_dir)]
    out = subprocess.run(
        [*cmd, "--limit", "8", "--precision", "fp32"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    assert verdict["photos"] == 8 and verdict["top1_agreement"] == 1.0, verdict
    assert verdict["passed"] is False  # fewer than GATE_MIN_PHOTOS never counts
    assert GATE_MIN_PHOTOS > 8
