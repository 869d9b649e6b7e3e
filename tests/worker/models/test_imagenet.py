"""Real ImageNet models on real photos (weights from the Keras cache the conftest prepares)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from worker.models import InceptionV3, MobileNet, MobileNetV2, top_k
from worker.models.base import bucket_sizes

ROOT = Path(__file__).resolve().parents[3]
DOG_IDS = range(151, 269)  # ImageNet class ids 151..268 are dog breeds
CATS = {"Egyptian_cat", "tabby", "tiger_cat"}


def load_photo(path: Path, size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """RGB, bilinear resize to ``size`` (width, height), float32 in 0..255: (height, width, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR), dtype=np.float32)


@pytest.fixture(scope="module")
def mobilenet() -> MobileNet:
    model = MobileNet(max_batch=32)
    model.setup()
    return model


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> dict[str, np.ndarray]:
    names = ("dog.jpg", "parrot.jpg", "cat.bmp", "hot_dog.jpg")
    return {name: load_photo(photos_dir / name) for name in names}


def top1(model, image: np.ndarray) -> dict:
    return top_k(model.predict_batch(image[None])[0], 1, model.labels)[0]


def test_import_does_not_load_keras() -> None:
    code = (
        "import worker.models, sys; "
        "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_class_index_matches_keras() -> None:
    from keras.src.applications import imagenet_utils

    from worker.models import imagenet

    assert imagenet.CLASS_INDEX_PATH == imagenet_utils.CLASS_INDEX_PATH


def test_labels(mobilenet: MobileNet) -> None:
    assert len(mobilenet.labels) == mobilenet.num_classes == 1000
    assert mobilenet.labels[249] == "malamute"
    assert mobilenet.name == "mobilenet"
    assert mobilenet.input_size == (224, 224)


def test_dog(mobilenet: MobileNet, photos: dict[str, np.ndarray]) -> None:
    assert top1(mobilenet, photos["dog.jpg"])["class_id"] in DOG_IDS


def test_parrot(mobilenet: MobileNet, photos: dict[str, np.ndarray]) -> None:
    best = top1(mobilenet, photos["parrot.jpg"])
    assert best["label"] == "macaw"
    assert best["score"] > 0.9


def test_cat(mobilenet: MobileNet, photos: dict[str, np.ndarray]) -> None:
    assert top1(mobilenet, photos["cat.bmp"])["label"] in CATS


def test_batch_matches_single_images(mobilenet: MobileNet, photos: dict[str, np.ndarray]) -> None:
    images = [photos["dog.jpg"], photos["parrot.jpg"], photos["cat.bmp"]]
    batch = np.stack(images)
    before = batch.copy()
    probs = mobilenet.predict_batch(batch)  # 3 padded to bucket 4
    np.testing.assert_array_equal(batch, before)  # the input is not modified
    for row, image in zip(probs, images, strict=True):
        alone = mobilenet.predict_batch(image[None])[0]  # bucket 1
        assert np.argmax(row) == np.argmax(alone)
        np.testing.assert_allclose(row, alone, atol=1e-4)


@pytest.mark.parametrize("n", [1, 3, 5, 33])
def test_batch_shapes(mobilenet: MobileNet, photos: dict[str, np.ndarray], n: int) -> None:
    pool = list(photos.values())
    batch = np.stack([pool[i % len(pool)] for i in range(n)])
    probs = mobilenet.predict_batch(batch)
    assert probs.shape == (n, 1000)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    if n == 33:  # chunks of 32 and 1; image 32 is the same photo as image 0
        np.testing.assert_allclose(probs[32], probs[0], atol=1e-4)


def test_empty_batch(mobilenet: MobileNet) -> None:
    assert mobilenet.predict_batch(np.zeros((0, 224, 224, 3), np.float32)).shape == (0, 1000)


def test_wrong_shape_rejected(mobilenet: MobileNet) -> None:
    with pytest.raises(ValueError, match="224, 224, 3"):
        mobilenet.predict_batch(np.zeros((1, 299, 299, 3), np.float32))


def test_setup_is_idempotent(mobilenet: MobileNet) -> None:
    model = mobilenet._model
    mobilenet.setup()
    assert mobilenet._model is model


def test_not_set_up() -> None:
    model = MobileNet()
    assert not model.is_ready
    with pytest.raises(RuntimeError, match="setup"):
        model.predict_batch(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(RuntimeError, match="setup"):
        _ = model.labels


def test_bucket_sizes() -> None:
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(24) == (1, 2, 4, 8, 16, 24)
    with pytest.raises(ValueError):
        bucket_sizes(0)


def test_top_k(mobilenet: MobileNet, photos: dict[str, np.ndarray]) -> None:
    probs = mobilenet.predict_batch(photos["parrot.jpg"][None])[0]
    result = top_k(probs, 5, mobilenet.labels)
    assert len(result) == 5
    assert result[0]["label"] == "macaw"
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True)
    for r in result:
        assert set(r) == {"label", "class_id", "score"}
        assert type(r["label"]) is str
        assert type(r["class_id"]) is int
        assert type(r["score"]) is float
        assert r["score"] == round(r["score"], 6)
        assert mobilenet.labels[r["class_id"]] == r["label"]


def test_top_k_synthetic() -> None:
    labels = ["a", "b", "c", "d"]
    probs = np.array([0.1, 0.4, 0.1, 0.4], dtype=np.float32)
    result = top_k(probs, 3, labels)
    assert [r["class_id"] for r in result] == [1, 3, 0]  # ties: lower class id first
    assert result[0] == {"label": "b", "class_id": 1, "score": 0.4}
    assert len(top_k(probs, 10, labels)) == 4
    with pytest.raises(ValueError):
        top_k(probs, 0, labels)
    with pytest.raises(ValueError):
        top_k(probs[None], 1, labels)
    with pytest.raises(ValueError):
        top_k(probs, 1, labels[:3])


def test_mobilenet_v2_parrot(photos: dict[str, np.ndarray]) -> None:
    model = MobileNetV2()
    model.setup()
    assert model.name == "mobilenet_v2"
    assert top1(model, photos["parrot.jpg"])["label"] == "macaw"


def test_inception_v3_shapes() -> None:
    # max_batch=1: two chunks at the warmed-up bucket, so no second (~2.5 s) trace.
    model = InceptionV3(weights=None, max_batch=1)
    model.setup()
    assert model.name == "inception_v3"
    assert model.input_size == (299, 299)
    probs = model.predict_batch(np.random.default_rng(0).uniform(0, 255, (2, 299, 299, 3)))
    assert probs.shape == (2, 1000)
    assert probs.dtype == np.float32
