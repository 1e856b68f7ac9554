"""What a flat folder of DICOM series costs (a PACS export: every series' files in one folder)
against the same series a folder each: `jobs.inventory` over each layout, each run a process
of its own (headers are read once a process), interleaved.

    python benchmarks/dicom_folder.py [--series 200] [--size 2048] [--repeats 2]

``--series`` DICOM series of ``--size`` px a side (`make_synthetic_slides.py --dicom`: a file
a level, JPEG frames, each series its own UIDs) are written once and hard-linked into both
layouts. Opening a slide of a flat folder read every DICOM file's header in it to find its own
series' levels (`engine.slides.dicom.local_series`), so an inventory of S series cost S x S x F
headers; the ratio of the two layouts' seconds shows what is left of that. Both must give the
same rows (but for their URIs and when each was read). Prints JSON and writes
``benchmarks/results/dicom_folder-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import polars as pl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import result_head, write_result  # noqa: E402
from benchmarks.make_synthetic_slides import make_slide  # noqa: E402


def inventory(folder: str, output: str) -> tuple[float, pl.DataFrame]:
    """Seconds `jobs.inventory` over ``folder`` took in a process of its own, and its rows
    (their names, without when each was read)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.inventory", "--input", folder, "--output",
                    output], cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    rows = pl.read_parquet(os.path.join(output, "slides", "slides.parquet"))
    # S0001/level_0.dcm in a folder each, S0001-level_0.dcm in the flat one
    name = pl.col("uri").str.slice(len(folder) + 1).str.replace("/", "-")
    return seconds, rows.with_columns(name=name).sort("name")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", type=int, default=200)
    p.add_argument("--size", type=int, default=2048, help="each series' side in px")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    runs: dict[str, list[float]] = {"flat": [], "nested": []}
    with tempfile.TemporaryDirectory(prefix="hemeflow-dicom-folder-") as root:
        written = os.path.join(root, "written")
        flat, nested = os.path.join(root, "flat"), os.path.join(root, "nested")
        os.makedirs(flat)
        files = 0
        for i in range(args.series):
            series = os.path.join(written, f"S{i:04d}")
            make_slide(series, args.size, seed=i, dicom=True)
            os.makedirs(os.path.join(nested, f"S{i:04d}"))
            for name in os.listdir(series):
                os.link(os.path.join(series, name), os.path.join(nested, f"S{i:04d}", name))
                os.link(os.path.join(series, name), os.path.join(flat, f"S{i:04d}-{name}"))
                files += 1
        got = {}
        for r in range(args.repeats):  # interleaved, so that drift hits both alike
            for way, folder in (("flat", flat), ("nested", nested)):
                seconds, got[way] = inventory(folder, os.path.join(root, f"out-{way}-{r}"))
                runs[way].append(round(seconds, 2))
    ok = {w: int((t["status"] == "ok").sum()) for w, t in got.items()}
    assert ok == {"flat": args.series, "nested": args.series}, ok
    same = ["name", "format", "width", "height", "level_count", "mpp_x", "status"]
    assert got["flat"].select(same).equals(got["nested"].select(same)), "the layouts differ"
    med = {w: round(statistics.median(v), 2) for w, v in runs.items()}
    result = {**result_head("dicom_folder"), "series": args.series, "files": files,
              "side_px": args.size, "inventory_s": runs, "median_s": med,
              "ratio_flat_over_nested": round(med["flat"] / med["nested"], 3)}
    write_result(result, f"dicom_folder-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
