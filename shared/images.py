"""Image decoding shared by the API and the worker.

Pillow only: the API imports this module, so it must never pull in TensorFlow.
Pillow's process-wide settings (``Image.MAX_IMAGE_PIXELS``, warning filters,
``ImageFile.LOAD_TRUNCATED_IMAGES``) are never changed here, because decoding runs
in several threads and other code may rely on them.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps

from shared.errors import ImageTooLarge, NotAnImage

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP"})

# Only these plugins may look at untrusted bytes, so exotic decoders never run on them.
_OPEN_FORMATS = tuple(sorted(ALLOWED_FORMATS))
# Pillow reports multi-picture JPEGs, which most phone cameras write, as MPO.
_ALIASES = {"MPO": "JPEG"}
# Pillow raises all of these for malformed or truncated input, depending on the plugin.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
# Pillow widens 16-bit samples into these modes; its own convert("RGB") clips them to white.
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255, 255)


def sniff_format(data: bytes) -> str | None:
    """Return the allowed format name of ``data`` from its header alone, else None."""
    try:
        with _open(data) as image:
            return _format(image)
    except NotAnImage:
        return None
    except ImageTooLarge:
        # Pillow refused to open it as a decompression bomb: it is an image all the same.
        return _format_from_magic(data)


def decode_image(
    data: bytes, *, max_pixels: int, at_least: tuple[int, int] | None = None
) -> Image.Image:
    """Decode the first frame of ``data``, upright, as RGB.

    Pixels with alpha are composited onto white: transparent areas often hold
    arbitrary (usually black) colour, and white is how viewers show them.

    ``at_least`` = the (width, height) the caller will resize to: a JPEG is then
    decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at least that big
    (libjpeg's DCT scaling), several times faster than a full decode.
    """
    with _open(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"The image is {width}x{height} pixels; at most {max_pixels} pixels are allowed."
            )
        try:
            if at_least and image.format == "JPEG":
                side = max(at_least)  # EXIF rotation may swap width and height later
                image.draft("RGB", (side, side))
            image.load()
            return _to_rgb(_upright(image))
        except _BOMB_ERRORS as exc:
            raise ImageTooLarge("The image exceeds the pixel limit.") from exc
        except _DECODE_ERRORS as exc:
            raise NotAnImage("The image data is corrupt or truncated.") from exc


def to_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` = (width, height) without cropping; float32 HxWx3 in 0..255."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    resized = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _open(data: bytes) -> Image.Image:
    """Read only the header (Image.open is lazy) and vet the format."""
    if not data:
        raise NotAnImage("The data is empty.")
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except _BOMB_ERRORS as exc:
        raise ImageTooLarge("The image exceeds the pixel limit.") from exc
    except _DECODE_ERRORS as exc:
        raise NotAnImage() from exc
    if _format(image) not in ALLOWED_FORMATS:
        image.close()
        raise NotAnImage()
    return image


def _format(image: Image.Image) -> str | None:
    return _ALIASES.get(image.format or "", image.format)


def _format_from_magic(data: bytes) -> str | None:
    prefix = data[:16]
    for name in _OPEN_FORMATS:
        accept = Image.OPEN[name][1]
        # Some accept functions return an error string meaning "recognised but unusable".
        verdict = accept(prefix) if accept else False
        if verdict and not isinstance(verdict, str):
            return name
    return None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        # Broken EXIF should not cost the user a classification; keep the pixels as stored.
        # A copy, because the caller closes the original.
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_INT_MODES:
        # Treat the samples as 16-bit and keep the top 8 bits' worth of range.
        samples = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.rint(samples).astype(np.uint8))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
