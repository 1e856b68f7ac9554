"""Inventory and staging over a real S3 HTTP endpoint (moto server on 127.0.0.1)."""

import threading

import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs

from engine.config import StorageConfig
from engine.errors import StagingError
from engine.slides import open_slide
from engine.slides.storage import StagingArea, list_files
from jobs import inventory
from tests.conftest import upload_tree

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


def test_inventory_on_s3_equals_inventory_on_disk(archive, s3_server, wsi_dir, tmp_path, capsys):
    assert inventory.main(["--input", str(wsi_dir), "--output", str(tmp_path / "local")]) == 0
    assert inventory.main(["--input", archive, "--output", "s3://results/inv",
                           "--s3-endpoint", s3_server]) == 0
    printed = capsys.readouterr()
    local = pl.read_parquet(f"{tmp_path}/local/slides/**/*.parquet")
    with _fs(s3_server).open("results/inv/slides/slides.parquet", "rb") as fh:
        remote = pl.from_arrow(pq.read_table(fh))
    local = local.with_columns(key=pl.col("uri").str.replace(f"^{wsi_dir}/", ""))
    remote = remote.with_columns(key=pl.col("uri").str.replace(f"^{archive}/", ""))
    assert remote["uri"].str.starts_with("s3://archive/wsi/").all()
    assert remote["etag"].is_not_null().all() and local["etag"].is_null().all()
    assert local.sort("key").select("key", *COMPARED).equals(remote.sort("key").select("key",
                                                                                      *COMPARED))
    # messages name the slide's URI, never the local staging path
    assert not remote["error_message"].drop_nulls().str.contains("hemeflow-stage").any()
    # credentials reach neither the outputs nor the logs
    config = _fs(s3_server).cat_file("results/inv/config.json").decode()
    for text in (config, printed.out, printed.err):
        assert "testing-secret-value" not in text and "testing-key-id" not in text


def test_missing_bucket_exits_cleanly(s3_server, capsys, tmp_path):
    code = inventory.main(["--input", "s3://no-such-bucket/slides", "--output", str(tmp_path),
                           "--s3-endpoint", s3_server])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


def test_listing_and_open_through_staging(archive, s3_server, wsi_dir):
    storage = StorageConfig(endpoint_url=s3_server)
    entries = list_files(archive, storage)
    assert len(entries) == sum(1 for p in wsi_dir.rglob("*") if p.is_file())
    svs = next(e for e in entries if e.uri.endswith("cmu-1-small-region.svs"))
    with StagingArea(storage) as staging:
        with open_slide(svs.uri, storage, staging, size=svs.size) as slide:
            assert slide.info.dimensions == (2220, 2967)
            tile = slide.read_region(0, 1000, 1000, 64, 64)
            assert tile.shape == (64, 64, 3)
            staged = list((p for p in __import__("pathlib").Path(staging.root).rglob("*.svs")))
            assert len(staged) == 1
        assert not list(__import__("pathlib").Path(staging.root).rglob("*.svs"))  # cleaned


def test_staging_is_size_bounded(archive, s3_server):
    storage = StorageConfig(endpoint_url=s3_server, stage_max_bytes=2_500_000)
    entries = {e.uri.rsplit("/", 1)[-1]: e for e in list_files(archive, storage)}
    with StagingArea(storage) as staging:
        with pytest.raises(StagingError, match="exceeds the staging bound"):
            with staging.stage(entries["tcga-cr-7395-01a-01-ts1.svs"].uri,
                               entries["tcga-cr-7395-01a-01-ts1.svs"].size):
                pass
        # two 1.9 MB objects cannot be staged at once under a 2.5 MB bound: the second waits
        cmu = entries["cmu-1-small-region.svs"]
        order = []

        def second():
            with staging.stage(cmu.uri, cmu.size):
                order.append("second-in")

        with staging.stage(cmu.uri, cmu.size):
            t = threading.Thread(target=second)
            t.start()
            t.join(0.5)
            order.append("first-out")
        t.join(10)
        assert order == ["first-out", "second-in"]
