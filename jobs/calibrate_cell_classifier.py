"""Fit a softmax temperature, or per-class logit offsets, on the validation split a checkpoint
was trained with, and write a checkpoint with them (``engine.train.calibration``).

    python -m jobs.calibrate_cell_classifier --checkpoint <ckpt.safetensors> --data <dir with
        labels.csv> --output <new.safetensors> [--offsets] [--source-mpp 0.1] [--seed 0]
        [--test-fraction 0.15] [--exclude-codes IG,NEU] [--folds 1] [--fold 0] [--no-tta]

The split is rebuilt exactly as ``jobs.train_cell_classifier`` made it (same seed, test fraction,
excluded codes and folds): the fit sees that fold's validation images only, never the test rows.

By default it fits the temperature that makes the probabilities honest (by likelihood; it
moves no call) and records it in the card, where loading applies it; the weights are copied as
they are (``--temperature`` says the same). ``--offsets``: per-class offsets that maximise
validation macro F1 are folded into the final bias instead (they move the calls). Offsets were
the default until release 0.8.15: on the reference's 1,337 held-out PBC images, offsets fitted
on n of them (30 to 668, 200 draws each) lowered macro F1 on the others in 14-59 % of the draws
and raised it in 0-15 % (``benchmarks/offset_spread.py``). Prints JSON: what was fitted, and
validation metrics (with the calibration error) before and after. Score the result on the test
split with ``jobs.evaluate_cell_classifier --compare-to`` the checkpoint it started from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import numpy as np

from jobs.common import job_main, labelled_data, refit_parser, storage_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = refit_parser("jobs.calibrate_cell_classifier", __doc__,
                     "the calibrated checkpoint (.safetensors)")
    p.add_argument("--folds", type=int, default=1)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--no-tta", action="store_true", help="fit on single views")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--temperature", action="store_true",
                     help="fit a softmax temperature (calibrated class_prob; calls unchanged): "
                          "the default")
    fit.add_argument("--offsets", action="store_true",
                     help="fit per-class logit offsets on validation macro F1 instead, folded "
                          "into the final bias (they move calls; seldom better on other "
                          "images: benchmarks/offset_spread.py)")
    return p.parse_args(argv)


def validation_rows(args) -> tuple[list[str], np.ndarray, list[str], set[str]]:
    """``(paths, y, codes, test_paths)`` of the fold's validation split."""
    from engine.train.splits import kfold_splits
    from jobs.train_cell_classifier import split_for_training

    data = labelled_data(args)  # auto: measured on all its images, as the train job did
    excluded = {c.strip() for c in args.exclude_codes.split(",") if c.strip()}
    trainable, codes, y, groups, dev_idx, test_rows = split_for_training(
        data, excluded, args.test_fraction, args.seed)
    folds = kfold_splits(y[dev_idx], args.folds, args.seed,
                         groups[dev_idx] if groups is not None else None)
    val = dev_idx[folds[args.fold][1]]
    return [trainable.paths[i] for i in val], y[val], codes, {p for p, _ in test_rows}


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from engine.models import create_model
    from engine.models.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
    from engine.train.calibration import (calibrate, classifier_bias_key, fit_temperature_on,
                                          too_few_for_temperature)
    from engine.train.data import load_cell_images

    storage = storage_from_args(args)
    try:
        state, card = read_checkpoint(args.checkpoint, storage)
        model = create_model(card["name"], args.checkpoint, storage=storage, calibrated=False)
        paths, y, codes, test_paths = validation_rows(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    if list(codes) != list(model.class_codes):
        print(f"hemeflow: error: the split's classes {codes} are not the checkpoint's "
              f"{list(model.class_codes)}: check --data, --exclude-codes", file=sys.stderr)
        return 2
    assert not set(paths) & test_paths, "validation rows overlap the test split"
    spec = model.spec
    images = load_cell_images(paths, args.source_mpp, spec.input_mpp, spec.input_px)
    split = {"seed": args.seed, "test_fraction": args.test_fraction,
             "exclude_codes": args.exclude_codes, "folds": args.folds, "fold": args.fold}
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    card = dict(card)
    card.pop("metrics", None)  # earlier test metrics describe the model before this fit
    if not args.offsets:
        if why := too_few_for_temperature(len(y)):
            print(f"hemeflow: warning: {why}: give more validation images (--data), or keep "
                  "the checkpoint as it is", file=sys.stderr, flush=True)
        card["temperature"] = {
            "method": "softmax temperature fitted by likelihood on the validation split"
                      + ("" if args.no_tta else " (8-view TTA)") + "; the final layer is "
                      "divided by it when the checkpoint is loaded",
            "from_checkpoint": args.checkpoint, "n_val": int(len(y)), "split": split,
            "created": created, **fit_temperature_on(model, images, y, tta=not args.no_tta)}
        write_checkpoint(state, card, args.output, storage)
        print(json.dumps(card["temperature"], indent=2))
        return 0
    result = calibrate(model, images, y, tta=not args.no_tta)
    key = classifier_bias_key(model)
    offsets = np.array([result["offsets"][c] for c in codes], np.float32)
    bias = state[key]
    state[key] = (bias.float() + torch.from_numpy(offsets)).to(bias.dtype)
    card["calibration"] = {
        "method": "per-class logit offsets added to the final bias, fitted by coordinate "
                  "ascent on validation macro F1" + ("" if args.no_tta else " (8-view TTA)"),
        "bias_key": key, "from_checkpoint": args.checkpoint, "n_val": int(len(y)),
        "split": split, "created": created, **result}
    write_checkpoint(state, card, args.output, storage)
    print(json.dumps(card["calibration"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
