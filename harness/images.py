"""Hostile image files, built in memory: decompression bombs and structure floods."""

from __future__ import annotations

import struct
import zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares huge dimensions: a decompression bomb's signature."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def jpeg_segment_flood(segments: int) -> bytes:
    """A JPEG start followed by ``segments`` empty APP0 segments (issue #14: 4.8 million)."""
    return b"\xff\xd8" + b"\xff\xe0\x00\x02" * segments + b"\xff\xd9"


def png_chunk_flood(chunks: int, kind: bytes = b"abCd") -> bytes:
    """An 8x8 grey PNG with ``chunks`` empty chunks before its image (issue #14: 1.6 million)."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 9 * 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(kind, b"") * chunks
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_16bit_grey(side: int, level: int = 0x8000) -> bytes:
    """A side x side 16-bit grey PNG of one level: 6300 x 6300 compresses to about 77 KB.

    Built a row at a time with zlib, so making it costs no full-size buffer.
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\x00" + struct.pack(">H", level) * side
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )
