"""Whether per-class logit offsets fitted on n validation images raise macro F1 on other images:
the evidence for `jobs.calibrate_cell_classifier`'s default (a temperature, since session 54;
offsets only with ``--offsets``).

The reference classifier's 8-view logits on its held-out PBC split (its job's split: IG and NEU
left out, 15 %, seed 0), as trained; then ``--draws`` random draws of n of those images, each
given the offsets `engine.train.calibration.fit_offsets` fits on them (as the job fits them on
a validation split), and each scored on the split's other images with those offsets and without:
the median change of macro F1, its 95 % range, and the shares of draws the offsets made worse,
left as they were and made better. n runs up to half the split.

    python benchmarks/offset_spread.py [--sizes 30 50 100 200 400 668] [--draws 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import result_head, write_result  # noqa: E402
from benchmarks.temperature_spread import PBC, held_out_view_logits  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=PBC, help="the PBC folder (labels.csv)")
    p.add_argument("--sizes", type=int, nargs="+", default=[30, 50, 100, 200, 400, 668])
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--max-images", type=int, help="the first N held-out images only (smoke)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    from engine.train.calibration import fit_offsets, macro_f1, probabilities

    t0 = time.time()
    logits, y = held_out_view_logits(args.data, args.max_images)
    none = np.zeros(logits.shape[2])
    rng = np.random.default_rng(0)
    spread = {}
    for n in (n for n in args.sizes if 2 * n <= len(y)):
        change, moved = [], []
        for _ in range(args.draws):
            order = rng.permutation(len(y))
            fit, rest = order[:n], order[n:]
            offsets = fit_offsets(logits[:, fit], y[fit])
            change.append(macro_f1(y[rest], probabilities(logits[:, rest], offsets))
                          - macro_f1(y[rest], probabilities(logits[:, rest], none)))
            moved.append(bool(offsets.any()))
        change = np.array(change)
        low, high = np.percentile(change, [2.5, 97.5])
        spread[str(n)] = {"median": round(float(np.median(change)), 4),
                          "mean": round(float(change.mean()), 4),
                          "ci95": [round(float(low), 4), round(float(high), 4)],
                          "worse": round(float(np.mean(change < 0)), 3),
                          "unchanged": round(float(np.mean(change == 0)), 3),
                          "better": round(float(np.mean(change > 0)), 3),
                          "any_offset": round(float(np.mean(moved)), 3)}
    result = {**result_head("offset_spread"), "images": len(y), "draws": args.draws,
              "macro_f1_without": round(macro_f1(y, probabilities(logits, none)), 4),
              "by_images": spread, "seconds": round(time.time() - t0, 1)}
    write_result(result, f"offset_spread-{result['hardware']}-{result['date']}", args.tag)
    return result


if __name__ == "__main__":
    main()
