"""S3 in and S3 out through the production code path, against moto on 127.0.0.1."""

import collections
import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from engine.config import StorageConfig
from engine.slides.storage import StagingArea
from jobs import process_slides
from tests.conftest import s3_requests, upload_tree
from tests.pipeline.conftest import read_only_config, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.s3]


def test_s3_in_and_out(ray_local, s3_server, s3_client, archive, tmp_path, capsys, monkeypatch):
    # the node's staging folder is shared: copies that an earlier run's export_cells or
    # predict_mil --figures staged (same URIs, same ETags) would spare this run its downloads
    StagingArea(StorageConfig()).purge()
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
    # --retry-failed reads the failed statuses back from S3 and redoes those slides, once each;
    # --mpp gives the slide without a pixel size one, and the ok slides' objects are not touched
    ok_ids = set(status.filter(pl.col("status") == "ok")["slide_id"])
    with s3_requests() as requests:
        assert process_slides.main(["--input", "s3://slides/lab-a", "--output",
                                    "s3://results/run1", "--s3-endpoint", s3_server, "--config",
                                    tiny_config(tmp_path), "--allow-untrained", "--mpp", "0.5",
                                    "--retry-failed"]) == 0
    printed = capsys.readouterr().out
    assert "--retry-failed: 4 committed slide(s) taken out" in printed
    assert "3 already committed, 4 to process" in printed
    written = [r.split(" ", 1)[1] for r in requests if r.startswith(("PUT", "DELETE", "POST"))]
    assert written and not [w for w in written if any(i in w for i in ok_ids)], written
    fs.invalidate_cache()
    status = pl.concat([pl.from_arrow(pq.read_table(fs.open(p, "rb")))
                        for p in fs.glob("results/run1/slide_status/*.parquet")])
    assert len(status) == 7 and status["slide_id"].is_unique().all()
    got = {r["uri"].rsplit("/", 1)[-1]: r for r in status.iter_rows(named=True)}
    tcga = got["tcga-cr-7395-01a-01-ts1.svs"]  # had no pixel size: --mpp gives it one
    assert tcga["status"] == "ok" and tcga["n_tiles"] > 0
    assert got["broken.svs"]["error_type"] == "SlideCorrupt"  # still bad: a row, again
    cells = pl.concat([pl.from_arrow(pq.read_table(fs.open(p, "rb")))
                       for p in fs.glob("results/run1/cells/*.parquet")])
    assert cells.select("slide_id", "cell_id").is_duplicated().sum() == 0
    # a rescan put over a committed slide's object (another ETag and size): a rerun does not
    # read the slides' rows to look (one GET per slide); a dry run names it, and
    # --reprocess-changed would process it, and only it, again (the processing itself is
    # --retry-failed's, above)
    sid = status.filter(pl.col("uri").str.ends_with("/small.svs"))["slide_id"][0]
    s3_client.put_object(Bucket="slides", Key="lab-a/small.svs",
                         Body=(archive / "small.svs").read_bytes() + b"\0" * 512)
    run = ["--input", "s3://slides/lab-a", "--output", "s3://results/run1", "--s3-endpoint",
           s3_server, "--config", tiny_config(tmp_path), "--allow-untrained", "--mpp", "0.5"]
    with s3_requests() as requests:
        assert process_slides.main(run) == 0
    printed = capsys.readouterr().out
    assert "changed since" not in printed and "7 already committed, 0 to process" in printed
    assert not [r for r in requests if "/results/run1/slides/" in r], requests
    assert not [r for r in requests if r.startswith(("PUT", "DELETE", "POST"))
                and "/results/" in r and "config.json" not in r and "/_running/" not in r]
    # the run's mark went up, and is gone now that it has ended
    assert [r for r in requests if r.startswith("PUT /results/run1/_running/")]
    assert s3_client.list_objects_v2(Bucket="results", Prefix="run1/_running/")["KeyCount"] == 0
    assert process_slides.main(run + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "1 committed slide(s) changed since they were processed" in printed
    assert f"{sid} (size " in printed and ", ETag " in printed
    assert process_slides.main(run + ["--reprocess-changed", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "--reprocess-changed: 1 committed slide(s) whose file changed since would be taken " \
           f"out to be processed again: {sid}" in printed
    assert "7 slide(s) in the input, 6 committed (skipped), 1 to process" in printed
    # the summary reads the committed slides back from S3 and writes beside them
    from jobs import slide_summary

    assert slide_summary.main(["--output", "s3://results/run1", "--s3-endpoint", s3_server]) == 0
    assert "7 slides (4 ok, 3 failed)" in capsys.readouterr().out
    summary = pl.read_csv(fs.open("results/run1/summary.csv", "rb"))
    assert sorted(summary["slide_id"]) == sorted(status["slide_id"])
    # cells for a lab's experts, exported to S3: labelled there, the train job's --data reads
    # the same prefix
    from engine.train.data import fetch_labelled, read_labels
    from jobs import export_cells

    # from here on, the jobs that read a few regions or a thumbnail of a slide fetch them by
    # range from a sparse copy (engine.slides.header_copy): no slide is staged whole
    staged, download = [], StagingArea._download
    monkeypatch.setattr(StagingArea, "_download",
                        lambda self, uri, *a: staged.append(uri) or download(self, uri, *a))
    s3_client.create_bucket(Bucket="labels")
    assert export_cells.main(["--output", "s3://results/run1", "--to", "s3://labels/lab-a",
                              "--per-class", "2", "--kind", "all", "--s3-endpoint",
                              s3_server]) == 0
    assert "put back when filled" in capsys.readouterr().out
    labels = pl.read_csv(fs.open("labels/lab-a/labels.csv", "rb"))
    assert len(labels) >= 2 and labels["code"].is_null().all()
    assert json.loads(fs.cat_file("labels/lab-a/pack.json"))["mpp"] == 0.25
    s3_client.put_object(Bucket="labels", Key="lab-a/labels.csv",  # an expert's codes
                         Body=labels.with_columns(code=pl.col("predicted")).write_csv().encode())
    folder = fetch_labelled("s3://labels/lab-a", StorageConfig(endpoint_url=s3_server))
    data = read_labels(folder)
    assert list(data.codes) == labels["predicted"].to_list()
    assert np.asarray(Image.open(data.paths[0])).shape == (144, 144, 3)
    assert export_cells.main(["--output", "s3://results/run1", "--to", "s3://labels/lab-a",
                              "--s3-endpoint", s3_server]) == 2
    assert "is not empty" in capsys.readouterr().err
    from jobs import cell_gallery, slide_map

    assert cell_gallery.main(["--output", "s3://results/run1", "--slide", "smear-a.tif",
                              "--per-class", "3", "--png", str(tmp_path / "gallery.png"),
                              "--s3-endpoint", s3_server]) == 0
    assert slide_map.main(["--output", "s3://results/run1", "--slide", "smear-a.tif",
                           "--png", str(tmp_path / "map.png"), "--s3-endpoint", s3_server]) == 0
    assert (tmp_path / "gallery.png").stat().st_size and (tmp_path / "map.png").stat().st_size
    # cellularity MIL on the run's tile embeddings, read from S3 where the run wrote them
    from jobs import predict_mil, train_mil

    tiles = pl.concat([pl.from_arrow(pq.read_table(fs.open(p, "rb"),
                                                   columns=["slide_id", "embedding"]))
                       for p in fs.glob("results/run1/tiles/*.parquet")])
    ok = sorted(tiles.filter(pl.col("embedding").is_not_null())["slide_id"].unique())
    assert len(ok) >= 2
    labels = tmp_path / "cellularity.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{sid},{30 + 10 * i}%\n"
                                                   for i, sid in enumerate(ok)))
    s3 = ["--embeddings", "s3://results/run1", "--s3-endpoint", s3_server]
    assert train_mil.main(["--task", "regression", "--labels", str(labels), *s3, "--output",
                           "s3://results/mil/", "--folds", "2", "--epochs", "2",
                           "--local"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["n_bags"] == len(ok)
    assert json.loads(fs.cat_file("results/mil/report.json")) == report  # all on S3
    assert fs.cat_file("results/mil/bland_altman.png")[:4] == b"\x89PNG"
    ckpt = "s3://results/mil/abmil.safetensors"
    assert json.loads(fs.cat_file("results/mil/abmil.json"))["embeddings"] == "s3://results/run1"
    assert predict_mil.main(["--checkpoint", ckpt, *s3, "--output", str(tmp_path / "pred"),
                             "--figures"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert sorted(p["slide_id"] for p in preds) == ok
    figures = tmp_path / "pred" / "mil_predictions" / "figures"
    assert sorted(p.stem for p in figures.iterdir()) == ok  # each slide read back from S3
    assert staged == []
    # compacted on S3: read_table reads the same rows from one file a table, not one a slide
    from engine.pipeline.commit import read_table
    from jobs import compact

    storage = StorageConfig(endpoint_url=s3_server)
    with s3_requests() as before:
        cells = read_table("s3://results/run1", "cells", storage=storage)
    assert compact.main(["--output", "s3://results/run1", "--s3-endpoint", s3_server]) == 0
    with s3_requests() as after:
        again = read_table("s3://results/run1", "cells", storage=storage)
    assert again.sort("slide_id", "cell_id").equals(cells.sort("slide_id", "cell_id"))
    per_slide = [r for r in before if r.startswith("GET /results/run1/cells/")]
    assert len(per_slide) >= cells["slide_id"].n_unique()
    assert not [r for r in after if r.startswith("GET /results/run1/cells/")]
    part = [r for r in after if "/compact/cells/part-" in r]
    assert part and len(part) <= 10 and len({r.split()[1] for r in part}) == 1, after


def test_sections_on_s3_are_read_by_range_as_their_local_files_are_read(ray_local, s3_server,
                                                                        s3_client, tmp_path):
    """A section's tiles branch reads one coarse level and the thumbnail's: from a sparse copy
    of the slide (engine.slides.header_copy), where it downloaded the slide whole, with the
    same tiles, areas and embeddings; a DICOM series' files alike."""
    from benchmarks.make_synthetic_slides import make_slide

    local = tmp_path / "sections"
    local.mkdir()
    make_slide(str(local / "marrow.tif"), 8192, kind="marrow")  # 0.25 um/px, 6 levels
    make_slide(str(local / "series"), 8192, kind="marrow", seed=1, dicom=True)  # 7 files
    s3_client.create_bucket(Bucket="sections")
    upload_tree(s3_client, "sections", local, "lab-b")
    run = ["--specimen", "biopsy", "--config", tiny_config(tmp_path), "--allow-untrained"]
    with s3_requests(status=True) as requests:
        assert process_slides.main(["--input", "s3://sections/lab-b", "--output",
                                    str(tmp_path / "remote"), "--s3-endpoint", s3_server,
                                    *run]) == 0
    for slide in ("marrow.tif", "series/level_0.dcm", "series/level_3.dcm"):
        gets = [r for r in requests if r.startswith(f"GET /sections/lab-b/{slide}")]
        assert gets and all(r.endswith(" 206") for r in gets), gets  # ranges only, never whole
    assert process_slides.main(["--input", str(local), "--output", str(tmp_path / "here"),
                                *run]) == 0
    tiles = {}
    for name in ("remote", "here"):
        slides = pl.read_parquet(tmp_path / name / "slides" / "*.parquet").select(
            "slide_id", file=pl.col("uri").str.split("/").list.last())
        t = pl.read_parquet(tmp_path / name / "tiles" / "*.parquet").join(slides, on="slide_id")
        assert sorted(t["file"].unique()) == ["level_0.dcm", "marrow.tif"]
        assert t.group_by("file").len()["len"].min() >= 20
        tiles[name] = t.sort("file", "y", "x").select(
            "file", "x", "y", "tissue_fraction", "nuclear_fraction", "embedding")
    assert tiles["remote"].equals(tiles["here"])


def test_credentials_refused_mid_run_stop_the_job_and_a_rerun_finishes_it(
        ray_local, s3_server, s3_client, archive, tmp_path, capsys, monkeypatch):
    """Credentials that stop working mid-run (a session token expires after an hour by
    default) failed each slide left 'permission denied' in turn: an archive marked failed in
    minutes. The job stops, saying why; a rerun with good ones does the rest, each slide once."""
    from moto.core.authorization import enable_iam_authentication

    s3_client.create_bucket(Bucket="expiring")
    upload_tree(s3_client, "expiring", archive, "lab")
    s3_client.put_object(Bucket="expiring", Key="lab/cold.svs", StorageClass="GLACIER",
                         Body=(archive / "small.svs").read_bytes())  # and one in S3 Glacier
    read, refused = process_slides.read_inputs, enable_iam_authentication()

    def read_then_expire(*args, **kwargs):  # the listing is read; every request after it is
        got = read(*args, **kwargs)         # refused: moto knows no such key
        refused.__enter__()
        return got

    monkeypatch.setattr(process_slides, "read_inputs", read_then_expire)
    run = ["--input", "s3://expiring/lab", "--output", str(tmp_path / "out"), "--s3-endpoint",
           s3_server, "--config", read_only_config(tmp_path)]
    try:
        code = process_slides.main(run)
    finally:
        refused.__exit__(None, None, None)
    printed = capsys.readouterr()
    assert code == 2, printed.err
    said = printed.err.strip().splitlines()[-1]
    assert said.startswith("hemeflow: error: s3://expiring/lab/"), printed.err
    assert ": object storage refused the credentials (InvalidAccessKeyId: " in said
    assert said.endswith("run the job again; what it committed stays, and it goes on from "
                         "there")
    assert not list((tmp_path / "out").glob("slide_status/*.parquet"))  # no slide failed for it
    monkeypatch.undo()
    assert process_slides.main(run) == 0
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status.height == status["slide_id"].n_unique() == 8
    assert sorted(status.filter(pl.col("status") == "failed")["error_type"]) == [
        "MissingMPP", "SlideArchived", "SlideCorrupt", "SlideCorrupt", "SlideUnsupported"]
    printed = capsys.readouterr()  # said before the run, by the listing, and after it
    assert "1 slide(s) to process are in an archive storage class by the listing (GLACIER; " \
           "s3://expiring/lab/cold.svs)" in printed.err
    assert "1 slide(s) in an archive storage class (SlideArchived): restore them" in printed.out


def test_a_dicom_series_met_in_glacier_leaves_no_row_once_restored_and_read_whole(
        ray_local, s3_server, s3_client, dicom_study, tmp_path, capsys):
    """A series' headers cannot be read while it is in S3 Glacier, so each of its files was a
    slide and failed SlideArchived. Restored, the series is one slide again: its other files'
    failed rows stayed in the output, as slides that no input names."""
    s3_client.create_bucket(Bucket="thawed")
    series = sorted(p.name for p in (dicom_study / "walked").iterdir())
    for name in series:
        s3_client.put_object(Bucket="thawed", Key=f"c/{name}", StorageClass="GLACIER",
                             Body=(dicom_study / "walked" / name).read_bytes())
    run = ["--input", "s3://thawed/c", "--output", str(tmp_path / "out"), "--s3-endpoint",
           s3_server, "--config", read_only_config(tmp_path), "--mpp", "0.25"]
    assert process_slides.main(run) == 0
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status["error_type"].to_list() == ["SlideArchived"] * len(series)
    capsys.readouterr()
    for name in series:
        s3_client.restore_object(Bucket="thawed", Key=f"c/{name}", RestoreRequest={"Days": 7})
    assert process_slides.main([*run, "--dry-run", "--retry-failed"]) == 0
    said = capsys.readouterr().out
    assert f"{len(series) - 1} committed slide(s) are files of a DICOM series that the input " \
           "now reads through another of its files" in said and "rows would be removed" in said
    assert len(list((tmp_path / "out" / "slide_status").iterdir())) == len(series)
    assert process_slides.main([*run, "--retry-failed"]) == 0
    assert "rows are removed" in capsys.readouterr().out
    for table in ("slide_status", "slides"):
        rows = pl.read_parquet(tmp_path / "out" / table / "*.parquet")
        assert rows["uri"].to_list() == ["s3://thawed/c/c_0.dcm"], table
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status["status"].to_list() == ["ok"] and status["n_tiles"][0] > 0


def test_an_object_replaced_after_the_listing_is_left_for_the_next_run(
        ray_local, s3_server, s3_client, archive, tmp_path, capsys, monkeypatch):
    """A rescan saved over a slide's object while a job reads it: its reads may mix the two
    scans' bytes, and its rows describe neither for sure. Its ETag is not the listing's: it is
    not committed, and the next run reads the new object whole."""
    s3_client.create_bucket(Bucket="rescans")
    for name in ("small.svs", "cmu-1-small-region.svs"):
        s3_client.put_object(Bucket="rescans", Key=f"lab/{name}",
                             Body=(archive / name).read_bytes())
    listed = process_slides.read_inputs

    def list_then_rescan(*args, **kwargs):
        got = listed(*args, **kwargs)
        s3_client.put_object(Bucket="rescans", Key="lab/small.svs",  # the same bytes, anew
                             Body=(archive / "small.svs").read_bytes() + b"\0")
        return got

    monkeypatch.setattr(process_slides, "read_inputs", list_then_rescan)
    run = ["--input", "s3://rescans/lab", "--output", str(tmp_path / "out"), "--s3-endpoint",
           s3_server, "--config", read_only_config(tmp_path)]
    assert process_slides.main(run) == 0
    out = capsys.readouterr().out
    assert "s3://rescans/lab/small.svs: its ETag went from " in out
    assert "since the job listed it: still being written as it was read, or saved over (a " \
           "copy under way? a rescan?); not committed, so the next run reads it" in out
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status["uri"].to_list() == ["s3://rescans/lab/cmu-1-small-region.svs"]
    assert {p.name.split("-")[0] for p in (tmp_path / "out").glob("*/*.parquet")} == {"cmu"}
    monkeypatch.undo()
    assert process_slides.main(run) == 0
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet").sort("uri")
    assert status["status"].to_list() == ["ok", "ok"]
    assert status["slide_id"].is_unique().all()
