"""The benchmark suite's smoke run: ``python -m bench.run_all --quick`` must keep working.

Tiny counts, seconds per section, into a temporary file (never docs/benchmarks.md).
It checks that every section ran and produced numbers, not what the numbers are:
the targets are judged by the full run on the benchmark machine, not in CI.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.support import ROOT

# About a minute on an idle 2-core machine; generous limits for a busy CI box.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SECTIONS = (
    "## Targets",
    "## 1. Limit",
    "## 2. The worker pipeline alone",
    "## 3. End to end",
    "## 4. Latency",
    "## 5. The alternative",
    "## 6. The API alone",
    "## 7. Memory",
    "## Bulk acceptance",
    "## 8. The plumbing's ceiling",
    "## 9. Efficiency",
    "## What limits it",
)


# Sections of bench/NOTES.md, appended to the report as written: prose, not measurements.
HAND_WRITTEN = {
    line[3:].strip()
    for line in (ROOT / "bench" / "NOTES.md").read_text().splitlines()
    if line.startswith("## ")
}


def positive(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    report, results = out / "benchmarks.md", out / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--quick", "--out", str(report), "--json",
         str(results)],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return report.read_text(), json.loads(results.read_text())["results"], results


def test_report_has_every_section_with_numbers(quick_run):
    text, _, _ = quick_run
    assert "FAILED" not in text
    assert "Re-measured at the end of the run" in text
    assert "python -m bench.run_all --quick" in text
    for title in SECTIONS:
        assert title in text, f"missing section {title!r}"
    # Issue #22's efficiency rows: service rate over the no-bookkeeping pipeline's.
    assert re.search(r"^\| 22 \| efficiency, bulk >= ", text, flags=re.M)
    assert re.search(r"^\| 22 \| efficiency, singles, wait for answer >= ", text, flags=re.M)
    assert "the service's singles with wait reach **" in text  # over the waiting bound
    # Each section after the header carries at least one table row with a number in it.
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for body in sections:
        name = body.splitlines()[0]
        rows = [line for line in body.splitlines() if line.startswith("| ")]  # header + data
        if name != "What limits it" and name not in HAND_WRITTEN:
            assert any(re.search(r"\d", row) for row in rows[1:]), f"no numbers in {name!r}"
    targets = sections[[s.splitlines()[0] for s in sections].index("Targets")]
    verdicts = re.findall(r"\| (met|\*\*MISSED\*\*|n/a) \|$", targets, flags=re.M)
    assert len(verdicts) >= 12
    assert "n/a" not in verdicts


def test_raw_results_are_measurements(quick_run):
    _, r, _ = quick_run
    assert positive(r["model_limit"]["models"]["mobilenet"]["best"]["images_per_s"])
    assert positive(r["pipeline"]["best"]["images_per_s"])
    assert positive(r["model_recheck"]["best"]["images_per_s"])
    for scenario in r["end_to_end"]["scenarios"]:
        assert scenario["succeeded"] == scenario["jobs"], scenario
        assert positive(scenario["images_per_s"])
    # (9)'s pipeline: a round before the first scenario of (3) and after each.
    rounds, sides = r["end_to_end"]["reference_rounds"], r["end_to_end"]["reference_sides"]
    assert len(rounds) == 4 and sides["bulk"] == [0, 1], sides  # (JSON: lists)
    assert sides["singles, wait for answer"] == [2, 3], sides
    for plain in rounds:
        assert plain["ok"] == plain["images"] and plain["failed"] == 0, plain
        assert positive(plain["images_per_s"]) and positive(plain["cpu_ms_per_image"]), plain
    waiting = r["no_bookkeeping_waiting"]  # (9)'s pipeline for waiting clients
    assert waiting["ok"] == waiting["images"] and waiting["clients"] == 16, waiting
    assert positive(waiting["images_per_s"]) and waiting["mean_batch"] >= 1, waiting
    keras = r["keras_bulk"]  # the bulk scenario again on RUNTIME=keras, for the runtime ratio
    assert keras["succeeded"] == keras["jobs"] and positive(keras["images_per_s"]), keras
    assert any(level.get("basis") == "wait" for level in r["latency"]["levels"])
    for level in r["latency"]["levels"]:
        assert level["failed"] == 0 and positive(level["p50_ms"]), level
    lone = r["latency"]["lone"]  # lone requests, one after another
    assert positive(lone["p50_ms"])
    assert len(lone["stages_p50_ms"]) == 4, lone  # its path, cut by the job's timestamps
    assert all(positive(ms) for ms in lone["stages_p50_ms"].values()), lone
    assert positive(r["api_only"]["saturation"]["ok_per_s"])
    assert r["api_only"]["saturation"]["non_2xx"] == 0
    assert positive(r["seed_alternative"]["best"]["images_per_s"])
    memory = r["end_to_end"]["memory"]
    assert positive(memory["worker_total_mb"]) and positive(memory["api_worker_max_mb"])
    assert all(positive(row["median_s"]) for row in r["bulk_accept"]["rows"])
    null = r["null_model"]
    for point in null["loaders"] + null["workers"]:
        for scenario in ("bulk", "singles_wait"):
            s = point[scenario]
            assert s["succeeded"] == s["jobs"] and positive(s["images_per_s"]), s
    # Loader processes did the loading where there were any: their CPU is a stage.
    assert any(p["loader_processes"] for p in null["loaders"])
    for point in null["loaders"]:
        if point["loader_processes"]:
            assert positive(point["bulk"]["cpu_ms_per_image"]["loaders"]), point


def test_report_renders_again_from_saved_results(quick_run, tmp_path):
    text, _, results = quick_run
    again = tmp_path / "again.md"
    subprocess.run(
        [sys.executable, "-m", "bench.run_all", "--render", str(results), "--out", str(again)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert again.read_text() == text
