"""MobileNet's limit (1) measured again at the end of the run: did the host's speed drift?

These machines are shared, and their speed can change by tens of percent within one
run (the load averages in the report show it). The ratio targets divide by the
limit, so the report uses the higher of the two measurements (the stricter bound)
and prints both.
"""

from __future__ import annotations

from bench.common import ensure_keras_home, main_json
from bench.model_limit import measure_model

SIZES = (1, 16, 32)


def run(quick: bool = False) -> dict:
    ensure_keras_home()
    return measure_model("mobilenet", (1, 8) if quick else SIZES, quick)


def report(first: dict, again: dict) -> str:
    """One line comparing the start-of-run limit with this re-measurement."""
    before = {r["batch_size"]: r["images_per_s"] for r in first["rows"]}
    cells = [
        f"b={r['batch_size']} {r['images_per_s']:.1f}/s"
        + (
            f" ({r['images_per_s'] / before[r['batch_size']]:.2f}x the first)"
            if r["batch_size"] in before
            else ""
        )
        for r in again["rows"]
    ]
    return (
        "Re-measured at the end of the run (host speed drift): " + ", ".join(cells) + ". "
        "The ratio targets use the higher best of the two."
    )


if __name__ == "__main__":
    main_json(run)
