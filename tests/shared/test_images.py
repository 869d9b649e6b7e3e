"""Decoding real photos and hand-made edge cases with shared.images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from shared.errors import ImageTooLarge, NotAnImage
from shared.images import ALLOWED_FORMATS, decode_image, sniff_format, to_array

LIMIT = 40_000_000


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR declares width x height but whose IDAT holds one row."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" + b"\0" * 3 * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _photos(photos_dir: Path) -> list[Path]:
    return sorted(p for p in photos_dir.iterdir() if p.suffix in {".jpg", ".bmp"})


def test_real_photos_decode_to_rgb_of_the_right_size(photos_dir: Path) -> None:
    photos = _photos(photos_dir)
    assert any(p.name == "cat.bmp" for p in photos)
    for path in photos:
        data = path.read_bytes()
        with Image.open(path) as reference:
            expected = ImageOps.exif_transpose(reference).size
        image = decode_image(data, max_pixels=LIMIT)
        assert image.mode == "RGB", path.name
        assert image.size == expected, path.name
        assert sniff_format(data) == ("BMP" if path.suffix == ".bmp" else "JPEG")


def test_cat_bmp_pixels_match_pillow(photos_dir: Path) -> None:
    data = (photos_dir / "cat.bmp").read_bytes()
    with Image.open(io.BytesIO(data)) as reference:
        expected = np.asarray(reference.convert("RGB"))
    assert np.array_equal(np.asarray(decode_image(data, max_pixels=LIMIT)), expected)


def test_huge_declared_png_is_refused_by_pillows_bomb_guard() -> None:
    data = _png_header_only(30_000, 30_000)
    assert sniff_format(data) == "PNG"
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=LIMIT)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # Decoding this would fail as truncated, so ImageTooLarge proves the header check ran first.
    data = _png_header_only(5_000, 5_000)
    assert sniff_format(data) == "PNG"
    with pytest.raises(ImageTooLarge, match="5000x5000"):
        decode_image(data, max_pixels=1_000_000)
    with pytest.raises(NotAnImage):
        decode_image(data, max_pixels=LIMIT)


@pytest.mark.parametrize("keep", [2048, 0.5])
def test_truncated_jpeg_is_not_an_image(photos_dir: Path, keep: float) -> None:
    whole = (photos_dir / "dog.jpg").read_bytes()
    data = whole[: int(keep if keep > 1 else len(whole) * keep)]
    if keep < 1:
        assert sniff_format(data) == "JPEG"  # the header is intact, the scan data is not
    with pytest.raises(NotAnImage):
        decode_image(data, max_pixels=LIMIT)


@pytest.mark.parametrize("data", [b"", b"hello, this is plain text\n" * 10, b"\x89PNG\r\n"])
def test_non_images_are_refused(data: bytes) -> None:
    assert sniff_format(data) is None
    with pytest.raises(NotAnImage):
        decode_image(data, max_pixels=LIMIT)


def test_tiff_is_not_allowed() -> None:
    data = _encode(Image.new("RGB", (8, 8), "red"), "TIFF")
    assert sniff_format(data) is None
    with pytest.raises(NotAnImage):
        decode_image(data, max_pixels=LIMIT)


def test_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 10), colour) for colour in ("red", "lime", "blue")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert sniff_format(data) == "GIF"
    image = decode_image(data, max_pixels=LIMIT)
    assert (image.mode, image.size) == ("RGB", (20, 10))
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_cmyk_jpeg_comes_out_as_rgb() -> None:
    data = _encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    image = decode_image(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert np.allclose(image.getpixel((16, 16)), (255, 0, 0), atol=12)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    samples = np.array([[0, 0x4000, 0x8000, 0xFFFF]], dtype=np.uint16).repeat(4, axis=0)
    data = _encode(Image.fromarray(samples), "PNG")
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.mode.startswith("I")  # really a 16-bit image
    pixels = np.asarray(decode_image(data, max_pixels=LIMIT))
    assert pixels.shape == (4, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_32_bit_integer_image_is_treated_as_16_bit() -> None:
    image = Image.fromarray(np.full((3, 5), 0x8080, dtype=np.int32))
    assert image.mode == "I"
    assert np.allclose(to_array(image, (5, 3)), 128.0)


def _half_transparent(mode: str) -> Image.Image:
    """Pixel 0 opaque red, the rest fully transparent black."""
    if mode == "P":
        image = Image.new("P", (4, 1), 1)
        image.putpalette([255, 0, 0, 0, 0, 0])
        image.putpixel((0, 0), 0)
        image.info["transparency"] = 1
        return image
    base = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    base.putpixel((0, 0), (255, 0, 0, 255))
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    data = _encode(_half_transparent(mode), "PNG")
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.getpixel((3, 0)) == (255, 255, 255)
    expected_opaque = (76, 76, 76) if mode == "LA" else (255, 0, 0)  # LA: red's luma
    assert np.allclose(decoded.getpixel((0, 0)), expected_opaque, atol=2)


def test_one_bit_and_grey_images_become_rgb() -> None:
    one_bit = Image.new("1", (8, 8), 1)
    grey = Image.new("L", (8, 8), 77)
    assert decode_image(_encode(one_bit, "BMP"), max_pixels=LIMIT).getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    assert decode_image(_encode(grey, "PNG"), max_pixels=LIMIT).getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), "blue")
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    image = decode_image(data, max_pixels=LIMIT)
    assert image.size == (20, 40)
    red, _, blue = image.getpixel((10, 5))  # the stored left half is now on top
    assert red > 200 and blue < 50


def test_multi_picture_jpeg_counts_as_jpeg() -> None:
    frames = [Image.new("RGB", (16, 16), "green"), Image.new("RGB", (16, 16), "red")]
    data = _encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.format == "MPO"
    assert sniff_format(data) == "JPEG"
    assert decode_image(data, max_pixels=LIMIT).size == (16, 16)


@pytest.mark.parametrize("fmt", sorted(ALLOWED_FORMATS))
def test_sniff_format_names_each_allowed_format(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow was built without WebP")
    data = _encode(Image.new("RGB", (8, 8), "red"), fmt)
    assert sniff_format(data) == fmt
    assert decode_image(data, max_pixels=LIMIT).size == (8, 8)


def test_to_array_shape_dtype_and_range(photos_dir: Path) -> None:
    image = decode_image((photos_dir / "dog.jpg").read_bytes(), max_pixels=LIMIT)
    array = to_array(image, (200, 224))
    assert array.shape == (224, 200, 3)
    assert array.dtype == np.float32
    assert array.min() >= 0.0 and array.max() <= 255.0
    assert array.max() > 1.0  # 0..255, not 0..1


def test_to_array_keeps_flat_colour_and_converts_other_modes() -> None:
    array = to_array(Image.new("L", (10, 30), 200), (7, 5))
    assert array.shape == (5, 7, 3)
    assert np.allclose(array, 200.0)
