"""What an inventory of S3 slides moves and costs: `engine.slides.inventory.inventory_file` reading
each slide from a sparse copy of its structure and thumbnail level (`engine.slides.header_copy`)
against staging each slide whole (what it did before), interleaved in one process, with the
job's thread pool.

    python benchmarks/inventory_s3.py [--slides 4] [--size 40000] [--repeats 2] [--tag T]
    python benchmarks/inventory_s3.py --input s3://lab/slides/ [--s3-endpoint URL] ...

With no ``--input``, ``--slides`` synthetic pyramidal TIFFs of ``--size`` px a side
(`make_synthetic_slides.py`, JPEG tiles) are put in a moto S3 server started in a process of its
own on 127.0.0.1. Bytes are counted as the machine's network interfaces received them (loopback
included, from /proc/net/dev), so both ways pay for the same requests. moto answers from this
machine's CPUs; over a network the whole copies cost more. Both ways must give the same rows.
Prints JSON and writes ``benchmarks/results/inventory_s3-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, result_head, write_result  # noqa: E402
from benchmarks.make_synthetic_slides import make_slide  # noqa: E402
from engine.slides.inventory import inventory_file  # noqa: E402
from engine.slides.storage import StagingArea, list_files  # noqa: E402
from jobs.common import add_storage_args, storage_from_args  # noqa: E402

COMPARED = ("uri", "status", "format", "backend", "width", "height", "level_count", "mpp_x",
            "objective", "associated_images", "error_type")


def moto_archive(slides: int, size: int, folder: str):
    """A moto server holding ``slides`` synthetic slides; returns it, its URL and the prefix."""
    server, endpoint, client = moto_server("bench-inventory")
    for i in range(slides):
        path = os.path.join(folder, f"BM-{i:04d}.tif")
        make_slide(path, size, seed=i)
        client.upload_file(path, "bench-inventory", f"slides/BM-{i:04d}.tif")
        os.remove(path)
    return server, endpoint, "s3://bench-inventory/slides"


def bytes_received() -> int:
    """Bytes this machine's network interfaces (loopback among them) have received (Linux)."""
    with open("/proc/net/dev") as fh:
        return sum(int(line.split(":", 1)[1].split()[0]) for line in fh if ":" in line)


def inventory(entries, storage, sparse: bool, workers: int) -> tuple[list[dict], float, int]:
    """Rows, seconds and bytes received for one pass; nothing staged is kept between passes."""
    received = bytes_received()
    t0 = time.perf_counter()
    with StagingArea(storage) as staging, ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda e: inventory_file(e, storage, staging, sparse=sparse),
                             entries))
        staging.purge()
    return rows, time.perf_counter() - t0, bytes_received() - received


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="an S3 prefix of a lab's slides (default: moto's)")
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--size", type=int, default=40000, help="synthetic slides' side in px")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=4, help="as jobs.inventory --workers")
    p.add_argument("--tag", default="")
    add_storage_args(p)
    args = p.parse_args(argv)
    server = None
    with tempfile.TemporaryDirectory(prefix="hemeflow-inventory-s3-") as folder:
        try:
            if args.input:
                prefix = args.input
            else:
                server, args.s3_endpoint, prefix = moto_archive(args.slides, args.size, folder)
            storage = replace(storage_from_args(args), stage_dir=folder)
            entries = list_files(prefix, storage)
            runs = {"whole": {"s": [], "bytes": []}, "sparse": {"s": [], "bytes": []}}
            rows = {}
            for _ in range(args.repeats):  # interleaved, so that drift hits both alike
                for name in ("whole", "sparse"):
                    got, seconds, moved = inventory(entries, storage, name == "sparse",
                                                    args.workers)
                    runs[name]["s"].append(round(seconds, 3))
                    runs[name]["bytes"].append(moved)
                    rows[name] = [{k: r.get(k) for k in COMPARED} for r in got]
        finally:
            if server is not None:
                server.kill()
    assert rows["whole"] == rows["sparse"], "the two ways gave different rows"
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in runs.items()}
    object_bytes = sum(e.size or 0 for e in entries)
    result = {**result_head("inventory_s3"),
              "store": "a lab's (--input)" if args.input else "moto, its own process, 127.0.0.1",
              "slides": len(entries), "side_px": None if args.input else args.size,
              "object_bytes": object_bytes, "workers": args.workers,
              "statuses": sorted({r["status"] for r in rows["sparse"]}),
              "runs": runs, "median": med,
              "bytes_per_slide": {k: round(v["bytes"] / len(entries)) for k, v in med.items()},
              "ratio_seconds_whole_over_sparse": round(med["whole"]["s"] / med["sparse"]["s"], 2),
              "ratio_bytes_whole_over_sparse": round(med["whole"]["bytes"]
                                                     / max(med["sparse"]["bytes"], 1), 1)}
    write_result(result, f"inventory_s3-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
