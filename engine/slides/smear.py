"""A real blood-smear slide assembled from BCCD fields, with its white-cell boxes in slide
coordinates: the project's end-to-end test slide for cell detection.

Fields (640x480 at about 0.075 µm/px) are resampled to the slide's µm/px and laid out on a grid
with a glass-coloured gap; the result is a JPEG-tiled pyramidal TIFF with MPP in its tags.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from engine.slides.annotations import read_voc_boxes
from engine.slides.writer import write_pyramid_tiff

BCCD_MPP = 0.075


def build_bccd_smear(bccd_dir: str, out_path: str, n_fields: int = 24, cols: int = 6,
                     mpp: float = 0.25, gap_um: float = 20.0, start: int = 0) -> str:
    """Write the slide and ``<out_path stem>.wbc.csv`` (slide_x0, slide_y0, slide_x1, slide_y1,
    field) with every WBC box in level-0 pixels. Returns the CSV path."""
    names = sorted(n for n in os.listdir(os.path.join(bccd_dir, "JPEGImages"))
                   if n.endswith(".jpg"))[start : start + n_fields]
    scale = BCCD_MPP / mpp
    fw, fh = round(640 * scale), round(480 * scale)
    gap = round(gap_um / mpp)
    rows = -(-len(names) // cols)
    canvas = np.full((rows * (fh + gap) + gap, cols * (fw + gap) + gap, 3), (236, 232, 240),
                     np.uint8)  # pale glass
    boxes = []
    for i, name in enumerate(names):
        r, c = divmod(i, cols)
        ox, oy = gap + c * (fw + gap), gap + r * (fh + gap)
        with Image.open(os.path.join(bccd_dir, "JPEGImages", name)) as im:
            canvas[oy : oy + fh, ox : ox + fw] = np.asarray(
                im.convert("RGB").resize((fw, fh), Image.Resampling.LANCZOS))
        stem = os.path.splitext(name)[0]
        for x0, y0, x1, y1 in read_voc_boxes(os.path.join(bccd_dir, "Annotations", stem + ".xml")):
            boxes.append((ox + x0 * scale, oy + y0 * scale, ox + x1 * scale, oy + y1 * scale,
                          stem))
    write_pyramid_tiff(canvas, out_path, mpp, tile_px=256, quality=92)
    csv_path = os.path.splitext(out_path)[0] + ".wbc.csv"
    with open(csv_path, "w", newline="") as fh_:
        w = csv.writer(fh_)
        w.writerow(["x0", "y0", "x1", "y1", "field"])
        w.writerows(boxes)
    return csv_path


def bccd_white_cells(bccd_dir: str, mpp: float = BCCD_MPP, out_mpp: float = 0.25,
                     px: int = 96, limit: int | None = None) -> np.ndarray:
    """BCCD's annotated white cells cropped as the pipeline crops cells: ``(N, px, px, 3)
    uint8``, ``px`` square at ``out_mpp`` around each box's centre (white beyond the field),
    from fields at ``mpp``; fields in name order, up to the one that reaches ``limit`` cells."""
    crops = []
    for xml in sorted(n for n in os.listdir(os.path.join(bccd_dir, "Annotations"))
                      if n.endswith(".xml")):
        stem, image = os.path.splitext(xml)[0], None
        for x0, y0, x1, y1 in read_voc_boxes(os.path.join(bccd_dir, "Annotations", xml)):
            if image is None:
                image = Image.open(os.path.join(bccd_dir, "JPEGImages", stem + ".jpg"))
                image = image.convert("RGB")
            half = px / 2 * out_mpp / mpp
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            crop = Image.new("RGB", (round(2 * half),) * 2, (255, 255, 255))
            crop.paste(image.crop((round(cx - half), round(cy - half), round(cx + half),
                                   round(cy + half))))
            crops.append(np.asarray(crop.resize((px, px), Image.Resampling.BILINEAR)))
        if limit is not None and len(crops) >= limit:
            break
    return np.stack(crops)
