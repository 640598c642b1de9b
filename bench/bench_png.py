"""PNG encoding: size against time, Pillow's levels against the daemon's encoder (issue 11).

    python bench/bench_png.py                         # synthetic images and noise, 256x256 RGB
    python bench/bench_png.py --image photo.jpg ...   # also real photos (cropped to --size)

Images: ``photo`` (each ``--image``, cropped to SIZE x SIZE from its top left),
``render`` (a synthetic scene: smooth gradients, soft shapes, mild sensor
noise: what generated samples and camera images look like to the encoder),
``plot`` (a chart: flat background, a few antialiased curves and a grid) and
``noise`` (uniform random bytes: the encoder's worst case).

Encoders: Pillow at ``compress_level`` 1 and 6 (its default), and the
daemon's own writer (``compute.encode_png``: Sub filter, zlib level 1 with
``Z_RLE``) plus its variants with the default strategy and at level 6.  Each is
timed single-threaded (median of ``--repeats`` calls) and its output decoded
back and compared with the input.
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import sys
import time
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from kohakuboard.storage import values as compute  # noqa: E402


def _render(rng: np.random.Generator, n: int) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n] / n
    img = np.zeros((n, n, 3))
    for c in range(3):
        img[..., c] = 0.4 + 0.3 * np.sin(2.0 * x + c) * np.cos(1.5 * y - c)
    for _ in range(12):
        cx, cy, r = rng.random(3) * [1, 1, 0.2] + [0, 0, 0.03]
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * (rng.random(3) - 0.5)
    img += rng.normal(0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _plot(rng: np.random.Generator, n: int) -> np.ndarray:
    img = np.full((n, n, 3), 255, np.uint8)
    img[:: n // 8, :, :] = 225
    img[:, :: n // 8, :] = 225
    x = np.arange(n)
    for k, colour in enumerate(([31, 119, 180], [255, 127, 14], [44, 160, 44])):
        y = n / 2 + n / 3 * np.sin(x / n * (3 + k) + k) * np.exp(-x / n)
        for dy in (-1, 0, 1):
            yy = np.clip((y + dy).astype(int), 0, n - 1)
            img[yy, x] = colour
    return img


def _pillow(level: int):
    def enc(a: np.ndarray) -> bytes:
        return compute.encode_png_pillow(a, level)

    return enc


def _own(level: int, strategy: int):
    def enc(a: np.ndarray) -> bytes:
        h, w, c = a.shape
        x = a.reshape(h, w * c)
        raw = np.empty((h, w * c + 1), np.uint8)
        raw[:, 0] = 1
        raw[:, 1 : c + 1] = x[:, :c]
        np.subtract(x[:, c:], x[:, :-c], out=raw[:, c + 1 :])
        z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
        idat = z.compress(raw) + z.flush()
        hdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
        return b"".join(
            (
                b"\x89PNG\r\n\x1a\n",
                compute._png_chunk(b"IHDR", hdr),
                compute._png_chunk(b"IDAT", idat),
                compute._png_chunk(b"IEND", b""),
            )
        )

    return enc


ENCODERS = {
    "Pillow level 1": _pillow(1),
    "Pillow level 6 (default)": _pillow(6),
    "daemon: Sub + zlib 1 Z_RLE (encode_png)": compute.encode_png,
    "Sub + zlib 1 default strategy": _own(1, zlib.Z_DEFAULT_STRATEGY),
    "Sub + zlib 6 default strategy": _own(6, zlib.Z_DEFAULT_STRATEGY),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", action="append", default=[], help="a photo to include (any format Pillow reads)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=31)
    args = p.parse_args()
    rng = np.random.default_rng(11)
    n = args.size
    images: dict[str, np.ndarray] = {}
    for path in args.image:
        a = np.asarray(Image.open(path).convert("RGB"))
        if a.shape[0] < n or a.shape[1] < n:
            sys.exit(f"{path} is smaller than {n}x{n}")
        images[f"photo {os.path.basename(path)}"] = np.ascontiguousarray(a[:n, :n])
    images["render"] = _render(rng, n)
    images["plot"] = _plot(rng, n)
    images["noise"] = rng.integers(0, 256, (n, n, 3), dtype=np.uint8)
    print(f"load average {os.getloadavg()[0]:.2f}; {n}x{n} RGB, median of {args.repeats} single-threaded encodes\n")
    print("| image | encoder | ms | KiB | size vs Pillow level 1 | speed vs Pillow level 1 |")
    print("|---|---|---|---|---|---|")
    for iname, a in images.items():
        base_ms = base_kb = None
        for ename, enc in ENCODERS.items():
            out = enc(a)
            back = np.asarray(Image.open(io.BytesIO(out)).convert("RGB"))
            assert np.array_equal(back, a), f"{ename} did not round-trip {iname}"
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                enc(a)
                ts.append(time.perf_counter() - t0)
            ms = float(np.median(ts)) * 1e3
            kb = len(out) / 1024
            if base_ms is None:
                base_ms, base_kb = ms, kb
            print(f"| {iname} | {ename} | {ms:.2f} | {kb:.0f} | {kb / base_kb:.2f}x | {base_ms / ms:.2f}x |")


if __name__ == "__main__":
    main()
