"""``python -m bench.fair_share --quick`` must keep working (tiny counts, one stack).

It checks that the report has its rows and numbers, not what they are: the targets
are judged by the full run (docs/benchmarks.md, "Fair share between users").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import fair_share
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_quick_run_reports_every_scenario(tmp_path):
    out = tmp_path / "fair.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fair_share", "--quick", "--json", str(out)],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    mode = result["modes"]["window"]
    sizes = result["sizes"]
    assert mode["behind"]["b"]["succeeded"] == sizes["small"]
    assert mode["behind"]["a"]["succeeded"] == sizes["big"]
    assert len(mode["together"]["walls_s"]) == sizes["users"]
    text = fair_share.report(result)
    for row in ("behind A's", "spread", "images/s"):
        assert row in text
    assert result["machine"]["cpu_model"] in text
