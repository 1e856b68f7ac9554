"""pyvips backend: generic and OME-TIFF pyramids (pages or sub-IFDs) and strip TIFFs as one-level
slides; also the fallback for TIFFs OpenSlide does not claim."""

from __future__ import annotations

import re

import numpy as np
import pyvips

from engine.errors import SlideCorrupt, SlideUnsupported
from engine.slides.base import SlideInfo, checked_mpp

_OME_SIZE = re.compile(r'PhysicalSize([XY])="([0-9.eE+-]+)"')
_OME_UNIT = re.compile(r'PhysicalSize([XY])Unit="([^"]+)"')
_UNIT_TO_UM = {"\u00b5m": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _field(img: pyvips.Image, name: str, default=None):
    return img.get(name) if name in img.get_fields() else default


def _describe_refusal(img: pyvips.Image, n_pages: int) -> str | None:
    """Why an image is not a brightfield RGB slide, or None if it is one."""
    desc = str(_field(img, "image-description", "") or "")
    if "PerkinElmer-QPI" in desc:
        return (f"multiplex fluorescence QPTIFF ({n_pages} single-channel pages); hemeflow reads "
                "brightfield RGB slides only")
    if img.format != "uchar":
        return (f"{img.format} samples ({img.bands} band(s), {n_pages} page(s)); hemeflow reads "
                "8-bit brightfield RGB slides only")
    if img.bands not in (3, 4):
        return (f"{img.bands}-band image ({img.interpretation}, {n_pages} page(s)); hemeflow "
                "reads brightfield RGB slides only")
    return None


class VipsReader:
    """`SlideReader` over libvips' TIFF loader."""

    backend = "vips"

    def __init__(self, path: str, uri: str | None = None):
        self.uri = uri or path
        self._path = path
        try:
            base = pyvips.Image.new_from_file(path, access="random")
            n_pages = int(_field(base, "n-pages", 1))
            refusal = _describe_refusal(base, n_pages)
            if refusal:
                raise SlideUnsupported(self.uri, refusal)
            self._levels = self._find_levels(base, n_pages)
        except pyvips.Error as err:
            raise SlideCorrupt(self.uri, "TIFF that neither OpenSlide nor libvips can decode "
                               f"(truncated or damaged?): {self._msg(err)}") from err
        loader = str(_field(base, "vips-loader", "unknown"))
        desc = str(_field(base, "image-description", "") or "")
        is_ome = desc.lstrip().startswith("<?xml") and "<OME" in desc
        fmt = "ome-tiff" if is_ome else loader.replace("load", "").replace("_source", "")
        mpp_x, mpp_y, src = self._read_mpp(base, desc, is_ome)
        mpp_x, mpp_y, src, note = checked_mpp(mpp_x, mpp_y, src)
        w0, h0 = self._levels[0].width, self._levels[0].height
        self.info = SlideInfo(
            uri=self.uri,
            backend=self.backend,
            format=fmt,
            level_dimensions=tuple((lv.width, lv.height) for lv in self._levels),
            level_downsamples=tuple((w0 / lv.width + h0 / lv.height) / 2 for lv in self._levels),
            mpp_x=mpp_x, mpp_y=mpp_y, mpp_source=src, notes=note,
        )

    def _find_levels(self, base: pyvips.Image, n_pages: int) -> list[pyvips.Image]:
        n_sub = int(_field(base, "n-subifds", 0))
        if n_sub:  # OME-TIFF style: reduced levels hang off page 0 as sub-IFDs
            return [base] + [pyvips.Image.new_from_file(self._path, subifd=i, access="random")
                             for i in range(n_sub)]
        levels = [base]
        for page in range(1, n_pages):  # classic pyramid: one page per level, largest first
            img = pyvips.Image.new_from_file(self._path, page=page, access="random")
            prev = levels[-1]
            same_kind = img.bands == base.bands and img.format == base.format
            aspect_ok = abs(img.width / img.height - base.width / base.height) < 0.02 * (
                base.width / base.height) + 2 / img.height
            if not (same_kind and aspect_ok and img.width < prev.width):
                break  # label / macro images follow the pyramid in some files
            levels.append(img)
        return levels

    @staticmethod
    def _read_mpp(img: pyvips.Image, desc: str, is_ome: bool):
        if is_ome:
            sizes = dict(_OME_SIZE.findall(desc))
            units = dict(_OME_UNIT.findall(desc))
            if "X" in sizes and "Y" in sizes:
                fx = _UNIT_TO_UM.get(units.get("X", "µm"), None)
                fy = _UNIT_TO_UM.get(units.get("Y", "µm"), None)
                if fx and fy:
                    return float(sizes["X"]) * fx, float(sizes["Y"]) * fy, "metadata"
        if "resolution-unit" in img.get_fields() and img.xres > 0 and img.yres > 0:
            return 1000.0 / img.xres, 1000.0 / img.yres, "tiff_resolution"  # xres is px/mm
        return None, None, "missing"

    def _decode(self, img: pyvips.Image, what: str) -> np.ndarray:
        try:
            if img.bands == 4:
                img = img.flatten(background=[255, 255, 255])
            return np.ascontiguousarray(img.cast("uchar").numpy())
        except pyvips.Error as err:
            raise SlideCorrupt(self.uri, f"{what} failed: {self._msg(err)}") from err

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        img = self._levels[level]
        ds = self.info.level_downsamples[level]
        lx, ly = int(round(x / ds)), int(round(y / ds))
        out = np.full((height, width, 3), 255, np.uint8)  # outside the image: slide background
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + width, img.width), min(ly + height, img.height)
        if x1 > x0 and y1 > y0:
            patch = self._decode(img.crop(x0, y0, x1 - x0, y1 - y0),
                                 f"reading level {level} at ({x}, {y})")
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = patch
        return out

    def read_thumbnail(self, max_size: tuple[int, int]) -> np.ndarray:
        w0, h0 = self.info.dimensions
        scale = min(max_size[0] / w0, max_size[1] / h0, 1.0)
        tw, th = max(int(round(w0 * scale)), 1), max(int(round(h0 * scale)), 1)
        # the smallest level still at least as large as the thumbnail
        src = next(lv for lv in reversed(self._levels) if lv.width >= tw and lv.height >= th)
        img = src.resize(tw / src.width, vscale=th / src.height) if src.width != tw else src
        return self._decode(img, "reading the thumbnail")

    def _msg(self, err: pyvips.Error) -> str:
        """libvips' message, one line, with a staged local path shown as the slide's URI."""
        text = " ".join(str(err.detail or err.message).split())[:500]
        return text.replace(self._path, self.uri) if self._path != self.uri else text

    def close(self) -> None:
        self._levels = []
