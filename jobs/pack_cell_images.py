"""Pack labelled single-cell images for training elsewhere: each resampled to the model's µm/px,
centre-cropped with the augmentation margin, and written small.

    python -m jobs.pack_cell_images --data <dir with labels.csv: path,code> --output <dir>
        [--source-mpp 0.1 | auto] [--mpp 0.25] [--px 144] [--format webp] [--quality 90]

The pack is a folder with ``labels.csv`` (the input's rows in the same order, ``path`` pointing
into the pack, ``source_path`` the input's own path), the images, and ``pack.json`` (where they
came from, at which µm/px and size).
`jobs.train_cell_classifier --data <pack>` trains on it at the pack's µm/px and gives the same
test split as on the original images, since rows, codes and seed are the same. PBC's 9,047
images take 161 MB as CellaVision JPEGs and 36 MB as this pack (WebP at quality 90), which
fits a GPU machine's transfer limit with the code beside it. Lossy packing changes pixels
slightly: score the final model on the original images too.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from engine.train.data import (UnreadableImages, labelled, load_cell_image, read_labels,
                               source_of, try_load)
from jobs.common import add_storage_args, fail, job_main, local_data, mpp_arg, resolve_source_mpp

FORMATS = {"webp": "WEBP", "png": "PNG", "jpeg": "JPEG"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.pack_cell_images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="folder or s3:// prefix with labels.csv (path,code)")
    p.add_argument("--output", required=True, help="pack folder (created; must be empty)")
    p.add_argument("--source-mpp", type=mpp_arg, default=0.1,
                   help="µm/px of the input images, or auto: measured on their red cells")
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of the pack (the model's)")
    p.add_argument("--px", type=int, default=144,
                   help="side of each packed image: the model's crop and the augmentation margin "
                        "(1.5 x 96)")
    p.add_argument("--format", choices=sorted(FORMATS), default="webp")
    p.add_argument("--quality", type=int, default=90, help="WebP / JPEG quality")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    add_storage_args(p)
    return p.parse_args(argv)


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        local_data(args)
        data = read_labels(args.data)
        source_mpp = resolve_source_mpp(args.source_mpp, data.paths)
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    if os.path.isdir(args.output) and os.listdir(args.output):
        return fail(f"{args.output} is not empty: pack into a new folder")
    os.makedirs(os.path.join(args.output, "images"), exist_ok=True)
    with open(os.path.join(args.data, "labels.csv"), newline="") as fh:
        rows = labelled(list(csv.DictReader(fh)))  # the rows read_labels gave, in order
    ext = "jpg" if args.format == "jpeg" else args.format
    names = [f"images/{i:06d}.{ext}" for i in range(len(rows))]
    options = {} if args.format == "png" else {"quality": args.quality}

    def pack(i: int) -> int:
        img = load_cell_image(data.paths[i], source_mpp, args.mpp, args.px)
        path = os.path.join(args.output, names[i])
        Image.fromarray(img).save(path, FORMATS[args.format], **options)
        return os.path.getsize(path)

    with ThreadPoolExecutor(args.threads) as pool:
        sizes = list(pool.map(try_load(pack), range(len(rows))))
    failed = [(p, s) for p, s in zip(data.paths, sizes) if isinstance(s, Exception)]
    if failed:
        shutil.rmtree(args.output)  # a new folder: nothing of a half-made pack is left
        return fail(str(UnreadableImages(failed, len(sizes))))
    total = sum(sizes)
    with open(os.path.join(args.output, "labels.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0], "source_path"])
        w.writeheader()
        w.writerows({**r, "path": name, "source_path": source_of(path)}  # where it was read
                    for r, name, path in zip(rows, names, data.paths))
    info = {"source": args.data_source, "source_mpp": source_mpp, "mpp": args.mpp,
            "px": args.px, "format": args.format,
            "quality": None if args.format == "png" else args.quality,
            "images": len(rows), "bytes": total,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    with open(os.path.join(args.output, "pack.json"), "w") as fh:
        json.dump(info, fh, indent=2)
    print(json.dumps(info))
    print("train on it with: python -m jobs.train_cell_classifier --data "
          f"{shlex.quote(args.output)} ...",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
