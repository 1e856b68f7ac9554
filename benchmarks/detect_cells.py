"""Cell-detection regions per second through the pipeline's detector (`DetectCells`, one actor
per core on Ray Data) at ``--threads`` reading threads per actor against ``--threads-baseline``,
in the same process, over the cell tasks of one synthetic slide.

    python benchmarks/detect_cells.py [--size 8192] [--kind aspirate|smear]
        [--mount-latency-ms 2] [--threads 4] [--threads-baseline 1] [--tag T]

Each task reads a 1024 px region at 0.25 µm/px and detects, crops and measures its cells;
both sides must find the same cells. With ``--mount-latency-ms`` the slide is read through a
FUSE mount that holds each open and read that long (`benchmarks.common.delayed_mount`: a
network file system such as NFS or SMB; needs fusepy and libfuse 2), where a region's reads
wait longer than its detection takes and the threads read the next regions meanwhile
(`pipeline.read_threads`). Rates are steady state: the clock starts at the first batch back.
The slide is read once before either side, so both find it in the page cache alike (through
the mount each read still waits: the baseline runs first).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_mount_arg, result_head, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--kind", choices=["smear", "aspirate"], default="aspirate")
    p.add_argument("--readers", type=int, default=os.cpu_count())
    p.add_argument("--threads", type=int, default=4, help="reading threads per detector actor "
                   "(pipeline.read_threads)")
    p.add_argument("--threads-baseline", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    add_mount_arg(p)
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()

    import ray

    from benchmarks.make_synthetic_slides import make_slide
    from engine.config import Config
    from engine.pipeline.steps import DetectCells, PlanTasks

    work = tempfile.mkdtemp(prefix="hemeflow-detect-")
    atexit.register(shutil.rmtree, work, True)  # the synthetic slide (after any unmount below)
    path = os.path.join(work, "slide.tif")
    make_slide(path, args.size, kind=args.kind)
    with open(path, "rb") as fh:  # in the page cache for both sides alike
        while fh.read(1 << 24):
            pass
    mount = proc = None
    if args.mount_latency_ms is not None:
        from benchmarks.common import delayed_mount

        mount = work + "-mount"
        proc = delayed_mount(work, mount, args.mount_latency_ms)
        path = mount + path[len(work):]
    cfg = Config()
    item = {"uri": path, "size": os.path.getsize(path), "etag": None, "specimen": args.kind,
            "case": None, "shard": 0, "shards": 1}
    tasks = [t for t in PlanTasks(cfg, None, "cells", None)(item) if int(t["task"]) >= 0]
    ray.init(num_cpus=args.readers, include_dashboard=False, log_to_driver=False)

    def ours(threads: int) -> tuple[float, int]:
        """Steady-state seconds for all tasks, and the cells found."""
        ds = ray.data.from_items(tasks).map_batches(
            DetectCells, fn_constructor_args=(cfg, threads), batch_size=args.batch_size,
            compute=ray.data.ActorPoolStrategy(size=args.readers), num_cpus=1)
        cells, counted, t = 0, 0, None
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            cells += sum(k == "nucleated" for k in batch["kind"].to_pylist())
            if t is None:
                t = time.time()
            else:
                counted += len(set(batch["task"].to_pylist()))
        return (time.time() - t) * len(tasks) / max(counted, 1), cells

    try:
        baseline_s, baseline_cells = ours(args.threads_baseline)
        ours_s, cells = ours(args.threads)
        assert cells == baseline_cells, "both sides must find the same cells"
    finally:
        ray.shutdown()
        if mount:
            from benchmarks.common import unmount

            unmount(mount, proc)
    n = len(tasks)
    result = {**result_head("detect_cells"), "slide_px": args.size, "kind": args.kind,
              "tasks": n, "nucleated_cells": cells, "mount_latency_ms": args.mount_latency_ms,
              "reader_actors": args.readers, "batch_size": args.batch_size,
              "threads_per_actor": args.threads, "regions_per_s": round(n / ours_s, 1),
              "baseline_threads_per_actor": args.threads_baseline,
              "baseline_regions_per_s": round(n / baseline_s, 1),
              "ratio_to_baseline_threads": round(baseline_s / ours_s, 3)}
    write_result(result, f"detect_cells-{result['hardware']}-{result['date']}", args.tag)


if __name__ == "__main__":
    main()
