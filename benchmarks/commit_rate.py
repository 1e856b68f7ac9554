"""Slides/s the job's driver takes in and commits to object storage: the `Aggregator` with its
writes on ``storage.write_threads`` threads beside the intake, against the same writes one
after another in the intake (``write_threads`` 1, as before session 39), interleaved in one
process.

    python benchmarks/commit_rate.py [--slides 100] [--tiles 196] [--cells 2000] [--repeats 2]
    python benchmarks/commit_rate.py --output s3://lab/bench/ [--s3-endpoint URL] ...

A slide's commit is a few files (tiles and cellularity, or cells, differentials and GeoJSON;
then its slides row and status row), each one request to S3. A GPU encodes a small biopsy's
196 tiles in some 15 ms, so at tens of ms a request those writes, one after another on the
driver, bound the tiles branch. With no ``--output``, a moto S3 server is started in a process
of its own on 127.0.0.1: it answers from this machine's CPUs in a few ms, where S3 answers in
tens, so the ratio is a floor. The batches are `driver_intake.py`'s (random values). Prints
JSON and writes ``benchmarks/results/commit_rate-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, result_head, write_result  # noqa: E402
from benchmarks.driver_intake import cell_batches, tile_batches  # noqa: E402
from engine.classes import DEEPHEME_CODES  # noqa: E402
from engine.config import StorageConfig  # noqa: E402
from engine.pipeline.aggregate import Aggregator  # noqa: E402
from engine.pipeline.commit import OutputStore  # noqa: E402
from jobs.common import add_storage_args, storage_from_args  # noqa: E402


def commit_seconds(branch: str, batches: list[dict], n_slides: int, output: str,
                   storage: StorageConfig, write_threads: int) -> float:
    """Seconds to take ``batches`` in and commit their ``n_slides`` slides under ``output``."""
    agg = Aggregator(OutputStore(output, storage), "bench", [branch], [], tuple(DEEPHEME_CODES),
                     100, (branch,), log=lambda *_: None, write_threads=write_threads)
    add = agg.add_cells if branch == "cells" else agg.add_tiles
    t0 = time.perf_counter()
    for b in batches:
        add(b)
    agg.close()
    seconds = time.perf_counter() - t0
    assert len(agg.summary) == n_slides and not agg.slides, "slides left uncommitted"
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="an s3:// prefix (or folder) to commit under (default: "
                                    "moto's); each run writes below it in a folder of its own")
    p.add_argument("--slides", type=int, default=100)
    p.add_argument("--tiles", type=int, default=196, help="tiles per slide")
    p.add_argument("--cells", type=int, default=2000, help="cells per slide")
    p.add_argument("--write-threads", type=int, default=StorageConfig().write_threads)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tag", default="")
    add_storage_args(p)
    args = p.parse_args(argv)
    server = None
    if not args.output:
        server, args.s3_endpoint, _ = moto_server("bench-commit")
        args.output = "s3://bench-commit/runs"
    storage = storage_from_args(args)
    rng = np.random.default_rng(0)
    work = {"tiles": tile_batches(args.slides, args.tiles, 384, rng),
            "cells": cell_batches(args.slides, args.cells, rng)}
    runs = {f"{b}_{w}": [] for b in work for w in ("one_by_one", "threads")}
    try:
        warm = {"tiles": tile_batches(2, 50, 384, rng), "cells": cell_batches(2, 100, rng)}
        for branch, batches in warm.items():  # imports, Parquet writers, the connections
            commit_seconds(branch, batches, 2, f"{args.output}/warm-{uuid.uuid4().hex[:8]}",
                           storage, args.write_threads)
        for _ in range(args.repeats):  # interleaved, so that drift hits both alike
            for branch, batches in work.items():
                for name, threads in (("one_by_one", 1), ("threads", args.write_threads)):
                    out = f"{args.output}/{branch}-{name}-{uuid.uuid4().hex[:8]}"
                    runs[f"{branch}_{name}"].append(round(commit_seconds(
                        branch, batches, args.slides, out, storage, threads), 3))
    finally:
        if server is not None:
            server.kill()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {**result_head("commit_rate"),
              "store": "moto, its own process, 127.0.0.1" if server else args.output,
              "slides": args.slides, "tiles_per_slide": args.tiles,
              "cells_per_slide": args.cells, "write_threads": args.write_threads,
              "seconds": runs, "median_s": med,
              "slides_per_s": {k: round(args.slides / v, 1) for k, v in med.items()},
              "ratio_tiles": round(med["tiles_one_by_one"] / med["tiles_threads"], 3),
              "ratio_cells": round(med["cells_one_by_one"] / med["cells_threads"], 3)}
    write_result(result, f"commit_rate-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
