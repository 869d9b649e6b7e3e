"""Random augmentation for the training split: flips, rotation, zoom and shift.

All geometric changes of one image are folded into a single affine transform and applied
in one ``ImageProjectiveTransformV3`` op per batch (bilinear, reflected borders). On the
2-core development machine that runs at about 3,000 CIFAR images/s, four times as fast
as chaining Keras' ``RandomFlip``/``RandomTranslation``/``RandomZoom``/``RandomRotation``
layers, which matters when the CPU is also training. Augmentation is part of the
``tf.data`` input pipeline of the training split only; it is not in the saved model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Augmentation:
    """How much to perturb training images.

    Attributes:
        rotation: Largest rotation, degrees, either way.
        zoom: Largest zoom, a fraction: 0.1 scales by 0.9..1.1.
        shift: Largest shift, a fraction of width/height, either way.
        hflip: Mirror left-right with probability 1/2 (natural photos: yes).
        vflip: Mirror top-bottom with probability 1/2 (only for data without an
            "up", such as aerial or microscope images).
    """

    rotation: float = 10.0
    zoom: float = 0.1
    shift: float = 0.1
    hflip: bool = True
    vflip: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.rotation or self.zoom or self.shift or self.hflip or self.vflip)

    def to_dict(self) -> dict:
        return asdict(self)


NONE = Augmentation(rotation=0.0, zoom=0.0, shift=0.0, hflip=False, vflip=False)


def augment_batch(images, aug: Augmentation):
    """Randomly transform a float32 ``(N, H, W, 3)`` batch (a TensorFlow op; traceable)."""
    import tensorflow as tf

    if not aug.enabled:
        return images
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    n = shape[0]
    h = tf.cast(shape[1], tf.float32)
    w = tf.cast(shape[2], tf.float32)

    def uniform(limit: float):
        return tf.random.uniform([n], -limit, limit)

    def sign(enabled: bool):
        if not enabled:
            return tf.ones([n])
        return tf.where(tf.random.uniform([n]) < 0.5, -1.0, 1.0)

    angle = uniform(math.radians(aug.rotation))
    scale = 1.0 + uniform(aug.zoom)  # > 1 zooms in
    tx = uniform(aug.shift) * w
    ty = uniform(aug.shift) * h
    fx, fy = sign(aug.hflip), sign(aug.vflip)
    # Output pixel p maps to input pixel c + R(angle) F (p - c) / scale + t.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a0, a1 = cos * fx, -sin * fy
    b0, b1 = sin * fx, cos * fy
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a2 = cx - a0 * cx - a1 * cy + tx
    b2 = cy - b0 * cx - b1 * cy + ty
    zeros = tf.zeros([n])
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
