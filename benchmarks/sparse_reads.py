"""What the jobs that read little of an S3 slide move and cost: reading it from a sparse copy that
fetches by range what each read touches (`open_slide(sparse=True)`, `engine.slides.header_copy`)
against staging each slide whole (what they did before), interleaved in one process, for two
uses:

- ``inventory``: `jobs.inventory`'s reading of each slide (metadata and a 256 px thumbnail;
  `inventory_file`, 4 slides at once, as the job's ``--workers``);
- ``gallery``: ``--crops`` cell crops a slide at random places at level 0, as
  `jobs.cell_gallery` reads them (`read_crops`: fetched in one batch), slides one after another.

    python benchmarks/sparse_reads.py [--slides 4] [--size 40000] [--crops 48] [--repeats 2]
                                      [--dicom]
    python benchmarks/sparse_reads.py --input s3://lab/slides/ [--s3-endpoint URL] ...

With no ``--input``, ``--slides`` synthetic pyramidal TIFFs of ``--size`` px a side
(`make_synthetic_slides.py`, JPEG tiles; ``--dicom``: DICOM series of one file per level, a
folder a slide, as converters write them) are put in a moto S3 server started in a process of
its own on 127.0.0.1. Bytes are counted as the machine's network interfaces received them (loopback
included, from /proc/net/dev). moto answers from this machine's CPUs; over a network the whole
copies cost more. Both ways must give the same rows and the same crops. Prints JSON and writes
``benchmarks/results/sparse_reads-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import polars as pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, result_head, write_result  # noqa: E402
from benchmarks.make_synthetic_slides import make_slide  # noqa: E402
from engine.slides import open_slide  # noqa: E402
from engine.slides.dicom import group_series  # noqa: E402
from engine.slides.inventory import inventory_file  # noqa: E402
from engine.slides.storage import StagingArea, list_files  # noqa: E402
from jobs.cell_gallery import read_crops  # noqa: E402
from jobs.common import add_storage_args, storage_from_args  # noqa: E402

COMPARED = ("uri", "status", "format", "backend", "width", "height", "level_count", "mpp_x",
            "objective", "associated_images", "error_type")


def moto_archive(slides: int, size: int, folder: str, dicom: bool = False):
    """A moto server holding ``slides`` synthetic slides; returns it, its URL and the prefix."""
    server, endpoint, client = moto_server("bench-sparse")
    for i in range(slides):
        path = os.path.join(folder, f"BM-{i:04d}" + ("" if dicom else ".tif"))
        make_slide(path, size, seed=i, dicom=dicom)
        for name in sorted(os.listdir(path)) if dicom else [""]:
            client.upload_file(os.path.join(path, name) if name else path, "bench-sparse",
                               f"slides/BM-{i:04d}" + (f"/{name}" if name else ".tif"))
        shutil.rmtree(path) if dicom else os.remove(path)
    return server, endpoint, "s3://bench-sparse/slides"


def bytes_received() -> int:
    """Bytes this machine's network interfaces (loopback among them) have received (Linux)."""
    with open("/proc/net/dev") as fh:
        return sum(int(line.split(":", 1)[1].split()[0]) for line in fh if ":" in line)


def inventory(entries, storage, sparse: bool, workers: int):
    with StagingArea(storage) as staging, ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda e: inventory_file(e, storage, staging, sparse=sparse),
                             entries))
        staging.purge()
    return [{k: r.get(k) for k in COMPARED} for r in rows]


def gallery(entries, storage, sparse: bool, crops: int):
    out = []
    with StagingArea(storage) as staging:
        for i, e in enumerate(entries):
            with open_slide(e.uri, storage, staging, size=e.size, etag=e.etag, keep=False,
                            sparse=sparse, direct_jpeg=False) as reader:
                w, h = reader.info.dimensions
                rng = np.random.default_rng(i)
                cells = pl.DataFrame({"x": rng.uniform(0, w, crops), "y": rng.uniform(0, h, crops)})
                out.append(read_crops(reader, cells, reader.info.mpp or 0.25, (w, h)))
        staging.purge()
    return out


def measured(fn, *args):
    """``fn(*args)``, its seconds and the bytes received meanwhile."""
    received, t0 = bytes_received(), time.perf_counter()
    got = fn(*args)
    return got, round(time.perf_counter() - t0, 3), bytes_received() - received


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="an S3 prefix of a lab's slides (default: moto's)")
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--size", type=int, default=40000, help="synthetic slides' side in px")
    p.add_argument("--crops", type=int, default=48, help="gallery crops a slide")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=4, help="as jobs.inventory --workers")
    p.add_argument("--dicom", action="store_true", help="synthetic DICOM series, not TIFFs")
    p.add_argument("--tag", default="")
    add_storage_args(p)
    args = p.parse_args(argv)
    server = None
    uses = {"inventory": lambda e, s, sparse: inventory(e, s, sparse, args.workers),
            "gallery": lambda e, s, sparse: gallery(e, s, sparse, args.crops)}
    runs = {u: {w: {"s": [], "bytes": []} for w in ("whole", "sparse")} for u in uses}
    with tempfile.TemporaryDirectory(prefix="hemeflow-sparse-reads-") as folder:
        try:
            if args.input:
                prefix = args.input
            else:
                server, args.s3_endpoint, prefix = moto_archive(args.slides, args.size, folder,
                                                                args.dicom)
            storage = replace(storage_from_args(args), stage_dir=folder)
            # a DICOM series is one slide, read through its level 0 (as the jobs take it)
            listed = list_files(prefix, storage)
            total_bytes = sum(e.size or 0 for e in listed)
            entries = [e for e in group_series(listed, storage) if not e.part_of]
            for use, fn in uses.items():
                got = {}
                for _ in range(args.repeats):  # interleaved, so that drift hits both alike
                    for way in ("whole", "sparse"):
                        got[way], seconds, moved = measured(fn, entries, storage,
                                                            way == "sparse")
                        runs[use][way]["s"].append(seconds)
                        runs[use][way]["bytes"].append(moved)
                same = got["whole"] == got["sparse"] if use == "inventory" else all(
                    np.array_equal(a, b) for a, b in zip(got["whole"], got["sparse"]))
                assert same, f"{use}: the two ways read different things"
        finally:
            if server is not None:
                server.kill()
    med = {u: {w: {m: round(statistics.median(v), 3) for m, v in r.items()}
               for w, r in ways.items()} for u, ways in runs.items()}
    result = {**result_head("sparse_reads"),
              "store": "a lab's (--input)" if args.input else "moto, its own process, 127.0.0.1",
              "slides": len(entries), "side_px": None if args.input else args.size,
              "format": None if args.input else "dicom" if args.dicom else "tiff",
              "object_bytes": total_bytes, "workers": args.workers,
              "crops_per_slide": args.crops, "runs": runs, "median": med,
              "bytes_per_slide": {u: {w: round(v["bytes"] / len(entries)) for w, v in m.items()}
                                  for u, m in med.items()},
              "ratio_seconds_whole_over_sparse": {
                  u: round(m["whole"]["s"] / m["sparse"]["s"], 2) for u, m in med.items()},
              "ratio_bytes_whole_over_sparse": {
                  u: round(m["whole"]["bytes"] / max(m["sparse"]["bytes"], 1), 1)
                  for u, m in med.items()}}
    write_result(result, f"sparse_reads-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
