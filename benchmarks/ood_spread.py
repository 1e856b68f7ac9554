"""How a feature density fitted on n images behaves, by n and by how its threshold is set: the
evidence for `engine.models.ood.cross_fitted` and `engine.models.ood.MIN_DENSITY_IMAGES` (the
train job fits its checkpoints' densities that way, and none on fewer images).

The reference classifier's penultimate features of a seeded draw of its PBC training split (its
job's split: IG and NEU left out, 15 % held out, seed 0), of the held-out split (cells it never
saw: in distribution, about 1 % should be flagged) and of BCCD's white cells (another lab's
stain and camera, cropped at their measured 0.082 µm/px: out of distribution). Then ``--draws``
random draws of n training images, the classes drawn being the ones fitted, each given a density
twice:

- ``held_out_quarter``: fitted on 3/4 of them, its threshold the 99th percentile of the other
  quarter's distances (the train job until 0.8.14);
- ``cross_fitted``: fitted on all of them, its threshold the 99th percentile of their 5-fold
  cross-fitted distances (since).

Each reports the share of the held-out split and of BCCD's cells flagged (median and 90 %
range over draws), the AUROC between the two, and the draws that could not be fitted (a class
absent from the fit).

    python benchmarks/ood_spread.py [--sizes 30 50 100 200 400 800 1600] [--draws 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import ROOT, result_head, write_result  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _spread(values) -> dict:
    v = np.asarray(values, np.float64)
    if not len(v):
        return {}
    low, high = np.percentile(v, [5, 95])
    return {"median": round(float(np.median(v)), 3),
            "range90": [round(float(low), 3), round(float(high), 3)]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(DATA, "pbc"), help="the PBC folder")
    p.add_argument("--bccd", default=os.path.join(DATA, "bccd"), help="the BCCD folder")
    p.add_argument("--sizes", type=int, nargs="+", default=[30, 50, 100, 200, 400, 800, 1600])
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--pool", type=int, default=4000, help="training-split images drawn from")
    p.add_argument("--max-images", type=int,
                   help="at most N held-out and N BCCD images (smoke)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    import torch
    from sklearn.metrics import roc_auc_score

    from engine.models import Predictor, create_model
    from engine.models.ood import MIN_DENSITY_IMAGES, cross_fitted, fit_density, usable_dims
    from engine.slides.smear import bccd_white_cells
    from engine.train.data import load_cell_images, read_labels
    from jobs.train_cell_classifier import split_for_training

    t0 = time.time()
    model = create_model("deepheme-resnext50")
    codes = list(model.class_codes)
    data, _, _, _, dev_idx, test_rows = split_for_training(read_labels(args.data),
                                                           {"IG", "NEU"}, 0.15, 0)
    pool = [i for i in dev_idx if data.codes[i] in codes]
    pool = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))[:args.pool]]
    predictor = Predictor(model)

    def features(images: np.ndarray) -> np.ndarray:
        return np.concatenate([predictor.embed(np.ascontiguousarray(images[i:i + 128]))
                               for i in range(0, len(images), 128)]).astype(np.float64)

    def cells(paths) -> np.ndarray:  # PBC's pixel size, as the reference took it
        return features(load_cell_images(paths, 0.1, model.spec.input_mpp,
                                         model.spec.input_px))

    x = cells([data.paths[i] for i in pool])
    y = np.array([codes.index(data.codes[i]) for i in pool])
    unseen = cells([path for path, code in test_rows if code in codes][:args.max_images])
    other = features(bccd_white_cells(args.bccd, mpp=0.082, limit=args.max_images)
                     [:args.max_images])
    seconds_features = time.time() - t0

    def score(density) -> tuple[float, float, float]:
        d_in, d_out = (density.distance(torch.from_numpy(f)).numpy() for f in (unseen, other))
        truth = np.r_[np.zeros(len(d_in)), np.ones(len(d_out))]
        return (float(np.mean(d_in > density.threshold)),
                float(np.mean(d_out > density.threshold)),
                float(roc_auc_score(truth, np.r_[d_in, d_out])))

    def held_out_quarter(xs, ys, n_classes):
        n_fit = len(xs) * 3 // 4
        density = fit_density(xs[:n_fit], ys[:n_fit], n_classes,
                              dims=usable_dims(n_fit, 128))
        return density.with_threshold(torch.from_numpy(xs[n_fit:]), 0.99)

    def cross(xs, ys, n_classes):
        return cross_fitted(xs, ys, n_classes, dims=128, quantile=0.99)

    rng = np.random.default_rng(0)
    by_images = {}
    for n in (n for n in args.sizes if n <= len(x)):
        scores = {"held_out_quarter": [], "cross_fitted": []}
        failed = dict.fromkeys(scores, 0)
        for _ in range(args.draws):
            idx = rng.choice(len(x), n, replace=False)
            present, ys = np.unique(y[idx], return_inverse=True)  # the lab's classes
            for name, fit in (("held_out_quarter", held_out_quarter), ("cross_fitted", cross)):
                try:
                    density = fit(x[idx], ys, len(present))
                except ValueError:  # a class absent from the fit
                    failed[name] += 1
                    continue
                scores[name].append(score(density))
        by_images[str(n)] = {name: {
            "fitted": len(s), "failed": failed[name],
            "held_out_split_flagged": _spread([v[0] for v in s]),
            "bccd_flagged": _spread([v[1] for v in s]),
            "auroc": _spread([v[2] for v in s])} for name, s in scores.items()}
        print(f"n={n}: " + "; ".join(
            f"{name} {r['held_out_split_flagged'].get('median')} / "
            f"{r['bccd_flagged'].get('median')}" for name, r in by_images[str(n)].items()),
            file=sys.stderr, flush=True)
    result = {**result_head("ood_spread"), "pool_images": len(x), "held_out_split": len(unseen),
              "bccd_white_cells": len(other), "draws": args.draws, "quantile": 0.99,
              "min_density_images": MIN_DENSITY_IMAGES, "by_images": by_images,
              "seconds_features": round(seconds_features, 1),
              "seconds": round(time.time() - t0, 1)}
    write_result(result, f"ood_spread-{result['hardware']}-{result['date']}", args.tag)
    return result


if __name__ == "__main__":
    main()
