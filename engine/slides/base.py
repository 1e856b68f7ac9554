"""The small protocol every slide backend implements, and the metadata it reports."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

# Microscope pixel sizes live well inside this range; TIFF resolution tags outside it are
# scanner-less defaults (72 dpi = 352.8 µm/px) and must not be mistaken for a real pixel size.
PLAUSIBLE_MPP = (0.02, 50.0)

MPP_SOURCES = ("metadata", "tiff_resolution", "override", "missing")


@dataclass(frozen=True)
class SlideInfo:
    """What a backend knows about a slide after opening it.

    Attributes:
        uri: the slide's URI as given (local path or ``s3://``).
        backend: registry name of the backend that opened it.
        format: vendor / file format (``aperio``, ``generic-tiff``, ``dicom``, ``ome-tiff``, ``png``…).
        level_dimensions: ``(width, height)`` per pyramid level, level 0 first.
        level_downsamples: level-0 pixels per level pixel, per level.
        mpp_x, mpp_y: µm per level-0 pixel, or None when unknown.
        mpp_source: one of `MPP_SOURCES`.
        objective: nominal objective power (20, 40…), if recorded.
        associated_images: names of label / macro / thumbnail images stored in the file.
        notes: human-readable remarks (e.g. why a resolution tag was ignored).
    """

    uri: str
    backend: str
    format: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float | None = None
    mpp_y: float | None = None
    mpp_source: str = "missing"
    objective: float | None = None
    associated_images: tuple[str, ...] = ()
    notes: str | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def width(self) -> int:
        return self.level_dimensions[0][0]

    @property
    def height(self) -> int:
        return self.level_dimensions[0][1]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def mpp(self) -> float | None:
        """Mean µm per level-0 pixel (None when unknown)."""
        if self.mpp_x is None or self.mpp_y is None:
            return None
        return (self.mpp_x + self.mpp_y) / 2

    def replace(self, **changes) -> SlideInfo:
        return dataclasses.replace(self, **changes)


def checked_mpp(mpp_x: float | None, mpp_y: float | None, source: str
                ) -> tuple[float | None, float | None, str, str | None]:
    """Validate a pixel size read from a file: implausible values become ``missing`` with a note."""
    if mpp_x is None or mpp_y is None or not (mpp_x > 0 and mpp_y > 0):
        return None, None, "missing", None
    lo, hi = PLAUSIBLE_MPP
    if not (lo <= mpp_x <= hi and lo <= mpp_y <= hi):
        note = (f"ignored {source} pixel size {mpp_x:.4g}x{mpp_y:.4g} µm/px: outside the "
                f"microscopy range {lo}-{hi} µm/px (a default DPI tag, not a scanner value)")
        return None, None, "missing", note
    return float(mpp_x), float(mpp_y), source, None


def composite_rgba(rgba: np.ndarray, background=(255, 255, 255)) -> np.ndarray:
    """``(H, W, 4) uint8`` premultiplied RGBA over a background colour -> ``(H, W, 3) uint8``.

    Fully transparent pixels are areas the scanner never imaged; they become the slide's background
    colour, as OpenSlide documents, not invented tissue.
    """
    rgba = np.ascontiguousarray(rgba)
    if cv2.extractChannel(rgba, 3).min() == 255:  # the common case: nothing to blend
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)  # a copy, several times np's speed
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    bg = np.asarray(background, np.uint16)
    out = rgb + ((255 - alpha) * bg + 127) // 255  # premultiplied: C = c*a, so add bg*(1-a)
    return np.clip(out, 0, 255).astype(np.uint8)


def thumbnail_size(width: int, height: int, max_size: tuple[int, int]) -> tuple[int, int]:
    """The size Pillow's ``Image.thumbnail`` gives a ``width`` x ``height`` image to fit
    ``max_size`` (its rounding, the aspect kept; an image that fits keeps its size)."""
    x, y = (int(v) for v in max_size)
    if x >= width and y >= height:
        return width, height
    aspect = width / height

    def nearest(n: float, key) -> int:
        return max(min(math.floor(n), math.ceil(n), key=key), 1)

    if x / y >= aspect:
        x = nearest(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = nearest(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def fit_thumbnail(rgb: np.ndarray, max_size: tuple[int, int]) -> np.ndarray:
    """``rgb`` reduced to fit ``max_size`` (w, h) as `thumbnail_size` says, each pixel the
    mean of the area it covers (OpenCV's area filter). Pillow's Lanczos filter, as OpenSlide's
    ``get_thumbnail`` uses, took 40 ms where this takes 7 to reduce a 2048 px level to a tissue
    mask's 1032 px thumbnail, a quarter of planning an encoder slide's tiles."""
    h, w = rgb.shape[:2]
    size = thumbnail_size(w, h, max_size)
    if size == (w, h):
        return rgb
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


@runtime_checkable
class SlideReader(Protocol):
    """One open slide. Coordinates are level-0 pixels; pixels come back as ``uint8 (H, W, 3)``.

    Readers never return made-up pixels for unreadable data: they raise `SlideCorrupt`. Areas outside
    the scanned image are the slide background (white unless the file says otherwise).
    """

    info: SlideInfo

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read ``(height, width, 3) uint8`` at ``level`` whose top-left is level-0 ``(x, y)``."""
        ...

    def read_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        """Whole slide downsampled to fit ``max_size`` (w, h), aspect kept, ``(h, w, 3) uint8``."""
        ...

    def close(self) -> None:
        ...


def quiet_tifffile():
    """tifffile, with its log of the tags it cannot read turned off. Probing a damaged TIFF
    (`engine.slides.jpeg_tiles`, `engine.slides.header_copy`) logged a warning per bad tag,
    naming no file, that Ray carried to the job's output (21 lines over 394 damaged slides);
    the slide's status row says what is wrong with it, in OpenSlide's words."""
    import tifffile

    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    return tifffile
