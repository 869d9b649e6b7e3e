"""probe: format and size from a bounded walk of the header, for every allowed format."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from shared import image_header
from shared.errors import NotAnImage
from shared.image_header import probe
from shared.images import decode_image
from tests import support


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _pillow_view(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return {"MPO": "JPEG"}.get(image.format, image.format), image.size


def _samples() -> dict[str, bytes]:
    rgb = Image.new("RGB", (37, 23), "teal")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (30, 20), c) for c in ("red", "lime")]
    samples = {
        "jpeg": _encode(rgb, "JPEG"),
        "jpeg progressive + exif": _encode(rgb, "JPEG", progressive=True, exif=exif.tobytes()),
        "jpeg grey": _encode(rgb.convert("L"), "JPEG"),
        "jpeg cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "mpo": _encode(frames[0], "MPO", save_all=True, append_images=frames[1:]),
        "png rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png palette": _encode(rgb.convert("P"), "PNG"),
        "png 16-bit": support.png_16bit_grey(41),
        "apng": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "gif": _encode(rgb, "GIF", comment=b"x" * 2000),
        "gif animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "bmp": _encode(rgb, "BMP"),
        "bmp 1-bit": _encode(rgb.convert("1"), "BMP"),
    }
    if features.check("webp"):
        samples["webp lossy"] = _encode(rgb, "WEBP")
        samples["webp lossless"] = _encode(rgb, "WEBP", lossless=True)
        samples["webp animated"] = _encode(
            frames[0], "WEBP", save_all=True, append_images=frames[1:]
        )
    return samples


@pytest.mark.parametrize(("name", "data"), sorted(_samples().items()))
def test_probe_agrees_with_pillow(name: str, data: bytes) -> None:
    header = probe(data)
    assert (header.format, (header.width, header.height)) == _pillow_view(data), name


def test_probe_agrees_with_pillow_on_the_real_photos(photos_dir: Path) -> None:
    for path in sorted(photos_dir.iterdir()):
        data = path.read_bytes()
        header = probe(data)
        assert (header.format, (header.width, header.height)) == _pillow_view(data), path.name
        assert header.steps < 50, path.name  # real files are nowhere near the caps


def test_gif_frame_larger_than_its_canvas_counts_the_frame() -> None:
    data = bytearray(_encode(Image.new("L", (20, 10), 9), "GIF"))
    struct.pack_into("<HH", data, 6, 5, 5)  # shrink the logical screen below the frame
    header = probe(bytes(data))
    assert (header.width, header.height) == _pillow_view(bytes(data))[1] == (20, 10)


@pytest.mark.parametrize(
    "data",
    [b"", b"plain text, not an image", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"],
)
def test_non_images_and_stubs_are_refused(data: bytes) -> None:
    with pytest.raises(NotAnImage):
        probe(data)


# --- hostile files: the walk stops at its cap, so its work does not grow with the file ---


def test_the_issues_jpeg_of_millions_of_empty_segments_stops_at_the_cap() -> None:
    data = support.jpeg_segment_flood(4_800_000)  # 19 MB, as in issue #14
    cap = image_header.MAX_JPEG_SEGMENTS
    with pytest.raises(NotAnImage, match=f"more than {cap} header segments"):
        probe(data)
    # The same verdict for a file cut short just past the cap: nothing after it was read.
    with pytest.raises(NotAnImage, match=f"more than {cap} header segments"):
        probe(data[: 2 + 4 * (cap + 1)] + b"\x00garbage")


@pytest.mark.parametrize("kind", [b"abCd", b"tEXt", b"IDAT"])
def test_the_issues_png_of_millions_of_empty_chunks_stops_at_the_cap(kind: bytes) -> None:
    data = support.png_chunk_flood(1_600_000, kind)  # 19 MB, as in issue #14
    walked = int(_refusal(data).split("(")[1].split()[0])
    # Both caps together, a few tens of thousands of steps, against 1.6 million chunks.
    assert walked <= 2 * image_header.MAX_PNG_CHUNKS + len(data) // 1024 + 1


def test_a_png_with_a_few_thousand_real_data_chunks_is_fine() -> None:
    # Encoders write image data in chunks of 8 KiB or more; here 2 KiB, thousands of them.
    side = 1500
    rows = np.random.default_rng(7).integers(0, 256, (side, 1 + 3 * side), dtype=np.uint8)
    rows[:, 0] = 0  # filter type "none"
    stream = zlib.compress(rows.tobytes(), 1)
    pieces = [stream[i : i + 2048] for i in range(0, len(stream), 2048)]
    data = (
        b"\x89PNG\r\n\x1a\n"
        + support.png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        + b"".join(support.png_chunk(b"IDAT", p) for p in pieces)
        + support.png_chunk(b"IEND", b"")
    )
    assert len(pieces) > 2 * image_header.MAX_PNG_CHUNKS
    assert probe(data).steps == 1 + len(pieces)
    assert decode_image(data, max_pixels=10**7).size == (side, side)


def test_a_jpeg_padded_with_megabytes_of_fill_is_refused() -> None:
    good = _encode(Image.new("RGB", (8, 8)), "JPEG")
    data = good[:2] + b"\xff" * 5_000_000 + good[2:]
    assert "stray bytes" in _refusal(data)
    app0_end = 4 + struct.unpack(">H", good[4:6])[0]
    assert good[app0_end] == 0xFF
    junk = good[:app0_end] + b"\x00" * 5_000_000 + good[app0_end:]
    assert "stray bytes" in _refusal(junk)


def test_a_jpeg_of_thousands_of_scans_is_refused() -> None:
    good = _encode(Image.new("RGB", (8, 8)), "JPEG", progressive=True)
    first_scan = good.index(b"\xff\xda")
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    data = good[:first_scan] + empty_scan * 5000 + good[first_scan:]
    assert "scans" in _refusal(data)


@pytest.mark.parametrize("window", [image_header.SCAN_WINDOW, 1, 2, 7])
def test_scan_markers_count_every_ff_da_from_the_position_on(window, monkeypatch) -> None:
    monkeypatch.setattr(image_header, "SCAN_WINDOW", window)  # pairs across window edges
    rng = np.random.default_rng(22)
    for _ in range(500):
        data = rng.choice(np.array([0xFF, 0xDA, 0x00, 0xD0], np.uint8), rng.integers(0, 40))
        raw = data.tobytes()
        pos = int(rng.integers(0, len(raw) + 1))
        assert image_header._scan_markers(raw, pos) == raw.count(b"\xff\xda", pos)


def test_a_gif_of_a_huge_comment_is_refused() -> None:
    good = _encode(Image.new("L", (8, 8)), "GIF")
    comment = b"!\xfe" + (b"\xff" + b"c" * 255) * 80_000 + b"\x00"  # 20 MB of sub-blocks
    table_end = 13 + (3 << ((good[10] & 7) + 1))  # after the global colour table
    data = good[:table_end] + comment + good[table_end:]
    assert _pillow_view(data) == ("GIF", (8, 8))
    assert "blocks" in _refusal(data)


def test_an_rle_bmp_longer_than_its_pixels_need_is_refused() -> None:
    width = height = 4
    palette = b"\x00\x00\x00\x00" * 256
    rle = b"\x00\x00" * 1_000_000 + b"\x00\x01"  # a million empty "end of line" codes
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 0, 0, 256, 0)
    data = b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset) + info + palette + rle
    assert _pillow_view(data) == ("BMP", (4, 4))
    assert "compressed data" in _refusal(data)


def test_the_worker_decode_refuses_them_before_pillow_parses_them(monkeypatch) -> None:
    # Pillow itself would spend seconds and hundreds of MB on these (issue #14).
    def pillow_open(*args, **kwargs):
        raise AssertionError("Pillow parsed a file the probe should have refused")

    monkeypatch.setattr("shared.images.Image.open", pillow_open)
    for data in (support.jpeg_segment_flood(4_800_000), support.png_chunk_flood(1_600_000)):
        with pytest.raises(NotAnImage):
            decode_image(data, max_pixels=10**7)


def _refusal(data: bytes) -> str:
    with pytest.raises(NotAnImage) as refused:
        probe(data)
    return refused.value.message
