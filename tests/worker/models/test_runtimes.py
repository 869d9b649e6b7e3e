"""worker.models.runtimes, one function at a time: cache keys, CPU flags, selection, gate."""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import Config
from worker.models import runtimes
from worker.models.runtimes import KERAS, Choice, GateResult

BF16 = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
AVX2 = frozenset({"avx2", "fma"})
OV = "2026.4.1"
KEY = {
    "weights": "a" * 64,
    "model_class": "worker.models.imagenet.MobileNet",
    "input_shape": (224, 224, 3),
    "runtime": "openvino",
    "runtime_version": OV,
    "precision": "fp32",
    "flags": BF16,
}


def test_cache_key_is_stable_and_readable() -> None:
    key = runtimes.cache_key(**KEY)
    assert key == runtimes.cache_key(**{**KEY, "flags": sorted(BF16)})
    assert key.startswith("openvino-fp32-")
    # Flags that do not change what the model computes do not split the cache.
    assert key == runtimes.cache_key(**{**KEY, "flags": BF16 | {"sse4_2", "aes"}})


@pytest.mark.parametrize(
    "change",
    [
        {"weights": "b" * 64},
        {"model_class": "worker.models.trained.TrainedModel_cats"},
        {"input_shape": (160, 160, 3)},
        {"runtime_version": "2026.5.0"},
        {"precision": "bf16"},
        {"flags": AVX2},
    ],
)
def test_cache_key_changes_with_what_the_compiled_model_depends_on(change: dict) -> None:
    assert runtimes.cache_key(**KEY) != runtimes.cache_key(**{**KEY, **change})


def test_cpu_flags_and_model_from_cpuinfo() -> None:
    text = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: fpu avx2 avx512_bf16\n"
    assert runtimes.cpu_flags(text) == {"fpu", "avx2", "avx512_bf16"}
    assert runtimes.cpu_model(text) == "AMD EPYC 9654"
    assert runtimes.has_bf16(runtimes.cpu_flags(text))
    assert runtimes.cpu_flags("nothing here") == frozenset()
    assert not runtimes.has_bf16(AVX2)


def candidates(runtime: str, **kw) -> list[Choice]:
    args = {"gpu": False, "backend": "tensorflow", "flags": BF16, "ov_version": OV, **kw}
    return runtimes.candidates(runtime, **args)


def test_candidates() -> None:
    ov32, ov16 = Choice("openvino", "fp32"), Choice("openvino", "bf16")
    assert candidates("keras") == [KERAS]
    assert candidates("auto") == [ov16, ov32, KERAS]
    assert candidates("auto", flags=AVX2) == [ov32, KERAS]  # e.g. an AMD EPYC without bf16
    assert candidates("openvino", flags=AVX2) == [ov32, KERAS]
    # GPUs keep Keras; so do other backends and a missing openvino package.
    assert candidates("auto", gpu=True) == [KERAS]
    assert candidates("auto", backend="jax") == [KERAS]
    assert candidates("auto", ov_version=None) == [KERAS]
    with pytest.raises(RuntimeError, match="openvino"):
        candidates("openvino", ov_version=None)
    with pytest.raises(ValueError, match="RUNTIME"):
        candidates("onnx")


def test_select_needs_a_passing_gate_for_reduced_precision() -> None:
    options = candidates("auto")
    passed = GateResult(1000, 0.996, 0.99)
    assert runtimes.select(options, lambda c: None) == Choice("openvino", "fp32")
    assert runtimes.select(options, lambda c: passed) == Choice("openvino", "bf16")
    for failed in (
        GateResult(999, 1.0, 1.0),  # too few photos
        GateResult(1000, 0.994, 1.0),
        GateResult(1000, 1.0, 0.979),
    ):
        assert not failed.passed
        assert runtimes.select(options, lambda c, r=failed: r) == Choice("openvino", "fp32")
    assert runtimes.select([KERAS], lambda c: None) == KERAS


def test_agreement() -> None:
    ref = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    assert runtimes.agreement(ref, ref) == (1.0, 1.0)
    swapped = ref.copy()
    swapped[0, [6, 5]] = swapped[0, [5, 6]]  # top-1 changes, top-5 set does not
    swapped[1, [4, 5]] = swapped[1, [5, 4]]  # 5th and 6th swap: one of five differs
    top1, top5 = runtimes.agreement(ref, swapped)
    assert top1 == 0.5
    assert top5 == pytest.approx((1.0 + 0.8) / 2)
    with pytest.raises(ValueError):
        runtimes.agreement(ref, ref[:1])


def test_gate_records_round_trip(tmp_path) -> None:
    assert runtimes.read_gate(tmp_path, "k") is None
    runtimes.write_gate(tmp_path, "k", GateResult(1200, 0.999, 0.995), model="mobilenet")
    assert runtimes.read_gate(tmp_path, "k") == GateResult(1200, 0.999, 0.995)
    runtimes.gate_path(tmp_path, "k").write_text("{not json")
    assert runtimes.read_gate(tmp_path, "k") is None


def test_config() -> None:
    assert Config().runtime == "auto"
    assert Config.from_env({"RUNTIME": "keras"}).runtime == "keras"
    with pytest.raises(ValueError, match="RUNTIME"):
        Config.from_env({"RUNTIME": "tensorrt"})


def test_the_null_runtime_is_for_benchmarks_only() -> None:
    assert candidates("null") == [runtimes.NULL]
    with pytest.raises(ValueError, match="benchmarks only"):
        Config.from_env({"RUNTIME": "null"})
    assert Config.from_env({"RUNTIME": "null", "ALLOW_NULL_RUNTIME": "1"}).runtime == "null"


def test_a_null_model_answers_every_image_the_same_at_once() -> None:
    from worker.models.base import top_k
    from worker.models.registry import ModelRegistry

    config = Config.from_env({"RUNTIME": "null", "ALLOW_NULL_RUNTIME": "1"})
    model = ModelRegistry(config).get("mobilenet")
    model.setup()  # labels only: no weights are read
    assert model.choice == runtimes.NULL and model._model is model._compiled
    probs = model.predict_batch(np.zeros((3, 224, 224, 3), dtype=np.uint8))
    assert probs.shape == (3, 1000) and np.allclose(probs.sum(1), 1)
    assert (probs == probs[0]).all()
    assert [p["class_id"] for p in top_k(probs[0], 3, model.labels)] == [0, 1, 2]
