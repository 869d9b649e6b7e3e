"""Image decoding shared by the API and the worker.

Pillow only: the API imports this module, so it must never pull in TensorFlow.
Pillow's process-wide settings (``Image.MAX_IMAGE_PIXELS``, warning filters,
``ImageFile.LOAD_TRUNCATED_IMAGES``) are never changed here, because decoding runs
in several threads and other code may rely on them.
"""

from __future__ import annotations

import ctypes
import io
import struct
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
from PIL import Image

from shared.errors import ImageTooLarge, NotAnImage
from shared.image_header import probe
from shared.pixel_budget import PixelBudget

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
_STRIP_PIXELS = 1 << 20
# Decodes this large give their memory back to the OS at once (see _return_freed_memory).
_TRIM_PIXELS = 4_000_000
_malloc_trim: Callable[[int], int] | None
try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim  # glibc only
except (OSError, AttributeError):
    _malloc_trim = None
_ORIENTATION = 0x0112
# As ImageOps.exif_transpose, which would also copy the full-size image.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    at_least: tuple[int, int] | None = None,
    budget: PixelBudget | None = None,
) -> Image.Image:
    """Decode the first frame of ``data``, upright, as RGB.

    Pixels with alpha are composited onto white: transparent areas often hold
    arbitrary (usually black) colour, and white is how viewers show them.

    ``at_least`` = the (width, height) the caller will resize to. A JPEG is then
    decoded at the smallest 1/2, 1/4 or 1/8 scale that is still at least that big
    (libjpeg's DCT scaling), several times faster than a full decode, and any image
    comes back shrunk by whole factors to between two and four times that size.

    ``budget``: the decodes sharing it hold at most this many pixels together; this
    one takes its width × height from it for as long as the full-size pixels exist.
    Memory: the full-size image in the mode it is stored in (1 to 4 bytes a pixel),
    plus a strip of about a million pixels at a time while converting.
    """
    header = probe(data)  # bounded: Pillow sees only files whose structure passed
    if header.pixels > max_pixels:
        raise ImageTooLarge(pixel_limit_message(header.width, header.height, max_pixels))
    # Taken before Image.open: libwebp allocates its canvas when the file is opened.
    with budget.hold(header.pixels) if budget else nullcontext():
        image = _open(data)
        small = None
        try:
            if image.width * image.height > header.pixels:
                raise NotAnImage("The image is larger than its header says.")
            small, orientation = _load_small(image, at_least)
        except _BOMB_ERRORS as exc:
            raise ImageTooLarge(_BOMB_MESSAGE) from exc
        except _DECODE_ERRORS as exc:
            raise NotAnImage("The image data is corrupt or truncated.") from exc
        finally:
            if small is not image:
                image.close()  # frees the full-size pixels before the budget is given back
            if header.pixels >= _TRIM_PIXELS:
                _return_freed_memory()
    # Turned upright after shrinking: transposing the full-size image would copy it.
    return small.transpose(orientation) if orientation is not None else small


def _return_freed_memory() -> None:
    """Hand the freed full-size pixels back to the OS now, not when glibc decides to.

    glibc keeps freed memory in per-thread arenas, and after a large block is freed
    it raises the size from which blocks get their own mapping: a large image
    decoded by each of 16 loader threads in turn then leaves the process holding
    many such images' worth (12 decodes, two at a time: 1 GB instead of 200 MB).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_small(
    image: Image.Image, at_least: tuple[int, int] | None
) -> tuple[Image.Image, Image.Transpose | None]:
    if at_least and _format(image) == "JPEG":
        side = max(at_least)  # EXIF rotation may swap width and height later
        image.draft("RGB", (side, side))
    image.load()
    return _shrink(image, at_least), _orientation(image)


def to_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize to ``size`` = (width, height) without cropping; float32 HxWx3 in 0..255."""
    return np.asarray(to_pixels(image, size), dtype=np.float32)


def to_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """As ``to_array`` but uint8: a quarter of the bytes to hand between processes."""
    if image.mode != "RGB":
        image = _to_rgb(image)
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


_BOMB_MESSAGE = "The image exceeds the pixel limit (MAX_IMAGE_PIXELS)."


def pixel_limit_message(width: int, height: int, max_pixels: int) -> str:
    """The image_too_large message: the image's size and the limit, with its setting."""
    return (
        f"The image is {width}x{height} = {width * height:,} pixels; the limit is "
        f"{max_pixels:,} pixels (MAX_IMAGE_PIXELS)."
    )


def _open(data: bytes) -> Image.Image:
    """Read only the header (Image.open is lazy) and vet the format."""
    if not data:
        raise NotAnImage("The data is empty.")
    try:
        image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except _BOMB_ERRORS as exc:
        raise ImageTooLarge(_BOMB_MESSAGE) from exc
    except _DECODE_ERRORS as exc:
        raise NotAnImage() from exc
    if _format(image) not in ALLOWED_FORMATS:
        image.close()
        raise NotAnImage()
    return image


def _format(image: Image.Image) -> str | None:
    return _ALIASES.get(image.format or "", image.format)


def _orientation(image: Image.Image) -> Image.Transpose | None:
    try:
        return _TRANSPOSE.get(image.getexif().get(_ORIENTATION, 1))
    except (*_DECODE_ERRORS, KeyError, TypeError):
        # Broken EXIF should not cost the user a classification; keep the pixels as stored.
        return None


def _shrink(image: Image.Image, at_least: tuple[int, int] | None) -> Image.Image:
    """RGB, reduced by whole factors to no less than twice ``at_least``, a strip at a time.

    Converting strip by strip keeps the wide intermediates (16-bit samples, RGBA
    for compositing) the size of a strip, not of the image. A box reduction of
    whole rows gives the same pixels strip by strip as in one go.
    """
    width, height = image.size
    fx, fy = _factors(image.size, at_least)
    if (fx, fy) == (1, 1) and image.mode == "RGB" and not image.has_transparency_data:
        return image
    out = Image.new("RGB", (-(-width // fx), -(-height // fy)))
    rows = fy * max(1, _STRIP_PIXELS // (width * fy))
    for top in range(0, height, rows):
        strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))))
        out.paste(strip.reduce((fx, fy)) if (fx, fy) != (1, 1) else strip, (0, top // fy))
    return out


def _factors(size: tuple[int, int], at_least: tuple[int, int] | None) -> tuple[int, int]:
    if not at_least:
        return 1, 1
    side = 2 * max(at_least)  # the final bilinear resize then still sees every pixel
    return max(1, size[0] // side), max(1, size[1] // side)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_INT_MODES:
        image = Image.fromarray(_top_8_bits(np.asarray(image)))
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _top_8_bits(samples: np.ndarray) -> np.ndarray:
    """16-bit samples (wider ones clipped to 16 bits) to 8, rounding like x / 257."""
    if samples.dtype.itemsize > 2:
        samples = np.clip(samples, 0, 65535)
    # Integer arithmetic: round(x / 257) == (255 * x + 32767) // 65535 exactly.
    wide = samples.astype(np.uint32) * 255 + 32767
    return (wide // 65535).astype(np.uint8)
