"""Screenshots of a virtual X display for the GUI tests: `xwd` takes it, this turns the XWD dump
into pixels (and a PNG a person can look at) with the standard library alone."""

from __future__ import annotations

import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shot:
    width: int
    height: int
    rgb: bytes  # width * height * 3

    def colours(self) -> int:
        """How many distinct colours (a blank screen has one)."""
        return len({self.rgb[i : i + 3] for i in range(0, len(self.rgb), 3 * 7)})

    def save_png(self, path: Path) -> None:
        rows = b"".join(
            b"\0" + self.rgb[y * self.width * 3 : (y + 1) * self.width * 3]
            for y in range(self.height)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b"")
        )


def take(display: str, window: str = "root") -> Shot:
    """The whole screen (or one window id) of `display`, as 24-bit RGB."""
    target = ["-root"] if window == "root" else ["-id", window]
    dump = subprocess.run(
        ["xwd", "-silent", "-display", display, *target],
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    return parse_xwd(dump)


def parse_xwd(dump: bytes) -> Shot:
    fields = struct.unpack(">25I", dump[:100])
    header_size, version = fields[0], fields[1]
    if version != 7:
        raise ValueError(f"not an XWD version 7 dump (version {version})")
    width, height = fields[4], fields[5]
    byte_order, bits_per_pixel, bytes_per_line = fields[7], fields[11], fields[12]
    ncolors = fields[19]
    if bits_per_pixel != 32:
        raise ValueError(f"expected 32 bits a pixel, got {bits_per_pixel}")
    pixels = dump[header_size + ncolors * 12 :]
    rgb = bytearray()
    for y in range(height):
        row = pixels[y * bytes_per_line : y * bytes_per_line + width * 4]
        for x in range(0, len(row), 4):
            b, g, r = (
                (row[x], row[x + 1], row[x + 2]) if byte_order == 0 else row[x + 1 : x + 4][::-1]
            )
            rgb += bytes((r, g, b))
    return Shot(width, height, bytes(rgb))
