"""What a rerun of `jobs.inventory` costs once new slides arrive in an S3 archive: the rerun on
the earlier inventory's output, which keeps the rows of unchanged files and reads only the new
ones, against reading every file again (``--reprocess``: what every rerun did before), each on
its own copy of the first inventory's output, interleaved in one process.

    python benchmarks/inventory_rerun.py [--slides 200] [--new 20] [--size 8000] [--repeats 3]

A moto S3 server is started in a process of its own on 127.0.0.1 and given ``--slides`` copies
of a synthetic pyramidal TIFF of ``--size`` px a side (`make_synthetic_slides.py`, JPEG tiles;
OpenSlide reads them as generic TIFFs, from a sparse copy: `engine.slides.header_copy`); then
``--new`` more arrive. Bytes are counted as the machine's network interfaces received them
(loopback included). Both ways must give the same rows (but for when each was read). Prints
JSON and writes ``benchmarks/results/inventory_rerun-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile

import polars as pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, result_head, write_result  # noqa: E402
from benchmarks.make_synthetic_slides import slide_bytes  # noqa: E402
from benchmarks.sparse_reads import measured  # noqa: E402
from jobs import inventory  # noqa: E402


def run(prefix: str, output: str, endpoint: str | None, *flags: str) -> pl.DataFrame:
    """`jobs.inventory` over ``prefix`` (a local folder where ``endpoint`` is None) into
    ``output``; its table, without when each row was read."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = inventory.main(["--input", prefix, "--output", output,
                               *(("--s3-endpoint", endpoint) if endpoint else ()), *flags])
    assert code == 0, f"inventory {flags} failed"
    table = pl.read_parquet(os.path.join(output, "slides", "slides.parquet"))
    return table.drop("inventoried_at").sort("uri")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=200, help="slides in the first inventory")
    p.add_argument("--new", type=int, default=20, help="slides that arrive after it")
    p.add_argument("--size", type=int, default=8000, help="synthetic slides' side in px")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    runs = {w: {"s": [], "bytes": []} for w in ("rerun", "reprocess")}
    with tempfile.TemporaryDirectory(prefix="hemeflow-inventory-rerun-") as folder:
        server, endpoint, client = moto_server("bench-inventory")
        try:
            body = slide_bytes(folder, args.size)
            put = lambda i: client.put_object(Bucket="bench-inventory",  # noqa: E731
                                              Key=f"slides/BM-{i:05d}.tif", Body=body)
            for i in range(args.slides):
                put(i)
            prefix = "s3://bench-inventory/slides"
            first = os.path.join(folder, "first")
            _, first_s, first_bytes = measured(run, prefix, first, endpoint)
            for i in range(args.slides, args.slides + args.new):
                put(i)
            got = {}
            for r in range(args.repeats):  # interleaved, so that drift hits both alike
                for way in ("rerun", "reprocess"):
                    out = os.path.join(folder, f"{way}-{r}")
                    shutil.copytree(first, out)
                    flags = ("--reprocess",) if way == "reprocess" else ()
                    got[way], seconds, moved = measured(run, prefix, out, endpoint, *flags)
                    runs[way]["s"].append(seconds)
                    runs[way]["bytes"].append(moved)
            assert got["rerun"].equals(got["reprocess"]), "the two ways gave different rows"
            assert got["rerun"].height == args.slides + args.new
        finally:
            server.kill()
    med = {w: {m: round(statistics.median(v), 3) for m, v in r.items()} for w, r in runs.items()}
    result = {**result_head("inventory_rerun"), "store": "moto, its own process, 127.0.0.1",
              "slides": args.slides, "new": args.new, "side_px": args.size,
              "object_bytes": len(body), "first": {"s": first_s, "bytes": first_bytes},
              "runs": runs, "median": med,
              "ratio_seconds_reprocess_over_rerun": round(
                  med["reprocess"]["s"] / med["rerun"]["s"], 2),
              "ratio_bytes_reprocess_over_rerun": round(
                  med["reprocess"]["bytes"] / max(med["rerun"]["bytes"], 1), 1)}
    write_result(result, f"inventory_rerun-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
