"""How fast the job's driver takes in results: cells/s and tiles/s through the `Aggregator`
(intake of model-output batches, then each slide's Parquet tables, GeoJSON and commit, on local
disk), against the GPU model-alone rates it must keep up with.

    python benchmarks/driver_intake.py [--slides 4] [--cells-per-slide 90000]
                                       [--tiles-per-slide 25000]

Every cell and tile of a run passes through the driver, one Python process, so its rate caps the
job's: at 80 % of ResNeXt-50's and ViT-S/14's model-alone rates on an H100 (the newest
``results/model_throughput-*.json`` with a GPU), the driver must take some 38k cells/s or 10k
tiles/s. The batches are what ``ClassifyCells`` and ``EncodeTiles`` emit (256 rows, 23
probabilities or a 384-d embedding per row), with random values. Prints JSON with the rates and
``headroom`` (driver rate / model-alone rate; above 1.25 the driver leaves the 80 % target
reachable) and writes ``benchmarks/results/driver_intake-<host>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import RESULTS, write_result  # noqa: E402
from engine.classes import DEEPHEME_CODES  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.pipeline.aggregate import Aggregator  # noqa: E402
from engine.pipeline.commit import OutputStore  # noqa: E402

BATCH = 256


def _header(slide_id: str) -> str:
    slide = {"slide_id": slide_id, "uri": f"/archive/{slide_id}.tif", "status": "ok",
             "inventoried_at": "2026-12-02T00:00:00+00:00"}
    return json.dumps({"slide": slide, "status": "ok", "error_type": None, "error_message": None})


def _rows(slide_id: str, n_rows: int, per_task: int, rng) -> list[dict]:
    """A slide's rows in model-output batches: ``per_task`` rows per task, its header on the
    first row."""
    n_tasks = -(-n_rows // per_task)
    task = np.arange(n_rows) // per_task
    in_task = np.bincount(task, minlength=n_tasks)[task]
    out = []
    for lo in range(0, n_rows, BATCH):
        m = min(BATCH, n_rows - lo)
        out.append({"slide_id": np.full(m, slide_id), "task": task[lo:lo + m],
                    "n_tasks": np.full(m, n_tasks), "n_in_task": in_task[lo:lo + m],
                    "header": np.asarray([_header(slide_id) if lo + i == 0 else ""
                                          for i in range(m)]),
                    "error_type": np.full(m, ""), "error_message": np.full(m, ""),
                    "x": rng.uniform(0, 40_000, m), "y": rng.uniform(0, 40_000, m)})
    return out


def cell_batches(n_slides: int, n_cells: int, rng) -> list[dict]:
    codes = np.asarray(DEEPHEME_CODES)
    batches = []
    for s in range(n_slides):
        for b in _rows(f"slide-{s:04d}", n_cells, 45, rng):
            m = len(b["task"])
            probs = rng.dirichlet(np.ones(len(codes)), m).astype(np.float32)
            b.update({k: b["x"] + rng.uniform(-20, 20, m) for k in ("x0", "y0", "x1", "y1")},
                     area_um2=rng.uniform(10, 100, m).astype(np.float32),
                     kind=np.where(rng.random(m) < 0.85, "nucleated", "platelet"),
                     at_edge=np.zeros(m, bool), probabilities=probs,
                     class_code=codes[probs.argmax(1)], class_prob=probs.max(1),
                     ood_distance=rng.uniform(5, 30, m).astype(np.float32),
                     out_of_distribution=rng.random(m) < 0.01)
            blur = rng.uniform(0.05, 0.35, m).astype(np.float32)  # measured on nucleated cells
            b.update(blur_um=np.where(b["kind"] == "nucleated", blur, np.nan),
                     out_of_focus=(b["kind"] == "nucleated") & (blur > 0.3))
            batches.append(b)
    return batches


def tile_batches(n_slides: int, n_tiles: int, dim: int, rng) -> list[dict]:
    batches = []
    for s in range(n_slides):
        for b in _rows(f"slide-{s:04d}", n_tiles, 1, rng):
            m = len(b["task"])
            b.update(x=(b["x"] // 224 * 224).astype(np.int64),
                     y=(b["y"] // 224 * 224).astype(np.int64), tile_mpp=np.full(m, 2.0),
                     tile_px=np.full(m, 224), tissue_fraction=rng.random(m),
                     cellular_px=rng.integers(0, 50_000, m), fat_px=rng.integers(0, 50_000, m),
                     embedding=rng.standard_normal((m, dim)).astype(np.float32))
            batches.append(b)
    return batches


def intake(branch: str, batches: list[dict], n_slides: int, warm_up: list[dict]) -> float:
    """Seconds for the driver to take ``batches`` in and commit their slides, after
    ``warm_up`` (another slide: imports on first use, pyarrow's Parquet writer, are not
    intake)."""
    with tempfile.TemporaryDirectory() as d:
        for folder, todo in (("warm-up", warm_up), ("run", batches)):
            agg = Aggregator(OutputStore(os.path.join(d, folder), Config().storage), "bench",
                             [branch], [], tuple(DEEPHEME_CODES), 100, (branch,),
                             log=lambda *_: None)
            add = agg.add_cells if branch == "cells" else agg.add_tiles
            t = time.perf_counter()
            for b in todo:
                add(b)
            seconds = time.perf_counter() - t
        assert len(agg.summary) == n_slides and not agg.slides, "slides left uncommitted"
    return seconds


def model_alone() -> tuple[str | None, dict[str, float]]:
    """The newest GPU model-alone rates (bf16, channels_last, no compile, batch 256)."""
    docs = [(os.path.basename(p), json.load(open(p)))
            for p in glob.glob(os.path.join(RESULTS, "model_throughput-*.json"))]
    gpu = sorted((d.get("date", ""), name, d) for name, d in docs if d.get("gpu"))
    if not gpu:
        return None, {}
    _, name, doc = gpu[-1]
    return name, {r["model"]: r["bf16_channels_last_images_per_s"] for r in doc["results"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--cells-per-slide", type=int, default=90_000)
    p.add_argument("--tiles-per-slide", type=int, default=25_000)
    p.add_argument("--embedding-dim", type=int, default=384, help="ViT-S/14: 384")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    cells = cell_batches(args.slides, args.cells_per_slide, rng)
    tiles = tile_batches(args.slides, args.tiles_per_slide, args.embedding_dim, rng)
    n_cells = args.slides * args.cells_per_slide
    n_tiles = args.slides * args.tiles_per_slide
    cells_per_s = n_cells / intake("cells", cells, args.slides, cell_batches(1, 300, rng))
    tiles_per_s = n_tiles / intake("tiles", tiles, args.slides, tile_batches(1, 300, 8, rng))
    source, alone = model_alone()
    result = {
        "benchmark": "driver_intake", "host": f"cpu{os.cpu_count()}",
        "date": dt.date.today().isoformat(), "args": vars(args),
        "cells_per_s": round(cells_per_s), "tiles_per_s": round(tiles_per_s),
        "model_alone_source": source,
        "headroom_cells": round(cells_per_s / alone["deepheme-resnext50"], 2)
        if "deepheme-resnext50" in alone else None,
        "headroom_tiles": round(tiles_per_s / alone["dinov2-vits14"], 2)
        if "dinov2-vits14" in alone else None,
        "model_alone_per_s": {k: alone.get(k) for k in ("deepheme-resnext50", "dinov2-vits14")},
    }
    write_result(result, f"driver_intake-{result['host']}-{result['date']}", args.tag)


if __name__ == "__main__":
    main()
