"""What Ray Data costs the driver per row on the cells branch's path, with no-op actors: rows/s
from detection-like actors through a classifier-like actor to the driver, and the driver
process's CPU per row, for the model stage's batching as configured against a baseline, in the
same process.

    python benchmarks/ray_data_passthrough.py [--tasks 3000] [--rows-per-task 45]
        [--read-batch 64] [--batch 256] [--passes 4 --calls 2] [--baseline-passes 1
        --baseline-calls 1] [--baseline-batch N] [--arrow-blocks] [--tag T]

Every cell of a run reaches the driver, one Python process whose threads share one GIL. It pays
Ray Data per block (scheduling, the model stage's output blocks converted for ``iter_batches``)
and the `Aggregator` per row (``driver_intake.py``). Here the actors do nothing: detection-like
actors emit ``rows-per-task`` crops of 96 px per task in batches of ``read-batch`` tasks (the
pipeline's ``read_batch_size``), a classifier-like actor takes ``batch`` x ``passes`` rows per
call with ``calls`` calls in flight (``pipeline.classifier.passes_per_call`` and
``calls_in_flight``), drops the crops and adds 23 probabilities, and the driver counts the rows.
With ``--arrow-blocks`` the configured run's classifier-like actor takes whole blocks as Arrow
tables instead, as the job's ``ClassifyCells`` does. Rates are steady state (from the first
batch at the driver). Prints JSON and writes
``benchmarks/results/ray_data_passthrough-cpu<N>-<date>[-<tag>].json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402


class Detect:
    """Detection's output shape: per task ``rows`` crop rows with their columns."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, batch: dict) -> dict:
        n = len(batch["task"]) * self.rows
        return {"task": np.repeat(batch["task"], self.rows), "slide_id": np.full(n, "slide-abc"),
                "kind": np.full(n, "nucleated"), "x": np.zeros(n), "y": np.zeros(n),
                "crop": np.zeros((n, 96, 96, 3), np.uint8)}


class Classify:
    """The classifier's output shape, without a model: crops dropped, probabilities added, and
    the actor process's CPU seconds so far (``_cpu``: every thread of it, Ray Data's batching
    and fetching included), what a GPU model actor's host has to spare."""

    def __call__(self, batch: dict) -> dict:
        batch.pop("crop")
        batch["probabilities"] = np.zeros((len(batch["task"]), 23), np.float32)
        batch["_cpu"] = np.full(len(batch["task"]), time.process_time())
        return batch


class ClassifyBlocks:
    """The same on whole blocks as Arrow tables, as `ClassifyCells` takes them in the job: the
    crops viewed in place chunk by chunk, the new columns appended."""

    def __call__(self, table):
        from engine.pipeline.steps import with_columns

        n = sum(len(chunk.to_numpy()) for chunk in table.column("crop").chunks)
        return with_columns(table.drop_columns(["crop"]), {
            "probabilities": np.zeros((n, 23), np.float32),
            "_cpu": np.full(n, time.process_time())})


def passthrough(tasks: int, rows: int, read_batch: int, batch: int, passes: int,
                calls: int, arrow: bool = False) -> dict:
    """One run: steady rows/s at the driver and the driver process's CPU per row."""
    import ray

    from engine.pipeline.run import actor_pool  # the pools the job builds

    ds = ray.data.from_items([{"task": i} for i in range(tasks)])
    ds = ds.map_batches(Detect, fn_constructor_args=(rows,), batch_size=read_batch,
                        compute=actor_pool(1), num_cpus=0.5)
    if arrow:  # as the job hands ClassifyCells its crops
        ds = ds.map_batches(ClassifyBlocks, batch_size=None, batch_format="pyarrow",
                            compute=actor_pool(1, calls=calls), num_cpus=0.5)
    else:
        ds = ds.map_batches(Classify, batch_size=batch * passes or None,
                            compute=actor_pool(1, calls=calls), num_cpus=0.5)
    n = n0 = blocks = 0
    first = cpu0 = None
    actor = [np.inf, -np.inf]  # the classify actor's CPU seconds at its first and last output
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        if first is None:
            first, cpu0, n0 = time.perf_counter(), time.process_time(), len(b["task"])
        n += len(b["task"])
        blocks += 1
        actor = [min(actor[0], float(b["_cpu"].min())), max(actor[1], float(b["_cpu"].max()))]
    wall, cpu = time.perf_counter() - first, time.process_time() - cpu0
    return {"batch": "arrow blocks" if arrow else batch or "blocks",
            "passes_per_call": passes, "calls_in_flight": calls,
            "rows": n, "blocks_at_driver": blocks, "rows_per_s": round((n - n0) / wall),
            "driver_cpu_us_per_row": round(cpu / (n - n0) * 1e6, 2),
            "driver_cpu_cores": round(cpu / wall, 2),
            "classify_actor_cpu_us_per_row": round((actor[1] - actor[0]) / (n - n0) * 1e6, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=3000)
    p.add_argument("--rows-per-task", type=int, default=45, help="an aspirate's 1024 px task")
    p.add_argument("--read-batch", type=int, default=64)
    p.add_argument("--batch", type=int, default=256,
                   help="rows per forward pass; 0: the blocks as they come, however many rows")
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--baseline-passes", type=int, default=1)
    p.add_argument("--baseline-calls", type=int, default=1)
    p.add_argument("--baseline-batch", type=int, help="the baseline's --batch (default: the same)")
    p.add_argument("--arrow-blocks", action="store_true",
                   help="the configured run takes whole blocks as Arrow tables, as the job's "
                        "classifier does (--batch and --passes then apply to the baseline)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    common = (args.tasks, args.rows_per_task, args.read_batch)
    baseline_batch = args.batch if args.baseline_batch is None else args.baseline_batch
    baseline = passthrough(*common, baseline_batch, args.baseline_passes, args.baseline_calls)
    ours = passthrough(*common, args.batch, args.passes, args.calls, args.arrow_blocks)
    result = {"benchmark": "ray_data_passthrough", "cpus": os.cpu_count(),
              "date": dt.date.today().isoformat(), "args": vars(args), "baseline": baseline,
              "configured": ours,
              "rows_per_s_ratio": round(ours["rows_per_s"] / baseline["rows_per_s"], 3),
              "driver_cpu_per_row_ratio": round(ours["driver_cpu_us_per_row"]
                                                / baseline["driver_cpu_us_per_row"], 3),
              "classify_actor_cpu_per_row_ratio": round(
                  ours["classify_actor_cpu_us_per_row"]
                  / baseline["classify_actor_cpu_us_per_row"], 3)}
    write_result(result, f"ray_data_passthrough-cpu{os.cpu_count()}-{result['date']}", args.tag)


if __name__ == "__main__":
    main()
