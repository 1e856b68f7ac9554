"""What a Ray Train run costs before and after its training function: seconds per ``fit`` of
a function that reports once, with the controller polling its workers at Ray's default
interval (2 s) against the one `engine.pipeline.train.run_ray_training` sets (0.25 s).

    python benchmarks/ray_train_start.py [--workers 2] [--fits 3] [--tag T]

Every fit of a job pays this: `train_mil` fits each fold and the final model (6 fits by
default), `train_cell_classifier` each fold. Runs the two intervals in turn, ``--fits`` each,
on one local Ray; prints JSON with each fit's seconds, the medians and their ratio (ours over
Ray's default), and writes ``benchmarks/results/ray_train_start-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402
from engine.pipeline.train import HEALTH_CHECK_INTERVAL_S, start_ray  # noqa: E402

RAY_DEFAULT_S = 2.0  # ray.train.v2._internal.constants.DEFAULT_HEALTH_CHECK_INTERVAL_S
VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def _report_once(config: dict) -> None:
    import ray.train

    ray.train.report({"started_s": round(time.time() - config["t0"], 3)})


def fit_seconds(workers: int, interval: float, storage: str) -> float:
    """Seconds of one ``TorchTrainer.fit`` of `_report_once` on ``workers`` CPU workers with
    the controller polling every ``interval`` s (read when the controller starts)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ[VARIABLE] = str(interval)
    t0 = time.time()
    TorchTrainer(_report_once, train_loop_config={"t0": t0},
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                 run_config=RunConfig(name=f"start-{t0:.3f}", storage_path=storage)).fit()
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    start_ray(log_to_driver=False)
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    runs: dict[str, list[float]] = {"ray_default": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="hemeflow-ray-train-start-") as storage:
        fit_seconds(args.workers, HEALTH_CHECK_INTERVAL_S, storage)  # warm: workers' imports
        for _ in range(args.fits):  # interleaved, so that drift hits both alike
            runs["ray_default"].append(round(fit_seconds(args.workers, RAY_DEFAULT_S, storage), 2))
            runs["ours"].append(round(fit_seconds(args.workers, HEALTH_CHECK_INTERVAL_S,
                                                  storage), 2))
    med = {k: statistics.median(v) for k, v in runs.items()}
    hardware = f"cpu{cpus}"
    result = {"benchmark": "ray_train_start", "hardware": hardware,
              "cpu": platform.processor() or platform.machine(),
              "date": dt.date.today().isoformat(), "workers": args.workers,
              "intervals_s": {"ray_default": RAY_DEFAULT_S, "ours": HEALTH_CHECK_INTERVAL_S},
              "fit_s": runs, "median_fit_s": med,
              "ratio_ours_over_default": round(med["ours"] / med["ray_default"], 3)}
    write_result(result, f"ray_train_start-{hardware}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
