"""A bounded look at an image's structure: format and size, without decoding.

Pillow's ``Image.open`` walks a JPEG's marker segments, a PNG's chunks and a GIF's
extension blocks one at a time in Python, and keeps what it reads. A file of
millions of empty segments therefore costs seconds of CPU and hundreds of MB
before a single pixel is decoded. ``probe`` walks the same structure with a cap
on how many steps it takes, jumping over segment bodies instead of reading them,
and refuses a file that needs more. Both the API (before it stores an upload) and
the worker (before Pillow sees the bytes) run it, so the work either does on a
file is bounded by these caps, not by the file.

The caps are far above what encoders write: a phone photo has about 15 segments
before its first scan, and encoders write PNG image data in chunks of 8 KiB or more.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from shared.errors import NotAnImage

# JPEG: marker segments before the first scan, stray bytes between them, and scans.
MAX_JPEG_SEGMENTS = 1024
MAX_JPEG_PADDING = 1024
# libjpeg redoes work over the whole image for every progressive scan; encoders write ~10.
MAX_JPEG_SCANS = 256
# Bytes of a JPEG that one step of the scan count compares at once (_scan_markers).
SCAN_WINDOW = 1 << 20
# PNG: chunks other than image data; image data chunks get this plus one per KiB of file.
MAX_PNG_CHUNKS = 1024
# GIF: extension sub-blocks (up to 255 bytes each) before the first frame.
MAX_GIF_BLOCKS = 4096

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_DATA = frozenset({b"IDAT", b"DDAT", b"fdAT"})
# JPEG markers that stand alone, without a length (Pillow's MARKER table, handler None).
_JPEG_STANDALONE = frozenset({0xC8, *range(0xD0, 0xDA), *range(0xF0, 0xFE)})
_JPEG_SOF = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}) | {0xDE}
_BMP_HEADERS = frozenset({12, 40, 52, 56, 64, 108, 124})
_BMP_RLE = frozenset({1, 2})


@dataclass(frozen=True)
class Header:
    format: str
    width: int
    height: int
    # Segments, chunks or blocks walked: what the probe cost, for tests and logs.
    steps: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe(data: bytes) -> Header:
    """The format and size of ``data``; NotAnImage if unknown, malformed or too intricate."""
    if data.startswith(b"\xff\xd8\xff"):
        header = _jpeg(data)
    elif data.startswith(_PNG_SIGNATURE):
        header = _png(data)
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        header = _gif(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        header = _webp(data)
    elif data[:2] == b"BM":
        header = _bmp(data)
    else:
        raise NotAnImage()
    if header.width <= 0 or header.height <= 0:
        raise NotAnImage("The image header declares no pixels.")
    return header


def _u16be(data: bytes, pos: int) -> int:
    return _unpack(">H", data, pos)


def _unpack(fmt: str, data: bytes, pos: int) -> int:
    try:
        return struct.unpack_from(fmt, data, pos)[0]
    except struct.error:
        raise NotAnImage("The image header is truncated.") from None


def _jpeg(data: bytes) -> Header:
    """Walk the segments before the first scan as Pillow does, counting them."""
    pos, segments, padding = 2, 0, 0
    size = (0, 0)
    while True:
        if pos >= len(data) - 1:
            raise NotAnImage("The JPEG ends before its image data.")
        if data[pos] != 0xFF or data[pos + 1] == 0x00:
            # Pillow skips stray bytes one by one in Python: allow only a few.
            nxt = data.find(b"\xff", pos + 1, pos + 1 + MAX_JPEG_PADDING - padding)
            if nxt < 0:
                raise NotAnImage("The JPEG has too many stray bytes between its segments.")
            padding += nxt - pos
            pos = nxt
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            padding += 1
            if padding > MAX_JPEG_PADDING:
                raise NotAnImage("The JPEG has too many stray bytes between its segments.")
            pos += 1
            continue
        if marker < 0xC0:
            raise NotAnImage("The JPEG has an invalid marker.")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise NotAnImage(f"The JPEG has more than {MAX_JPEG_SEGMENTS} header segments.")
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = _u16be(data, pos + 2)
        if marker in _JPEG_SOF:
            size = (_u16be(data, pos + 7), _u16be(data, pos + 5))
        if marker == 0xDA:
            break
        pos += 2 + max(length, 2)
    if _scan_markers(data, pos) > MAX_JPEG_SCANS:
        raise NotAnImage(f"The JPEG has more than {MAX_JPEG_SCANS} scans.")
    return Header("JPEG", *size, steps=segments)


def _scan_markers(data: bytes, pos: int) -> int:
    """SOS markers (FF DA) from ``pos`` on: every scan, as entropy-coded data never
    holds one (an FF there is followed by 00 or a restart marker).

    numpy's comparisons, not ``bytes.count``: this runs on every JPEG a worker loads,
    over the whole file, and ``bytes.count`` took 1.5 ms on a 1.4 MB photo holding
    the GIL throughout; these take 0.2 ms, mostly without it (issue #22). Window by
    window, so the comparisons' temporary arrays stay ~3 bytes per window byte rather
    than per file byte (a 20 MB upload would take 60 MB more while it is checked).
    """
    tail = np.frombuffer(data, np.uint8, offset=pos)
    count = 0
    for start in range(0, len(tail) - 1, SCAN_WINDOW):
        window = tail[start : start + SCAN_WINDOW + 1]  # a byte over: a pair on the edge
        count += int(np.count_nonzero((window[:-1] == 0xFF) & (window[1:] == 0xDA)))
    return count


def _png(data: bytes) -> Header:
    """Walk every chunk up to IEND (Pillow reads them all, in Python), counting them."""
    if data[12:16] != b"IHDR":
        raise NotAnImage("The PNG does not start with IHDR.")
    width, height = _unpack(">I", data, 16), _unpack(">I", data, 20)
    max_data = MAX_PNG_CHUNKS + len(data) // 1024
    pos, other, image_data = 8, 0, 0
    while pos + 12 <= len(data):
        length = _unpack(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND" or (kind == b"fcTL" and image_data):
            break  # Pillow stops at the second frame of an animation
        if kind in _PNG_DATA:
            image_data += 1
        else:
            other += 1
        if other > MAX_PNG_CHUNKS or image_data > max_data:
            raise NotAnImage(f"The PNG has too many chunks ({other + image_data} so far).")
        pos += 12 + length  # a length past the end: truncated, which the decoder reports
    return Header("PNG", width, height, steps=other + image_data)


def _gif(data: bytes) -> Header:
    """Walk the blocks before the first frame, counting sub-blocks."""
    width, height = _unpack("<H", data, 6), _unpack("<H", data, 8)
    pos = 13 + _colour_table(data[10])
    blocks = 0
    while pos < len(data):
        kind = data[pos]
        if kind == 0x2C:  # image descriptor: Pillow grows the canvas to fit the frame
            left, top, w, h = (_unpack("<H", data, pos + 1 + 2 * i) for i in range(4))
            return Header("GIF", max(width, left + w), max(height, top + h), steps=blocks)
        if kind != 0x21:  # an extension is all that may come before
            break
        pos += 2
        while True:  # sub-blocks, ended by an empty one
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise NotAnImage(f"The GIF has more than {MAX_GIF_BLOCKS} blocks before its image.")
            if pos >= len(data):
                break
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    raise NotAnImage("The GIF has no image.")


def _colour_table(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _webp(data: bytes) -> Header:
    # libwebp parses the RIFF chunks itself, in C; only the canvas size is needed here.
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return Header("WEBP", _unpack("<H", data, 26) & 0x3FFF, _unpack("<H", data, 28) & 0x3FFF, 1)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        return Header("WEBP", width, int.from_bytes(data[27:30], "little") + 1, 1)
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = _unpack("<I", data, 21)
        return Header("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 1)
    raise NotAnImage("The WebP header is not recognised.")


def _bmp(data: bytes) -> Header:
    header_size = _unpack("<I", data, 14)
    if header_size not in _BMP_HEADERS:
        raise NotAnImage("The BMP header is not recognised.")
    if header_size == 12:
        width, height, compression = _unpack("<H", data, 18), _unpack("<H", data, 20), 0
    else:
        width, height = _unpack("<i", data, 18), abs(_unpack("<i", data, 22))
        compression = _unpack("<I", data, 30)
    if compression in _BMP_RLE:
        # Pillow decodes RLE in Python, two bytes a step, until the data or the image
        # ends; no encoder needs more than two bytes per pixel plus an end per row.
        offset = _unpack("<I", data, 10)
        if len(data) - offset > 2 * width * height + 4 * height + 1024:
            raise NotAnImage("The BMP's compressed data is longer than its pixels need.")
    return Header("BMP", width, height, steps=1)
