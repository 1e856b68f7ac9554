"""Large smear-like pyramidal TIFFs (JPEG tiles, MPP in the tags), made in seconds with libvips.

    python benchmarks/make_synthetic_slides.py --out /tmp/slides --count 1 --size 40000

A 2048 px block of red cells and nucleated cells on glass is repeated to the requested size
(libvips streams it; memory stays small) and saved as a tiled pyramid at 0.25 µm/px.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyvips

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.slides.writer import write_pyramid_tiff  # noqa: E402


def smear_block(seed: int = 0, side: int = 2048) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), (236, 232, 240), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for _ in range(side * side // 6000):
        cy, cx = rng.integers(0, side, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2] = (215, 150, 160)   # red cells
    for _ in range(side * side // 120000):
        cy, cx = rng.integers(20, side - 20, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 18 ** 2] = (95, 60, 175)     # nuclei
    return img


def make_slide(path: str, size: int, seed: int = 0, mpp: float = 0.25) -> None:
    block = pyvips.Image.new_from_array(smear_block(seed))
    n = -(-size // block.width)
    big = block.replicate(n, n).crop(0, 0, size, size)
    write_pyramid_tiff(big, path, mpp, tile_px=256, quality=85)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--size", type=int, default=40000, help="side in pixels")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.count):
        t = time.time()
        path = os.path.join(args.out, f"synthetic-{i:04d}.tif")
        make_slide(path, args.size, seed=i)
        print(f"{path}: {args.size}x{args.size} px in {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
