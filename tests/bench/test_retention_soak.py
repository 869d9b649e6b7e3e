"""The retention soak's verdict (one function, on hand-made samples; the soak itself runs
minutes against a real stack: ``python -m bench.retention_soak``)."""

from bench.retention_soak import PURGED, verdict


def _sample(t_s: int, total: int) -> dict:
    share = total // len(PURGED)
    return {"t_s": t_s, **{t: {"rows": 0, "bytes": share} for t in PURGED}}


def test_flat_is_within_ten_percent_of_the_size_when_the_warm_up_ended():
    growing_then_flat = [_sample(0, 100), _sample(60, 500), _sample(120, 1000), _sample(180, 1050)]
    result = verdict(growing_then_flat, warmup=120)
    assert result["flat"] and result["base_bytes"] == 1000
    still_growing = [*growing_then_flat, _sample(240, 1200)]
    assert not verdict(still_growing, warmup=120)["flat"]
    assert not verdict(growing_then_flat, warmup=600)["flat"]  # no sample after the warm-up
