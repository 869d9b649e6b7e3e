"""``python -m bench.runtimes --quick`` keeps working: every runtime row and gate row has
numbers (what they are is for the recorded run in docs/benchmarks.md, not for CI)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_quick_run(tmp_path) -> None:
    out = tmp_path / "runtimes.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "RUNTIME_CACHE_DIR": str(tmp_path / "c")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.runtimes", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = {row["runtime"] for row in result["speed"]}
    assert {"keras fp32 (predict_on_batch)", "openvino fp32"} <= names
    for row in result["speed"]:
        assert row["images_per_s"] > 0 and not math.isnan(row["images_per_s"]), row
    gate = {row["runtime"]: row for row in result["gate"]}
    assert gate["openvino fp32"]["top1_agreement"] == 1.0
    assert not any(row["passed"] for row in result["gate"])  # 11 photos never pass
    assert not (tmp_path / "c" / "gates").exists()  # a smoke run records no verdicts
    assert "| openvino fp32 |" in proc.stdout
