"""bench.efficiency's arithmetic and its section of docs/benchmarks.md, one function at a
time (the measurement itself runs in the run_all --quick smoke, tests/bench/test_smoke.py)."""

from __future__ import annotations

import pytest

from bench import efficiency


def scenario(name: str, rate: float, jobs: int = 10) -> dict:
    cpu = {"worker": 20.0, "api": 5.0, "postgres": 1.0, "driver (clients)": 9.0}
    return {
        "scenario": name,
        "jobs": jobs,
        "succeeded": jobs,
        "failed": 0,
        "images_per_s": rate,
        "cpu_ms_per_image": cpu,
        "worker": {"mean_batch_size": 4.5},
    }


def test_rates_are_divided_by_the_faster_pipeline_round() -> None:
    rounds = [{"images_per_s": 40.0}, {"images_per_s": 50.0}]
    seed = {"best": {"name": "gthread", "requests": 5, "ok": 5, "failed": 0, "images_per_s": 30}}
    out = efficiency.summarize(
        rounds, [scenario("bulk", 45.0), scenario("singles, wait for answer", 25.0)], seed
    )
    assert out["pipeline_best"] == 50.0
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["bulk"]["efficiency"] == pytest.approx(0.9)
    assert rows["bulk"]["target"] == 0.85
    assert rows["singles, wait for answer"]["efficiency"] == pytest.approx(0.5)
    assert rows["singles, wait for answer"]["target"] == 0.65
    # The service's own processes only: not the clients.
    assert rows["bulk"]["cpu_ms_per_image"] == pytest.approx(26.0)
    (seed_row,) = [r for r in out["rows"] if r["name"].startswith("seed-style")]
    assert seed_row["efficiency"] == pytest.approx(0.6) and seed_row["target"] is None
    assert rows["bulk"]["mean_batch"] == 4.5 and seed_row["mean_batch"] is None


def test_a_scenario_is_divided_by_the_rounds_either_side_of_it() -> None:
    # The host slowed down between the rounds: each scenario against its own time.
    rounds = [{"images_per_s": 100.0}, {"images_per_s": 80.0}, {"images_per_s": 60.0}]
    scenarios = [scenario("bulk", 81.0), scenario("singles, wait for answer", 42.0)]
    sides = {"bulk": (0, 1), "singles, wait for answer": (1, 2)}
    out = efficiency.summarize(rounds, scenarios, None, None, sides)
    rows = {r["name"]: r for r in out["rows"]}
    assert rows["bulk"]["efficiency"] == pytest.approx(0.9)  # 81 / mean(100, 80)
    assert rows["bulk"]["strict"] == pytest.approx(0.81)  # 81 / the fastest round
    assert rows["singles, wait for answer"]["efficiency"] == pytest.approx(0.6)
    assert rows["singles, wait for answer"]["pipeline_per_s"] == pytest.approx(70.0)
    assert efficiency.verdict(rows["bulk"]) == "met"
    assert efficiency.verdict(rows["singles, wait for answer"]) == "**MISSED**"


def test_the_section_replaces_its_old_self_or_goes_before_the_analysis(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## 8. Null\n\nx\n\n## What limits it\n\n- y\n")
    efficiency.write_section("first table", doc)
    text = doc.read_text()
    assert text.index(efficiency.TITLE) < text.index("## What limits it")
    assert text.index("## 8. Null") < text.index(efficiency.TITLE)
    efficiency.write_section("second table", doc)
    text = doc.read_text()
    assert text.count(efficiency.TITLE) == 1
    assert "second table" in text and "first table" not in text
    assert "## What limits it\n\n- y" in text
