"""The networks: a CNN trained from scratch and MobileNet transfer learning.

Both take RGB pixels in 0..255 at any size and start with the serving-time preprocessing
as Keras layers (``Resizing`` to the input size, ``Rescaling`` to [0, 1]), so the saved
model applies exactly the resize and scaling it was trained with and the worker only
has to hand it pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

ARCHITECTURES = ("cnn", "mobilenet")
MOBILENET_ALPHA = 0.75
# The full ImageNet MobileNet (with its classifier) is the one whose weights are in the
# offline Keras cache (mobilenet_7_5_224_tf.h5); the "_no_top" file is not there.
MOBILENET_WEIGHTS_SIZE = (224, 224)
MOBILENET_BLOCKS = 13
BACKBONE = "mobilenet_base"


def preprocessing(image_size: tuple[int, int], name_prefix: str = "") -> list:
    """``Resizing`` to ``image_size`` (width, height) and ``Rescaling`` to [0, 1]."""
    from keras import layers

    width, height = image_size
    return [
        layers.Resizing(height, width, interpolation="bilinear", name=f"{name_prefix}resize"),
        layers.Rescaling(1.0 / 255.0, name=f"{name_prefix}rescale"),
    ]


def _inputs(image_size: tuple[int, int]):
    import keras

    # Any size in: the model resizes. The worker feeds it image_size already.
    del image_size
    return keras.Input(shape=(None, None, 3), name="pixels")


def build_cnn(
    num_classes: int,
    image_size: tuple[int, int] = (32, 32),
    *,
    depth: int = 3,
    width: int = 32,
    l2: float = 5e-4,
    dropout: float = 0.1,
    dense_units: int = 128,
    dense_dropout: float = 0.3,
) -> keras.Model:
    """A VGG-style CNN: convolution, pooling, batch normalization, dropout, dense; L2 weights.

    A stem convolution at full resolution, then ``depth`` stages of
    ``conv -> max-pool -> BN -> ReLU -> conv -> BN -> ReLU -> dropout`` with
    ``width * 2**i`` filters (pooling right after the first convolution halves the cost
    of everything after it), then global average pooling, a dense hidden layer and the
    softmax classifier. Every convolution and dense kernel carries an L2 penalty.
    """
    import keras
    from keras import layers

    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    width_px, height_px = image_size
    if min(width_px, height_px) < 2**depth:
        raise ValueError(f"{depth} pooling stages need an input of at least {2**depth} px")
    reg = keras.regularizers.l2(l2) if l2 else None

    def conv_bn(x, filters: int, name: str, pool: bool = False):
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"{name}_conv"
        )(x)
        if pool:
            x = layers.MaxPooling2D(name=f"{name}_pool")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.Activation("relu", name=f"{name}_relu")(x)

    inputs = _inputs(image_size)
    x = inputs
    for layer in preprocessing(image_size):
        x = layer(x)
    x = conv_bn(x, max(16, width // 2), "stem")
    for i in range(depth):
        filters = width * 2**i
        x = conv_bn(x, filters, f"stage{i + 1}a", pool=True)
        x = conv_bn(x, filters, f"stage{i + 1}b")
        if dropout:
            x = layers.Dropout(dropout, name=f"stage{i + 1}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dense_units:
        x = layers.Dense(dense_units, use_bias=False, kernel_regularizer=reg, name="dense")(x)
        x = layers.BatchNormalization(name="dense_bn")(x)
        x = layers.Activation("relu", name="dense_relu")(x)
        if dense_dropout:
            x = layers.Dropout(dense_dropout, name="dense_dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name="cnn")


def mobilenet_backbone(image_size: tuple[int, int], alpha: float = MOBILENET_ALPHA):
    """ImageNet MobileNet without its classifier, at ``image_size``, loaded offline.

    Keras ships ``include_top=False`` weights as a separate download that the offline
    cache does not hold, and ``include_top=True`` only accepts 224x224. So the full
    224x224 model is loaded from the cache and its weights are copied, layer by layer
    (convolutions do not depend on the input size), into a classifier-less MobileNet
    built at ``image_size``.
    """
    import keras

    width, height = image_size
    full = keras.applications.MobileNet(
        input_shape=(*MOBILENET_WEIGHTS_SIZE[::-1], 3),
        alpha=alpha,
        include_top=True,
        weights="imagenet",
    )
    base = keras.applications.MobileNet(
        input_shape=(height, width, 3), alpha=alpha, include_top=False, weights=None
    )
    for layer in base.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    base.name = BACKBONE
    del full
    return base


def build_mobilenet(
    num_classes: int,
    image_size: tuple[int, int] = (224, 224),
    *,
    alpha: float = MOBILENET_ALPHA,
    dropout: float = 0.2,
    l2: float = 1e-4,
) -> keras.Model:
    """ImageNet MobileNet, frozen, with a new head: pooling, dropout, dense softmax.

    The backbone runs in inference mode (``training=False``) always, so its batch
    normalization statistics stay ImageNet's even while its last blocks are fine-tuned
    (``unfreeze_top``). MobileNet wants pixels in [-1, 1]: the [0, 1] scaling is followed
    by a second ``Rescaling`` inside the model.
    """
    import keras
    from keras import layers

    base = mobilenet_backbone(image_size, alpha)
    base.trainable = False
    inputs = _inputs(image_size)
    x = inputs
    for layer in preprocessing(image_size):
        x = layer(x)
    x = layers.Rescaling(2.0, offset=-1.0, name="to_mobilenet_range")(x)
    x = base(x, training=False)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    reg = keras.regularizers.l2(l2) if l2 else None
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, name="predictions"
    )(x)
    return keras.Model(inputs, outputs, name="mobilenet_transfer")


def unfreeze_top(model: keras.Model, blocks: int) -> int:
    """Make the backbone's last ``blocks`` depthwise-separable blocks trainable.

    Batch normalization layers stay frozen. Returns the number of trainable backbone
    layers. Recompile the model afterwards.
    """
    from keras import layers

    base = model.get_layer(BACKBONE)
    if not 0 <= blocks <= MOBILENET_BLOCKS:
        raise ValueError(f"fine-tune blocks must be 0..{MOBILENET_BLOCKS}, got {blocks}")
    first = MOBILENET_BLOCKS - blocks + 1
    base.trainable = blocks > 0
    trainable = 0
    started = False
    for layer in base.layers:
        if layer.name == f"conv_dw_{first}":
            started = True
        layer.trainable = (
            blocks > 0 and started and not isinstance(layer, layers.BatchNormalization)
        )
        trainable += bool(layer.trainable and layer.weights)
    return trainable


def build(arch: str, num_classes: int, image_size: tuple[int, int], **options) -> keras.Model:
    """Build ``arch`` (one of ``ARCHITECTURES``) with its own keyword options."""
    if arch == "cnn":
        return build_cnn(num_classes, image_size, **options)
    if arch == "mobilenet":
        return build_mobilenet(num_classes, image_size, **options)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
