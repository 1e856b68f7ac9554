"""OpenSlide backend: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Leica SCN, Ventana BIF, Philips TIFF,
DICOM WSI, Sakura and generic tiled TIFF pyramids."""

from __future__ import annotations

import ctypes
import os
import shutil
import weakref

import numpy as np
import openslide

from engine.errors import SlideCorrupt, SlideError, SlideUnsupported
from engine.slides.base import SlideInfo, checked_mpp, composite_rgba, fit_thumbnail
from engine.slides.dicom import is_dicom_name, series_view

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


# vendors whose levels OpenSlide reads as a plain grid of TIFF tiles (Ventana, Philips and
# Leica layouts overlap, skip or combine tiles and stay with OpenSlide)
DIRECT_JPEG_VENDORS = ("generic-tiff", "aperio", "dicom")
# the side of the square at a level's origin whose direct decoding is checked against OpenSlide's
# before the level's first read (across the edges of the tiles it spans). Checking a cell tile's
# sample read (1024 px) whole took OpenSlide 20 ms of a planner's 200 ms per slide
CHECK_PX = 512


class OpenSlideReader:
    """`SlideReader` over ``openslide.OpenSlide`` (needs a local path; S3 objects are staged).

    With ``direct_jpeg``, the JPEG-tiled levels of generic TIFFs, Aperio SVS and DICOM series
    are decoded directly (`engine.slides.jpeg_tiles`). Before its first read each such level is
    checked against OpenSlide on the `CHECK_PX` square at its origin, and a level whose pixels
    differ there goes back to OpenSlide for good. At fractional level positions the direct path
    reads from the nearest level pixel, where OpenSlide interpolates (`_read_direct`; a DICOM
    series leaves those to OpenSlide).
    """

    backend = "openslide"

    def __init__(self, path: str, uri: str | None = None, direct_jpeg: bool = True):
        self.uri = uri or path
        self._path = path
        self._jpeg = None  # JpegTiles, when direct decoding applies
        self._checked: dict[int, bool] = {}  # level -> agreed with OpenSlide on its first read
        self._slide = None
        # a local DICOM series' files alone, linked, where its folder holds other series;
        # removed on close, or once the reader is collected unclosed
        self._view = series_view(path) if is_dicom_name(path) else None
        self._drop_view = weakref.finalize(self, shutil.rmtree, os.path.dirname(self._view),
                                           True) if self._view else None
        try:
            self._slide = openslide.OpenSlide(self._view or path)
        except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError) as err:
            self.close()
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
        if direct_jpeg and vendor in DIRECT_JPEG_VENDORS:
            self._open_direct()

    @property
    def direct_checks(self) -> dict[int, bool]:
        """Per level checked so far: whether it decodes directly as OpenSlide decodes it."""
        return dict(self._checked)

    def trust_checks(self, checks: dict[int, bool]) -> None:
        """Take ``checks`` (another reader's `direct_checks` of this file: the planner's, which
        read the same levels) instead of checking those levels again. A reader's first read of
        a level otherwise costs an OpenSlide read of the check square: 5 ms, where a 224 px
        encoder tile takes 0.7, paid by each process that reads the slide."""
        for level, agrees in checks.items():
            if self._jpeg is not None and int(level) in self._jpeg.levels:
                self._checked.setdefault(int(level), bool(agrees))

    def will_check(self, level: int) -> bool:
        """Whether the next read of ``level`` first checks its direct decoding (`_agrees`),
        which reads the `CHECK_PX` square at its origin."""
        return self._jpeg is not None and level in self._jpeg.levels and level not in self._checked

    def _open_direct(self) -> None:
        """JPEG-tiled levels decoded without OpenSlide (`engine.slides.jpeg_tiles`), each
        checked against OpenSlide on its first read."""
        from engine.slides.jpeg_tiles import JpegTiles

        try:
            jpeg = JpegTiles(self._view or self._path, self.info.level_dimensions,
                             self.info.level_downsamples, dicom=self.info.format == "dicom")
        except Exception:  # noqa: BLE001 - a TIFF tifffile cannot parse: OpenSlide reads it all
            return
        if jpeg:
            self._jpeg = jpeg

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        fast = self._read_direct(level, x, y, width, height)
        return fast if fast is not None else self._read_openslide(level, x, y, width, height)

    def _read_direct(self, level: int, x: int, y: int, width: int, height: int
                     ) -> np.ndarray | None:
        """The region decoded directly, or None where OpenSlide must read it (no direct path
        for this level, one that disagreed with OpenSlide, or a tile that does not decode).

        At a fractional level position (a level whose downsample is not whole, as is common on
        SVS files, or a level-0 position that is no multiple of it) the region starts at the
        nearest level pixel, where OpenSlide interpolates between level pixels (through it a
        synthetic 0.252 µm/px biopsy's encoder tiles cost a reader 5 times the CPU). Not on a
        DICOM series (decoded directly since release 0.8.5, a release whose pixels are 0.8.4's):
        there OpenSlide reads it, as before."""
        if self._jpeg is None or level not in self._jpeg.levels or not self._agrees(level):
            return None
        return self._jpeg.read(level, x, y, width, height, self._background,
                               nearest=self.info.format != "dicom")

    def _agrees(self, level: int) -> bool:
        """Whether ``level`` decodes directly as OpenSlide decodes it, checked once: its
        `CHECK_PX` square at the level's origin (a whole position on every level) both ways."""
        if level not in self._checked:
            w, h = (min(CHECK_PX, v) for v in self.info.level_dimensions[level])
            fast = self._jpeg.read(level, 0, 0, w, h, self._background)
            self._checked[level] = fast is not None and bool(
                np.array_equal(fast, self._read_openslide(level, 0, 0, w, h)))
        return self._checked[level]

    def _read_openslide(self, level: int, x: int, y: int, width: int, height: int
                        ) -> np.ndarray:
        try:
            rgba = np.asarray(self._slide.read_region((int(x), int(y)), int(level),
                                                      (int(width), int(height))))
        except openslide.OpenSlideError as err:
            raise translate_openslide_error(self.uri, err, f"reading level {level} at ({x}, {y})",
                                            self._path) from err
        return composite_rgba(rgba, self._background)

    def thumbnail_level(self, max_size: tuple[int, int]) -> int:
        """The level OpenSlide's ``get_thumbnail`` would take for ``max_size``: the best for
        its downsample."""
        size = tuple(max(int(v), 1) for v in max_size)
        return self._slide.get_best_level_for_downsample(
            max(d / t for d, t in zip(self.info.dimensions, size)))

    def read_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        """The `thumbnail_level`, decoded directly where it can be (a quarter of the time:
        OpenSlide composites the level through cairo), reduced by `fit_thumbnail`."""
        level = self.thumbnail_level(max_size)
        dims = self.info.level_dimensions[level]
        whole = self._read_direct(level, 0, 0, *dims)
        if whole is None:
            whole = self._read_openslide(level, 0, 0, *dims)
        return fit_thumbnail(whole, tuple(max(int(v), 1) for v in max_size))

    def close(self) -> None:
        if self._jpeg is not None:
            self._jpeg.close()
        if self._slide is not None:  # idempotent: a reader may be closed, then collected
            slide, self._slide = self._slide, None
            try:
                slide.close()
            except ctypes.ArgumentError:  # the garbage collector closed its handle first
                pass
        if self._drop_view is not None:
            self._drop_view()
