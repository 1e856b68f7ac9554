"""Large smear-like pyramidal TIFFs (JPEG tiles, MPP in the tags), made in seconds with libvips.

    python benchmarks/make_synthetic_slides.py --out /tmp/slides --count 1 --size 40000

A 2048 px block (smear: a blood film, red cells and 8 nucleated cells per megapixel; aspirate: a
marrow aspirate, 45 per megapixel; marrow: H&E biopsy) is repeated to the requested size
(libvips streams it; memory stays small) and saved as a tiled pyramid at 0.25 µm/px.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pyvips

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.slides.synthetic import aspirate_block, marrow_block, smear_block  # noqa: E402
from engine.slides.writer import write_dicom_series, write_pyramid_tiff  # noqa: E402


def make_slide(path: str, size: int, seed: int = 0, mpp: float = 0.25,
               kind: str = "smear", dicom: bool = False) -> None:
    """``kind``: ``smear`` (blood-film-like), ``aspirate`` (marrow-aspirate-like: the cell
    density DeepHeme reads) or ``marrow`` (H&E marrow biopsy at 50 % cellularity with bone and
    fat); ``engine.slides.synthetic``. ``dicom``: a DICOM series in the folder ``path``
    (``level_<n>.dcm``) in place of a TIFF."""
    block = smear_block(seed) if kind == "smear" else \
        aspirate_block(seed, 2048, mpp)[0] if kind == "aspirate" else \
        marrow_block(50, 2048, mpp, seed)[0]
    block = pyvips.Image.new_from_array(block)
    n = -(-size // block.width)
    big = block.replicate(n, n).crop(0, 0, size, size)
    if dicom:
        write_dicom_series(big, path, mpp, tile_px=256, quality=85)
    else:
        write_pyramid_tiff(big, path, mpp, tile_px=256, quality=85)


def slide_bytes(folder: str, size: int, seed: int = 0) -> bytes:
    """The bytes of a synthetic smear TIFF of ``size`` px a side (`make_slide`), made in
    ``folder``: what the S3 benchmarks put in moto, as many times as they need."""
    path = os.path.join(folder, f"slide-{seed}.tif")
    make_slide(path, size, seed=seed)
    with open(path, "rb") as fh:
        return fh.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--size", type=int, default=40000, help="side in pixels")
    p.add_argument("--kind", choices=["smear", "aspirate", "marrow"], default="smear")
    p.add_argument("--dicom", action="store_true",
                   help="DICOM series (a folder of one file per level) in place of TIFFs")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.count):
        t = time.time()
        path = os.path.join(args.out, f"synthetic-{i:04d}" + ("" if args.dicom else ".tif"))
        make_slide(path, args.size, seed=i, kind=args.kind, dicom=args.dicom)
        print(f"{path}: {args.size}x{args.size} px in {time.time() - t:.1f}s")


if __name__ == "__main__":
    main()
