"""Measure the pixel size of blood-smear images (single-cell exports, camera fields) on their red cells.

    python -m jobs.estimate_pixel_size --data <folder with labels.csv, or a folder of images>
        [--sample 300] [--red-cell-um 7.5]

Prints JSON: µm/px, its interquartile range, the red cells and images it rests on. The other jobs
take ``--source-mpp auto`` to do the same before they resample.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from jobs.common import add_storage_args, fail, job_main, local_data, measure_pixel_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def image_paths(data: str) -> list[str]:
    """The images of ``labels.csv`` in ``data`` when there is one, else every image below it."""
    if os.path.isfile(os.path.join(data, "labels.csv")):
        from engine.train.data import read_labels

        return list(read_labels(data).paths)
    return [p for p in glob.glob(os.path.join(glob.escape(data), "**", "*"), recursive=True)
            if p.lower().endswith(IMAGE_SUFFIXES)]


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.estimate_pixel_size", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="folder or s3:// prefix with labels.csv, or a local folder of images")
    p.add_argument("--sample", type=int, default=300, help="images measured (a seeded draw)")
    p.add_argument("--red-cell-um", type=float, default=7.5,
                   help="red-cell diameter assumed (7.5 µm in a normal sample)")
    add_storage_args(p)
    args = p.parse_args(argv)
    try:
        local_data(args)
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    paths = image_paths(args.data)
    if not paths:
        return fail(f"no images found in {args.data}")
    try:
        est = measure_pixel_size(paths, args.sample, rbc_diameter_um=args.red_cell_um)
    except ValueError as err:
        return fail(str(err))
    json.dump({"data": args.data_source, "images_found": len(paths), **est.to_dict()},
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
