import os

import pytest

from engine.config import StorageConfig
from engine.errors import TransientStorageError
from engine.slides.storage import call_with_retries, is_transient, list_files, normalize_uri


def test_transient_errors_are_retried_with_backoff():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("An error occurred (SlowDown) when calling GetObject: reduce rate")
        return "done"

    cfg = StorageConfig(retries=4, retry_backoff_s=0.1)
    assert call_with_retries(flaky, cfg, "get", sleep=sleeps.append) == "done"
    assert len(calls) == 3 and sleeps == [0.1, 0.2]


@pytest.mark.parametrize("err", [FileNotFoundError("nope"), PermissionError("denied"),
                                 ValueError("a bug")])
def test_permanent_errors_are_not_retried(err):
    calls = []

    def fail():
        calls.append(1)
        raise err

    with pytest.raises(type(err)):
        call_with_retries(fail, StorageConfig(retries=5), "get", sleep=lambda s: None)
    assert len(calls) == 1


def test_retries_give_up_after_the_budget():
    calls = []

    def always():
        calls.append(1)
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        call_with_retries(always, StorageConfig(retries=2), "get", sleep=lambda s: None)
    assert len(calls) == 3
    assert is_transient(TransientStorageError("x")) and not is_transient(KeyError("x"))


def test_listing_skips_hidden_files_and_folders_and_mirax_data_folders(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "case.mrxs").write_bytes(b"x")
    (tmp_path / "case").mkdir()
    (tmp_path / "case" / "Data0000.dat").write_bytes(b"x")
    (tmp_path / "case" / "Slidedat.ini").write_bytes(b"x")
    for hidden in (".snapshot/hourly.0", ".Trash-1000/files", "2026/.cache"):
        (tmp_path / hidden).mkdir(parents=True)  # a file server's copies of the archive, ...
        (tmp_path / hidden / "a.svs").write_bytes(b"x")
    (tmp_path / "2026" / "b.svs").write_bytes(b"x")
    uris = [e.uri for e in list_files(str(tmp_path), StorageConfig())]
    assert uris == [str(tmp_path / "2026" / "b.svs"), str(tmp_path / "a.svs"),
                    str(tmp_path / "case.mrxs")]
    # a hidden folder above the input's root is the user's choice: its slides are listed
    inner = tmp_path / ".snapshot" / "hourly.0"
    assert [e.uri for e in list_files(str(inner), StorageConfig())] == [str(inner / "a.svs")]


def test_listing_follows_links_to_folders_once_and_takes_a_file_once(tmp_path, capsys):
    """An archive put together from links to other volumes: fsspec took a link to a folder
    for a file, so its slides were lost and it failed 'is a directory'. A link back up ends;
    a file reached under two names is one slide, not two; a link to nothing fails naming it."""
    from engine.errors import SlideNotFound
    from engine.slides.registry import open_slide
    from jobs.common import expand_inputs

    volume, root = tmp_path / "vol2", tmp_path / "archive"
    (volume / "2019").mkdir(parents=True)
    (volume / "2019" / "a.svs").write_bytes(b"x")
    (root / "2020").mkdir(parents=True)
    (root / "2020" / "b.svs").write_bytes(b"xy")
    (root / "2019").symlink_to(volume / "2019")  # another volume's folder
    (root / "latest").symlink_to("2020")  # the same folder again
    (root / "2020" / "up").symlink_to("..")  # a loop
    (root / "b-copy.svs").symlink_to(root / "2020" / "b.svs")  # a file again
    os.link(root / "2020" / "b.svs", root / "b-hard.svs")  # a file of its own, as find takes it
    (root / "gone.svs").symlink_to(tmp_path / "moved" / "gone.svs")
    os.mkfifo(root / "pipe.svs")  # no slide: opened, it would wait for a writer
    twins: dict[str, str] = {}
    entries = list_files(str(root), StorageConfig(), twins)
    assert [(e.uri, e.size) for e in entries] == [
        (f"{root}/2019/a.svs", 1), (f"{root}/2020/b.svs", 2), (f"{root}/b-hard.svs", 2),
        (f"{root}/gone.svs", None)]
    assert twins == {f"{root}/b-copy.svs": f"{root}/2020/b.svs"}
    assert [e.uri for e in expand_inputs(str(root), StorageConfig())] == [e.uri for e in entries]
    assert f"{root}: 1 file(s) reached under another name too (a link) are taken once, by the " \
           f"first name: {root}/b-copy.svs is {root}/2020/b.svs" in capsys.readouterr().err
    with pytest.raises(SlideNotFound, match=f"a link to {tmp_path}/moved/gone.svs, which does "
                                            "not exist"):
        with open_slide(f"{root}/gone.svs"):
            pass


def test_a_name_that_is_not_utf8_is_a_failed_row_that_says_why(wsi_dir, tmp_path, capsys):
    """A share mounted without iocharset, or an old archive, holds names in a legacy code page
    (Müller in Latin-1): Python keeps their bytes as lone surrogates, which no hash, table or
    log could hold, and the inventory and process_slides crashed on the first. Each such slide
    fails saying why, and every other slide is read."""
    import polars as pl

    from engine.errors import SlideUnsupported
    from engine.slides.registry import open_slide
    from jobs import inventory, process_slides

    small = (wsi_dir / "openslide-python" / "small.svs").read_bytes()
    root = tmp_path / "share"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "BM-1.svs").write_bytes(small)
    for name in (b"BM-M\xfcller.svs", b"M\xfcller/BM-2.svs"):  # a file's name, a folder's
        path = os.path.join(os.fsencode(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(small)
    uris = [e.uri for e in list_files(str(root), StorageConfig())]
    assert uris == [f"{root}/BM-M\\xfcller.svs", f"{root}/M\\xfcller/BM-2.svs",
                    f"{root}/ok/BM-1.svs"]
    for uri in uris[:2]:
        with pytest.raises(SlideUnsupported, match="its path is not UTF-8 text \\(byte 0xfc: "
                                                   "a legacy code page's"):
            with open_slide(uri):
                pass
    assert inventory.main(["--input", str(root), "--output", str(tmp_path / "inv")]) == 0
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet").sort("uri")
    assert rows["uri"].to_list() == uris
    assert rows["status"].to_list() == ["failed", "failed", "ok"]
    assert process_slides.main(["--input", str(root), "--output", str(tmp_path / "run"),
                                "--dry-run", "--allow-untrained"]) == 0
    assert "3 slide(s) in the input" in capsys.readouterr().out


def test_a_network_file_system_is_known_by_its_mount(tmp_path, wsi_dir, monkeypatch, capsys):
    """An NFS or SMB mount is a local path whose every read waits on a round trip, as S3's do:
    the inventory opens as many slides at once there as on S3 (it opened 4)."""
    import engine.slides.storage as storage
    from jobs import inventory

    mounts = storage.parse_mounts(
        "/dev/vda / ext4 rw 0 0\n"
        "filer:/export/slides /mnt/slide\\040archive nfs4 rw,relatime 0 0\n"
        "//pacs/wsi /mnt/slide\\040archive/pacs cifs rw 0 0\n"
        "/dev/sdb1 /mnt/slide\\040archive/pacs/usb fuseblk rw 0 0\n"
        "bucket /mnt/s3 fuse.mountpoint-s3 ro 0 0\n")
    assert mounts[1] == ("/mnt/slide archive", "nfs4")
    got = {p: storage.network_filesystem(p, mounts) for p in (
        "/mnt/slide archive/2026/a.svs", "/mnt/slide archive/pacs/b.dcm",
        "/mnt/slide archive/pacs/usb/c.svs", "/mnt/s3/d.svs", "/mnt/slide archivist/e.svs")}
    assert got == {"/mnt/slide archive/2026/a.svs": "nfs4", "/mnt/slide archive/pacs/b.dcm":
                   "cifs", "/mnt/slide archive/pacs/usb/c.svs": None,
                   "/mnt/s3/d.svs": "fuse.mountpoint-s3", "/mnt/slide archivist/e.svs": None}
    link = tmp_path / "archive"
    link.symlink_to(wsi_dir)  # through a link, the mount of what it names
    here = storage.parse_mounts(  # the mount's own path: ../shared may itself be a link
        f"/dev/vda / ext4 rw 0 0\nfiler:/x {wsi_dir.resolve()} nfs rw 0 0\n")
    assert storage.network_filesystem(str(link / "a.svs"), here) == "nfs"
    pools, pool = [], inventory.in_time
    monkeypatch.setattr(inventory, "in_time",
                        lambda fn, items, n, *a: pools.append(n) or pool(fn, items, n, *a))
    listed = tmp_path / "slides.txt"
    listed.write_text(f"{link}/openslide-python/small.svs\n")
    for table in ((), tuple(here)):
        monkeypatch.setattr(storage, "_mounts", lambda table=table: table)
        assert inventory.main(["--input", str(listed), "--output",
                               str(tmp_path / f"inv{len(table)}")]) == 0
    assert pools == [inventory.LOCAL_WORKERS, inventory.REMOTE_WORKERS] == [4, 16]
    # the pipeline's tile readers take threads there too (pipeline.read_threads 0: auto)
    from engine.config import Config
    from engine.pipeline.run import NETWORK_READ_THREADS, read_threads_for

    assert Config().pipeline.read_threads == 0
    assert read_threads_for([f"{link}/a.svs", "s3://b/c.svs"]) == NETWORK_READ_THREADS == 4
    monkeypatch.setattr(storage, "_mounts", lambda: ())
    assert read_threads_for([f"{link}/a.svs", "s3://b/c.svs"]) == 1


def test_a_file_changed_since_it_was_listed_says_how(tmp_path):
    """A copy under way grows, or (preallocated, as Windows copies over SMB) keeps its size
    and is written into: either tells a read that failed on it from a corrupt file."""
    from engine.slides.storage import FileEntry, changed_since_listed

    (tmp_path / "grows.svs").write_bytes(b"II*\0")
    (tmp_path / "filled.svs").write_bytes(b"\0" * 8)
    listed = {e.uri.rsplit("/", 1)[1]: e for e in list_files(str(tmp_path), StorageConfig())}
    assert all(changed_since_listed(e) is None for e in listed.values())
    with open(tmp_path / "grows.svs", "ab") as fh:
        fh.write(b"\1" * 4)
    os.utime(tmp_path / "filled.svs", (0, listed["filled.svs"].mtime + 1))
    assert changed_since_listed(listed["grows.svs"]) == "its size went from 4 to 8 bytes"
    assert changed_since_listed(listed["filled.svs"]) == "it was modified"
    assert changed_since_listed(FileEntry(str(tmp_path / "x.svs"))) is None  # no size listed


def test_normalize_uri():
    assert normalize_uri("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert normalize_uri("file:///tmp/x.svs") == "/tmp/x.svs"
    assert normalize_uri("rel/x.svs").startswith("/")


def test_a_request_pool_stopped_drops_the_tasks_not_yet_started():
    """A ThreadPoolExecutor's exit waits for every task it was given: an inventory stopped by
    Ctrl-C, SIGTERM or refused credentials read every slide left first. A request pool runs
    those under way to their end and no other."""
    import threading
    import time

    from engine.slides.storage import request_pool

    ran, lock = [], threading.Lock()

    def task(i):
        with lock:
            ran.append(i)
        time.sleep(0.01)
        return i

    with pytest.raises(KeyboardInterrupt):
        with request_pool(2, "test") as pool:
            work = pool.map(task, range(500))  # held, as the inventory holds it
            for i in work:
                if i == 3:
                    raise KeyboardInterrupt
    assert 4 <= len(ran) <= 10, len(ran)  # of 500


def test_a_storage_other_than_s3_or_a_path_is_refused_saying_what_is():
    """gs:// (or az://, https://) ended a job in a traceback: fsspec's "Please install gcsfs
    to access Google Storage", or a read over plain HTTP. Slides, outputs and checkpoints
    now say which storages the jobs use, and that another's bucket may be mounted."""
    from engine.errors import HemeflowError
    from engine.models.checkpoint import read_checkpoint
    from engine.slides.storage import InputError, get_filesystem

    for uri in ("gs://lab/slides", "az://lab/slides", "https://example.org/a.svs"):
        with pytest.raises(InputError, match=f"^{uri}: .*:// storage is not supported: give an "
                           r"s3:// URI .* or a local path \(a share or a bucket mounted on "
                           r"every node: gcsfuse, blobfuse2\)$"):
            get_filesystem(uri, StorageConfig())
    with pytest.raises(HemeflowError, match="^gs://m/x.safetensors: gs:// storage is not"):
        read_checkpoint("gs://m/x.safetensors", StorageConfig())
    assert get_filesystem("s3a://lab/slides", StorageConfig())[1] == "lab/slides"
