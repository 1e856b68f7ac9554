"""Label-free marrow cellularity from tiles at about 2 µm/px: stained (cellular) area over
cellular plus fat area inside the tissue. Pure numpy.

Fat vacuoles are unstained and bright; haematopoietic tissue is stained. Bone and large vessels
are not yet separated (issue: cellularity and MIL), so this is a first estimate.
"""

from __future__ import annotations

import numpy as np

FAT_MAX_SATURATION = 0.08
FAT_MIN_VALUE = 0.85
CELLULAR_MIN_SATURATION = 0.15


def tile_area_counts(tile: np.ndarray) -> tuple[int, int]:
    """``(cellular_px, fat_px)`` of one ``(H, W, 3) uint8`` tile.

    HSV saturation ``(max - min) / max`` and value ``max`` compared in integers (no float image:
    this runs on every tile of every slide).
    """
    mx = tile.max(axis=-1).astype(np.int32)
    spread = mx - tile.min(axis=-1)
    fat = (spread * 100 < FAT_MAX_SATURATION * 100 * mx) & (mx > FAT_MIN_VALUE * 255)
    cellular = spread * 100 >= CELLULAR_MIN_SATURATION * 100 * mx
    return int(np.count_nonzero(cellular & (mx > 0))), int(np.count_nonzero(fat))


def slide_cellularity(cellular_px, fat_px) -> float | None:
    """Cellular fraction of marrow space over a slide's tiles, in percent (None without any)."""
    c, f = float(np.sum(cellular_px)), float(np.sum(fat_px))
    return 100.0 * c / (c + f) if c + f > 0 else None
