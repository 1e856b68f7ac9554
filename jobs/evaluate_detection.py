"""Measure nucleated-cell detection against Pascal VOC white-cell boxes (BCCD-style data), and
platelet detection against the platelet boxes.

    python -m jobs.evaluate_detection --images <dir> --annotations <dir of VOC xml> --mpp 0.075
        [--specimen blood | aspirate | unknown] [--config <yaml>]

A detection matches a WBC box when its centroid falls inside it; each box matches at most one
detection and each detection at most one box. Prints JSON: recall, precision, F1, counts, and the
images with misses or extra detections; under ``platelets`` the same for ``platelet``
detections against ``Platelets`` boxes (BCCD's annotators left many platelets unboxed, so there
the precision is a floor). ``--specimen`` (blood, BCCD's) detects as the pipeline does on a
slide of that type: pale platelets are looked for, and a cell's platelet-sized nuclear parts
joined (`cells.nucleus_body_ratio`), on `cells.pale_platelet_specimens` only, and pale nuclei
on `cells.pale_nucleus_specimens` too (aspirates). ``--config``
takes the ``cells:`` section of a YAML config, the file ``process_slides --config`` takes, so
a lab can measure a detector setting on its own boxed fields before it runs an archive with it
(the JSON's ``detector`` says what ran).
Each image is treated as its own slide (the stain threshold is estimated from it), since fields
of unknown origin share no slide.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml
from PIL import Image

from engine.cells import (KIND_CELL, KIND_PLATELET, PALE_ALL, detect_cells, estimate_threshold,
                          match_centroids, pale_pass)
from engine.config import CellDetectionConfig
from engine.specimen import SPECIMENS
from engine.slides.annotations import read_voc_boxes
from jobs.common import config_from_yaml, fail, job_main, mpp_arg, resolve_source_mpp


def evaluate_image(image_path: str, xml_path: str, mpp: float, cfg: CellDetectionConfig,
                   pale: str = PALE_ALL) -> dict:
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    det = detect_cells(rgb, mpp, estimate_threshold([rgb], cfg), cfg, pale)
    out = {"image": os.path.basename(image_path)}
    for key, kind, name in (("", KIND_CELL, "WBC"), ("platelet_", KIND_PLATELET, "Platelets")):
        found = det.select(det.kind == kind)
        boxes = read_voc_boxes(xml_path, name)
        matched, missed, extra = match_centroids(found.x, found.y, boxes)
        out.update({f"{key}boxes": len(boxes), f"{key}detections": len(found),
                    f"{key}matched": matched, f"{key}missed": len(missed),
                    f"{key}extra": len(extra)})
    return out


def _scores(rows: list[dict], key: str = "") -> dict:
    """Counts, recall, precision and F1 summed over the images' ``key``-prefixed counts."""
    boxes, matched, dets = (sum(r[key + k] for r in rows) for k in ("boxes", "matched",
                                                                    "detections"))
    recall = matched / boxes if boxes else 0.0
    precision = matched / dets if dets else 0.0
    return {"boxes": boxes, "detections": dets, "matched": matched, "recall": recall,
            "precision": precision,
            "f1": 2 * recall * precision / (recall + precision) if recall + precision else 0.0}


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate_detection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--mpp", type=mpp_arg, required=True,
                   help="µm per pixel of the images, or auto: measured on their red cells")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--specimen", choices=sorted(SPECIMENS), default="blood",
                   help="the images' specimen type: detect as on a slide of that type")
    p.add_argument("--config", help="YAML config whose cells: section the detector takes "
                   "(as process_slides --config; jobs/configs/default.yaml)")
    args = p.parse_args(argv)
    try:
        cfg = config_from_yaml(args.config).cells
    except (OSError, ValueError, yaml.YAMLError) as err:  # ConfigError is a ValueError
        return fail(str(err))
    mode = pale_pass(args.specimen, cfg)
    for flag, folder in (("--images", args.images), ("--annotations", args.annotations)):
        if not os.path.isdir(folder):
            return fail(f"{flag} {folder}: not a folder")
    pairs = []
    for name in sorted(os.listdir(args.images)):
        stem, ext = os.path.splitext(name)
        xml = os.path.join(args.annotations, stem + ".xml")
        if ext.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff") and os.path.exists(xml):
            pairs.append((os.path.join(args.images, name), xml))
    if not pairs:
        print(f"hemeflow: error: no image with a matching .xml under {args.images}",
              file=sys.stderr)
        return 2
    try:
        args.mpp = resolve_source_mpp(args.mpp, [image for image, _ in pairs])
    except ValueError as err:
        return fail(str(err))
    with ThreadPoolExecutor(args.threads) as pool:
        rows = list(pool.map(lambda pr: evaluate_image(*pr, args.mpp, cfg, mode), pairs))
    wbc = _scores(rows)
    report = {
        "images": len(rows), "wbc_boxes": wbc.pop("boxes"), **wbc,
        "platelets": _scores(rows, "platelet_"),
        "mpp": args.mpp, "pale_pass": mode, "detector": cfg.__dict__,
        "images_with_misses": [r["image"] for r in rows if r["missed"]],
        "images_with_extra_detections": [r["image"] for r in rows if r["extra"]],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
