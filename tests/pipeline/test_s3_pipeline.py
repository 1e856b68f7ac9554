"""S3 in and S3 out through the production code path, against moto on 127.0.0.1."""

import collections

import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs

from engine.config import StorageConfig
from engine.slides.storage import StagingArea
from jobs import process_slides
from tests.conftest import s3_requests, upload_tree
from tests.pipeline.conftest import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def test_s3_in_and_out(ray_local, s3_server, s3_client, archive, tmp_path, capsys):
    s3_client.create_bucket(Bucket="slides")
    s3_client.create_bucket(Bucket="results")
    upload_tree(s3_client, "slides", archive, "lab-a")
    with s3_requests() as requests:
        code = process_slides.main(["--input", "s3://slides/lab-a", "--output",
                                    "s3://results/run1", "--s3-endpoint", s3_server, "--config",
                                    tiny_config(tmp_path), "--allow-untrained"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # both branches' planners and readers share one staged copy per node: each slide is
    # downloaded once (before the shared staging folder, four times or more)
    downloads = collections.Counter(r.split("/")[-1] for r in requests
                                    if r.startswith("GET /slides/lab-a/") and "?" not in r)
    assert set(downloads) == {p.name for p in archive.iterdir()}
    assert set(downloads.values()) == {1}, downloads
    assert not StagingArea(StorageConfig())._entries()  # the job emptied the folder
    assert "staging: removed" in printed.out
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    status = pl.concat([pl.from_arrow(pq.read_table(fs.open(p, "rb")))
                        for p in fs.glob("results/run1/slide_status/*.parquet")])
    got = dict(zip(status["uri"].str.split("/").list.last(), status["status"]))
    assert got["smear-a.tif"] == "ok" and got["unreadable.svs"] == "failed"
    assert len(got) == 7
    cells = fs.glob("results/run1/cells/*.parquet")
    assert cells and all(p.rsplit("/", 1)[-1].split(".")[0] in set(status["slide_id"])
                         for p in cells)
    config = fs.cat_file("results/run1/config.json").decode()
    for text in (config, printed.out, printed.err):
        assert "testing-secret-value" not in text and "testing-key-id" not in text
    # a rerun against S3 finds every slide committed
    assert process_slides.main(["--input", "s3://slides/lab-a", "--output", "s3://results/run1",
                                "--s3-endpoint", s3_server, "--config", tiny_config(tmp_path),
                                "--allow-untrained"]) == 0
    assert "7 already committed, 0 to process" in capsys.readouterr().out
    # --retry-failed reads the failed statuses back from S3 and redoes those slides, once each
    assert process_slides.main(["--input", "s3://slides/lab-a", "--output", "s3://results/run1",
                                "--s3-endpoint", s3_server, "--config", tiny_config(tmp_path),
                                "--allow-untrained", "--retry-failed"]) == 0
    printed = capsys.readouterr().out
    assert "--retry-failed: 4 committed slide(s) taken out" in printed
    assert "3 already committed, 4 to process" in printed
    fs.invalidate_cache()
    assert len(fs.glob("results/run1/slide_status/*.parquet")) == 7
    # the summary reads the committed slides back from S3 and writes beside them
    from jobs import slide_summary

    assert slide_summary.main(["--output", "s3://results/run1", "--s3-endpoint", s3_server]) == 0
    assert "7 slides (3 ok, 4 failed)" in capsys.readouterr().out
    summary = pl.read_csv(fs.open("results/run1/summary.csv", "rb"))
    assert sorted(summary["slide_id"]) == sorted(status["slide_id"])
