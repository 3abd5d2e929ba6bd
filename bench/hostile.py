"""Uploads within every limit that cost far more than their size: the server's CPU and memory for each.

    .venv/bin/python bench/hostile.py                  # the working tree
    .venv/bin/python bench/hostile.py --base HEAD~1    # and a base revision, side by side

Each file is POSTed to `/encode` (multipart) on a server of its own, served as `bench/compare.py` serves a
tree, and measured by the server's CPU seconds for the request (/proc/PID/stat, all its threads) and the
growth of its peak resident memory (VmHWM). Every file is within VAE_MAX_BODY_BYTES and names an image within
VAE_MAX_IMAGE_PIXELS: a TIFF of 80000 empty pages, a 2 x 2 TIFF that lists 7 million strips, and a QOI
and an uncompressed DDS of random pixels (formats Pillow decodes in Python). Loopback only; Linux.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from compare import cpu_seconds, serve, trees
from PIL import Image

SIDE = 3800


def tiff_pages(pages: int) -> bytes:
    """A TIFF of `pages` 1 x 1 pages, each a directory of four entries linked to the next."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (262, 3, 1, 1), (273, 3, 1, 0)]  # width, height, black, strip
    size = 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(pages):
        following = len(out) + size if page < pages - 1 else 0
        out += struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHIHH", *e, 0) for e in entries)
        out += struct.pack("<I", following)
    return bytes(out)


def tiff_strips(strips: int) -> bytes:
    """A 2 x 2 TIFF that lists `strips` strips (SHORT offsets, one row a strip, all at the same pixels; more
    than 2 strips, whose offsets do not fit in their directory entry)."""
    if strips <= 2:
        raise ValueError("more than 2 strips")
    entries = 7
    pixels_at = 8 + 2 + 12 * entries + 4  # after the directory, before the strip offsets
    tags = [
        *[(256, 3, 1, 2), (257, 3, 1, 2), (258, 3, 1, 8), (262, 3, 1, 1)],  # 2 x 2, 8 bits, black is zero
        (273, 3, strips, pixels_at + 4),  # the strip offsets, after the pixels
        *[(278, 3, 1, 1), (279, 3, 1, 2)],  # one row a strip, of 2 bytes
    ]
    directory = struct.pack("<H", entries) + b"".join(struct.pack("<HHII", *tag) for tag in tags)
    offsets = struct.pack("<H", pixels_at) * strips
    return (
        b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + b"\x00\xff\xff\x00" + offsets
    )


def noise(fmt: str, side: int) -> bytes:
    """`side` x `side` random RGB pixels in `fmt`, as Pillow writes it."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def dds_masked() -> bytes:
    """A SIDE x SIDE uncompressed DDS of 8-bit pixels with RGB bit masks (Pillow's Python decoder)."""
    header = bytearray(128)
    header[0:4] = b"DDS "
    struct.pack_into("<7I", header, 4, 124, 0x1007, SIDE, SIDE, SIDE, 0, 0)
    struct.pack_into("<4I", header, 76, 32, 0x40, 0, 8)  # pixel format: RGB, 8 bits a pixel
    struct.pack_into("<3I", header, 92, 0xE0, 0x1C, 0x03)  # the masks of R, G and B
    return bytes(header) + np.random.default_rng(0).integers(0, 256, SIDE * SIDE, dtype=np.uint8).tobytes()


FILES: dict[str, Callable[[], bytes]] = {
    "TIFF, 80000 empty pages": lambda: tiff_pages(80_000),
    "TIFF 2x2, 7 million strips": lambda: tiff_strips(7_000_000),
    "QOI 2000x2000, noise": lambda: noise("QOI", 2000),  # 4 bytes a pixel: 16 MB
    f"DDS {SIDE}x{SIDE}, 8-bit masked": dds_masked,
}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="also measure this git revision (HEAD~1, main)")
    args = parser.parse_args(argv)
    files = {name: make() for name, make in FILES.items()}
    print(
        f"{'file':30s} {'bytes':>9s}  {'tree':6s} {'status':>6s} {'CPU':>8s} {'wall':>8s} {'peak RSS +':>10s}"
    )
    with tempfile.TemporaryDirectory(prefix="vae-hostile-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        sides = trees(args.base, work, stack)
        for name, data in files.items():
            for tree_name, tree in sides:
                with serve(tree_name, tree, work) as server, httpx.Client(base_url=server.url) as client:
                    pid = server.pid()
                    before_cpu, before_rss = cpu_seconds(pid), peak_rss_mb(pid)
                    started = time.perf_counter()
                    response = client.post("/encode", files={"files": ("upload", data)}, timeout=600)
                    wall = time.perf_counter() - started
                    cpu, rss = cpu_seconds(pid) - before_cpu, peak_rss_mb(pid) - before_rss
                print(
                    f"{name:30s} {len(data):9d}  {tree_name:6s} {response.status_code:6d} {cpu:7.2f}s "
                    f"{wall:7.2f}s {rss:7.0f} MiB",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
