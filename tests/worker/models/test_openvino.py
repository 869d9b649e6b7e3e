"""The OpenVINO runtime on the real MobileNet and real photos: same answers as Keras,
compiled once and then read from the cache, and the accuracy gate of what ``auto`` picks."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest

from shared.config import Config
from tests.conftest import ASSETS
from worker.models import MobileNet, ModelRegistry
from worker.models.runtimes import (
    GATE_TOP1,
    GATE_TOP5,
    KERAS,
    Choice,
    GateResult,
    cpu_flags,
    gate,
    has_bf16,
    load_photos,
    photo_paths,
    write_gate,
)

pytest.importorskip("openvino")

DATASET = ASSETS / "datasets" / "cats_and_dogs_filtered.tar.gz"
GATE_SAMPLE = 96  # CI's sample; the recorded gate (bench.runtimes) uses >= 1,000 photos


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def keras_model() -> MobileNet:
    model = MobileNet(max_batch=32, runtime="keras")
    model.setup()
    return model


@pytest.fixture(scope="module")
def ov_model(cache_dir: Path) -> MobileNet:
    model = MobileNet(max_batch=32, runtime="openvino", runtime_cache_dir=cache_dir)
    model.setup()
    return model


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> np.ndarray:
    return load_photos(photo_paths(photos_dir, 100), (224, 224))


@pytest.fixture(scope="module")
def gate_photos(tmp_path_factory) -> np.ndarray:
    """The first GATE_SAMPLE photos of cats_and_dogs_filtered's validation split."""
    folder = tmp_path_factory.mktemp("gate-photos")
    with tarfile.open(DATASET) as tar:
        found = 0
        for member in tar:
            if found < GATE_SAMPLE and "/validation/" in member.name and member.isfile():
                tar.extract(member, folder, filter="data")
                found += 1
    return load_photos(photo_paths(folder, GATE_SAMPLE), (224, 224))


def test_keras_runtime_is_the_keras_model(keras_model: MobileNet, photos: np.ndarray) -> None:
    assert str(keras_model.choice) == "keras/fp32"
    # RUNTIME=keras through the worker's registry: Keras' predict_on_batch, as before.
    config = Config(runtime="keras", runtime_cache_dir="/nonexistent/never-written")
    served = ModelRegistry(config).get("mobilenet")
    served.setup()
    assert served.choice == KERAS and served._compiled is None
    np.testing.assert_array_equal(served.predict_batch(photos), keras_model.predict_batch(photos))


def test_openvino_gives_keras_answers_on_real_photos(
    keras_model: MobileNet, ov_model: MobileNet, photos: np.ndarray
) -> None:
    assert ov_model.choice is not None and ov_model.choice.runtime == "openvino"
    assert len(photos) >= 11
    expected = keras_model.predict_batch(photos)
    got = ov_model.predict_batch(photos)
    assert got.shape == expected.shape == (len(photos), 1000)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    if ov_model.choice.precision == "fp32":
        np.testing.assert_allclose(got, expected, atol=1e-4)
    # Odd sizes: Keras pads them to a bucket, OpenVINO runs them at their own size.
    np.testing.assert_array_equal(
        ov_model.predict_batch(photos[:3]).argmax(1), expected[:3].argmax(1)
    )


def test_openvino_runs_each_batch_at_its_own_size(
    ov_model: MobileNet, photos: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = ov_model._compiled
    assert compiled is not None
    forward = compiled.predict_on_batch
    sizes: list[int] = []

    def recorded(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        return forward(batch)

    monkeypatch.setattr(compiled, "predict_on_batch", recorded)
    nine = np.stack([photos[i % len(photos)] for i in range(9)])
    got = ov_model.predict_batch(nine)  # Keras would run it as 16
    seventy = np.stack([photos[i % len(photos)] for i in range(70)])
    assert ov_model.predict_batch(seventy).shape == (70, 1000)
    assert sizes == [9, 32, 32, 6]  # chunks of max_batch, none padded
    padded = np.concatenate([nine, np.zeros((7, *nine.shape[1:]), nine.dtype)])
    np.testing.assert_allclose(got, forward(padded.astype(np.float32))[:9], atol=1e-5)


def test_a_restart_reads_the_compiled_model_from_the_cache(
    ov_model: MobileNet, cache_dir: Path, photos: np.ndarray
) -> None:
    first = ov_model._compiled
    assert first is not None
    xml = first.path / "model.xml"
    mtime = xml.stat().st_mtime_ns
    again = MobileNet(max_batch=32, runtime="openvino", runtime_cache_dir=cache_dir)
    again.setup()  # a new process would do the same: the key is the same
    assert again._compiled is not None and again._compiled.from_cache
    assert again._compiled.path == first.path
    assert xml.stat().st_mtime_ns == mtime  # reused, not rebuilt
    np.testing.assert_array_equal(
        again.predict_batch(photos).argmax(1), ov_model.predict_batch(photos).argmax(1)
    )


def test_auto_refuses_bf16_without_a_passing_gate(cache_dir: Path, ov_model: MobileNet) -> None:
    if not has_bf16(cpu_flags()):
        pytest.skip("this CPU has no native bf16: auto never considers it")
    bf16 = Choice("openvino", "bf16")
    key = ov_model.runtime_key(bf16)
    write_gate(cache_dir, key, GateResult(1000, 0.97, 0.99))  # a failed gate
    model = MobileNet(max_batch=32, runtime="auto", runtime_cache_dir=cache_dir)
    model.setup()
    assert model.choice == Choice("openvino", "fp32")
    write_gate(cache_dir, key, GateResult(1000, 0.996, 0.99))  # a passed gate
    model = MobileNet(max_batch=32, runtime="auto", runtime_cache_dir=cache_dir)
    model.setup()
    assert model.choice == bf16
    write_gate(cache_dir, key, GateResult(1000, 0.97, 0.99))  # leave it refused for the rest


def test_what_auto_picks_passes_the_gate_on_real_photos(
    gate_photos: np.ndarray, tmp_path: Path
) -> None:
    # With a fresh cache (no gate records), as a newly deployed worker starts.
    model = MobileNet(max_batch=32, runtime="auto", runtime_cache_dir=tmp_path)
    model.setup()
    assert model.choice is not None
    if model.choice.runtime == "keras":
        pytest.skip("auto picked Keras itself here (GPU or no OpenVINO): nothing to gate")
    assert len(gate_photos) == GATE_SAMPLE
    result = gate(model, model.choice.precision, gate_photos)
    assert result.top1_agreement >= GATE_TOP1, result
    assert result.top5_overlap >= GATE_TOP5, result
    assert not result.passed  # a 96-photo sample never counts as the recorded gate
