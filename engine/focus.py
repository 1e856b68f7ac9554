"""How blurred a cell is: the Gaussian spread of its edges, in µm, from the crop alone.

A scanner leaves regions out of focus (a thick smear, a tilted slide, a bubble), and the
classifier does not see it: on held-out PBC cells blurred by a Gaussian of 0.375 µm the
reference's accuracy falls from 0.935 to 0.51, three in four misses called erythroblasts (at 0.5
µm, 97 %) with a mean top probability near 0.8, and the feature density (`engine.models.ood`)
flags less than a quarter of the cells. A blurred region
would therefore inflate a slide's erythroid count, its NRBC and M:E ratio. A technologist counts
only where the cells are sharp; so does the differential (`pipeline.count_out_of_focus`).

The measure is Zhuo and Sim's re-blur ratio (Pattern Recognition 44, 2011): at an edge blurred
by a Gaussian of sigma, blurring once more with ``sigma_r`` lowers the gradient by
``R = sqrt(sigma^2 + sigma_r^2) / sigma``, so ``sigma = sigma_r / sqrt(R^2 - 1)``. It is read at
the crop's strongest gradients around the centred cell, with the Sobel operator's own smoothing
taken out, and is independent of contrast and stain. On disks of known blur up to 0.5 µm, and
on PBC cells blurred at 0.1 µm/px before they were resampled, it returns the blur within a few
hundredths of a µm (``tests/test_focus.py``). Beyond that it reads low (0.64-0.89 µm for 0.75
and 1 µm, lowest at low contrast, where the crop's whole grey levels blur less smoothly), still
far above any sensible threshold.
"""

from __future__ import annotations

import cv2
import numpy as np

SIGMA_R = 1.0        # px: the re-blur
SOBEL_VAR = 0.5      # px^2: the variance the Sobel operator's [1, 2, 1] smoothing adds
EDGE_SHARE = 0.02    # the strongest 2 % of the central window's gradients are its edges
MARGIN = 16          # px left out at each side of a crop: filters do not reach across crops
MIN_CONTRAST = 16.0  # Sobel magnitude (8 x grey levels per px): less, and there is no edge
MAX_SIGMA_PX = 8.0   # where the ratio says "no sharper than this", the estimate stops
CHUNK = 32           # crops per filter call: 1,024 crops took 89-92 µs each so, 151-179 at once
REACH = 5            # px a pixel's gradient after the re-blur draws on (Gaussian 4, Sobel 1)


def _gradient(grey: np.ndarray) -> np.ndarray:
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return cv2.magnitude(gx, gy)


def edge_blur_um(crops: np.ndarray, mpp: float, inside: np.ndarray | None = None
                 ) -> np.ndarray:
    """Each crop's edge blur: the Gaussian sigma of its strongest edges, in µm.

    Args:
        crops: ``(N, H, W, 3) uint8`` cell-centred crops (96 px at 0.25 µm/px in the pipeline),
            H and W above ``2 * MARGIN``.
        mpp: their µm per pixel.
        inside: ``(N, 4)`` crop-pixel boxes ``x0, y0, x1, y1`` of the image each crop was cut
            from (`engine.cells.inside_of_crops`); None: the whole crop. Edges are read only
            where the filters see no pixel outside the box: at a slide's border, the padding
            (its background) meets the cell in a sharp straight edge that is not the cell's.

    Returns:
        ``(N,) float32``; NaN for a crop without an edge to measure (blank, or no contrast).

    Raises:
        ValueError: crops too small to hold the central window.
    """
    n, h, w = crops.shape[:3]
    if min(h, w) <= 2 * MARGIN:
        raise ValueError(f"crops of {h} x {w} px: the blur is read inside a {MARGIN} px margin, "
                         f"so they must be larger than {2 * MARGIN} px")
    # in chunks: a whole export at once would be 3x slower a crop (its arrays leave the cache)
    if inside is not None and (np.asarray(inside) == [0, 0, w, h]).all():
        inside = None  # no crop runs off its image: no mask to build (the pipeline's usual case)
    # One OpenCV thread: a CI run once saw the same crops read 5e-5 apart in two calls (not
    # reproduced here: 30 calls on 4 threads agreed), and how threads split the float32
    # filters' rows is the one thing that varies between calls. It costs nothing on chunks
    # this size (111-113 µs a crop against 113-120 with two). A crop's place in the stacked
    # chunk moves its value by up to 1e-5 µm (float32 rounding; float64 filters would cost 47 %
    # more), so a tile's cells, always measured together, read the same in every run.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        parts = [_edge_blur_um(crops[i:i + CHUNK], mpp,
                               None if inside is None else inside[i:i + CHUNK])
                 for i in range(0, n, CHUNK)]
    finally:
        cv2.setNumThreads(threads)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _edge_blur_um(crops: np.ndarray, mpp: float, inside: np.ndarray | None) -> np.ndarray:
    """`edge_blur_um` of one chunk of crops."""
    n, h, w = crops.shape[:3]
    # the crops' central windows (plus the filters' reach) stacked into one tall grey image:
    # one filter call for the batch; the pad keeps each window clear of its neighbours' pixels
    pad = MARGIN - REACH
    win = np.ascontiguousarray(crops[:, pad:h - pad, pad:w - pad])
    wh, ww = win.shape[1:3]
    grey = cv2.cvtColor(win.reshape(n * wh, ww, 3), cv2.COLOR_RGB2GRAY).astype(np.float32)
    inner = (slice(None), slice(REACH, wh - REACH), slice(REACH, ww - REACH))
    sharp = _gradient(grey).reshape(n, wh, ww)[inner].reshape(n, -1)
    soft = _gradient(cv2.GaussianBlur(grey, (0, 0), SIGMA_R)).reshape(n, wh, ww)[inner]
    soft = soft.reshape(n, -1)
    if inside is not None:  # no edge where the filters saw padding
        rows = MARGIN + np.arange(h - 2 * MARGIN)  # the central window's crop coordinates
        cols = MARGIN + np.arange(w - 2 * MARGIN)
        seen = (((rows >= inside[:, 1:2] + REACH) & (rows < inside[:, 3:4] - REACH))[:, :, None]
                & ((cols >= inside[:, 0:1] + REACH) & (cols < inside[:, 2:3] - REACH))[:, None, :])
        sharp = np.where(seen.reshape(n, -1), sharp, 0)
    k = max(8, int(EDGE_SHARE * sharp.shape[1]))
    kth = np.partition(sharp, -k, axis=1)[:, -k]  # (N,) each crop's k-th strongest gradient
    edge = sharp >= kth[:, None]  # its edge pixels (ties may add a few)
    # the ratio of the summed gradients at the edges: the strongest, at the edges' centres,
    # where the relation above holds exactly, weigh most
    ratio = np.where(edge, sharp, 0).sum(1) / np.maximum(np.where(edge, soft, 0).sum(1), 1e-6)
    limit = np.sqrt(1 + (SIGMA_R / MAX_SIGMA_PX) ** 2)  # the ratio of the largest sigma
    sigma = SIGMA_R / np.sqrt(np.maximum(ratio, limit) ** 2 - 1)
    sigma = np.sqrt(np.maximum(sigma ** 2 - SOBEL_VAR, 0.0))
    out = (sigma * mpp).astype(np.float32)
    out[kth < MIN_CONTRAST] = np.nan
    return out
