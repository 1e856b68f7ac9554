"""Synthetic slide content with known ground truth, for tests and benchmarks.

- ``smear_block``: a blood-smear-like field (red cells and nucleated cells on glass).
- ``aspirate_block``: a bone-marrow-aspirate-smear-like field: red cells and tens of nucleated
  cells per megapixel (mononuclear, lobed and small lymphoid), with the nuclei's centres.
- ``marrow_block``: an H&E bone-marrow-biopsy-like field at a chosen cellularity: bone trabeculae,
  fat vacuoles with membranes, and haematopoietic tissue (cytoplasm with packed nuclei). The truth
  is counted on the masks it was drawn from, so ``cellularity`` = haematopoietic area / (haema-
  topoietic + fat area), bone excluded, as a pathologist reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

GLASS = (243, 241, 245)
FAT = (247, 245, 248)
MEMBRANE = (214, 160, 196)
BONE = (226, 112, 168)
CYTOPLASM = (214, 166, 204)
NUCLEUS = (88, 56, 150)


def smear_block(seed: int = 0, side: int = 2048) -> np.ndarray:
    """``(side, side, 3) uint8``: red cells and nucleated cells on glass at about 0.25 µm/px."""
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), (236, 232, 240), np.uint8)

    def paint(cy, cx, r, colour):  # pixels strictly within r of (cy, cx), in a window around it
        y0, x0 = max(cy - r, 0), max(cx - r, 0)
        yy, xx = np.ogrid[y0:min(cy + r + 1, side), x0:min(cx + r + 1, side)]
        img[y0:y0 + yy.shape[0], x0:x0 + xx.shape[1]][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] \
            = colour

    for _ in range(side * side // 6000):
        paint(*(int(v) for v in rng.integers(0, side, 2)), 15, (215, 150, 160))  # red cells
    for _ in range(side * side // 120000):
        paint(*(int(v) for v in rng.integers(20, side - 20, 2)), 18, (95, 60, 175))  # nuclei
    return img


RBC, RBC_PALLOR, GLASS_SMEAR = (215, 150, 160), (226, 176, 184), (236, 232, 240)


def aspirate_block(seed: int = 0, side: int = 2048, mpp: float = 0.25,
                   cells_per_mpx: float = 45.0) -> tuple[np.ndarray, np.ndarray]:
    """A Wright-Giemsa bone-marrow-aspirate-like field at ``mpp`` µm/px, and its truth.

    Red cells cover about 45 % of it. Nucleated cells are ``cells_per_mpx`` per megapixel (at
    0.25 µm/px, a cellular aspirate trail holds tens per 256 µm square, where ``smear_block``, a
    blood film, holds 8): 60 % mononuclear (5-8 µm radius, a purple nucleus of half that), 30 %
    with 3-4 touching lobes (segmented neutrophils) and 10 % small lymphoid cells. Cells never
    cross the block's edge (blocks are tiled into larger slides) and their nuclei never touch.
    Platelets (20 per megapixel) stay inside too. Noise and a slight blur, as an objective and
    a camera give.

    Returns:
        ``(image (side, side, 3) uint8, centres (N, 2) float64)``: each nucleated cell's nucleus
        centre ``(x, y)`` in pixels (the mean of its lobes' centres for lobed ones).
    """
    rng = np.random.default_rng(seed)
    um = 1.0 / mpp
    img = np.empty((side, side, 3), np.float32)
    img[:] = GLASS_SMEAR
    n_rbc = int(0.45 * side * side / (np.pi * (3.75 * um) ** 2))
    cy, cx, r = rng.uniform(0, side, n_rbc), rng.uniform(0, side, n_rbc), \
        rng.uniform(3.4, 4.0, n_rbc) * um
    img[_discs(side, cy, cx, r)] = RBC
    img[_discs(side, cy, cx, 0.45 * r)] = RBC_PALLOR

    def paint(y, x, radius, colour):
        sy, sx, disc = _disc_into(img[..., 0], y, x, radius)
        img[sy, sx][disc] = colour

    n_cells = int(round(cells_per_mpx * side * side / 1e6))
    placed: list[tuple[float, float, float]] = []
    centres = []
    for _ in range(60 * n_cells):
        if len(placed) == n_cells:
            break
        kind = rng.choice(3, p=(0.6, 0.3, 0.1))  # mononuclear, lobed, small lymphoid
        R = (rng.uniform(5, 8) if kind < 2 else rng.uniform(4, 4.8)) * um
        y, x = rng.uniform(R + 2, side - R - 2, 2)
        if any(np.hypot(y - py, x - px) < 0.9 * (R + pr) for py, px, pr in placed):
            continue
        placed.append((y, x, R))
        jitter = rng.integers(-10, 11, 3)
        if kind == 2:
            paint(y, x, R, (185, 190, 205))  # scant pale-blue cytoplasm
            paint(y, x, 0.8 * R, np.clip(np.add((80, 55, 160), jitter), 0, 255))
            centres.append((x, y))
        elif kind == 0:
            paint(y, x, R, (208, 180, 214))  # lilac-pink cytoplasm
            dy, dx = rng.uniform(-0.2, 0.2, 2) * R
            paint(y + dy, x + dx, rng.uniform(0.45, 0.6) * R,
                  np.clip(np.add((95, 60, 175), jitter), 0, 255))
            centres.append((x + dx, y + dy))
        else:
            paint(y, x, R, (214, 184, 212))
            k, ring, lobe = int(rng.integers(3, 5)), 2.3 * um, rng.uniform(1.8, 2.2) * um
            a = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(k) / k
            ly, lx = y + ring * np.sin(a), x + ring * np.cos(a)
            for yy, xx in zip(ly, lx):
                paint(yy, xx, lobe, np.clip(np.add((100, 62, 170), jitter), 0, 255))
            centres.append((lx.mean(), ly.mean()))
    n_plt = int(20 * side * side / 1e6)
    for y, x, rr in zip(rng.uniform(2 * um, side - 2 * um, n_plt),
                        rng.uniform(2 * um, side - 2 * um, n_plt),
                        rng.uniform(1.0, 1.4, n_plt) * um):
        if all(np.hypot(y - py, x - px) > pr + rr + 2 * um for py, px, pr in placed):
            paint(y, x, rr, (130, 90, 180))
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    img = ndi.gaussian_filter(img, (0.15 * um, 0.15 * um, 0))
    return np.clip(img, 0, 255).astype(np.uint8), np.asarray(centres, np.float64).reshape(-1, 2)


@dataclass
class MarrowTruth:
    """Pixel counts of what ``marrow_block`` drew."""

    haematopoietic_px: int
    fat_px: int
    bone_px: int

    @property
    def cellularity(self) -> float:
        """Percent of marrow space (haematopoietic + fat) that is haematopoietic."""
        return 100.0 * self.haematopoietic_px / max(self.haematopoietic_px + self.fat_px, 1)


def _disc_into(mask: np.ndarray, cy: float, cx: float, r: float) -> tuple[slice, slice,
                                                                            np.ndarray]:
    h, w = mask.shape
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, h)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, w)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    return slice(y0, y1), slice(x0, x1), (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _discs(side: int, cy: np.ndarray, cx: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``(side, side) bool``: the union of the discs ``(x - cx)² + (y - cy)² <= r²`` over pixel
    centres, all at once (a window of the largest disc's size around each centre)."""
    mask = np.zeros((side, side), bool)
    if not len(cy):
        return mask
    k = np.arange(-int(np.ceil(r.max())) - 1, int(np.ceil(r.max())) + 2)
    yy = np.floor(cy).astype(np.int64)[:, None, None] + k[None, :, None]  # (n, K, 1)
    xx = np.floor(cx).astype(np.int64)[:, None, None] + k[None, None, :]  # (n, 1, K)
    hit = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= (r * r)[:, None, None])
    hit &= (yy >= 0) & (yy < side) & (xx >= 0) & (xx < side)
    n, ky, kx = np.nonzero(hit)
    mask[yy[n, ky, 0], xx[n, 0, kx]] = True
    return mask


def marrow_block(cellularity: float, side: int = 2048, mpp: float = 1.0, seed: int = 0,
                 bone_fraction: float = 0.12) -> tuple[np.ndarray, MarrowTruth]:
    """An H&E marrow-like ``(side, side, 3) uint8`` field at ``mpp`` µm/px and its truth.

    Args:
        cellularity: target haematopoietic share of marrow space in percent (the drawn truth
            lands within a point or two; use the returned ``MarrowTruth``).
        bone_fraction: approximate share of the field covered by trabeculae (0 for none).
    """
    rng = np.random.default_rng(seed)
    um = 1.0 / mpp  # px per µm
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    bone = np.zeros((side, side), bool)
    if bone_fraction > 0:  # one wavy trabecula across the field
        half = bone_fraction * side / 2
        centre = rng.uniform(0.25, 0.75) * side
        amp, period = rng.uniform(0.03, 0.08) * side, rng.uniform(0.6, 1.2) * side
        bone = np.abs(yy - (centre + amp * np.sin(2 * np.pi * xx / period
                                                  + rng.uniform(0, 6.3)))) < half
    marrow = ~bone
    # fat: adipocytes (25-50 µm radius) added until the fat share of marrow reaches the target
    cell = np.zeros((side, side), np.int32)  # adipocyte label per pixel, 0 = none
    target = (1 - cellularity / 100.0) * marrow.sum()
    have, k = 0, 0
    while have < target:
        r = rng.uniform(25, 50) * um
        cy, cx = rng.uniform(0, side, 2)
        sy, sx, disc = _disc_into(cell, cy, cx, r)
        new = disc & marrow[sy, sx] & (cell[sy, sx] == 0)
        k += 1
        cell[sy, sx][new] = k
        have += int(new.sum())
    fat = cell > 0
    haem = marrow & ~fat
    # what each pixel shows, later layers over earlier ones, coloured at the end: one byte per
    # pixel to assign, not three floats
    layer = np.zeros((side, side), np.uint8)  # 0 glass
    layer[bone] = 1
    layer[haem] = 2
    layer[fat] = 3
    # adipocyte membranes, about 2 µm wide, drawn inside the fat where neighbours differ
    edge = np.zeros_like(fat)
    edge[1:] |= cell[1:] != cell[:-1]
    edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    rim = fat & ndi.binary_dilation(edge, iterations=max(1, round(um)))
    layer[rim] = 4
    # nuclei, 2.5-4 µm radius, covering about a third of the haematopoietic area
    n = int(0.35 * side * side / (np.pi * (3.2 * um) ** 2))
    cys, cxs = rng.uniform(0, side, n), rng.uniform(0, side, n)
    inside = haem[cys.astype(int), cxs.astype(int)]
    nuc = _discs(side, cys[inside], cxs[inside], rng.uniform(2.5, 4.0, n)[inside] * um) & haem
    layer[nuc] = 5
    img = np.asarray((GLASS, BONE, CYTOPLASM, FAT, MEMBRANE, NUCLEUS), np.float32)[layer]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    img = ndi.gaussian_filter(img, (0.6 * um, 0.6 * um, 0))
    truth = MarrowTruth(int((haem).sum()), int((fat).sum()), int(bone.sum()))
    return np.clip(img, 0, 255).astype(np.uint8), truth
