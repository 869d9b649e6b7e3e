"""``python -m bench.null_model --quick`` keeps working (CI): the whole service with
RUNTIME=null, one loader process, then two worker processes; every point has numbers.
What they are is for the recorded run in docs/benchmarks.md, not for CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_quick_run(tmp_path) -> None:
    out = tmp_path / "null.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.null_model", "--quick", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    [loaders] = result["loaders"]
    [workers] = result["workers"]
    assert (loaders["loader_processes"], workers["workers"]) == (1, 2)
    for point in (loaders, workers):
        for scenario in ("bulk", "singles_wait"):
            s = point[scenario]
            assert s["succeeded"] == s["jobs"] and s["images_per_s"] > 0, s
    # The loader processes did the loading: their CPU shows as a stage of its own.
    assert loaders["bulk"]["cpu_ms_per_image"]["loaders"] > 0
