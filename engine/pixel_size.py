"""Pixel size of blood-smear images, measured on their red cells.

Single-cell exports (CellaVision) and camera fields of a smear carry no pixel size, yet every
model here works at a fixed µm/px. Red cells are the one object of known size in any smear: a
normal erythrocyte is about 7.5 µm across (reference range about 6.2-8.2 µm). The median
equivalent diameter of the isolated, round, unnucleated objects in a set of images therefore
gives µm/px to within the spread of red-cell size, a few per cent on a normal sample.

The measure is scale-free: Otsu on the green channel separates cells from glass, holes (central
pallor) are filled, and an object counts as a red cell when it is round and convex, does not
touch the image border, and has almost no nuclear stain (``blue - red``). Nothing assumes a size
in pixels beyond a floor of 8 px across.

The same measure checks a slide whose pixel size is known: its free-lying red cells, measured at
its stated µm/px (`red_cell_size`), should be about 7.5 µm across. Scanner metadata that is wrong
by a factor (a 20x scan recorded as 40x, a conversion that lost the pixel spacing's unit) makes
them half or twice that, and every model then sees cells at the wrong scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from engine.cells import stain_score

RBC_DIAMETER_UM = 7.5
MIN_RED_CELLS = 30
_MIN_DIAMETER_PX = 8.0


@dataclass(frozen=True)
class PixelSizeEstimate:
    """µm/px from red cells.

    Attributes:
        mpp: the estimate, ``rbc_diameter_um / diameter_px``.
        diameter_px: median equivalent diameter of the red cells measured.
        diameter_px_iqr: its 25th and 75th percentiles.
        n_cells, n_images: red cells measured, and images that had at least one.
        rbc_diameter_um: the red-cell size assumed.
    """

    mpp: float
    diameter_px: float
    diameter_px_iqr: tuple[float, float]
    n_cells: int
    n_images: int
    rbc_diameter_um: float = RBC_DIAMETER_UM

    @property
    def mpp_range(self) -> tuple[float, float]:
        """µm/px implied by the interquartile range of diameters (larger cells, smaller µm/px)."""
        lo, hi = self.diameter_px_iqr
        return self.rbc_diameter_um / hi, self.rbc_diameter_um / lo

    def to_dict(self) -> dict:
        lo, hi = self.mpp_range
        return {"mpp": round(self.mpp, 4), "mpp_iqr": [round(lo, 4), round(hi, 4)],
                "red_cell_diameter_px": round(self.diameter_px, 2),
                "red_cell_diameter_px_iqr": [round(d, 2) for d in self.diameter_px_iqr],
                "n_red_cells": self.n_cells, "n_images": self.n_images,
                "assumed_red_cell_diameter_um": self.rbc_diameter_um}


def red_cell_diameters(rgb: np.ndarray, max_stained: float = 0.05) -> np.ndarray:
    """Equivalent diameters (px) of the red cells in one image.

    Args:
        rgb: ``(H, W, 3) uint8``.
        max_stained: largest share of an object's pixels with nuclear stain (score above 30)
            for it to count as a red cell; white cells, platelets and clumps of them exceed it.

    Returns:
        ``(N,) float64``, one per accepted object.
    """
    h, w = rgb.shape[:2]
    _, fg = cv2.threshold(np.ascontiguousarray(rgb[..., 1]), 0, 255,
                          cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(fg, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    stained = stain_score(rgb) > 30
    out = []
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        if x <= 1 or y <= 1 or x + bw >= w - 1 or y + bh >= h - 1:
            continue  # cut by the border: its size is not its own
        area = cv2.contourArea(c)  # the outline's area: central pallor counts as cell
        if area < np.pi / 4 * _MIN_DIAMETER_PX ** 2 or not 0.8 < bw / bh < 1.25:
            continue
        perimeter = cv2.arcLength(c, True)
        hull = cv2.contourArea(cv2.convexHull(c))
        if 4 * np.pi * area / perimeter ** 2 < 0.85 or area / max(hull, 1.0) < 0.96:
            continue  # not round, or overlapping cells
        mask = np.zeros((bh, bw), np.uint8)
        cv2.drawContours(mask, [c - (x, y)], -1, 1, thickness=cv2.FILLED)
        if stained[y:y + bh, x:x + bw][mask > 0].mean() > max_stained:
            continue  # nucleated or granular: not a red cell
        out.append(2.0 * np.sqrt(area / np.pi))
    return np.asarray(out, np.float64)


@dataclass(frozen=True)
class RedCellSize:
    """The free-lying red cells of a set of images of known µm/px.

    Attributes:
        n_cells: red cells measured (after the size-mode filter of `estimate_mpp`).
        diameter_um: their median equivalent diameter, µm; None with fewer than 30.
        iqr_um: its 25th and 75th percentiles (None as above).
    """

    n_cells: int
    diameter_um: float | None
    iqr_um: tuple[float, float] | None


def _size_mode(d: np.ndarray) -> np.ndarray:
    """The diameters within [0.6, 1.5] x their median, twice: specks, pallor fragments and
    doublets that passed the shape test lie far from the red-cell mode."""
    for _ in range(2):
        if not d.size:
            break
        median = float(np.median(d))
        d = d[(d > 0.6 * median) & (d < 1.5 * median)]
    return d


def red_cell_size(diameters: Iterable[np.ndarray], mpp: float) -> RedCellSize:
    """The red cells of smear images taken at ``mpp`` µm/px (a slide's sample tiles, an
    export's images), from each image's `red_cell_diameters`: how many were measured and, from
    30 on, their median and interquartile range in µm."""
    per_image = list(diameters)
    d = _size_mode(np.concatenate(per_image) if per_image else np.zeros(0)) * mpp
    if d.size < MIN_RED_CELLS:
        return RedCellSize(int(d.size), None, None)
    q1, median, q3 = (float(v) for v in np.percentile(d, [25, 50, 75]))
    return RedCellSize(int(d.size), median, (q1, q3))


def estimate_mpp(images: Iterable[np.ndarray],
                 rbc_diameter_um: float = RBC_DIAMETER_UM) -> PixelSizeEstimate:
    """µm/px of a set of smear images of one pixel size, from their red cells.

    Args:
        images: ``(H, W, 3) uint8`` RGB images (any sizes).
        rbc_diameter_um: the red-cell diameter assumed (7.5 µm for a normal sample).

    Raises:
        ValueError: fewer than 30 red cells were found (too few images, or none with free-lying
            red cells): give the pixel size instead.
    """
    per_image = [red_cell_diameters(im) for im in images]
    d = np.concatenate(per_image) if per_image else np.zeros(0)
    if d.size < MIN_RED_CELLS:
        raise ValueError(f"found {d.size} free-lying red cells in {len(per_image)} images, need "
                         f"at least {MIN_RED_CELLS} to estimate the pixel size: give it instead")
    d = _size_mode(d)
    if d.size < MIN_RED_CELLS:
        raise ValueError(f"only {d.size} red cells of one size in {len(per_image)} images, need "
                         f"at least {MIN_RED_CELLS} to estimate the pixel size: give it instead")
    median = float(np.median(d))
    q1, q3 = (float(v) for v in np.percentile(d, [25, 75]))
    return PixelSizeEstimate(rbc_diameter_um / median, median, (q1, q3), int(d.size),
                             sum(1 for p in per_image if p.size), rbc_diameter_um)
