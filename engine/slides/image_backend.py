"""Plain images (PNG, JPEG) as one-level slides, decoded with Pillow."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import SlideCorrupt, SlideUnsupported
from engine.slides.base import SlideInfo, checked_mpp, fit_thumbnail

# A plain image is decoded whole, by each process that reads it. Pillow refuses one past twice
# its MAX_IMAGE_PIXELS (179 million pixels, 537 MB decoded: a 13,000 px square) as a
# decompression bomb before its size can be asked, and so does this (where a process turned
# Pillow's check off too), saying what to do instead.
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
CONVERT = ("convert it to a tiled pyramid, which is read tile by tile: vips tiffsave <image> "
           "<slide>.tif --tile --pyramid --compression jpeg")


class ImageReader:
    """`SlideReader` for small non-pyramidal images (field photographs, exported regions)."""

    backend = "image"

    def __init__(self, path: str, uri: str | None = None):
        self.uri = uri or path
        try:
            with Image.open(path) as im:
                fmt = (im.format or "image").lower()
                if im.width * im.height > MAX_PIXELS:
                    raise SlideUnsupported(self.uri, f"{im.width}x{im.height} plain image is too "
                                           f"large to decode whole; {CONVERT}")
                if im.mode not in ("RGB", "RGBA", "P", "L", "LA"):
                    raise SlideUnsupported(self.uri, f"image mode {im.mode} is not 8-bit RGB")
                dpi = im.info.get("dpi")
                rgb = im.convert("RGBA").convert("RGB") if im.mode in ("RGBA", "P", "LA") \
                    else im.convert("RGB")
                self._pixels = np.asarray(rgb)  # (H, W, 3) uint8
        except Image.DecompressionBombError as err:  # a run stopped on it (release 0.8.19)
            got = re.search(r"\((\d+) pixels\)", str(err))  # Pillow's words: its size
            size = f"of {int(got[1]) / 1e6:,.0f} million pixels " if got else ""
            raise SlideUnsupported(self.uri, f"plain image {size}is too large to decode whole "
                                   f"(over {MAX_PIXELS / 1e6:.0f} million); {CONVERT}") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise SlideCorrupt(self.uri, f"image could not be decoded: {err}") from err
        mpp = (25_400.0 / float(dpi[0]), 25_400.0 / float(dpi[1])) if dpi and dpi[0] and dpi[1] \
            else (None, None)
        mpp_x, mpp_y, src, note = checked_mpp(*mpp, "tiff_resolution" if fmt == "tiff" else
                                              "metadata")
        h, w = self._pixels.shape[:2]
        self.info = SlideInfo(uri=self.uri, backend=self.backend, format=fmt,
                              level_dimensions=((w, h),), level_downsamples=(1.0,),
                              mpp_x=mpp_x, mpp_y=mpp_y, mpp_source=src, notes=note)

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        if level != 0:
            raise IndexError(f"plain images have one level, asked for level {level}")
        h, w = self._pixels.shape[:2]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def read_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        return fit_thumbnail(self._pixels, max_size)

    def close(self) -> None:
        self._pixels = np.empty((0, 0, 3), np.uint8)
