"""What a node's CPUs can feed a GPU model: cells/s from the cells branch's CPU step (`DetectCells`:
read a 1024 px region, detect, crop, measure focus) and tiles/s from the tiles branch's
(`ReadTiles`: read, resize, area masks), in one process alone and in N processes at once,
outside Ray.

    python benchmarks/feed_capacity.py [--processes N] [--seconds 10] [--cells-size 8192]
        [--tiles-size 32768] [--mpp 0.25] [--branches cells tiles] [--dicom]
        [--compare-openslide] [--tag T]

The cells branch's synthetic aspirate is planned typed ``aspirate``, as a lab's job types it
(since session 34; its detection then also looks for pale nuclei), the biopsy untyped.
Each process builds the step as the job's actors do, runs it once over the slide's first batch
to warm up, waits for the others and then runs the slide's batches (the job's batch sizes)
round and round for ``--seconds``; a rate is the items of that window over its length.
Against the newest GPU model-alone rates (the `model_throughput` results, as
`driver_intake.py` takes them; or ``--cells-rate`` / ``--tiles-rate``):

- ``scaling``: the N processes' rate over N x one process's (1.0: the cores do not slow each
  other; less: shared caches, memory bandwidth, fewer physical cores than CPUs, frequency);
- ``cap``: the N processes' rate over the model's: the highest end-to-end ratio of #7 a node
  with these CPUs could reach if all N did nothing but feed the model;
- ``processes_for_0_8``: the processes it takes at the N-process rate each to feed the model
  at 0.8 of its rate alone.

The rates are the tasks' step alone. Each slide is also planned once before its tasks
(`PlanTasks`: thumbnail, tissue mask, sample tiles), on the same CPUs: ``plan`` gives that
cost per slide and per item in one process, ``one_with_planning_per_s`` one process's rate
with it, and ``planning_share`` its part of an item's CPU. ``first_read_ms`` is what a process
pays the first time it reads a slide (opening it), once per slide for each process that gets
some of its batches.

``--dicom``: the slides are DICOM series (a file per level, JPEG frames) in place of TIFFs.
``--compare-openslide``: one process's rate is measured again with every read through
OpenSlide (``pipeline.direct_jpeg`` off), in the same run: ``direct_jpeg_speedup``.

Inside the running job `pipeline_e2e.py` reports the same per-process figure as
``feed_per_actor_s`` (items per busy second of an actor): where that is well below this
script's, Ray Data's work around the step or the other processes on the node take the
difference; where they agree, the CPUs themselves bound the branch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402

# per branch: the synthetic slide's kind and the model the branch feeds
BRANCHES = {"cells": ("aspirate", "deepheme-resnext50"), "tiles": ("marrow", "dinov2-vits14")}
# and the type its slide is planned with: the aspirate as a lab's job types it (since session
# 34: its detection then also looks for pale nuclei, x0.86 of the untyped rate here); the
# biopsy untyped (the tiles branch plans the same either way)
SPECIMEN = {"cells": "aspirate", "tiles": "unknown"}


def task_batches(branch: str, uri: str, cfg) -> list[dict]:
    """The slide's tasks for ``branch`` as the job's batches (columns of numpy arrays)."""
    from engine.pipeline.steps import PlanTasks

    tasks = PlanTasks(cfg, None, branch)({"uri": uri, "slide_id": "feed",
                                          "specimen": SPECIMEN[branch]})
    if int(tasks[0]["task"]) < 0:
        raise RuntimeError(f"{uri}: no {branch} tasks planned ({tasks[0].get('header')})")
    size = cfg.pipeline.read_batch_size if branch == "cells" else \
        cfg.pipeline.tile_read_batch_size
    return [{k: np.stack([np.asarray(t[k]) for t in part]) for k in part[0]}
            for part in (tasks[i:i + size] for i in range(0, len(tasks), size))]


def make_step(branch: str, cfg):
    from engine.pipeline.steps import DetectCells, ReadTiles

    return DetectCells(cfg) if branch == "cells" else ReadTiles(cfg, keep_pixels=True)


def items_of(branch: str, out) -> int:
    """Cells (detections: not a tile's "none" or "error" marker) or tiles read. ``out``: a
    step's batch out (`DetectCells`': a ``pyarrow.Table``)."""
    if branch == "cells":
        return int(np.isin(np.asarray(out["kind"]), ["none", "error"], invert=True).sum())
    return int((np.asarray(out["error_type"]) == "").sum())


def plan_cost(branch: str, uri: str, repeats: int = 5) -> dict:
    """What the job spends once per slide before its tasks (`PlanTasks`: the thumbnail and
    tissue mask, and the sample tiles for the stain threshold or the stain vectors), in this
    process: ms per slide (the median of ``repeats``, after one to warm up) and per item of the
    slide (its cells or tiles, counted by reading it once)."""
    from engine.config import Config
    from engine.pipeline.steps import PlanTasks

    cfg = Config()
    plan = PlanTasks(cfg, None, branch)
    row = {"uri": uri, "slide_id": "feed", "specimen": SPECIMEN[branch]}
    plan(dict(row))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan(dict(row))
        times.append(time.perf_counter() - t0)
    batches = task_batches(branch, uri, cfg)
    step = make_step(branch, cfg)
    items = sum(items_of(branch, step(dict(b))) for b in batches)
    ms = 1000 * float(np.median(times))
    return {"ms_per_slide": round(ms, 1), "items_per_slide": items,
            "ms_per_item": round(ms / max(items, 1), 4),
            **first_read(branch, batches[0], cfg, repeats)}


def first_read(branch: str, batch: dict, cfg, repeats: int) -> dict:
    """What a process pays the first time it reads a slide, on top of the read itself: opening
    it and, without the planner's verdict in the task (``direct_ok``), checking the level's
    direct decoding. Each of the batch's first two tasks is read by a new step (``cold``) and by
    a step that has already read the other (``warm``), in turn, ``repeats`` times: the mean of
    the two tasks' medians each way, so that one task's more cells than the other's never count
    as the opening's cost (before session 54 ``cold`` was always the first task and ``warm`` the
    second: one CI run measured -34 ms). In the job each process that gets some of a slide's
    batches pays it once for that slide. Returns ``first_read_ms``, the difference of the
    medians ``first_read_cold_ms`` and ``first_read_warm_ms`` (near 0, it may come out below on
    a busy machine)."""
    tasks = [{k: v[i:i + 1] for k, v in batch.items()} for i in (0, 1)]
    cold, warm = ([], []), ([], [])  # per task
    for r in range(2 * repeats):
        first = r % 2
        fresh = make_step(branch, cfg)
        t0 = time.perf_counter()
        fresh(dict(tasks[first]))
        t1 = time.perf_counter()
        fresh(dict(tasks[1 - first]))
        cold[first].append(t1 - t0)
        warm[1 - first].append(time.perf_counter() - t1)
    # each task's median, the two averaged
    cold_ms, warm_ms = (500 * sum(float(np.median(t)) for t in x) for x in (cold, warm))
    return {"first_read_ms": round(cold_ms - warm_ms, 1),
            "first_read_cold_ms": round(cold_ms, 1), "first_read_warm_ms": round(warm_ms, 1)}


def worker(branch: str, uri: str, seconds: float, barrier, results, direct: bool = True
           ) -> None:
    """One process: build the step, warm it, wait for the others, run for ``seconds``
    (``direct``: JPEG tiles decoded directly, as configured; else through OpenSlide)."""
    from engine.config import Config

    cfg = Config.from_dict({"pipeline": {"direct_jpeg": direct}})
    batches = task_batches(branch, uri, cfg)
    step = make_step(branch, cfg)
    step(dict(batches[0]))
    barrier.wait()
    t0 = time.perf_counter()
    items = k = 0
    while time.perf_counter() - t0 < seconds:
        items += items_of(branch, step(dict(batches[k % len(batches)])))
        k += 1
    results.put((items, time.perf_counter() - t0))


def run_processes(branch: str, uri: str, n: int, seconds: float, direct: bool = True) -> dict:
    """``n`` processes at once: their summed rate and each one's."""
    ctx = mp.get_context("spawn")  # a clean process each, as a Ray worker starts
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(branch, uri, seconds, barrier, results, direct))
             for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a {branch} process failed (exit code {p.exitcode})")
    rates = [items / s for items, s in got]
    return {"processes": n, "per_s": round(sum(rates), 1),
            "per_process_s": round(sum(rates) / n, 1), "items": sum(i for i, _ in got)}


def capacity(one: dict, many: dict, model: str, alone: float | None, source: str | None,
             plan: dict | None = None) -> dict:
    """A branch's figures (module docstring) from its 1- and N-process runs (and ``plan``:
    `plan_cost`'s, which add ``one_with_planning_per_s``)."""
    out = {"one": one, "many": many,
           "scaling": round(many["per_s"] / (many["processes"] * one["per_s"]), 3),
           "model": model, "model_alone_per_s": alone, "model_source": source}
    if plan is not None:
        ms = 1000 / one["per_s"] + plan["ms_per_item"]
        out.update(plan=plan, one_with_planning_per_s=round(1000 / ms, 1),
                   planning_share=round(plan["ms_per_item"] / ms, 3))
    if alone:
        out["cap"] = round(min(1.0, many["per_s"] / alone), 3)
        out["processes_for_0_8"] = math.ceil(0.8 * alone / many["per_process_s"])
    return out


def cpu_topology() -> dict:
    """The CPUs this process may run on and the physical cores they are: two hyperthreads of
    one core share its execution units, so 16 CPUs on 8 cores feed about as 8 would."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as fh:
                cores.add(fh.read().strip())
        except OSError:
            cores.add(str(c))
    out = {"cpus": len(cpus), "physical_cores": len(cores), "model": platform.processor()}
    try:
        with open("/proc/cpuinfo") as fh:
            out["model"] = next(line.split(":", 1)[1].strip() for line in fh
                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:  # a container's CPU quota (cgroup v2), where one is set
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()
        out["cgroup_cpus"] = None if quota == "max" else round(int(quota) / int(period), 2)
    except (OSError, ValueError):
        pass
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=os.cpu_count())
    p.add_argument("--seconds", type=float, default=10.0, help="each run's measured window")
    p.add_argument("--cells-size", type=int, default=8192,
                   help="side of the synthetic marrow aspirate, px (at --mpp)")
    p.add_argument("--tiles-size", type=int, default=32768,
                   help="side of the synthetic H&E marrow biopsy, px (at --mpp)")
    p.add_argument("--mpp", type=float, default=0.25,
                   help="the slides' level-0 µm/px (a 40x Aperio or Leica scan: 0.252-0.263, "
                        "whose cell tiles are resampled to 0.25)")
    p.add_argument("--branches", nargs="+", choices=sorted(BRANCHES), default=sorted(BRANCHES))
    p.add_argument("--cells-rate", type=float, help="the classifier's rate alone (crops/s); "
                   "default: the newest GPU model_throughput result")
    p.add_argument("--tiles-rate", type=float, help="the encoder's rate alone (tiles/s)")
    p.add_argument("--dicom", action="store_true", help="DICOM series, not TIFFs")
    p.add_argument("--compare-openslide", action="store_true",
                   help="one process's rate again with every read through OpenSlide")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    from benchmarks.driver_intake import model_alone

    source, rates = model_alone()
    with tempfile.TemporaryDirectory(prefix="hemeflow-feed-") as work:  # the synthetic slides
        return _measure(args, work, source, rates)


def _measure(args: argparse.Namespace, work: str, source: str, rates: dict) -> dict:
    """`main`'s runs over each branch's synthetic slide, made in the folder ``work``."""
    from benchmarks.make_synthetic_slides import make_slide

    given = {"cells": args.cells_rate, "tiles": args.tiles_rate}
    result = {"benchmark": "feed_capacity", "host": f"cpu{os.cpu_count()}",
              "cpu": cpu_topology(), "seconds": args.seconds,
              "date": dt.date.today().isoformat()}
    for branch in args.branches:
        kind, model = BRANCHES[branch]
        size = args.cells_size if branch == "cells" else args.tiles_size
        uri = os.path.join(work, branch if args.dicom else f"{branch}.tif")
        make_slide(uri, size, kind=kind, mpp=args.mpp, dicom=args.dicom)
        if args.dicom:
            uri = os.path.join(uri, "level_0.dcm")
        one = run_processes(branch, uri, 1, args.seconds)
        many = run_processes(branch, uri, args.processes, args.seconds)
        alone = given[branch] or rates.get(model)
        result[branch] = {"slide": {"kind": kind, "specimen": SPECIMEN[branch],
                                    "size_px": size, "mpp": args.mpp,
                                    "format": "dicom" if args.dicom else "tiff"},
                          **capacity(one, many, model, alone,
                                     "given" if given[branch] else source,
                                     plan_cost(branch, uri))}
        if args.compare_openslide:
            via = run_processes(branch, uri, 1, args.seconds, direct=False)
            result[branch].update(one_via_openslide=via,
                                  direct_jpeg_speedup=round(one["per_s"] / via["per_s"], 3))
    write_result(result, f"feed_capacity-{result['host']}-{result['date']}", args.tag)
    return result


if __name__ == "__main__":
    main()
