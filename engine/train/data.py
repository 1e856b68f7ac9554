"""Labelled single-cell images: read ``labels.csv`` and bring images to the model's µm/px."""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with class codes (and optional groups such as patient or slide ids)."""

    paths: tuple[str, ...]
    codes: tuple[str, ...]
    groups: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx) -> LabelledImages:
        idx = list(map(int, idx))
        return LabelledImages(tuple(self.paths[i] for i in idx), tuple(self.codes[i] for i in idx),
                              tuple(self.groups[i] for i in idx) if self.groups else None)


def labelled(rows: list[dict]) -> list[dict]:
    """The rows of a labels table with a code (an empty one is a cell not yet labelled)."""
    return [r for r in rows if (r.get("code") or "").strip()]


def read_labels(data_dir: str, csv_name: str = "labels.csv") -> LabelledImages:
    """``<data_dir>/labels.csv`` with ``path`` and ``code`` columns (``patient_id``, ``slide_id`` or
    ``group`` optional); relative paths are relative to ``data_dir``. A row with an empty code
    is not labelled (`jobs.export_cells` writes the rows for experts to fill) and is left out."""
    table = os.path.join(data_dir, csv_name)
    if not os.path.exists(table):
        raise FileNotFoundError(f"no {csv_name} in {data_dir} (expected columns: path,code)")
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"path", "code"} <= set(rows[0]):
        raise ValueError(f"{table} needs 'path' and 'code' columns")
    rows = labelled(rows)
    if not rows:
        raise ValueError(f"{table} has no row with a code: fill in the code column")
    group_col = next((c for c in ("patient_id", "slide_id", "group") if c in rows[0]), None)
    paths = tuple(r["path"] if os.path.isabs(r["path"]) else os.path.join(data_dir, r["path"])
                  for r in rows)
    return LabelledImages(paths, tuple(r["code"].strip() for r in rows),
                          tuple(r[group_col] for r in rows) if group_col else None)


def load_cell_image(path: str, source_mpp: float, target_mpp: float, out_px: int,
                    blur_um: float = 0.0) -> np.ndarray:
    """One image resampled to ``target_mpp`` and centre-cropped (or white-padded) to ``out_px``;
    with ``blur_um``, first blurred at its own pixels by a Gaussian of that sigma (a scanner
    out of focus).

    Returns:
        ``(out_px, out_px, 3) uint8``.
    """
    with Image.open(path) as im:
        return cell_crop(np.asarray(im.convert("RGB")), source_mpp, target_mpp, out_px, blur_um)


def cell_crop(rgb: np.ndarray, source_mpp: float, target_mpp: float, out_px: int,
              blur_um: float = 0.0) -> np.ndarray:
    """`load_cell_image` of an image already decoded, ``(H, W, 3) uint8`` at ``source_mpp``."""
    if blur_um > 0:
        import cv2

        rgb = cv2.GaussianBlur(rgb, (0, 0), blur_um / source_mpp)
    im = Image.fromarray(rgb)
    scale = source_mpp / target_mpp
    if abs(scale - 1) > 1e-3:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.Resampling.LANCZOS)
    arr = np.asarray(im)
    h, w = arr.shape[:2]
    out = np.full((out_px, out_px, 3), 255, np.uint8)
    sy, sx = max((h - out_px) // 2, 0), max((w - out_px) // 2, 0)
    dy, dx = max((out_px - h) // 2, 0), max((out_px - w) // 2, 0)
    ch, cw = min(h, out_px), min(w, out_px)
    out[dy:dy + ch, dx:dx + cw] = arr[sy:sy + ch, sx:sx + cw]
    return out


def load_cell_images(paths, source_mpp: float, target_mpp: float = 0.25, out_px: int = 144,
                     threads: int = 8, blur_um: float = 0.0) -> np.ndarray:
    """Many images at once, ``(N, out_px, out_px, 3) uint8`` (decoded in threads)."""
    with ThreadPoolExecutor(threads) as pool:
        images = list(pool.map(
            lambda p: load_cell_image(p, source_mpp, target_mpp, out_px, blur_um), paths))
    return np.stack(images) if images else np.zeros((0, out_px, out_px, 3), np.uint8)
