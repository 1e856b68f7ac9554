"""Direct decoding of JPEG-tiled TIFF levels (generic tiled TIFF pyramids, Aperio SVS) and of a
DICOM series' JPEG frames.

OpenSlide decodes each JPEG tile to premultiplied ARGB, paints it through cairo and hands back
RGBA that we composite to RGB again: on a 1120 px region that is about four times the cost of
the JPEG decoding itself. Here the tiles' JPEG streams are read from the file (``os.pread``, no
shared file position, so threads may share one reader) and decoded straight to RGB by
libjpeg-turbo (simplejpeg), in strict mode: a stream libjpeg finds corrupt is
refused, as OpenSlide refuses it, where OpenCV returns the damaged pixels. The
TIFF's structure comes from tifffile.

Only levels whose every property is known are taken: tiled, JPEG, 8-bit, 3 samples, chunky,
photometric RGB or YCbCr, every tile present. An RGB-photometric stream (Aperio) carries no
marker saying its components are not YCbCr, so an Adobe APP14 marker with transform 0 is put in
front, which makes libjpeg read them as RGB, as OpenSlide does. Anything else (a tile that does
not decode) returns None and the caller reads through OpenSlide. At fractional level coordinates
OpenSlide interpolates between level pixels; the caller (`OpenSlideReader`) takes the nearest
level pixel's region instead.

A DICOM series' levels are its VOLUME files of one focal plane and optical path, JPEG
baseline or extended, whose frames an offset table (Basic or Extended) places; each frame is a
whole JPEG stream (`engine.slides.dicom.read_layout`). OpenSlide reads a DICOM frame through
the same cairo path: a 1,024 px region took 23 ms through it, 3.8 ms here. Its reads at
fractional level positions stay with OpenSlide (`OpenSlideReader._read_direct`).

The caller also checks each level against OpenSlide before its first read (its 512 px square at
the level's origin, a position every level has whole): a level whose pixels differ is never read
here again.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import simplejpeg

from engine.slides.base import quiet_tifffile

_JPEG, _RGB, _YCBCR = 7, 2, 6
# DICOM's JPEG baseline and extended transfer syntaxes, and the photometrics of their frames
_DICOM_JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
_DICOM_YCBCR = ("YBR_FULL_422", "YBR_FULL")
# APP14 "Adobe", version 100, flags 0 0, transform 0: the components are RGB, not YCbCr
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class _Level:
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # (ny, nx) byte offset of each tile's stream
    counts: np.ndarray   # (ny, nx) its length
    header: bytes        # SOI, the Adobe marker for RGB streams, the shared tables
    path: str = ""       # the file holding it (a DICOM series: a file a level); "": the TIFF


def _level_of(page) -> _Level | None:
    """The layout of one TIFF page if this module can decode it, else None."""
    if not page.is_tiled or int(page.compression) != _JPEG or page.samplesperpixel != 3 \
            or int(page.photometric) not in (_RGB, _YCBCR) or page.bitspersample != 8 \
            or int(page.planarconfig) != 1 or getattr(page, "imagedepth", 1) != 1:
        return None
    nx = -(-page.imagewidth // page.tilewidth)
    ny = -(-page.imagelength // page.tilelength)
    offsets = np.asarray(page.dataoffsets, np.int64)
    counts = np.asarray(page.databytecounts, np.int64)
    if offsets.size != nx * ny or (counts <= 0).any() or (offsets <= 0).any():
        return None  # sparse (missing tiles) or an unexpected layout
    tables = bytes(page.jpegtables or b"")
    if tables and not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
        return None
    header = b"\xff\xd8" + (_ADOBE_RGB if int(page.photometric) == _RGB else b"") + tables[2:-2]
    return _Level(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength,
                  offsets.reshape(ny, nx), counts.reshape(ny, nx), header)


def _dicom_layout(path: str):
    from engine.slides.dicom import read_layout

    with open(path, "rb") as fh:
        return read_layout(fh, os.fstat(fh.fileno()).st_size)


def _dicom_level(got, path: str) -> _Level | None:
    """The level of the DICOM file ``path`` (its `read_layout` ``got``) if this module can
    decode it."""
    if not (got.volume and got.encapsulated and got.tiled and got.frames) \
            or got.syntax not in _DICOM_JPEG or got.samples != 3 or got.bits != 8 \
            or got.photometric not in (*_DICOM_YCBCR, "RGB"):
        return None
    nx, ny = -(-got.width // got.tile_w), -(-got.height // got.tile_h)
    items = np.asarray(got.frames, np.int64)
    offsets = items[:, 0] + 8  # past each frame's item tag and length
    counts = items[:, 1] - offsets
    if (counts <= 0).any():
        return None
    header = b"\xff\xd8" + (_ADOBE_RGB if got.photometric == "RGB" else b"")
    return _Level(got.width, got.height, got.tile_w, got.tile_h, offsets.reshape(ny, nx),
                  counts.reshape(ny, nx), header, path)


def _dicom_levels(path: str) -> dict[tuple[int, int], _Level]:
    """The decodable levels of the DICOM series ``path`` is a file of (its folder's files of
    the same series), by size."""
    from engine.slides.dicom import local_series

    own = _dicom_layout(path)
    if own is None:
        return {}
    by_size: dict[tuple[int, int], _Level] = {}
    for other in local_series(path):
        got = own if other == path else _dicom_layout(other)
        level = _dicom_level(got, other) if got and got.series == own.series else None
        if level is not None:
            by_size.setdefault((level.width, level.height), level)
    return by_size


class JpegTiles:
    """The directly decodable levels of one TIFF file (or of the DICOM series ``path`` is a file
    of, with ``dicom``), matched to the reader's levels by size.

    Args:
        path: local file.
        level_dimensions: ``(width, height)`` per level as OpenSlide reports them.
        level_downsamples: level-0 pixels per level pixel.
    """

    def __init__(self, path: str, level_dimensions, level_downsamples,
                 cache_bytes: int = 32 * 2**20, dicom: bool = False):
        tifffile = quiet_tifffile()

        # decoded tiles, least recently used first: neighbouring regions share JPEG tiles (an
        # encoder tile of 224 px on 256 px JPEG tiles touches 3.5 of them on average)
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes, self._cached = cache_bytes, 0
        self._lock = threading.Lock()
        self.levels: dict[int, _Level] = {}
        self.downsamples = tuple(float(d) for d in level_downsamples)
        if dicom:
            by_size = _dicom_levels(path)
        else:
            with tifffile.TiffFile(path) as tif:
                by_size = {}
                for page in tif.pages:
                    level = _level_of(page)
                    if level is not None:
                        by_size.setdefault((level.width, level.height), level)
        for i, dims in enumerate(level_dimensions):
            if tuple(dims) in by_size:
                self.levels[i] = by_size[tuple(dims)]
        # a descriptor a file (no shared position: threads pread from them at once)
        self._fds = {p: os.open(p or path, os.O_RDONLY)
                     for p in sorted({lv.path for lv in self.levels.values()})}

    def __bool__(self) -> bool:
        return bool(self.levels)

    def read(self, level: int, x: int, y: int, width: int, height: int,
             background=(255, 255, 255), nearest: bool = False) -> np.ndarray | None:
        """``(height, width, 3) uint8`` at ``level`` from level-0 ``(x, y)``, outside the image
        ``background``; None where this level or these coordinates are not handled here.

        Where ``(x, y)`` falls between the level's pixels (its downsample is fractional, as is
        common on SVS files, or the position is odd), OpenSlide interpolates between them:
        None, or with ``nearest`` the region from the nearest level pixel (at most half a level
        pixel away)."""
        lv = self.levels.get(level)
        if lv is None or lv.path not in self._fds:  # closed
            return None
        ds = self.downsamples[level]
        lx, ly = x / ds, y / ds
        if nearest:
            lx, ly = math.floor(lx + 0.5), math.floor(ly + 0.5)
        elif lx != int(lx) or ly != int(ly):
            return None
        lx, ly = int(lx), int(ly)
        out = np.empty((height, width, 3), np.uint8)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, lv.width), min(ly + height, lv.height)
        bg = np.asarray(background, np.uint8)
        if x1 <= x0 or y1 <= y0:
            out[:] = bg
            return out
        # the strips that lie off the image (only these: filling a whole region costs as much
        # as decoding it)
        out[:y0 - ly], out[y1 - ly:] = bg, bg
        out[:, :x0 - lx], out[:, x1 - lx:] = bg, bg
        for r in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1):
            for c in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1):
                tile = self._tile(level, lv, r, c)
                if tile is None:
                    return None
                tx, ty = c * lv.tile_w, r * lv.tile_h
                sx0, sy0 = max(x0, tx), max(y0, ty)
                sx1, sy1 = min(x1, tx + lv.tile_w), min(y1, ty + lv.tile_h)
                out[sy0 - ly:sy1 - ly, sx0 - lx:sx1 - lx] = tile[sy0 - ty:sy1 - ty,
                                                                 sx0 - tx:sx1 - tx]
        return out

    def _tile(self, level: int, lv: _Level, r: int, c: int) -> np.ndarray | None:
        """Tile ``(r, c)`` of ``level``, decoded once while it stays in the cache."""
        key = (level, r, c)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        tile = self._decode(lv, r, c)
        if tile is None or tile.nbytes > self._cache_bytes:
            return tile
        tile.setflags(write=False)  # shared by later reads: callers copy out of it
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached += tile.nbytes
            while self._cached > self._cache_bytes:
                self._cached -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _decode(self, lv: _Level, r: int, c: int) -> np.ndarray | None:
        data = os.pread(self._fds[lv.path], int(lv.counts[r, c]), int(lv.offsets[r, c]))
        if not data.startswith(b"\xff\xd8"):
            return None
        try:  # strict: libjpeg's warnings (corrupt data) raise; OpenSlide then says what is wrong
            tile = simplejpeg.decode_jpeg(lv.header + data[2:], colorspace="RGB", strict=True)
        except ValueError:
            return None
        if tile.shape[:2] != (lv.tile_h, lv.tile_w):
            return None
        return tile

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
