"""How far a softmax temperature fitted on n validation images strays, by n: the evidence for
`engine.train.calibration.MIN_TEMPERATURE_IMAGES` (the train job fits none on fewer).

The reference classifier's 8-view logits on its held-out PBC split (its job's split: IG and NEU
left out, 15 %, seed 0) give the temperature of the whole split; then ``--draws`` random draws
of n of those images, each fitted alone, give the median, the 95 % range and the share that hit
the fit's lower bound (0.05: every probability then near 1).

    python benchmarks/temperature_spread.py [--sizes 8 16 32 64 100 200 400] [--draws 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import ROOT, result_head, write_result  # noqa: E402

PBC = os.path.join(os.path.dirname(ROOT), "shared", "data", "pbc")


def held_out_view_logits(data: str, max_images: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The reference classifier's 8-view logits ``(8, N, C)``, as trained (no temperature), on
    its held-out PBC split (its job's split: IG and NEU left out, 15 %, seed 0; the first
    ``max_images``), and the labels ``(N,)`` as indices into its class codes."""
    from engine.models import create_model
    from engine.train.calibration import collect_view_logits
    from engine.train.data import load_cell_images, read_labels
    from jobs.train_cell_classifier import split_for_training

    model = create_model("deepheme-resnext50", calibrated=False)  # the weights as trained
    codes = list(model.class_codes)
    *_, held_out = split_for_training(read_labels(data), {"IG", "NEU"}, 0.15, 0)
    rows = [(path, code) for path, code in held_out if code in codes][:max_images]
    y = np.array([codes.index(code) for _, code in rows])
    images = load_cell_images([path for path, _ in rows], 0.1, model.spec.input_mpp,
                              model.spec.input_px)  # PBC's pixel size, as the reference took
    return collect_view_logits(model, images, tta=True), y


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=PBC, help="the PBC folder (labels.csv)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 100, 200, 400])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--max-images", type=int, help="the first N held-out images only (smoke)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    from engine.train.calibration import (MIN_TEMPERATURE_IMAGES, TEMPERATURE_BOUNDS,
                                          fit_temperature)

    t0 = time.time()
    logits, y = held_out_view_logits(args.data, args.max_images)
    rng = np.random.default_rng(0)
    spread = {}
    for n in (n for n in args.sizes if n < len(y)):
        fitted = np.array([fit_temperature(logits[:, idx], y[idx]) for idx in
                           (rng.choice(len(y), n, replace=False) for _ in range(args.draws))])
        low, high = np.percentile(fitted, [2.5, 97.5])
        spread[str(n)] = {"median": round(float(np.median(fitted)), 3),
                          "ci95": [round(float(low), 3), round(float(high), 3)],
                          "at_lower_bound": round(float(np.mean(  # within the fit's xatol
                              fitted < TEMPERATURE_BOUNDS[0] * 1.002)), 3)}
    result = {**result_head("temperature_spread"), "images": len(y), "draws": args.draws,
              "temperature_all": round(fit_temperature(logits, y), 4),
              "min_temperature_images": MIN_TEMPERATURE_IMAGES, "by_images": spread,
              "seconds": round(time.time() - t0, 1)}
    write_result(result, f"temperature_spread-{result['hardware']}-{result['date']}", args.tag)
    return result


if __name__ == "__main__":
    main()
