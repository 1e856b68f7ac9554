"""A gallery of one slide's classified cells, a row per class, for review by a hematologist.

    python -m jobs.cell_gallery --output <process_slides or classify_cells output>
        --slide <slide_id, file or folder name> [--per-class 16]
        [--order random | confident | uncertain | far | blurred | disagree]
        [--kind nucleated | platelet | all]
        [--saliency gradcam | smoothgrad]
        [--png <file>] [--seed 0]

Reads the slide's rows of the ``cells`` and ``slides`` tables, reads each chosen cell's crop
back from the slide (96 px at 0.25 µm/px, as the classifier saw it) and writes a PNG: one row per
class code, with its name and count, each crop captioned with the class probability. ``random``
(the default) shows what the counts are made of; ``uncertain`` the least confident calls, where
review pays most; ``far`` the cells least like the classifier's training data (largest
``ood_distance``), which is where a slide flagged ``out_of_distribution`` goes wrong;
``blurred`` the cells with the most blurred edges (``blur_um``, `engine.focus`) first, each
captioned with its blur, to see what a slide flagged ``out_of_focus`` left out. ``--kind``
picks the detections shown: ``nucleated`` (the default: what the differential counts),
``platelet`` (the platelet-sized ones, by the classifier's call) or ``all``. The slide
must still be where the run read it (its ``uri``). On a ``classify_cells`` output the slide is
an exported folder, and its cells are its images (``image_cells``), read as the job read them;
``disagree`` shows those whose call is not what the analyser's class folder says, the most
confident first, each captioned with the folder's label.

``--saliency`` adds under each row where the run's classifier (from the output's
``config.json``; an ensemble's maps are averaged) looked for that call
(`engine.models.saliency`): ``gradcam`` (coarse, class-specific) or ``smoothgrad``
(pixel-fine, slower: 16 passes per crop). It needs the run's checkpoint where the run read it.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from engine.schema import EXPORT_FORMAT
from jobs.common import (add_storage_args, committed_slide, count_arg, fail, job_main,
                         storage_from_args, without_lobes)

CROP_PX, CROP_MPP = 96, 0.25
METHOD_NAMES = {"gradcam": "Grad-CAM", "smoothgrad": "SmoothGrad"}


def disagreeing(cells):
    """The cells of an export whose call is not what the analyser's folder (``source_label``)
    says, where that folder names a class, lineage or PBC label; and the labels it could not
    read."""
    import polars as pl

    from engine.report.agreement import category_codes

    known, unread = {}, set()
    for label in cells["source_label"].drop_nulls().unique().to_list():
        try:
            known[label] = category_codes(label)
        except KeyError:
            unread.add(label)
    judged = cells.filter(pl.col("source_label").is_in(list(known)))
    agree = [code in known[label] for code, label in zip(judged["class_code"],
                                                         judged["source_label"])]
    return judged.filter(~pl.Series(agree, dtype=pl.Boolean)), sorted(unread)


SORTED_BY = {"far": "ood_distance", "blurred": "blur_um"}  # orders by a column, largest first


def choose(cells, per_class: int, order: str, seed: int) -> dict[str, object]:
    """``class_code -> rows`` to show: up to ``per_class`` of each class, by ``order``
    (``disagree``: the cells given, most confident first)."""
    import polars as pl

    out = {}
    if order == "random":  # one shuffle of them all: each class's first are a random pick of
        # it. A draw per class with one seed took the same places in each class's rows, which
        # come slide by slide: every class's cells from the same slides
        cells = cells.sample(fraction=1.0, shuffle=True, seed=seed)
    for code in sorted(set(cells["class_code"].to_list()) - {""}):
        rows = cells.filter(pl.col("class_code") == code)
        if order in ("far", "blurred"):
            rows = rows.sort(SORTED_BY[order], descending=True, nulls_last=True)
        elif order != "random":
            rows = rows.sort("class_prob", descending=order in ("confident", "disagree"))
        out[code] = rows.head(per_class)
    return out


def read_crops(reader, rows, mpp: float, size: tuple[int, int], px: int = CROP_PX
               ) -> np.ndarray:
    """``(N, px, px, 3) uint8``: each cell's surroundings at 0.25 µm/px (96 px: what the
    classifier saw), read at level 0."""
    import cv2

    side = max(1, int(round(px * CROP_MPP / mpp)))
    regions = [(int(np.clip(round(x - side / 2), 0, max(size[0] - side, 0))),
                int(np.clip(round(y - side / 2), 0, max(size[1] - side, 0))),
                min(side, size[0]), min(side, size[1]))
               for x, y in zip(rows["x"].to_list(), rows["y"].to_list())]
    if hasattr(reader, "prefetch"):  # a sparse copy (`open_slide(sparse=True)`) fetches by range
        reader.prefetch(0, regions)
    crops = [cv2.resize(np.ascontiguousarray(reader.read_region(0, *r)), (px, px),
                        interpolation=cv2.INTER_AREA) for r in regions]
    return np.stack(crops) if crops else np.zeros((0, px, px, 3), np.uint8)


def read_export_crops(folder: str, rows, mpp: float, storage) -> np.ndarray:
    """``(N, 96, 96, 3) uint8``: the chosen images of an exported slide, resampled from its
    µm/px to 0.25 and centre-cropped, as ``classify_cells`` gave them to the classifier."""
    from engine.train.data import load_cell_image
    from jobs.common import image_source

    crops = [load_cell_image(image_source(f"{folder.rstrip('/')}/{path}", storage), mpp,
                             CROP_MPP, CROP_PX) for path in rows["path"].to_list()]
    return np.stack(crops) if crops else np.zeros((0, CROP_PX, CROP_PX, 3), np.uint8)


def run_classifiers(doc: dict, storage) -> list:
    """The classifier(s) a run used, from its ``config.json`` (process_slides: the
    ``pipeline.classifier`` block, an ensemble's members; classify_cells: its model and
    weights).

    Raises:
        ValueError: the run used random weights, whose maps would say nothing.
    """
    from engine.models import create_model

    if doc.get("job") == "classify_cells":
        s = doc["settings"]
        name, checkpoints = s["model"], [s["weights"]]
    else:
        c = doc["config"]["pipeline"]["classifier"]
        name, checkpoints = c["model"], [c.get("checkpoint"), *c.get("ensemble", [])]
    if "untrained" in checkpoints:  # classify_cells' record; a process_slides run's random
        # weights are no checkpoint, and create_model refuses them (MissingWeights)
        raise ValueError("the run's classifier had random weights (--allow-untrained): "
                         "saliency of an untrained model says nothing")
    return [create_model(name, None, hub=True) if str(ckpt).startswith("hub:")
            else create_model(name, ckpt, storage=storage) for ckpt in checkpoints]


def saliency_rows(method: str, models: list, crops: dict) -> dict:
    """``class_code -> (N, 96, 96, 3) uint8`` overlays: each crop with the map of its call,
    averaged over the members of an ensemble."""
    from engine.models.saliency import saliency
    from engine.report.plots import heatmap_overlay

    out, codes = {}, models[0].class_codes
    for code, images in crops.items():
        if not len(images):
            continue
        if code not in codes:
            raise ValueError(f"class {code} is not one of the run's classifier's codes "
                             f"{list(codes)}: was the output made with another checkpoint?")
        target = np.full(len(images), codes.index(code))
        maps = np.mean([saliency(method, m, images, target)[0] for m in models], axis=0)
        out[code] = heatmap_overlay(images, maps)
    return out


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.cell_gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True,
                   help="a process_slides or classify_cells output folder or s3:// prefix")
    p.add_argument("--slide", required=True,
                   help="slide_id, or the slide's file name (an export's or a DICOM "
                        "series' folder name)")
    p.add_argument("--per-class", type=count_arg(), default=16)
    p.add_argument("--order", default="random",
                   choices=("random", "confident", "uncertain", "far", "blurred", "disagree"))
    p.add_argument("--kind", default="nucleated", choices=("nucleated", "platelet", "all"),
                   help="the detections to show (a process_slides output): nucleated (what "
                        "the differential counts), platelet or all")
    p.add_argument("--saliency", choices=("gradcam", "smoothgrad"),
                   help="add each crop's saliency map of its call, under its row")
    p.add_argument("--png", help="where to write (default: <slide_id>-gallery.png here)")
    p.add_argument("--seed", type=int, default=0)
    add_storage_args(p)
    args = p.parse_args(argv)

    import polars as pl

    from engine.classes import get_class
    from engine.errors import HemeflowError
    from engine.pipeline.commit import OutputStore
    from engine.report.plots import plot_cell_gallery
    from engine.slides import open_slide

    storage = storage_from_args(args)
    store = OutputStore(args.output, storage)
    fs = store.fs

    def path(*parts: str) -> str:
        return "/".join([store.path.rstrip("/"), *parts])

    try:
        slide = committed_slide(store, args.slide)
        sid = slide["slide_id"]
        export = slide["format"] == EXPORT_FORMAT
        table = "image_cells" if export else "cells"
        if not fs.exists(path(table, f"{sid}.parquet")):
            return fail(f"slide {sid} has no {table} table in {args.output} (no cell stage "
                        "ran: the slide failed, or its specimen type has none)")
        with fs.open(path(table, f"{sid}.parquet"), "rb") as fh:
            cells = pl.read_parquet(fh)
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    if args.kind != "all" and "kind" in cells.columns:  # an export's images have no kind
        cells = cells.filter(pl.col("kind") == args.kind)
    cells = without_lobes(cells)  # a cell found as two nuclei is shown once
    unclassified = cells["class_code"].null_count()
    if unclassified:  # platelets the run did not classify (pipeline.classifier.platelets)
        print(f"{unclassified} platelet-sized detection(s) not classified by the run are not "
              f"shown (pipeline.classifier.platelets: false)")
        cells = cells.filter(pl.col("class_code").is_not_null())
    if cells.is_empty():
        return fail(f"slide {sid} has no {'' if args.kind == 'all' else args.kind + ' '}"
                    f"cells in {args.output}")
    if args.order == "far" and ("ood_distance" not in cells.columns
                                or cells["ood_distance"].is_null().all()):
        return fail(f"slide {sid}'s cells have no distance to the training data: the run's "
                    "checkpoint carries no feature density (python -m jobs.fit_cell_ood)")
    if args.order == "blurred" and ("blur_um" not in cells.columns
                                    or cells["blur_um"].is_null().all()):
        return fail(f"slide {sid}'s cells have no blur measured (cells.max_blur_um: null in "
                    "the run's config, or an output made before hemeflow measured focus)")
    shown = len(cells)
    if args.order == "disagree":
        if not export or cells["source_label"].is_null().all():
            return fail(f"slide {sid} has no analyser's labels to disagree with: --order "
                        "disagree is for classify_cells outputs of exports in class folders")
        cells, unread = disagreeing(cells)
        if unread:
            print(f"folders that name no class (left out): {', '.join(unread)}",
                  file=sys.stderr)
        print(f"{len(cells)} of {shown} cells called other than their folder says")
        if cells.is_empty():
            return 0
    mpp = (slide["mpp_x"] + slide["mpp_y"]) / 2
    picked = choose(cells, args.per_class, args.order, args.seed)
    try:
        models = []
        if args.saliency:
            with fs.open(path("config.json")) as fh:
                models = run_classifiers(json.load(fh), storage)
        if export:
            crops = {code: read_export_crops(slide["uri"], chosen, mpp, storage)
                     for code, chosen in picked.items()}
        else:
            with open_slide(slide["uri"], storage, keep=False, sparse=True) as reader:
                crops = {code: read_crops(reader, chosen, mpp, (slide["width"], slide["height"]))
                         for code, chosen in picked.items()}
        maps = saliency_rows(args.saliency, models, crops) if args.saliency else {}
    except (OSError, ValueError, KeyError, HemeflowError) as err:  # checkpoint errors too
        return fail(f"{sid}: {type(err).__name__}: {err}")
    rows = []
    for code, chosen in picked.items():
        count = int((cells["class_code"] == code).sum())
        probs = chosen["class_prob"].to_numpy()
        if args.order == "disagree":  # what the analyser said, and the call's probability
            probs = [f"[{lab}] {p:.2f}" for lab, p in zip(chosen["source_label"], probs)]
        elif args.order == "blurred":  # the cell's blur, and the call's probability
            probs = [f"{b:.2f}µm {p:.2f}" for b, p in zip(chosen["blur_um"].fill_null(np.nan),
                                                         probs)]
        rows.append((f"{code} {get_class(code).name}\n{count} cells", crops[code], probs))
        if code in maps:
            rows.append((METHOD_NAMES[args.saliency], maps[code], None))
    png = args.png or f"{sid}-gallery.png"
    what = "" if export or args.kind == "all" else f" {args.kind}"
    plot_cell_gallery(rows, png, title=f"{sid}: {shown}{what} cells, {args.order} "
                                       f"{args.per_class} per class"
                                       + (" (a row per call; caption: [the folder's label] "
                                          "the call's probability)"
                                          if args.order == "disagree" else "")
                                       + (f", {METHOD_NAMES[args.saliency]}" if maps else ""))
    print(f"wrote {png}: {len(picked)} classes, {sum(len(c) for c in crops.values())} cells"
          + (f", with {METHOD_NAMES[args.saliency]} maps" if maps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
