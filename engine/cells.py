"""Nucleated-cell detection on Romanowsky-stained smear tiles, tile ownership, and crops.

numpy and scipy.ndimage, with OpenCV for the whole-tile resampling, morphology and connected
components (the same results as scipy.ndimage's, faster). Touching nuclei are split around
distance-transform peaks. Wright-Giemsa / May-Grünwald-Giemsa stain nuclei blue-purple and red
cells pink, so ``blue - red`` separates nuclei from red cells and glass. The threshold is set once
per slide (Otsu over sampled tiles, clamped), not per tile: a tile with no white cell must not
find one in its red cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from engine.config import CellDetectionConfig
from engine.tissue import binary_close, components, fill_small_holes, otsu_threshold

KIND_CELL, KIND_PLATELET = "nucleated", "platelet"
# the pale pass a slide gets, by its specimen type (`pale_pass`)
PALE_ALL, PALE_NUCLEI, PALE_OFF = "all", "nuclei", "off"


def pale_pass(specimen: str, cfg: CellDetectionConfig) -> str:
    """Which pale pass a slide of ``specimen`` gets: `PALE_ALL` (pale platelets and nuclei, and
    a white cell's nuclear parts joined) on ``cfg.pale_platelet_specimens``, `PALE_NUCLEI` (pale
    nuclei alone) on ``cfg.pale_nucleus_specimens``, else `PALE_OFF`."""
    if specimen in cfg.pale_platelet_specimens:
        return PALE_ALL
    return PALE_NUCLEI if specimen in cfg.pale_nucleus_specimens else PALE_OFF


def stain_score(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(H, W) float32`` nuclear-stain score ``blue - red`` (−255…255)."""
    rgb = np.ascontiguousarray(rgb)
    return cv2.subtract(cv2.extractChannel(rgb, 2), cv2.extractChannel(rgb, 0), dtype=cv2.CV_32F)


def estimate_threshold(samples: list[np.ndarray], cfg: CellDetectionConfig) -> float:
    """Per-slide stain threshold: Otsu over the positive scores of sampled RGB tiles, clamped to
    ``[threshold_floor, threshold_ceiling]``."""
    # the positive scores are the integers 1..255 (blue - red on bytes): count each (OpenCV's
    # saturating subtraction and histogram) and give Otsu the 255 values with their counts, the
    # same histogram as over every pixel's score at a tenth of the cost
    counts = np.zeros(256, np.int64)
    for s in samples:
        s = np.ascontiguousarray(s)
        positive = cv2.subtract(cv2.extractChannel(s, 2), cv2.extractChannel(s, 0))  # max(0, b-r)
        counts += cv2.calcHist([positive], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    if counts[1:].sum() < 100:
        return cfg.threshold_floor
    values = np.arange(1, 256, dtype=np.float32) / 255.0  # float32, as the scores were
    thr = otsu_threshold(values, weights=counts[1:]) * 255.0
    return float(np.clip(thr, cfg.threshold_floor, cfg.threshold_ceiling))


@dataclass(frozen=True)
class Detections:
    """Objects found in one tile, in that tile's pixel frame (at the tile's µm/px).

    Attributes:
        x, y: ``(N,) float64`` centroids.
        x0, y0, x1, y1: ``(N,) float64`` bounding boxes (nucleus extent).
        area_um2: ``(N,) float32`` stained area.
        kind: ``(N,)`` ``"nucleated"`` or ``"platelet"``.
    """

    x: np.ndarray
    y: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    area_um2: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, keep: np.ndarray) -> Detections:
        return Detections(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


def _disk(r: float) -> np.ndarray:
    r = max(int(round(r)), 1)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r


_SQUARE2 = np.ones((2, 2), np.uint8)


def _open2(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, np.ones((2, 2)))``: scipy's origin for an even structure is
    its second row and column for the erosion and, reflected, its first for the dilation."""
    m = cv2.erode(mask.view(np.uint8), _SQUARE2, anchor=(1, 1),
                  borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return cv2.dilate(m, _SQUARE2, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT,
                      borderValue=0).view(bool)


def _zoom(score: np.ndarray, zoom: float) -> np.ndarray:
    """``ndi.zoom(score, zoom, order=1, grid_mode=True, mode="nearest")``: bilinear on pixel
    centres, edges repeated."""
    h, w = (int(round(n * zoom)) for n in score.shape)
    return cv2.resize(score, (w, h), interpolation=cv2.INTER_LINEAR)


def _split(blob: np.ndarray, min_distance_px: float) -> np.ndarray:
    """Label map splitting one binary blob into cells around the peaks of its distance
    transform (peaks closer than ``min_distance_px`` are one cell)."""
    # scipy.ndimage here, where touching nuclei are split: not in every process that imports
    # this module (each Ray worker of the pipeline, through its steps: 0.37 s of CPU a process)
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(blob)
    size = max(int(round(min_distance_px)), 1) * 2 + 1
    peaks = (dist == ndi.maximum_filter(dist, size=size)) & (dist >= min_distance_px / 2)
    markers, n = ndi.label(peaks)
    if n < 2:
        return blob.astype(np.int32)
    # merge plateau fragments: markers closer than min_distance are one cell
    centers = np.array(ndi.center_of_mass(peaks, markers, range(1, n + 1)))
    keep, taken = [], np.zeros(n, bool)
    for i in range(n):
        if taken[i]:
            continue
        close = np.hypot(*(centers - centers[i]).T) < min_distance_px
        taken |= close
        keep.append(np.flatnonzero(close) + 1)
    if len(keep) < 2:
        return blob.astype(np.int32)
    merged = np.zeros_like(markers)
    for new, olds in enumerate(keep, start=1):
        merged[np.isin(markers, olds)] = new
    # each pixel of the blob goes to its nearest cell centre (a Voronoi split inside the blob;
    # for roughly convex nuclei this cuts along the neck, like a distance-transform watershed)
    _, (iy, ix) = ndi.distance_transform_edt(merged == 0, return_indices=True)
    return np.where(blob, merged[iy, ix], 0).astype(np.int32)


def _raster_order(labels: np.ndarray, stats: np.ndarray) -> np.ndarray:
    """Component indices (1..n-1) in raster order of their first pixel, as ``ndi.label`` numbers
    them (OpenCV's 8-connected labelling numbers them otherwise), so cells keep their order."""
    idx = np.arange(1, len(stats))
    if not len(idx):
        return idx
    return idx[np.lexsort((_first_x(labels, stats, idx), stats[1:, cv2.CC_STAT_TOP]))]


def _bodies(score: np.ndarray, cut: float, memo: dict) -> np.ndarray:
    """8-connected labels of ``score > cut``: cells' bodies (cytoplasm joined to its nucleus).
    `_pale_objects` and `_join_nucleus_parts` cut at the same fraction of the threshold by
    default, so a tile's labels are made once (``memo``, by cut)."""
    if cut not in memo:
        memo[cut] = cv2.connectedComponents((score > cut).view(np.uint8), connectivity=8,
                                            ltype=cv2.CV_32S)[1]
    return memo[cut]


def _pale_objects(score: np.ndarray, threshold: float, objects: np.ndarray, labels: np.ndarray,
                  stats: np.ndarray, mpp: float, cfg: CellDetectionConfig, bodies: dict,
                  platelets: bool = True) -> tuple[list[tuple], list[tuple], np.ndarray]:
    """Platelets too pale for the threshold: objects of the pixels above
    ``cfg.pale_platelet_ratio * threshold`` that hold a pixel above
    ``cfg.pale_platelet_seed_ratio * threshold`` (a seed), no object already found
    (``objects``: the nuclear mask; ``labels``, ``stats``: its components), are
    platelet-sized and lie clear of nucleated cells: farther than
    ``cfg.pale_platelet_clearance_um`` from a nucleus and outside its cell's body. And nuclei
    too pale for it: such objects of ``cfg.pale_nucleus_min_area_um2`` or more, clear of
    nucleated cells too, whose parts above the threshold (``objects`` components, platelet-sized
    all, or there would be a nucleus) they take the place of; and such a nucleus in lobes,
    smaller one by one (`_lobed_nuclei`).

    Returns:
        ``(platelets, nuclei, absorbed)``: ``(cx, cy, x0, y0, x1, y1, area_um2)`` each, in
        work-grid pixels (no platelets where ``platelets`` is False), and the ``labels`` of
        the objects the nuclei take the place of.
    """
    n, lab, st, cent = components(score > cfg.pale_platelet_ratio * threshold)
    area = st[:, cv2.CC_STAT_AREA] * mpp * mpp
    def holding(mask: np.ndarray) -> np.ndarray:  # per object: holds a pixel of ``mask``
        held = np.zeros(n, bool)
        held[lab[mask]] = True
        held[0] = False  # the background
        return held

    seeded = holding(score > threshold)  # a pale nucleus' parts
    sown = holding(score > cfg.pale_platelet_seed_ratio * threshold)  # a pale platelet's seed
    keep = sown & (area >= cfg.pale_platelet_min_area_um2) & (area < cfg.min_cell_area_um2)
    nuc = np.zeros(n, bool) if cfg.pale_nucleus_min_area_um2 is None else \
        seeded & (area >= cfg.pale_nucleus_min_area_um2) & (area <= cfg.split_area_um2)
    lobe = np.zeros(n, bool) if cfg.pale_nucleus_min_area_um2 is None \
        or cfg.pale_nucleus_lobe_gap_um is None else \
        seeded & (area >= cfg.min_cell_area_um2) & (area < cfg.pale_nucleus_min_area_um2)
    if not platelets and not lobe.any():
        keep[:] = False  # without platelets, pale platelets' sizes matter only beside lobes
    if not keep.any() and not nuc.any() and not lobe.any():
        return [], [], np.zeros(0, np.int64)
    found = stats[:, cv2.CC_STAT_AREA] * mpp * mpp
    fg = np.flatnonzero(objects)  # the objects' pixels (a few % of the tile)
    of = found[labels.ravel()[fg]]
    keep[lab.ravel()[fg[of >= cfg.min_platelet_area_um2]]] = False  # counted already
    big = fg[of >= cfg.min_cell_area_um2]
    nuc[lab.ravel()[big]] = False  # a nucleus found, in a cell's paler parts
    lobe[lab.ravel()[big]] = False
    if (keep.any() or nuc.any() or lobe.any()) and len(big):  # cytoplasm and granules around
        nucleated = np.zeros(labels.shape, np.uint8)  # a nucleus
        nucleated.ravel()[big] = 1
        near = cv2.dilate(nucleated, _disk(cfg.pale_platelet_clearance_um / mpp).view(np.uint8))
        for flags in (keep, nuc, lobe):
            flags[lab[near.view(bool)]] = False
        if cfg.pale_platelet_body_ratio is not None and (keep.any() or nuc.any() or lobe.any()):
            # farther out, within the cell's body: what joins its nucleus above a lower cut
            # (cytoplasm; red cells and glass score below it, so a platelet on them stays apart)
            body = _bodies(score, cfg.pale_platelet_body_ratio * threshold, bodies)
            of_cell = np.zeros(int(body.max()) + 1, bool)
            of_cell[body.ravel()[big]] = True
            for flags in (keep, nuc, lobe):
                ids = np.flatnonzero(flags)  # a pale object lies whole in one body component:
                flags[ids] = ~of_cell[body[st[ids, 1], _first_x(lab, st, ids)]]  # its 1st pixel
    # a pale nucleus in lobes (an eosinophil's, apart across its red granules), or with them
    members = _lobed_nuclei(lab, st, area, lobe, nuc, keep, cfg, mpp) \
        if lobe.any() else [np.array([i]) for i in np.flatnonzero(nuc)]
    nuclei = [_union_box(m, cent, st, area) for m in members]
    for m in members:
        nuc[m] = True  # their parts above the threshold are absorbed as a pale nucleus' are
        keep[m] = False
    absorbed = np.unique(labels.ravel()[fg[nuc[lab.ravel()[fg]]]])
    kept = np.flatnonzero(keep) if platelets else np.zeros(0, np.int64)
    if cfg.pale_platelet_merge_um is None or not len(kept):
        return [_box(i, cent, st, area[i]) for i in kept], nuclei, absorbed
    # one platelet's parts: its granules lie apart in its paler hyalomere, and the parts of it
    # above the pale cut are as many objects. Those within 2 x merge_um of each other (box to
    # box) are one platelet, and none if one of them is beside an object the threshold found
    # (counted already)
    counted = np.flatnonzero((found >= cfg.min_platelet_area_um2)
                             & (found < cfg.min_cell_area_um2))
    counted = counted[(counted > 0) & ~np.isin(counted, absorbed)]
    box = np.concatenate([st[kept, :4], stats[counted, :4]]).astype(np.float64)
    box[:, 2:] += box[:, :2]  # x0, y0, x1, y1
    gap = 2 * cfg.pale_platelet_merge_um / mpp
    apart_x = np.maximum(box[:, None, 0], box[None, :, 0]) - np.minimum(box[:, None, 2],
                                                                          box[None, :, 2])
    apart_y = np.maximum(box[:, None, 1], box[None, :, 1]) - np.minimum(box[:, None, 3],
                                                                          box[None, :, 3])
    group = _linked_groups((apart_x <= gap) & (apart_y <= gap))
    taken = np.zeros(len(box), bool)
    taken[group[len(kept):]] = True
    of_group = group[:len(kept)]
    out = []
    for g in np.unique(of_group[~taken[of_group]]):
        m = kept[of_group == g]
        if len(m) == 1:
            out.append(_box(m[0], cent, st, area[m[0]]))
            continue
        out.append(_union_box(m, cent, st, area))
    return out, nuclei, absorbed


def _union_box(m: np.ndarray, cent: np.ndarray, st: np.ndarray, area: np.ndarray) -> tuple:
    """Components ``m`` as one object: their area-weighted centroid, joint box and summed area
    (``(cx, cy, x0, y0, x1, y1, area_um2)``, work-grid pixels)."""
    px = st[m, cv2.CC_STAT_AREA].astype(np.float64)
    cx, cy = (cent[m] * px[:, None]).sum(0) / px.sum()
    return (cx, cy, st[m, 0].min(), st[m, 1].min(), (st[m, 0] + st[m, 2]).max(),
            (st[m, 1] + st[m, 3]).max(), area[m].sum())


def _lobed_nuclei(lab: np.ndarray, st: np.ndarray, area: np.ndarray, lobe: np.ndarray,
                  nuc: np.ndarray, bits: np.ndarray, cfg: CellDetectionConfig, mpp: float
                  ) -> list[np.ndarray]:
    """Pale nuclei in lobes: pale lobes (``lobe``: components of ``lab``) and pale nuclei
    (``nuc``) within ``cfg.pale_nucleus_lobe_gap_um`` of each other (pixel to pixel) are one
    nucleus where two or more of them together reach ``cfg.pale_nucleus_min_area_um2``, stay
    within ``cfg.split_area_um2`` and hold at most one pale nucleus (two are two cells). The
    smaller pale objects among them (``bits``, a pale platelet's size: the same nucleus broken
    up at the pale cut) go with them, and count in the area.

    Returns:
        the component labels of each nucleus: such groups, and every other pale nucleus alone.
    """
    ids = np.flatnonzero(lobe | nuc | bits)
    mask = np.isin(lab, ids).view(np.uint8)
    near = cv2.dilate(mask, _disk(cfg.pale_nucleus_lobe_gap_um / 2 / mpp).view(np.uint8))
    group = cv2.connectedComponents(near, connectivity=8, ltype=cv2.CV_32S)[1]
    of = group[st[ids, 1], _first_x(lab, st, ids)]
    out = []
    for g in np.unique(of):
        m = ids[of == g]
        if (lobe[m] | nuc[m]).sum() > 1 and nuc[m].sum() <= 1 \
                and cfg.pale_nucleus_min_area_um2 <= area[m].sum() <= cfg.split_area_um2:
            out.append(m)
        else:
            out += [np.array([i]) for i in m[nuc[m]]]
    return out


def _join_nucleus_parts(score: np.ndarray, threshold: float, nuclei: np.ndarray,
                        labels: np.ndarray, stats: np.ndarray, centroids: np.ndarray, mpp: float,
                        cfg: CellDetectionConfig, absorbed: np.ndarray, bodies: dict) -> tuple:
    """One cell's nucleus found as platelet-sized parts: a monocyte's folds, a basophil's
    nucleus under its granules, a neutrophil's lobes, each under ``cfg.min_cell_area_um2``
    above the threshold, with the cell's cytoplasm between them (an eosinophil's red granules
    score below the body cut, so its lobes stay apart here; pale ones `_lobed_nuclei` joins). A
    cell body is what joins above ``cfg.nucleus_body_ratio`` of the threshold (cytoplasm scores
    above it; red cells and glass below, so a platelet on a red cell stays apart). The
    platelet-sized parts (``labels`` components) in a body with one nucleated component are part
    of it; in a body with none, parts that together reach ``cfg.min_cell_area_um2`` are one
    nucleus. A body with two or more nucleated components (touching cells), or with parts a pale
    nucleus took the place of (``absorbed``: `_pale_objects` found that nucleus whole), is left
    as it is.

    Returns:
        ``(labels, stats, centroids, joined)``: each part's pixels relabelled as the component
        it joins, whose ``stats`` (box and area) and centroid now cover them all; ``joined``:
        the labels of the parts (no longer in ``labels``). `detect_cells` decides whether to
        split a nucleus between touching cells by its area before the join.
    """
    n = len(stats)
    area = stats[:, cv2.CC_STAT_AREA] * mpp * mpp
    small = (area >= cfg.min_platelet_area_um2) & (area < cfg.min_cell_area_um2)
    small[0] = False  # the background
    if not small.any():
        return labels, stats, centroids, np.zeros(0, np.int64)
    body = _bodies(score, cfg.nucleus_body_ratio * threshold, bodies)
    fg = np.flatnonzero(nuclei.ravel() & (labels.ravel() > 0))  # above the threshold: in a body
    body_of = np.zeros(n, np.int64)
    body_of[labels.ravel()[fg]] = body.ravel()[fg]
    big = area >= cfg.min_cell_area_um2
    big[0] = False
    taken = np.unique(body_of[np.asarray(absorbed, np.int64)])  # bodies holding a pale nucleus
    stats, centroids, to, joined = stats.copy(), centroids.copy(), np.arange(n), []
    for b in np.setdiff1d(body_of[small & (body_of > 0)], taken):
        parts = np.flatnonzero(small & (body_of == b))
        cells = np.flatnonzero(big & (body_of == b))
        if len(cells) == 1:
            target = cells[0]
        elif not len(cells) and len(parts) > 1 and area[parts].sum() >= cfg.min_cell_area_um2:
            target = parts[np.argmax(area[parts])]
        else:
            continue
        members = np.union1d(parts, [target])
        cx, cy, x0, y0, x1, y1, _ = _union_box(members, centroids, stats, area)
        centroids[target] = cx, cy
        stats[target] = (x0, y0, x1 - x0, y1 - y0, stats[members, cv2.CC_STAT_AREA].sum())
        to[parts[parts != target]] = target
        joined += parts[parts != target].tolist()
    if not joined:
        return labels, stats, centroids, np.zeros(0, np.int64)
    return to[labels].astype(np.int32), stats, centroids, np.asarray(joined, np.int64)


def _linked_groups(linked: np.ndarray) -> np.ndarray:
    """Connected groups of a small symmetric ``(n, n)`` link matrix: each node's group is the
    lowest index it reaches (label propagation; ``n`` is a tile's few pale objects)."""
    group = np.arange(len(linked))
    while True:
        reached = np.where(linked, group[None, :], len(linked)).min(1)
        new = np.minimum(group, reached)
        if (new == group).all():
            return group
        group = new


def _first_x(lab: np.ndarray, st: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The column of each component's first pixel in its top row (components ``ids`` of the
    labels ``lab`` with stats ``st``)."""
    return np.argmax(lab[st[ids, cv2.CC_STAT_TOP]] == np.asarray(ids)[:, None], axis=1)


def _box(i: int, cent: np.ndarray, st: np.ndarray, area: float) -> tuple:
    return (*cent[i], st[i, 0], st[i, 1], st[i, 0] + st[i, 2], st[i, 1] + st[i, 3], area)


def detect_cells(tile: np.ndarray, tile_mpp: float, threshold: float,
                 cfg: CellDetectionConfig, pale: str = PALE_ALL) -> Detections:
    """Nucleated cells (and platelets) in one RGB tile. Platelets and nuclei too pale for the
    threshold are found around seeds above it (`_pale_objects`; none where
    ``cfg.pale_platelet_ratio`` is None) and come last.

    Args:
        tile: ``(H, W, 3) uint8`` at ``tile_mpp`` µm/px.
        tile_mpp: µm per tile pixel.
        threshold: the slide's stain threshold (`estimate_threshold`).
        cfg: sizes and detector resolution.
        pale: the slide's `pale_pass`: `PALE_ALL`, the pale pass's platelets and nuclei, and a
            white cell's platelet-sized nuclear parts joined (`_join_nucleus_parts`): a blood
            film's; `PALE_NUCLEI`, its pale nuclei alone (an aspirate's, whose denser
            cytoplasm the platelet part would take for platelets); `PALE_OFF`, none.

    Returns:
        `Detections` in tile pixel coordinates.
    """
    score = stain_score(tile)
    zoom = tile_mpp / cfg.work_mpp
    if abs(zoom - 1) > 1e-3:
        score = _zoom(score, zoom)
    mpp = tile_mpp / zoom if zoom else tile_mpp
    px_area = mpp * mpp
    nuclei = _open2(score > threshold)
    merged = fill_small_holes(binary_close(nuclei, _disk(cfg.merge_um / mpp)) | nuclei)
    _, labels, stats, centroids = components(merged)
    out = {k: [] for k in ("x", "y", "x0", "y0", "x1", "y1", "area_um2", "kind")}

    def add(cx, cy, x0, y0, x1, y1, a):  # work-grid pixel centres and edges -> tile pixels
        out["x"].append((cx + 0.5) / zoom - 0.5)
        out["y"].append((cy + 0.5) / zoom - 0.5)
        out["x0"].append(x0 / zoom)
        out["y0"].append(y0 / zoom)
        out["x1"].append(x1 / zoom)
        out["y1"].append(y1 / zoom)
        out["area_um2"].append(a)
        out["kind"].append(KIND_CELL if a >= cfg.min_cell_area_um2 else KIND_PLATELET)

    pale_platelets, pale_nuclei = [], []
    absorbed, joined = np.zeros(0, np.int64), np.zeros(0, np.int64)
    own = stats[:, cv2.CC_STAT_AREA] * px_area  # before parts join: whether to split a nucleus
    if pale not in (PALE_ALL, PALE_NUCLEI, PALE_OFF):
        raise ValueError(f"pale pass {pale!r}: one of {PALE_ALL}, {PALE_NUCLEI}, {PALE_OFF}")
    platelets = pale == PALE_ALL
    if pale != PALE_OFF and cfg.pale_platelet_ratio is not None:
        bodies = {}  # `_bodies` by cut, made once for both passes
        pale_platelets, pale_nuclei, absorbed = _pale_objects(
            score, threshold, merged, labels, stats, mpp, cfg, bodies, platelets)
        # after it, so that a pale nucleus takes its own parts; a blood film's only
        if platelets and cfg.nucleus_body_ratio is not None:
            labels, stats, centroids, joined = _join_nucleus_parts(
                score, threshold, nuclei, labels, stats, centroids, mpp, cfg, absorbed, bodies)
    absorbed = set(np.asarray(absorbed).tolist()) | set(joined.tolist())
    for i in _raster_order(labels, stats):
        if i in absorbed:
            continue
        x, y, w, h, px = (int(v) for v in stats[i])
        area = px * px_area
        if area < cfg.min_platelet_area_um2 or area > cfg.max_cell_area_um2:
            continue
        if own[i] <= cfg.split_area_um2:  # one cell: its numbers are the component's (parts
            # joined to it included: they do not make it two cells)
            add(*centroids[i], x, y, x + w, y + h, area)
            continue
        parts = _split(labels[y:y + h, x:x + w] == i, cfg.split_min_distance_um / mpp)
        for j in range(1, int(parts.max()) + 1):
            part = parts == j
            a = float(part.sum() * px_area)
            if a < cfg.min_platelet_area_um2:
                continue
            ys, xs = np.nonzero(part)
            add(xs.mean() + x, ys.mean() + y, xs.min() + x, ys.min() + y, xs.max() + x + 1,
                ys.max() + y + 1, a)
    for cx, cy, x0, y0, x1, y1, a in pale_nuclei + pale_platelets:  # after the others
        add(cx, cy, x0, y0, x1, y1, float(a))
    return Detections(*(np.asarray(out[k], np.float32 if k == "area_um2" else
                                   object if k == "kind" else np.float64)
                        for k in ("x", "y", "x0", "y0", "x1", "y1", "area_um2", "kind")))


def owned_by_tile(cx: np.ndarray, cy: np.ndarray, tile_x: int, tile_y: int, stride: float,
                  overlap: float, grid_shape: tuple[int, int]) -> np.ndarray:
    """Which centroids (level-0) this tile owns, so that overlapping tiles emit each cell once.

    The plane is cut into half-open cells of the tile grid shifted by half the overlap; the first
    and last row/column extend to infinity so cells at the slide border are owned too.
    """
    nx, ny = grid_shape
    col = np.clip(np.floor((cx - overlap / 2) / stride), 0, nx - 1)
    row = np.clip(np.floor((cy - overlap / 2) / stride), 0, ny - 1)
    return (col == round(tile_x / stride)) & (row == round(tile_y / stride))


def crop_around(image: np.ndarray, cx: float, cy: float, size: int, fill: int = 255
                ) -> tuple[np.ndarray, bool]:
    """``size x size`` crop centred on ``(cx, cy)``; outside the image is padded with ``fill``.

    Returns:
        ``(crop (size, size, 3) uint8, padded)``; ``padded`` flags crops that ran off the image.
    """
    h, w = image.shape[:2]
    x0 = int(round(cx - size / 2))
    y0 = int(round(cy - size / 2))
    out = np.full((size, size, 3), fill, np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out, not (x0 >= 0 and y0 >= 0 and x0 + size <= w and y0 + size <= h)


def crops_around(image: np.ndarray, cx: np.ndarray, cy: np.ndarray, size: int,
                 fill: int = 255) -> np.ndarray:
    """``(N, size, size, 3) uint8``: `crop_around` at each centre, the crops inside the image
    gathered in one indexing operation (the padded ones one by one)."""
    cx, cy = np.asarray(cx, np.float64), np.asarray(cy, np.float64)
    out = np.empty((len(cx), size, size, 3), np.uint8)
    h, w = image.shape[:2]
    x0 = np.rint(cx - size / 2).astype(np.int64)  # round half to even, as round() in crop_around
    y0 = np.rint(cy - size / 2).astype(np.int64)
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + size <= w) & (y0 + size <= h)
    if inside.any():
        windows = np.lib.stride_tricks.sliding_window_view(image, (size, size, 3))
        out[inside] = windows[y0[inside], x0[inside], 0]
    for i in np.flatnonzero(~inside):
        out[i] = crop_around(image, cx[i], cy[i], size, fill)[0]
    return out


def inside_of_crops(cx: np.ndarray, cy: np.ndarray, size: int, x0: float, y0: float,
                    x1: float, y1: float) -> np.ndarray:
    """``(N, 4) int64``: where the image region ``[x0, x1) x [y0, y1)`` (say, a slide's
    extent in a tile's pixels) lies in each `crops_around` crop, as crop-pixel boxes
    ``x0, y0, x1, y1`` clipped to the crop (the rest is padding)."""
    left = np.rint(np.asarray(cx, np.float64) - size / 2)  # the crops' origins, as crops_around
    top = np.rint(np.asarray(cy, np.float64) - size / 2)
    box = np.stack([np.ceil(x0 - left), np.ceil(y0 - top), np.floor(x1 - left),
                    np.floor(y1 - top)], axis=1)
    return np.clip(box, 0, size).astype(np.int64)


def lobes(x: np.ndarray, y: np.ndarray, codes, lobed, max_distance: float) -> np.ndarray:
    """Nucleated detections that are one cell's lobes: those called the same lobed class
    (``lobed``, for example a bilobed eosinophil's two lobes, whose thin bridge is paler than
    the threshold) with centres within ``max_distance`` (the centres' units) of each other.

    Returns:
        ``(N,) int64``: per detection, the index of the detection that stands for its cell (the
        first of the cell's lobes in order), or -1 where it stands for its own.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    out = np.full(len(x), -1, np.int64)
    codes = np.asarray(codes, dtype=object)
    for code in lobed:  # a slide's cells of one call: the near pairs only, not all pairs
        idx = np.flatnonzero(codes == code)
        pairs = cKDTree(np.c_[x[idx], y[idx]]).query_pairs(max_distance, output_type="ndarray") \
            if len(idx) > 1 else np.zeros((0, 2), np.int64)
        if not len(pairs):
            continue
        n, group = connected_components(coo_matrix(
            (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(len(idx), len(idx))),
            directed=False)
        first = np.full(n, len(idx))  # each group's first detection in order
        np.minimum.at(first, group, np.arange(len(idx)))
        lobe = first[group] != np.arange(len(idx))
        out[idx[lobe]] = idx[first[group][lobe]]
    return out


def match_centroids(xs, ys, boxes) -> tuple[int, list[int], list[int]]:
    """One-to-one matching of detections to ground-truth boxes: a detection matches a box when
    its centroid lies inside; each box takes the free detection nearest its centre.

    Returns:
        ``(matches, unmatched box indices, unmatched detection indices)``.
    """
    free = set(range(len(xs)))
    missed = []
    for b, (x0, y0, x1, y1) in enumerate(boxes):
        inside = [i for i in free if x0 <= xs[i] <= x1 and y0 <= ys[i] <= y1]
        if not inside:
            missed.append(b)
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        free.remove(min(inside, key=lambda i: (xs[i] - cx) ** 2 + (ys[i] - cy) ** 2))
    return len(boxes) - len(missed), missed, sorted(free)
