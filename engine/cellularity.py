"""Label-free marrow cellularity from tiles at about 2 µm/px: stained (cellular) area over
cellular plus fat area inside the tissue. Pure numpy.

Fat vacuoles are unstained and bright; haematopoietic tissue is stained. Bone and large vessels
are not yet separated (issue: cellularity and MIL), so this is a first estimate.
"""

from __future__ import annotations

import numpy as np

from engine.tissue import rgb_to_saturation_value

FAT_MAX_SATURATION = 0.08
FAT_MIN_VALUE = 0.85
CELLULAR_MIN_SATURATION = 0.15


def tile_area_counts(tile: np.ndarray) -> tuple[int, int]:
    """``(cellular_px, fat_px)`` of one ``(H, W, 3) uint8`` tile."""
    sat, val = rgb_to_saturation_value(tile)
    fat = (sat < FAT_MAX_SATURATION) & (val > FAT_MIN_VALUE)
    cellular = sat >= CELLULAR_MIN_SATURATION
    return int(cellular.sum()), int(fat.sum())


def slide_cellularity(cellular_px, fat_px) -> float | None:
    """Cellular fraction of marrow space over a slide's tiles, in percent (None without any)."""
    c, f = float(np.sum(cellular_px)), float(np.sum(fat_px))
    return 100.0 * c / (c + f) if c + f > 0 else None
