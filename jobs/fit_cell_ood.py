"""Give a cell classifier's checkpoint a feature density, so runs say which cells (and slides) lie
outside its training data (``engine.models.ood``).

    python -m jobs.fit_cell_ood --checkpoint <float.safetensors> --data <dir with labels.csv>
        --output <with-density.safetensors> [--source-mpp 0.1 | auto] [--seed 0]
        [--test-fraction 0.15] [--exclude-codes IG,NEU] [--fit-images 3000]
        [--held-out-images 1000] [--dims 128] [--quantile 0.99]

The training split is rebuilt exactly as ``jobs.train_cell_classifier`` made it (same seed, test
fraction and excluded codes). Class centres and the within-class covariance are fitted on
``--fit-images`` of its images; the threshold is the ``--quantile`` of the distances of
``--held-out-images`` other training-split images, so about 1 % of in-distribution cells are
flagged by construction. With ``--held-out-images 0`` the fitting images set it themselves, each
by its distance under a density fitted without its fold (5-fold cross-fitting), as
``train_cell_classifier`` fits its checkpoints' densities: the choice for a few hundred labelled
cells, where a held-out share is too few to put a 99th percentile on. The test split then says
how many of its cells are flagged. The output is the same weights (same dtype) plus the density
under ``ood.`` keys, and the card with an ``ood`` section; prints that section as JSON. Quantize
after this step: the int8 checkpoint carries the density.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import numpy as np

from jobs.common import fail, float_classifier_split, job_main, refit_parser, storage_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = refit_parser("jobs.fit_cell_ood", __doc__, "the checkpoint to write (.safetensors)")
    p.add_argument("--fit-images", type=int, default=3000)
    p.add_argument("--held-out-images", type=int, default=1000,
                   help="0: the fitting images set the threshold, cross-fitted")
    p.add_argument("--dims", type=int, default=128, help="principal components kept")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="of held-out in-distribution distances: the threshold")
    p.add_argument("--batch-size", type=int, default=128)
    return p.parse_args(argv)


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from engine.models import CheckpointError, Predictor, write_checkpoint
    from engine.models.ood import PREFIX, fit_on_crops
    from engine.train.data import load_cell_images

    if not 0.5 <= args.quantile < 1:
        return fail(f"--quantile must be in [0.5, 1), got {args.quantile}")
    if args.held_out_images < 0:
        return fail(f"--held-out-images must be 0 or more, got {args.held_out_images}")
    try:
        state, card, model, trainable, dev_idx, test_rows = float_classifier_split(args)
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as err:
        return fail(str(err))
    codes = list(model.class_codes)
    spec = model.spec
    rows = [(trainable.paths[i], codes.index(trainable.codes[i])) for i in dev_idx
            if trainable.codes[i] in codes]
    rows = [rows[i] for i in np.random.default_rng(args.seed).permutation(len(rows))
            [:args.fit_images + args.held_out_images]]  # only the images the fit draws from
    crops = load_cell_images([p for p, _ in rows], args.source_mpp, spec.input_mpp,
                             spec.input_px)
    try:
        density, fitted = fit_on_crops(
            model, crops, np.array([y for _, y in rows]), fit_images=args.fit_images,
            held_out_images=args.held_out_images, dims=args.dims, quantile=args.quantile,
            seed=args.seed, batch_size=args.batch_size)
    except ValueError as err:
        return fail(f"{err}: change --fit-images, or give --held-out-images 0"
                    if args.held_out_images else str(err))
    test_paths = [p for p, c in test_rows if c in codes]
    flagged = None
    if test_paths:
        pred = Predictor(model)
        test = load_cell_images(test_paths, args.source_mpp, spec.input_mpp, spec.input_px)
        far = np.concatenate([density.distance(torch.from_numpy(pred.embed(
            test[i:i + args.batch_size]))).numpy() for i in range(0, len(test), args.batch_size)])
        flagged = float((far > density.threshold).mean())
    card = dict(card)
    card["ood"] = {
        **fitted, "from_checkpoint": args.checkpoint,
        "data": args.data_source, "source_mpp": args.source_mpp,
        "split": {"seed": args.seed, "test_fraction": args.test_fraction,
                  "exclude_codes": args.exclude_codes},
        "rows": "fit and threshold on the training split, never the test split",
        "test_split": {"n": len(test_paths), "flagged_fraction":
                       None if flagged is None else round(flagged, 4)},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    weights = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    write_checkpoint({**weights, **density.state_dict()}, card, args.output,
                     storage_from_args(args))
    print(json.dumps({"output": args.output, **card["ood"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
