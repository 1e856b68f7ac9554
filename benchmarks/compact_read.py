"""What reading a table of an archive's output costs, from the slides' own files (one per slide:
what every read did before) against the compacted files `jobs.compact` writes (a few per
table), for the same committed rows, on local disk and on S3 (moto in its own process), the two
reads interleaved in one process.

    python benchmarks/compact_read.py [--slides 1000] [--cells 1000] [--repeats 3] [--tag T]

Two outputs of ``--slides`` slides are made alike (``--cells`` random cells a slide in the
``cells`` table, and a status row each: `OutputStore.commit`, as the job commits); one is
compacted. Timed: ``read_table`` of the whole ``cells`` table, and of two of its columns, from
each. Both must give the same rows. Prints JSON and writes
``benchmarks/results/compact_read-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, result_head, write_result  # noqa: E402
from engine.config import StorageConfig  # noqa: E402
from engine.pipeline.commit import OutputStore, read_table  # noqa: E402
from engine.pipeline.compact import compact_table  # noqa: E402
from engine.schema import TABLES  # noqa: E402

CODES = ["BL", "M1", "M2", "M3", "M4", "M5", "M6", "E4", "B2", "MO2", "L2", "ER1", "ER2", "PL2"]


def slide_cells(sid: str, n: int, rng) -> pa.Table:
    """A slide's ``cells`` rows: random positions, sizes and class probabilities."""
    probs = rng.dirichlet(np.ones(len(CODES)), n).astype(np.float32)
    columns = {
        "slide_id": [sid] * n, "cell_id": np.arange(n), "x": rng.uniform(0, 4e4, n),
        "y": rng.uniform(0, 4e4, n), "area_um2": rng.uniform(12, 200, n).astype(np.float32),
        "kind": ["nucleated"] * n, "class_code": [CODES[i] for i in probs.argmax(1)],
        "class_prob": probs.max(1), "probabilities": list(probs), "model_codes": [CODES] * n}
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type))
                     for f in TABLES["cells"]}, schema=TABLES["cells"])


def fill(store: OutputStore, slides: int, cells: int) -> None:
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.timezone.utc)
    for i in range(slides):
        sid = f"BM-{i:05d}-000000000000"
        full = slide_cells(sid, cells, rng)
        store.commit(sid, {"cells": full}, {"slide_id": sid, "uri": f"s3://lab/{sid}.svs",
                                            "status": "ok", "finished_at": now})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=1000)
    p.add_argument("--cells", type=int, default=1000, help="cells a slide")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    result = {**result_head("compact_read"), "slides": args.slides,
              "cells_per_slide": args.cells, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="hemeflow-compact-read-") as folder:
        server, endpoint, client = moto_server("bench-compact")
        try:
            stores = {"local": (os.path.join(folder, "{}"), StorageConfig()),
                      "s3 (moto)": ("s3://bench-compact/{}", StorageConfig(
                          endpoint_url=endpoint))}
            for name, (pattern, storage) in stores.items():
                outs = {way: pattern.format(way) for way in ("per_slide", "compacted")}
                t0 = time.perf_counter()
                for uri in outs.values():
                    fill(OutputStore(uri, storage), args.slides, args.cells)
                made = time.perf_counter() - t0
                store = OutputStore(outs["compacted"], storage)
                t0 = time.perf_counter()
                done = compact_table(store, "cells", store.stamps())
                compact_s = time.perf_counter() - t0
                runs = {f"{way}/{q}": [] for way in outs for q in ("all", "two_columns")}
                got = {}
                for _ in range(args.repeats):  # interleaved, so that drift hits both alike
                    for way, uri in outs.items():
                        for q, cols in (("all", None), ("two_columns", ["slide_id",
                                                                       "class_code"])):
                            t0 = time.perf_counter()
                            got[way, q] = read_table(uri, "cells", cols, storage)
                            runs[f"{way}/{q}"].append(round(time.perf_counter() - t0, 3))
                for q in ("all", "two_columns"):
                    a, b = got["per_slide", q], got["compacted", q]
                    keys = ["slide_id", "cell_id"] if q == "all" else ["slide_id"]
                    assert a.sort(keys).equals(b.sort(keys)), f"{name} {q}: different rows"
                med = {k: statistics.median(v) for k, v in runs.items()}
                result["stores"][name] = {
                    "made_s": round(made, 1), "compact_s": round(compact_s, 2),
                    "compacted_files": done["files"], "rows": done["rows"], "runs": runs,
                    "median_s": med,
                    "ratio_per_slide_over_compacted": {
                        q: round(med[f"per_slide/{q}"] / med[f"compacted/{q}"], 1)
                        for q in ("all", "two_columns")}}
        finally:
            server.kill()
    write_result(result, f"compact_read-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
