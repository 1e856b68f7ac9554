"""OpenSlide backend: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Ventana BIF, Philips TIFF,
DICOM WSI, Sakura and generic tiled TIFF pyramids."""

from __future__ import annotations

import ctypes

import numpy as np
import openslide

from engine.errors import SlideCorrupt, SlideError, SlideUnsupported
from engine.slides.base import SlideInfo, checked_mpp, composite_rgba

# OpenSlide error texts that mean "a format we do not take" rather than "damaged bytes".
_UNSUPPORTED_MARKERS = {
    "Unsupported TIFF compression": "TIFF compression scheme not supported by OpenSlide",
    "Couldn't get image flavor": "DICOM file is not a whole-slide image (no VL Whole Slide "
                                 "Microscopy image flavor)",
    "Unsupported": "format not supported by OpenSlide",
}


def translate_openslide_error(uri: str, err: Exception, during: str, path: str | None = None
                              ) -> SlideError:
    """Map an OpenSlide exception onto a typed slide error that keeps its message.

    A staged local path in the message is replaced by the slide's URI.
    """
    msg = str(err) or type(err).__name__
    if path and path != uri:
        msg = msg.replace(path, uri)
    if isinstance(err, openslide.OpenSlideUnsupportedFormatError):
        return SlideUnsupported(uri, f"not a format OpenSlide reads ({msg})")
    for marker, meaning in _UNSUPPORTED_MARKERS.items():
        if marker in msg:
            return SlideUnsupported(uri, f"{meaning}: {msg}")
    return SlideCorrupt(uri, f"{during} failed: {msg}")


def _float(props, key) -> float | None:
    try:
        return float(props[key])
    except (KeyError, TypeError, ValueError):
        return None


class OpenSlideReader:
    """`SlideReader` over ``openslide.OpenSlide`` (needs a local path; S3 objects are staged)."""

    backend = "openslide"

    def __init__(self, path: str, uri: str | None = None):
        self.uri = uri or path
        self._path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as err:
            raise translate_openslide_error(self.uri, err, "open", path) from err
        props = self._slide.properties
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        source = "tiff_resolution" if vendor == "generic-tiff" else "metadata"
        mpp_x, mpp_y, mpp_source, note = checked_mpp(
            _float(props, openslide.PROPERTY_NAME_MPP_X),
            _float(props, openslide.PROPERTY_NAME_MPP_Y), source)
        bg = props.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR)
        self._background = tuple(bytes.fromhex(bg)) if bg and len(bg) == 6 else (255, 255, 255)
        self.info = SlideInfo(
            uri=self.uri,
            backend=self.backend,
            format=vendor,
            level_dimensions=tuple(tuple(int(v) for v in d) for d in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp_x=mpp_x,
            mpp_y=mpp_y,
            mpp_source=mpp_source,
            objective=_float(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
            associated_images=tuple(sorted(self._slide.associated_images.keys())),
            notes=note,
        )

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region((int(x), int(y)), int(level),
                                                      (int(width), int(height))))
        except openslide.OpenSlideError as err:
            raise translate_openslide_error(self.uri, err, f"reading level {level} at ({x}, {y})",
                                            self._path) from err
        return composite_rgba(rgba, self._background)

    def read_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        try:
            thumb = self._slide.get_thumbnail(tuple(int(v) for v in max_size))
        except openslide.OpenSlideError as err:
            raise translate_openslide_error(self.uri, err, "reading the thumbnail",
                                            self._path) from err
        return np.asarray(thumb.convert("RGB"))

    def close(self) -> None:
        if self._slide is not None:  # idempotent: a reader may be closed, then collected
            slide, self._slide = self._slide, None
            try:
                slide.close()
            except ctypes.ArgumentError:  # the garbage collector closed its handle first
                pass
