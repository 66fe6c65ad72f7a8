"""A small PNG decoder for tests: 8-bit greyscale, RGB and RGBA, all five row filters.

Written independently of the node's encoder (it follows the PNG
specification, section 9) so that it can read both our QA snapshots and
Chromium's screenshots, which use every filter type.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk; raises on a bad signature or CRC."""
    if data[:8] != SIGNATURE:
        raise ValueError("not a PNG file")
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(tag + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in {tag!r} chunk")
        out.append((tag, payload))
        pos += 12 + length
        if tag == b"IEND":
            break
    return out


def decode(data: bytes) -> np.ndarray:
    """Decode to ``(height, width, 3)`` uint8 RGB (alpha dropped, grey expanded)."""
    parts = chunks(data)
    if parts[0][0] != b"IHDR" or parts[-1][0] != b"IEND":
        raise ValueError("IHDR must come first and IEND last")
    width, height, depth, ctype, _comp, _filt, interlace = struct.unpack(">IIBBBBB", parts[0][1])
    if depth != 8 or ctype not in CHANNELS or interlace != 0:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {ctype}, "
                         f"interlace {interlace}")
    bpp = CHANNELS[ctype]
    raw = zlib.decompress(b"".join(p for t, p in parts if t == b"IDAT"))
    stride = width * bpp
    if len(raw) != height * (stride + 1):
        raise ValueError("image data has the wrong length")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    ftypes = rows[:, 0].astype(np.int32)
    if (ftypes > 4).any():
        raise ValueError(f"unknown filter type on row {int(np.argmax(ftypes > 4))}")
    filtered = rows[:, 1:].reshape(height, width, bpp).astype(np.int32)
    # Pixel (y, x) depends on (y, x-1), (y-1, x) and (y-1, x-1): every pixel of
    # one anti-diagonal can be reconstructed at once from the earlier ones.
    recon = np.zeros((height + 1, width + 1, bpp), dtype=np.int32)  # row/column 0: zeros
    for k in range(height + width - 1):
        ys = np.arange(max(0, k - width + 1), min(height, k + 1))
        xs = k - ys
        a = recon[ys + 1, xs]  # left
        b = recon[ys, xs + 1]  # up
        c = recon[ys, xs]  # up-left
        ft = ftypes[ys][:, None]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.select([ft == 1, ft == 2, ft == 3, ft == 4],
                         [a, b, (a + b) // 2, paeth], default=0)
        recon[ys + 1, xs + 1] = (filtered[ys, xs] + pred) & 0xFF
    pixels = recon[1:, 1:].astype(np.uint8)
    if ctype in (0, 4):
        return np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])
