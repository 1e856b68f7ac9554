"""Foreground (tissue / smear) masks on thumbnails and per-tile foreground fractions.

numpy, scipy.ndimage and OpenCV (morphology: the same masks as scipy's, faster). Sizes come in
µm and are turned into pixels with the thumbnail's µm/px, so the same config works for a 40×
biopsy and a 100× smear.
"""

from __future__ import annotations

import cv2
import numpy as np

from engine.config import TissueConfig


def rgb_to_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] of a ``(H, W, 3) uint8`` image, each ``(H, W) float32``."""
    # max and min on the bytes (OpenCV, per plane: numpy's reductions over a last axis of 3 are
    # ten times slower), then scaled: the same floats as scaling first
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    vmax = cv2.max(cv2.max(r, g), b).astype(np.float32) / np.float32(255.0)
    vmin = cv2.min(cv2.min(r, g), b).astype(np.float32) / np.float32(255.0)
    sat = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0).astype(np.float32)
    return sat, vmax


def otsu_threshold(values: np.ndarray, bins: int = 256, value_range=(0.0, 1.0),
                   weights: np.ndarray | None = None) -> float:
    """Otsu's threshold: the cut that maximises between-class variance of a 1-D sample
    (``weights``: how many times each value occurs, for a sample given by its distinct values)."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=value_range, weights=weights)
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return float(value_range[0])
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # an empty gap between the classes gives a plateau of equal maxima: cut in its middle
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    run = best[: np.argmax(np.diff(np.append(best, best[-1] + 2)) > 1) + 1]
    return float(edges[int(run[len(run) // 2]) + 1])


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r


def _morph(mask: np.ndarray, disk: np.ndarray, first, second) -> np.ndarray:
    k = disk.astype(np.uint8)
    m = first(mask.view(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return second(m, k, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)


def binary_close(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """``ndi.binary_closing(mask, disk, border_value=0)`` for a symmetric, odd ``disk``."""
    return _morph(mask, disk, cv2.dilate, cv2.erode)


def binary_open(mask: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, disk)`` for a symmetric, odd ``disk``."""
    return _morph(mask, disk, cv2.erode, cv2.dilate)


def components(mask: np.ndarray, connectivity: int = 8) -> tuple[int, np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """Connected components of a boolean mask (OpenCV; several times scipy's ``ndi.label``, with
    the same labels: numbered from 1 in raster order of their first pixel).

    Returns:
        ``(n, labels (H, W) int32, stats (n, 5): x, y, width, height, area, centroids (n, 2):
        x, y)``; index 0 is the background. Exactly ``cv2.connectedComponentsWithStats``'s.
    """
    m = mask.view(np.uint8)
    fg = cv2.countNonZero(m)
    if fg * 8 > m.size:
        return cv2.connectedComponentsWithStats(m, connectivity=connectivity, ltype=cv2.CV_32S)
    # sparse (a cell tile's nuclei: 1 % of its pixels): OpenCV's statistics pass visits every
    # pixel and takes 6x the labelling itself; here they come from the foreground pixels only
    n, labels = cv2.connectedComponents(m, connectivity=connectivity, ltype=cv2.CV_32S)
    h, w = m.shape
    pts = cv2.findNonZero(m)  # x, y in raster order (None if empty): 2x numpy's flatnonzero
    pts = np.zeros((0, 2), np.int32) if pts is None else pts.reshape(-1, 2)
    xs, ys = pts[:, 0], pts[:, 1]
    lab = labels[ys, xs]
    area = np.bincount(lab, minlength=n)
    stats = np.zeros((n, 5), np.int32)
    centroids = np.zeros((n, 2), np.float64)
    if n > 1:
        order = np.argsort(lab, kind="stable")
        starts = np.searchsorted(lab[order], np.arange(1, n))
        for col, v, fn in ((0, xs, np.minimum), (1, ys, np.minimum), (2, xs, np.maximum),
                           (3, ys, np.maximum)):
            stats[1:, col] = fn.reduceat(v[order], starts)
        stats[1:, 2] += 1 - stats[1:, 0]
        stats[1:, 3] += 1 - stats[1:, 1]
        stats[1:, 4] = area[1:]
        centroids[1:, 0] = np.bincount(lab, xs, minlength=n)[1:] / area[1:]
        centroids[1:, 1] = np.bincount(lab, ys, minlength=n)[1:] / area[1:]
    # the background (label 0), as OpenCV counts it: its box spans every row and column not
    # wholly foreground
    bg = m.size - len(xs)
    stats[0, 4] = bg
    if bg:
        rows = np.flatnonzero(np.bincount(ys, minlength=h) < w)
        cols = np.flatnonzero(np.bincount(xs, minlength=w) < h)
        stats[0, :4] = cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        centroids[0] = ((h * w * (w - 1) / 2 - xs.sum()) / bg,
                        (w * h * (h - 1) / 2 - ys.sum()) / bg)
    return n, labels, stats, centroids


def remove_small_regions(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected foreground components smaller than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = components(mask)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_hole_px: float = np.inf) -> np.ndarray:
    """Fill background components enclosed by foreground and smaller than ``max_hole_px``
    (4-connected background; with no limit, the same as ``ndi.binary_fill_holes``)."""
    if max_hole_px <= 0:
        return mask
    if max_hole_px == np.inf:
        # every hole: the background a 4-connected flood from a one-pixel frame cannot reach
        # (one scan-line fill, 8x fewer operations than labelling the background)
        h, w = mask.shape
        framed = np.zeros((h + 2, w + 2), np.uint8)
        framed[1:-1, 1:-1] = mask.view(np.uint8)
        cv2.floodFill(framed, None, (0, 0), 1, flags=4)
        return mask | (framed[1:-1, 1:-1] == 0)
    n, holes, stats, _ = components(~mask, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
    border = (x == 0) | (y == 0) | (x + stats[:, cv2.CC_STAT_WIDTH] == w) | \
        (y + stats[:, cv2.CC_STAT_HEIGHT] == h)
    fill = (stats[:, cv2.CC_STAT_AREA] < max_hole_px) & ~border
    fill[0] = False
    return mask | fill[holes]


def close_mask(mask: np.ndarray, radius_um: float, mpp: float) -> np.ndarray:
    """Morphological closing with a disc of ``radius_um``; the image border is padded by
    reflection, so tissue running off the edge of the slide is not eroded away."""
    r = int(round(radius_um / mpp))
    if r < 1 or not mask.any():
        return mask
    padded = np.pad(mask, r, mode="reflect")
    return binary_close(padded, _disk(r))[r:-r, r:-r]


def with_enclosed_fat(mask: np.ndarray, thumbnail: np.ndarray, mpp: float, radius_um: float,
                      cfg: TissueConfig) -> np.ndarray:
    """``mask`` plus fatty marrow: faintly stained pixels (adipocyte membranes, saturation above
    ``cfg.min_saturation``) closed with a disc of ``radius_um`` join the tissue, so fat vacuoles
    up to about twice that across count as marrow space rather than glass."""
    if radius_um <= 0:
        return mask
    sat, _ = rgb_to_saturation_value(thumbnail)
    faint = close_mask(mask | (sat > cfg.min_saturation), radius_um, mpp)
    return mask | remove_small_regions(faint, cfg.min_area_um2 / (mpp * mpp))


def compute_tissue_mask(thumbnail: np.ndarray, mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Foreground mask of a Romanowsky- or H&E-stained slide thumbnail.

    HSV saturation thresholded by Otsu (floored at ``cfg.min_saturation``), glass-bright pixels
    removed, then closing, opening, small-region and small-hole filters sized in µm.

    Args:
        thumbnail: ``(H, W, 3) uint8`` RGB.
        mpp: µm per thumbnail pixel.
        cfg: thresholds and sizes.

    Returns:
        ``(H, W) bool``, True on tissue.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB, got shape {thumbnail.shape}")
    sat, val = rgb_to_saturation_value(thumbnail)
    thr = max(otsu_threshold(sat), cfg.min_saturation)
    mask = (sat > thr) & ~((val > cfg.max_value) & (sat < 2 * cfg.min_saturation))
    if cfg.closing_um > 0:
        mask = binary_close(mask, _disk(cfg.closing_um / mpp))
    if cfg.opening_um / mpp >= 1:
        mask = binary_open(mask, _disk(cfg.opening_um / mpp))
    px_area = mpp * mpp
    mask = remove_small_regions(mask, cfg.min_area_um2 / px_area)
    return fill_small_holes(mask, cfg.max_hole_um2 / px_area)


def tile_fractions(mask: np.ndarray, scale: tuple[float, float], x: np.ndarray, y: np.ndarray,
                   size: tuple[float, float]) -> np.ndarray:
    """Fraction of mask pixels inside each tile's footprint.

    Args:
        mask: ``(H, W) bool`` foreground mask.
        scale: level-0 pixels per mask pixel, ``(sx, sy)``.
        x, y: ``(N,)`` tile origins in level-0 pixels.
        size: tile footprint ``(w, h)`` in level-0 pixels.

    Returns:
        ``(N,) float32`` in [0, 1]; a footprint smaller than a mask pixel reads one pixel.
    """
    h, w = mask.shape
    # summed-area table with a zero first row and column (OpenCV's, exact in int32 below 2**31
    # pixels; numpy's two int64 cumsums cost 8x)
    integral = cv2.integral(mask.view(np.uint8)) if h * w < 2**31 else \
        np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sx, sy = scale
    x0 = np.clip(np.floor(np.asarray(x) / sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(np.asarray(y) / sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((np.asarray(x) + size[0]) / sx).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((np.asarray(y) + size[1]) / sy).astype(np.int64), y0 + 1, h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (total / ((x1 - x0) * (y1 - y0))).astype(np.float32)
