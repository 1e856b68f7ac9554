"""Evaluate a cell classifier (or an ensemble of fold models) on labelled cell images.

    python -m jobs.evaluate_cell_classifier --checkpoint <model.safetensors> [--checkpoint …]
        --data <dir with labels.csv: path,code> [--data …] [--source-mpp 0.1] [--plots <dir>]
        [--saliency N] [--blur-um S] [--hue-shift DEG] [--saturation X]
        [--compare-to <baseline.safetensors> …] [--bootstrap N]

Prints one JSON document to stdout: accuracy, macro F1, mean one-vs-rest AUC, per-class
precision/recall/F1/AUC/support, how many classes have precision and recall above 0.8, group-level
accuracy for rows labelled only with a group code, and rows whose codes the model does not cover.
Writes confusion.png, reliability.png (how far ``class_prob`` can be read as the chance a call is
right: ``calibration`` in the JSON) and umap.png (penultimate features coloured by class) under
--plots, and with ``--saliency N`` errors.png: per true class its N most confident wrong calls, each
with the Grad-CAM of the call and of the true class (`engine.models.saliency`), to see what the
model took for the wrong class's sign. ``focus`` says how blurred the cells are as the model gets
them (`engine.focus`); ``--blur-um S`` blurs them first, at their own pixels, to measure what a
region out of focus does to the calls. ``--hue-shift DEG`` and ``--saturation X`` turn their
colours first (hue by DEG degrees, saturation times X), as another lab's stain or scanner
would: how far the calls hold (``shift`` in the JSON says what was done). With
``--compare-to``, both models get the same shifted images.

A test split is a sample, so ``ci95`` gives each figure's 95 % interval over image-level
bootstrap resamples (``--bootstrap``, 2,000). ``--compare-to`` scores a baseline (the reference
checkpoint, or a model before fine-tuning) on the same images and reports, in ``comparison``,
its figures and the paired differences (this model minus the baseline) with their intervals and
the share of resamples in which this model scores higher: a change whose interval holds 0 is
one this split cannot tell from chance. ``--compare-source-mpp`` gives the baseline the images
at the pixel size it was trained to assume, where the two models assume different ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from engine.errors import CheckpointError
from engine.train.data import Shift
from engine.train.metrics import BOOTSTRAP_RESAMPLES
from jobs.common import (add_data_arg, add_storage_args, count_arg, job_main, labelled_data,
                         mpp_arg, number_arg, storage_from_args)


# argparse types of the shifts (`engine.train.data.Shift`): their plausible ranges
def hue_arg(text: str) -> float:
    return number_arg(text, lambda v: -180 <= v <= 180, "degrees from -180 to 180")


def saturation_arg(text: str) -> float:
    return number_arg(text, lambda v: 0 <= v <= 10, "a factor from 0 to 10")


def blur_arg(text: str) -> float:
    return number_arg(text, lambda v: 0 <= v <= 5, "a sigma in µm from 0 to 5")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate_cell_classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="safetensors checkpoint (repeat for an ensemble: probabilities averaged)")
    add_data_arg(p, "folder or s3:// prefix with labels.csv (path,code)")
    p.add_argument("--source-mpp", type=mpp_arg,
                   help="µm/px of the images, or auto: measured on their red cells (default: a "
                        "pack's own, from its pack.json, as a train job's test split has; else "
                        "0.1)")
    p.add_argument("--plots", default="hemeflow-eval", help="folder for confusion.png, umap.png")
    p.add_argument("--no-tta", action="store_true", help="no test-time rotations/flips")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure")
    p.add_argument("--saliency", type=count_arg(0), default=0, metavar="N",
                   help="errors.png: per class its N most confident wrong calls with the "
                        "Grad-CAM of the call and of the true class")
    p.add_argument("--blur-um", type=blur_arg, default=0.0, metavar="SIGMA",
                   help="blur each image at its own pixels by a Gaussian of this sigma (µm) "
                        "before resampling: how the model fares on cells a scanner left out "
                        "of focus (the report's 'focus' says how many cells.max_blur_um flags)")
    p.add_argument("--hue-shift", type=hue_arg, default=0.0, metavar="DEG",
                   help="turn each image's hue by this many degrees (-180 to 180) before "
                        "resampling: how the model fares on another lab's stain or scanner")
    p.add_argument("--saturation", type=saturation_arg, default=1.0, metavar="X",
                   help="multiply each image's saturation by X (0.6: a paler stain; 1.4: a "
                        "deeper one; 0: grey) before resampling")
    p.add_argument("--compare-to", action="append", default=[], metavar="CHECKPOINT",
                   help="a baseline scored on the same images (repeat for an ensemble): "
                        "paired differences with 95 %% intervals in 'comparison'")
    p.add_argument("--compare-source-mpp", type=float, default=None, metavar="MPP",
                   help="the images' µm/px as the baseline was trained to take them (default: "
                        "--source-mpp): each model gets them resampled as it was trained")
    p.add_argument("--bootstrap", type=count_arg(0), default=BOOTSTRAP_RESAMPLES, metavar="N",
                   help="image-level bootstrap resamples for the 95 %% intervals (0: none; "
                        "default %(default)s)")
    p.add_argument("--batch-size", type=count_arg(), default=256)
    p.add_argument("--fp32", action="store_true",
                   help="float32 throughout (default: bf16 autocast on CUDA and on CPUs with "
                        "native bf16; the report's 'precision' says which ran)")
    add_storage_args(p)
    return p.parse_args(argv)


def load(checkpoint: str, storage):
    """A classifier checkpoint built as its card names it."""
    from engine.models import create_model, read_checkpoint  # torch: not for --help

    _, card = read_checkpoint(checkpoint, storage)
    return create_model(card["name"], checkpoint, storage=storage)


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    from engine.train.evaluation import check_comparable, evaluate_classifier

    storage = storage_from_args(args)
    try:
        models = [load(ckpt, storage) for ckpt in args.checkpoint]
        baseline = [load(ckpt, storage) for ckpt in args.compare_to]
        if baseline:
            check_comparable(models[0], baseline[0])
        data = labelled_data(args)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    report, arrays = evaluate_classifier(models, data, args.source_mpp, args.batch_size,
                                         tta=not args.no_tta, amp=not args.fp32,
                                         shift=Shift(args.blur_um, args.hue_shift,
                                                     args.saturation),
                                         bootstrap=args.bootstrap,
                                         baseline=baseline, baseline_mpp=args.compare_source_mpp)
    report["data"] = args.data_source  # what was given: a folder or prefix, or a list of them
    os.makedirs(args.plots, exist_ok=True)
    from engine.report.plots import plot_confusion, plot_reliability, plot_umap

    if report.get("confusion_matrix"):
        plot_confusion(report["confusion_matrix"], report["class_codes"],
                       os.path.join(args.plots, "confusion.png"),
                       f"{report['model']}: macro F1 {report['macro_f1']:.3f}")
        report["confusion_png"] = os.path.join(args.plots, "confusion.png")
        plot_reliability(report["calibration"], os.path.join(args.plots, "reliability.png"),
                         report["model"])
        report["reliability_png"] = os.path.join(args.plots, "reliability.png")
    if not args.no_umap and len(data) >= 10:
        plot_umap(arrays["features"], list(data.codes), os.path.join(args.plots, "umap.png"),
                  title=f"{report['model']} penultimate features")
        report["umap_png"] = os.path.join(args.plots, "umap.png")
    if args.saliency > 0 and report.get("class_codes"):
        path = os.path.join(args.plots, "errors.png")
        report["errors_png"] = path if plot_errors(models, data, arrays, args.source_mpp,
                                                   args.saliency, path) else None
    print(json.dumps(report, indent=2))
    return 0


def plot_errors(models, data, arrays: dict, source_mpp: float, per_class: int, path: str
                ) -> bool:
    """errors.png: for each true class, its ``per_class`` most confident wrong calls, then the
    Grad-CAM of each call and of the true class (an ensemble's maps averaged). False where the
    model made no error."""
    import numpy as np

    from engine.models.saliency import grad_cam
    from engine.report.plots import heatmap_overlay, plot_cell_gallery
    from engine.train.data import load_cell_images

    codes, spec = list(models[0].class_codes), models[0].spec
    probs, y = arrays["probs"], arrays["y"]
    called = probs.argmax(1)
    rows = []
    for k, code in enumerate(codes):
        every = np.flatnonzero((y == k) & (called != k))
        if not len(every):
            continue
        wrong = every[np.argsort(-probs[every, called[every]], kind="stable")][:per_class]
        crops = load_cell_images([data.paths[i] for i in wrong], source_mpp, spec.input_mpp,
                                 spec.input_px)

        def cam(target, crops=crops):
            return heatmap_overlay(crops, np.mean([grad_cam(m, crops, target)[0]
                                                   for m in models], axis=0))

        rows += [(f"{code}: {len(every)} of {int((y == k).sum())} wrong", crops,
                  [f"{codes[c]} {probs[i, c]:.2f}" for i, c in zip(wrong, called[wrong])]),
                 ("Grad-CAM of the call", cam(called[wrong]), None),
                 (f"Grad-CAM of {code}", cam(np.full(len(wrong), k)), None)]
    if rows:
        plot_cell_gallery(rows, path, title=f"{spec.name}: the most confident wrong calls "
                                            "(caption: the call and its probability)")
    return bool(rows)


if __name__ == "__main__":
    sys.exit(main())
