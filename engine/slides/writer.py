"""Write tiled pyramidal TIFFs (JPEG tiles, pixel size in the resolution tags) with libvips.

Used to build slides the project needs itself: synthetic test slides, benchmark slides and the
blood-smear slide assembled from real BCCD fields.
"""

from __future__ import annotations

import numpy as np
import pyvips


def write_pyramid_tiff(image: np.ndarray | pyvips.Image, path: str, mpp: float,
                       tile_px: int = 256, quality: int = 90, compression: str = "jpeg") -> None:
    """Save an RGB image as a tiled pyramid that OpenSlide opens as ``generic-tiff``.

    Args:
        image: ``(H, W, 3) uint8`` array or a 3-band uchar `pyvips.Image` (may be lazy and huge).
        path: destination ``.tif`` path.
        mpp: µm per level-0 pixel, written as TIFF resolution (pixels per centimetre).
        tile_px: tile side.
        quality: JPEG quality.
        compression: ``jpeg``, ``deflate``, ``lzw`` or ``none``.
    """
    img = pyvips.Image.new_from_array(image) if isinstance(image, np.ndarray) else image
    if img.bands != 3 or img.format != "uchar":
        raise ValueError(f"expected 3-band uchar RGB, got {img.bands} bands of {img.format}")
    px_per_mm = 1000.0 / mpp
    img = img.copy(interpretation="srgb", xres=px_per_mm, yres=px_per_mm)
    img.tiffsave(path, tile=True, tile_width=tile_px, tile_height=tile_px, pyramid=True,
                 compression=compression, Q=quality, resunit="cm", bigtiff=img.width *
                 img.height * 3 > 2**31)
