"""Decoding real photos and hand-made edge cases with shared.images."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from shared.errors import ImageTooLarge, NotAnImage
from shared.image_header import probe
from shared.images import ALLOWED_FORMATS, decode_image, to_array
from shared.pixel_budget import PixelBudget

LIMIT = 40_000_000


def sniff_format(data: bytes) -> str | None:
    """The allowed format name of ``data`` from its header alone, else None."""
    try:
        return probe(data).format
    except NotAnImage:
        return None


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
    with pytest.raises(ImageTooLarge) as refused:
        decode_image(data, max_pixels=1_000_000)
    # The image's size and the limit, with the setting that raises it.
    assert refused.value.message == (
        "The image is 5000x5000 = 25,000,000 pixels; the limit is 1,000,000 pixels "
        "(MAX_IMAGE_PIXELS)."
    )
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


# --- memory: a pixel budget for concurrent decodes, no full-size wide copies (issue #14) ---

_PEAK_SCRIPT = """
import resource, sys, threading
from shared.images import decode_image, to_array
from shared.pixel_budget import PixelBudget
from tests import support

n, budget_pixels = int(sys.argv[1]), int(sys.argv[2])
data = support.png_16bit_grey(6300)  # 39.7 million pixels in about 80 KB
# 0: no budget argument (decode_image had none before issue #14)
shared = {"budget": PixelBudget(budget_pixels, wait_s=600)} if budget_pixels else {}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
arrays = []

def decode():
    image = decode_image(data, max_pixels=40_000_000, at_least=(224, 224), **shared)
    arrays.append(to_array(image, (224, 224)))

threads = [threading.Thread(target=decode) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(arrays) == n and all(abs(a.mean() - 128) < 1 for a in arrays), "wrong pixels"
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def _peak_rise_mb(decodes: int, budget_pixels: int) -> int:
    """Peak RSS growth of a fresh process decoding the issue's 16-bit PNG ``decodes`` times."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(decodes), str(budget_pixels)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_a_16_bit_png_decodes_without_full_size_wide_copies() -> None:
    # The image alone is 79 MB at 16 bits; float64 copies of it were 317 MB each.
    assert _peak_rise_mb(1, 0) < 200


def test_concurrent_decodes_share_the_pixel_budget() -> None:
    # Issue #14's batch: 12 such PNGs decoded at once took 5.7 GB; a budget of two at a
    # time keeps the peak near two images' worth.
    assert _peak_rise_mb(12, 80_000_000) < 400


def test_the_budget_is_held_while_decoding_and_given_back() -> None:
    data = _encode(Image.new("RGB", (300, 200), "red"), "PNG")
    budget = PixelBudget(60_000, wait_s=5)
    image = decode_image(data, max_pixels=LIMIT, budget=budget)
    assert image.size == (300, 200) and budget.free == 60_000
    with pytest.raises(ImageTooLarge, match="at most 59,999 at once"):
        decode_image(data, max_pixels=LIMIT, budget=PixelBudget(59_999, wait_s=5))
    with pytest.raises(NotAnImage):  # a decode that fails gives its pixels back too
        decode_image(data[: len(data) // 2], max_pixels=LIMIT, budget=budget)
    assert budget.free == 60_000


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "L"])
def test_shrinking_strip_by_strip_gives_the_same_pixels_as_at_once(mode: str) -> None:
    rng = np.random.default_rng(3)
    width, height = 3000, 1300  # several strips, and a height that is no multiple of 2
    if mode == "I;16":
        source = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        eight_bit = np.rint(np.asarray(source, dtype=np.float64) / 257).astype(np.uint8)
        expected = Image.fromarray(eight_bit).convert("RGB")
    else:
        bands = {"RGBA": 4, "P": 0, "L": 0}[mode]
        shape = (height, width, bands) if bands else (height, width)
        source = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        if mode == "P":
            source.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
            source.info["transparency"] = 5
        expected = decode_image(_encode(source, "PNG", compress_level=1), max_pixels=LIMIT)
    data = _encode(source, "PNG", compress_level=1)
    shrunk = decode_image(data, max_pixels=LIMIT, at_least=(224, 224))
    factors = (width // 448, height // 448)
    assert shrunk.size == (-(-width // factors[0]), -(-height // factors[1]))
    assert np.array_equal(np.asarray(shrunk), np.asarray(expected.reduce(factors)))


def test_exif_orientation_is_applied_after_shrinking() -> None:
    stored = Image.new("RGB", (4000, 2000), "blue")
    stored.paste((255, 0, 0), (0, 0, 2000, 2000))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for fmt in ("JPEG", "PNG"):
        data = _encode(stored, fmt, exif=exif.tobytes())
        image = decode_image(data, max_pixels=LIMIT, at_least=(224, 224))
        assert max(image.size) <= 4 * 448, fmt  # shrunk (each side by its own factor)
        red, _, blue = image.getpixel((image.width // 2, image.height // 4))  # now on top
        assert red > 200 and blue < 50, fmt
        red, _, blue = image.getpixel((image.width // 2, 3 * image.height // 4))
        assert red < 50 and blue > 200, fmt
