"""jobs.classify_cells on real single-cell images (PBC) with the shipped reference classifier:
exports laid out as CellaVision writes them, an unreadable image, a slide with none readable."""

import io
import json
import os
import shutil

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine.schema import slide_id_for
from jobs import classify_cells, slide_summary
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "pbc" / "labels.csv").exists(),
                                reason="PBC data not present")
FOLDERS = {"L2": "lymphocyte", "M6": "neutrophil", "ER": "erythroblast", "MO2": "monocyte",
           "E4": "eosinophil"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two exported slides of 24 held-out images each, in the analyser's class folders (one with
    a truncated image besides), and one whose only image is unreadable."""
    from tests.models.test_mil_bags import _held_out_images

    rng = np.random.default_rng(0)
    rows = [r for r in _held_out_images() if r[1] in FOLDERS]
    picks = rng.permutation(len(rows))[:48]
    root = tmp_path_factory.mktemp("exports")
    truth = {}
    for n, i in enumerate(picks):
        path, code = rows[i]
        folder = root / ("slide-a" if n < 24 else "slide-b") / FOLDERS[code]
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(path, folder / os.path.basename(path))
        truth[os.path.basename(path)] = code
    good = open(rows[picks[0]][0], "rb").read()
    (root / "slide-b" / "cut.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "slide-c").mkdir()
    (root / "slide-c" / "x.jpg").write_text("not an image")
    return root, truth


def test_each_export_gets_its_cells_and_differential(exports, tmp_path, capsys):
    root, truth = exports
    out = tmp_path / "out"
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                "blood"]) == 0
    printed = capsys.readouterr().out
    assert "3 exported slide(s)" in printed and "2 ok, 1 failed of 3 classified" in printed
    assert [line.rsplit(" ", 1)[-1] for line in printed.splitlines() if line.startswith(
        "slide-")] == ["[1/3]", "[2/3]", "[3/3]"]  # how many of the run's are done
    st = {r["uri"].rsplit("/", 1)[-1]: r for r in
          pl.read_parquet(f"{out}/slide_status/*.parquet").iter_rows(named=True)}
    assert st["slide-c"]["status"] == "failed" and st["slide-c"]["error_type"] == "NoReadableImages"
    assert "x.jpg" in st["slide-c"]["error_message"]
    assert st["slide-a"]["status"] == st["slide-b"]["status"] == "ok"
    assert st["slide-a"]["n_cells"] == 24 and st["slide-b"]["n_cells"] == 24  # cut.jpg left out
    assert any(w.startswith("unreadable_images: 1 of 25") and "cut.jpg" in w
               for w in st["slide-b"]["warnings"])
    cells = pl.read_parquet(f"{out}/image_cells/*.parquet")
    assert len(cells) == 48 and cells.select("slide_id", "cell_id").is_unique().all()
    assert cells["slide_id"].unique().sort().to_list() == sorted(
        slide_id_for(str(root / s)) for s in ("slide-a", "slide-b"))
    names = cells["path"].str.split("/").list.last()
    assert (cells["source_label"] == cells["path"].str.split("/").list.first()).all()
    # the reference classifier on images it never saw: most calls are the expert's
    agree = np.mean([c == truth[n] for c, n in zip(cells["class_code"], names)])
    assert agree >= 0.8, agree
    assert cells["ood_distance"].null_count() == 0  # the shipped checkpoint carries a density
    diff = pl.read_parquet(f"{out}/differentials/*.parquet")
    for sid, rows in diff.group_by("slide_id"):
        classes = rows.filter(pl.col("level") == "class")
        assert classes["count"].sum() == 24
        assert set(rows["denominator"]) == {"wbc"} and rows["me_ratio"].is_null().all()
        n_er = classes.filter(pl.col("class_code") == "ER")["count"].sum()
        n_wbc = rows["n_wbc"][0]
        assert rows["nrbc_per_100_wbc"][0] == pytest.approx(100 * n_er / n_wbc)
        # an export's platelet images are not a film's platelets: no count, no ratio
        assert rows["n_platelets"].is_null().all() and rows["platelets_per_wbc"].is_null().all()
        # the red cells around them were measured; 24 images hold fewer than the 30 a size
        # needs
        assert 0 < rows["n_red_cells"][0] < 30 and rows["red_cell_diameter_um"][0] is None
    # the summary job reads the output as it reads process_slides'
    assert slide_summary.main(["--output", str(out)]) == 0
    assert "3 slides (2 ok, 1 failed)" in capsys.readouterr().out
    # an export's cells are files already: nothing to read back from a slide for labelling
    from jobs import export_cells

    assert export_cells.main(["--output", str(out), "--to", str(tmp_path / "label")]) == 2
    assert "label them where they are" in capsys.readouterr().err

    # a rerun: a crash's leftovers are removed, committed slides are not redone
    stray = out / "image_cells" / "ghost-000000000000.parquet"
    stray.write_bytes(next((out / "image_cells").glob("*.parquet")).read_bytes())
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet") if p != stray}
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                "blood"]) == 0
    assert "3 already committed, 0 to classify" in capsys.readouterr().out
    assert not stray.exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before
    # while another run writes the output, a run is refused and its leftovers are kept
    from engine.config import StorageConfig
    from engine.pipeline.commit import OutputStore, RunLease

    stray.write_bytes(next((out / "image_cells").glob("*.parquet")).read_bytes())
    with RunLease(OutputStore(str(out), StorageConfig()), "classify_cells"):
        assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                    "blood"]) == 2
    assert "is being written by another run: classify_cells" in capsys.readouterr().err
    assert stray.exists()
    stray.unlink()
    # other settings would mix two kinds of count in one output: refused
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                "aspirate"]) == 2
    assert "specimen: blood -> aspirate" in capsys.readouterr().err
    # so would an output of an earlier engine release (0.1.0's config.json had no release)
    from engine import results_release

    doc = json.loads((out / "config.json").read_text())
    del doc["settings"]["engine_release"]
    doc["config_hash"] = "0.1.0's"
    (out / "config.json").write_text(json.dumps(doc))
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                "blood"]) == 2
    assert f"engine_release: None -> {results_release()}" in capsys.readouterr().err


def test_an_export_still_being_written_is_left_for_the_next_run(exports, tmp_path, capsys,
                                                                monkeypatch):
    """An export copied to the share as the job read it was committed with the images there
    then (its differential over part of the slide's cells), and every rerun skipped it. One
    whose images changed as it was read is not committed; the next run classifies it whole."""
    import shutil

    root, _ = exports
    share = tmp_path / "share"
    shutil.copytree(root / "slide-a", share / "slide-a", symlinks=True)
    first = sorted((share / "slide-a").rglob("*.jpg"))[0]
    late = first.parent / "late.jpg"
    real = classify_cells.classify_slide

    def copy_goes_on(*args, **kwargs):
        got = real(*args, **kwargs)
        late.write_bytes(first.read_bytes())  # one more image lands meanwhile
        return got

    monkeypatch.setattr(classify_cells, "classify_slide", copy_goes_on)
    run = ["--images", str(share), "--output", str(tmp_path / "out"), "--specimen", "blood"]
    assert classify_cells.main(run) == 0
    printed = capsys.readouterr().out
    assert "warning: slide-a: 1 image(s) added as it was read: still being written (an " \
           "export or a copy under way?); not committed, so the next run classifies it" in printed
    assert "0 ok, 0 failed, 1 being written (not committed) of 1 classified" in printed
    assert not list((tmp_path / "out").glob("slide_status/*.parquet"))
    monkeypatch.undo()
    assert classify_cells.main(run) == 0
    assert "1 ok, 0 failed of 1 classified" in capsys.readouterr().out
    status = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert status["n_cells"].to_list() == [25]


def test_red_cells_around_the_cells_check_the_given_pixel_size(exports, tmp_path, capsys):
    """The exports' 48 images as one export: its red cells measure about 7 µm at PBC's 0.1
    µm/px; given as 0.2 they measure twice that, and the export is flagged pixel_size."""
    root, _ = exports
    one = tmp_path / "images" / "slide-ab"
    one.mkdir(parents=True)
    for path in [*(root / "slide-a").rglob("*.jpg"), *(root / "slide-b").rglob("*.jpg")]:
        if path.name != "cut.jpg":
            os.symlink(os.path.realpath(path), one / path.name)
    sizes, flags = [], []
    for mpp in ("0.1", "0.2"):
        out = tmp_path / f"out-{mpp}"
        assert classify_cells.main(["--images", str(one.parent), "--output", str(out),
                                    "--source-mpp", mpp]) == 0
        diff = pl.read_parquet(f"{out}/differentials/*.parquet")
        assert diff["n_red_cells"][0] >= 30
        sizes.append(diff["red_cell_diameter_um"][0])
        warnings = pl.read_parquet(f"{out}/slide_status/*.parquet")["warnings"][0].to_list()
        flags.append([w for w in warnings if w.startswith("pixel_size: ")])
    assert 6.2 < sizes[0] < 8.2 and sizes[1] == pytest.approx(2 * sizes[0], rel=0.03)
    assert flags[0] == [] and len(flags[1]) == 1 and f"{sizes[1]:.1f} µm" in flags[1][0]
    capsys.readouterr()
    # a case that pools the export keeps its slide's flag, naming the slide; its red cells
    # are the slide's (their median is each slide's own)
    from jobs import case_differentials

    cases = tmp_path / "cases.csv"
    cases.write_text("slide,case\nslide-ab,K\n")
    for mpp in ("0.1", "0.2"):
        assert case_differentials.main(["--output", str(tmp_path / f"out-{mpp}"), "--cases",
                                        str(cases)]) == 0
    capsys.readouterr()
    for mpp, flagged in (("0.1", False), ("0.2", True)):
        case = f"{tmp_path}/out-{mpp}/cases"
        warnings = pl.read_csv(f"{case}/case_summary.csv")["warnings"][0] or ""
        assert ("pixel_size: slide-ab-" in warnings) is flagged
        assert not flagged or f"{sizes[1]:.1f} µm" in warnings
        pooled = pl.read_parquet(f"{case}/case_differentials.parquet")
        slide = pl.read_parquet(f"{tmp_path}/out-{mpp}/differentials/*.parquet")
        assert (pooled["n_red_cells"] == slide["n_red_cells"][0]).all()
        assert pooled["red_cell_diameter_um"].is_null().all()
    # the range is a setting of the output: another is refused on a rerun; none turns it off
    assert classify_cells.main(["--images", str(one.parent), "--output", str(out),
                                "--source-mpp", "0.2", "--red-cell-diameter-um", "4,16"]) == 2
    assert "red_cell_diameter_um: [5.0, 10.5] -> [4.0, 16.0]" in capsys.readouterr().err
    assert classify_cells.main(["--images", str(one.parent), "--output", str(tmp_path / "o"),
                                "--source-mpp", "0.2", "--red-cell-diameter-um", "none"]) == 0
    status = pl.read_parquet(f"{tmp_path}/o/slide_status/*.parquet")
    assert not any(w.startswith("pixel_size") for w in status["warnings"][0])


def test_a_cases_slides_are_counted_together(exports, tmp_path, capsys):
    """jobs.case_differentials pools a case's slides' cells: its counts are the sum of theirs,
    its percentages over the pooled white cells; a failed or unknown slide is listed as left
    out; a blood film is not pooled with a marrow slide."""
    import shutil

    import pyarrow as pa

    from jobs import case_differentials

    root, _ = exports
    out = tmp_path / "out"
    cases = tmp_path / "cases.csv"
    cases.write_text("slide,case\nslide-a,X\nslide-b,X\nslide-c,Y\nnope,Y\n")
    # the export's cases recorded in its slides table, and pooled from there
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                "blood", "--cases", str(cases)]) == 0
    assert "1 slide(s) are no export under" in capsys.readouterr().err
    slides = pl.read_parquet(f"{out}/slides/*.parquet")
    assert dict(zip(slides["uri"].str.split("/").list.last(), slides["case"])) == {
        "slide-a": "X", "slide-b": "X", "slide-c": "Y"}
    assert case_differentials.main(["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 case(s) from 2 slide(s)" in printed
    per_slide = pl.read_parquet(f"{out}/differentials/*.parquet").filter(
        pl.col("level") == "class")
    pooled = pl.read_parquet(out / "cases" / "case_differentials.parquet")
    assert set(pooled["case"]) == {"X"} and (pooled["n_slides"] == 2).all()
    got = pooled.filter(pl.col("level") == "class")
    want = per_slide.group_by("class_code").agg(pl.col("count").sum())
    assert dict(zip(got["class_code"], got["count"])) == dict(zip(want["class_code"],
                                                                  want["count"]))
    n_wbc = per_slide.group_by("slide_id").agg(pl.col("n_wbc").first())["n_wbc"].sum()
    assert (got["n_wbc"] == n_wbc).all()
    for r in got.filter(pl.col("percent").is_not_null()).iter_rows(named=True):
        assert r["percent"] == pytest.approx(100 * r["count"] / n_wbc)
    summary = pl.read_csv(out / "cases" / "case_summary.csv")
    y = summary.filter(pl.col("case") == "Y").row(0, named=True)
    assert y["n_slides"] == 0 and "status failed" in y["left_out"]
    # a sheet in place of the recorded cases
    assert case_differentials.main(["--output", str(out), "--cases", str(cases), "--to",
                                    str(tmp_path / "sheet")]) == 0
    assert "1 case(s) from 2 slide(s)" in capsys.readouterr().out
    sheet = pl.read_parquet(tmp_path / "sheet" / "case_differentials.parquet")
    assert sheet.equals(pooled)
    y = pl.read_csv(tmp_path / "sheet" / "case_summary.csv").filter(
        pl.col("case") == "Y").row(0, named=True)
    assert "slide-c: status failed" in y["left_out"] and "nope: not in the output" in y["left_out"]
    twice = tmp_path / "twice.csv"  # one slide in two cases: a sheet's mistake
    twice.write_text("slide,case\nslide-a,X\nslide-b,X\nslide-a,W\n")
    assert case_differentials.main(["--output", str(out), "--cases", str(twice)]) == 2
    assert "is in case X and in case W" in capsys.readouterr().err
    # a manual differential per case, against the case's pooled counts
    from jobs import compare_differentials

    manual = tmp_path / "manual.csv"
    manual.write_text("case,lymphocyte,neutrophil,monocyte\nX,10,20,8\nY,5,5,5\nZ,1,1,1\n")
    assert compare_differentials.main(["--output", str(out), "--manual", str(manual),
                                       "--cases", str(cases), "--to", str(tmp_path / "a")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compared"] == "cases" and report["slides_compared"] == 1
    assert report["unmatched"] == ["Z"] and "Y" in report["not_compared"]
    assert "slide-c: status failed" in report["not_compared"]["Y"]
    # the same against the cases the output records
    assert compare_differentials.main(["--output", str(out), "--manual", str(manual),
                                       "--cases", "--to", str(tmp_path / "b")]) == 0
    recorded = json.loads(capsys.readouterr().out)
    assert recorded["slides_compared"] == 1 and recorded["unmatched"] == ["Z"]
    assert recorded["categories"] == report["categories"]
    rows = pl.read_parquet(tmp_path / "a" / "agreement_slides.parquet")
    assert set(rows["slide_id"]) == {"X"}
    auto = dict(zip(got["class_code"], got["count"]))  # the pooled counts above
    assert dict(zip(rows["category"], rows["auto_count"])) == {
        "lymphocyte": auto["L2"], "neutrophil": auto["M5"] + auto["M6"], "monocyte": auto["MO2"]}
    assert compare_differentials.main(["--output", str(out), "--source-labels", "--cases",
                                       str(cases)]) == 2
    assert "give one" in capsys.readouterr().err
    # one of the two slides retyped as a marrow aspirate: not pooled with the blood film
    other = tmp_path / "other"
    shutil.copytree(out, other)
    for path in (other / "slides").glob("*.parquet"):
        table = pq.read_table(path)
        i = table.schema.get_field_index("specimen")
        retyped = ["aspirate" if u.endswith("slide-b") else s for u, s in
                   zip(table["uri"].to_pylist(), table["specimen"].to_pylist())]
        pq.write_table(table.set_column(i, table.schema.field(i), pa.array(retyped)), path)
    assert case_differentials.main(["--output", str(other), "--cases", str(cases)]) == 2
    assert "a blood film with marrow slides" in capsys.readouterr().err
    # an output of an older table schema is refused with what to do, not a traceback
    doc = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**doc, "schema_version": 3}))
    assert case_differentials.main(["--output", str(other), "--cases", str(cases)]) == 2
    assert "table schema 3" in capsys.readouterr().err
    # an export's images have no place on a slide: no map of them
    from jobs import slide_map

    assert slide_map.main(["--output", str(out), "--slide", "slide-a"]) == 2
    assert "single-cell export" in capsys.readouterr().err


def test_an_export_classified_at_two_pixel_sizes_compared_image_by_image(exports, tmp_path,
                                                                         capsys):
    """compare_differentials --against on two runs of the same exports (cells resampled from
    0.1 and from 0.13 µm/px): each image is matched to itself, and the agreement is the share
    of images given the same call."""
    from jobs import compare_differentials

    root, _ = exports
    for mpp in ("0.1", "0.13"):
        assert classify_cells.main(["--images", str(root), "--output", str(tmp_path / mpp),
                                    "--specimen", "blood", "--source-mpp", mpp]) == 0
    capsys.readouterr()
    cells = [pl.read_parquet(f"{tmp_path}/{mpp}/image_cells/*.parquet") for mpp in ("0.1",
                                                                                 "0.13")]
    pairs = cells[1].join(cells[0], on=["slide_id", "path"], suffix="_ref")
    assert len(pairs) == len(cells[0]) == 48  # slide-a's 24 and slide-b's 24 readable images
    assert compare_differentials.main(["--output", str(tmp_path / "0.13"), "--against",
                                       str(tmp_path / "0.1"), "--to", str(tmp_path / "a")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["slides_compared"] == 2 and report["cells"]["matched_of_this_runs"] == [48, 48]
    assert report["cells"]["reference_cells"] == 48
    same = (pairs["class_code"] == pairs["class_code_ref"]).mean()
    assert report["cells"]["n_cells"] == 48 and report["cells"]["accuracy"] == pytest.approx(same)
    assert 0.3 < same < 1  # 30 % larger cells than in training: some calls change
    assert (tmp_path / "a" / "bland_altman.png").exists()


def test_images_out_of_focus_are_left_out_of_the_count(exports, tmp_path, capsys):
    """An export of 16 held-out cells, 8 of them blurred at their own pixels (Gaussian 0.5 µm,
    as a camera out of focus would take them): those are out_of_focus, the differential counts
    the 8 sharp ones, and the slide is flagged."""
    import cv2
    from PIL import Image

    root, truth = exports
    sources = sorted((root / "slide-a").rglob("*.jpg"))[:16]
    export = tmp_path / "blurry" / "slide-d"
    export.mkdir(parents=True)
    for n, src in enumerate(sources):
        rgb = np.asarray(Image.open(src).convert("RGB"))
        if n % 2:
            rgb = cv2.GaussianBlur(rgb, (0, 0), 0.5 / 0.1)  # 0.5 µm at the files' 0.1 µm/px
        Image.fromarray(rgb).save(export / f"{n:02d}-{src.name}", quality=95)
    out = tmp_path / "out"
    assert classify_cells.main(["--images", str(export.parent), "--output", str(out)]) == 0
    assert "out_of_focus" in capsys.readouterr().out
    cells = pl.read_parquet(f"{out}/image_cells/*.parquet").sort("path")
    blurred = np.arange(len(cells)) % 2 == 1
    assert cells["out_of_focus"].to_list() == blurred.tolist()
    assert (cells["blur_um"].to_numpy()[blurred] > 0.45).all()  # measured 0.5-0.55
    assert (cells["blur_um"].to_numpy()[~blurred] < 0.2).all()
    diff = pl.read_parquet(f"{out}/differentials/*.parquet")
    assert diff.filter(pl.col("level") == "class")["count"].sum() == 8
    assert diff["n_out_of_focus"][0] == 8 and diff["out_of_focus_percent"][0] == 50.0
    status = pl.read_parquet(f"{out}/slide_status/*.parquet")
    assert status["warnings"][0][0].startswith("out_of_focus: 50% of nucleated cells")


def test_untrained_classifier_is_refused(exports, tmp_path, capsys):
    root, _ = exports
    assert classify_cells.main(["--images", str(root), "--output", str(tmp_path / "o"),
                                "--model", "deepheme-resnet18"]) == 2
    assert "no trained weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_gallery_of_an_export(exports, tmp_path, capsys):
    """jobs.cell_gallery reads an export's images as classify_cells did, and will not draw
    saliency maps of random weights."""
    from PIL import Image

    from jobs import cell_gallery

    root, _ = exports
    out = tmp_path / "o"
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--model",
                                "deepheme-tiny", "--allow-untrained"]) == 0
    png = tmp_path / "g.png"
    assert cell_gallery.main(["--output", str(out), "--slide", "slide-a", "--per-class", "3",
                              "--png", str(png)]) == 0
    cells = pl.read_parquet(f"{out}/image_cells/slide-a-*.parquet")
    n_classes = cells["class_code"].n_unique()
    shown = sum(min(3, n) for n in cells["class_code"].value_counts()["count"])
    assert f"{n_classes} classes, {shown} cells" in capsys.readouterr().out
    assert Image.open(png).size[1] > 100 * n_classes
    assert cell_gallery.main(["--output", str(out), "--slide", "slide-a", "--saliency",
                              "gradcam", "--png", str(png)]) == 2
    assert "random weights" in capsys.readouterr().err
    # the calls that are not what the analyser's folder says, for review
    from engine.report.agreement import category_codes

    # (the random model agrees with no folder: every other cell given a call its folder names)
    calls = [sorted(category_codes(lab))[0] if i % 2 else code for i, (lab, code) in
             enumerate(zip(cells["source_label"], cells["class_code"]))]
    wrong, unread = cell_gallery.disagreeing(cells.with_columns(class_code=pl.Series(calls)))
    assert not unread and 0 < len(wrong) <= len(cells) // 2 + 1
    for row, call in zip(cells.iter_rows(named=True), calls):
        assert (call not in category_codes(row["source_label"])) == \
            (row["cell_id"] in set(wrong["cell_id"]))
    wrong, _ = cell_gallery.disagreeing(cells)
    assert cell_gallery.main(["--output", str(out), "--slide", "slide-a", "--order",
                              "disagree", "--per-class", "2", "--png", str(png)]) == 0
    assert f"{len(wrong)} of {len(cells)} cells called other than their folder says" in \
        capsys.readouterr().out


@pytest.mark.s3
def test_images_and_output_on_s3(exports, s3_server, s3_client, tmp_path, capsys):
    from tests.conftest import upload_tree

    root, truth = exports
    s3_client.create_bucket(Bucket="exports")
    upload_tree(s3_client, "exports", root, "lab-a")  # the images too: read from S3
    args = ["--images", "s3://exports/lab-a", "--output", "s3://exports/run1", "--s3-endpoint",
            s3_server, "--source-mpp", "auto"]
    assert classify_cells.main(args) == 0
    assert "2 ok, 1 failed of 3 classified" in capsys.readouterr().out
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="exports")["Contents"]}
    assert "run1/config.json" in keys
    for table, n in (("slide_status", 3), ("slides", 3), ("image_cells", 2),
                     ("differentials", 2)):
        assert len([k for k in keys if k.startswith(f"run1/{table}/")]) == n, table
    slide = pq.read_table(io.BytesIO(s3_client.get_object(
        Bucket="exports", Key=next(k for k in keys if k.startswith("run1/slides/")))["Body"].read()))
    # the pixel size measured on the images' red cells, and said so
    assert slide["mpp_source"][0].as_py().startswith("red cells")
    assert 0.08 < slide["mpp_x"][0].as_py() < 0.13  # PBC: about 0.107 µm/px
    cells = pl.concat([pl.read_parquet(io.BytesIO(s3_client.get_object(Bucket="exports", Key=k)
                                                  ["Body"].read()))
                       for k in sorted(keys) if k.startswith("run1/image_cells/")])
    assert len(cells) == 48  # cut.jpg, truncated, left out as on disk
    assert (cells["source_label"] == cells["path"].str.split("/").list.first()).all()
    assert set(cells["path"].str.split("/").list.last()) == set(truth)
    assert cells["slide_id"].unique().sort().to_list() == sorted(
        slide_id_for(f"s3://exports/lab-a/{s}") for s in ("slide-a", "slide-b"))
    config = s3_client.get_object(Bucket="exports", Key="run1/config.json")["Body"].read()
    assert b"testing-secret-value" not in config and b"testing-key-id" not in config
    capsys.readouterr()
    assert classify_cells.main(args) == 0  # the rerun reads the commits back from S3
    assert "3 already committed, 0 to classify" in capsys.readouterr().out
    # a gallery of one export with the Grad-CAM of each call: the images and the run's
    # config read back from S3, the checkpoint the run used
    from jobs import cell_gallery

    png = tmp_path / "g.png"
    assert cell_gallery.main(["--output", "s3://exports/run1", "--slide", "slide-b",
                              "--per-class", "2", "--saliency", "gradcam", "--png", str(png),
                              "--s3-endpoint", s3_server]) == 0
    assert "with Grad-CAM maps" in capsys.readouterr().out and png.stat().st_size > 10_000
    # a manual sheet on S3 against the output on S3: the agreement tables are written beside it
    s3_client.put_object(Bucket="exports", Key="manual.csv",
                         Body=b"slide,lymphocyte,neutrophil,monocyte\nslide-a,5,10,9\n")
    from jobs import compare_differentials

    assert compare_differentials.main(["--output", "s3://exports/run1", "--manual",
                                       "s3://exports/manual.csv", "--s3-endpoint",
                                       s3_server]) == 0
    assert json.loads(capsys.readouterr().out)["slides_compared"] == 1
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="exports")["Contents"]}
    assert {f"run1/agreement/{f}" for f in ("agreement.parquet", "agreement_slides.parquet",
                                            "bland_altman.png")} <= keys
    # a case sheet on S3: the pooled case written beside the output
    from jobs import case_differentials

    s3_client.put_object(Bucket="exports", Key="cases.csv",
                         Body=b"slide,case\nslide-a,X\nslide-b,X\n")
    assert case_differentials.main(["--output", "s3://exports/run1", "--cases",
                                     "s3://exports/cases.csv", "--s3-endpoint", s3_server]) == 0
    assert "1 case(s) from 2 slide(s)" in capsys.readouterr().out
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="exports")["Contents"]}
    assert {"run1/cases/case_differentials.parquet", "run1/cases/case_summary.csv"} <= keys


@pytest.mark.s3
def test_exports_are_found_alike_on_disk_and_on_s3(tmp_path, s3_server, s3_client):
    """`find_exports` lists a folder on disk and an S3 prefix by two paths (os.walk, fs.find):
    both take ``<slide>/…/<image>`` and leave out hidden files and folders (a viewer's
    ``.thumbnails``, say) at any depth, and files that are no images."""
    from engine.config import StorageConfig
    from jobs.common import find_exports
    from tests.conftest import upload_tree

    root = tmp_path / "lab"
    for rel in ("slide-a/x.jpg", "slide-a/M3/y.png", "slide-a/.thumbnails/t.jpg",
                "slide-a/.z.jpg", "slide-b/notes.txt", ".trash/slide-c/q.jpg",
                "slide-d/sub/.cache/w.jpg", "slide-d/sub/v.JPG", "loose.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    want = {"slide-a": ["M3/y.png", "x.jpg"], "slide-d": ["sub/v.JPG"]}
    local = find_exports(str(root), StorageConfig())
    assert {k: [os.path.relpath(p, root / k) for p in v] for k, v in local.items()} == want
    s3_client.create_bucket(Bucket="finds")
    upload_tree(s3_client, "finds", root, "lab")
    remote = find_exports("s3://finds/lab", StorageConfig(endpoint_url=s3_server))
    assert {k: [p.removeprefix(f"s3://finds/lab/{k}/") for p in v]
            for k, v in remote.items()} == want
    # and what tells an export still being written (`classify_cells.export_files`) sees the
    # same images
    for k, v in local.items():
        assert sorted(classify_cells.export_files(str(root / k), StorageConfig())) == v
        assert sorted(classify_cells.export_files(f"s3://finds/lab/{k}", StorageConfig(
            endpoint_url=s3_server))) == remote[k]


def test_an_export_of_another_stain_is_flagged(exports, tmp_path, capsys):
    """The 24 cells of an export, and the same cells with their hue turned 20° at their own
    pixels (another lab's stain): the turned export's nuclei read about 20° further round and
    it is flagged ``stain``; the original is not (its nuclei are the training stain's)."""
    from PIL import Image

    from engine.train.data import Shift

    root, _ = exports
    sources = sorted((root / "slide-a").rglob("*.jpg"))
    assert len(sources) == 24
    both = tmp_path / "sites"
    for name, shift in (("as-given", Shift()), ("turned", Shift(hue_deg=20))):
        (both / name).mkdir(parents=True)
        for src in sources:
            rgb = np.asarray(Image.open(src).convert("RGB"))
            Image.fromarray(shift.apply(rgb, 0.1)).save(both / name / src.name, quality=95)
    out = tmp_path / "out"
    assert classify_cells.main(["--images", str(both), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    st = {r["uri"].rsplit("/", 1)[-1]: r["warnings"] for r in
          pl.read_parquet(f"{out}/slide_status/*.parquet").iter_rows(named=True)}
    assert not any(w.startswith("stain") for w in st["as-given"])
    assert [w for w in st["turned"] if w.startswith("stain: nuclei stained unlike")]
    diff = pl.read_parquet(f"{out}/differentials/*.parquet").group_by("slide_id").first()
    hue = dict(zip(diff["slide_id"], diff["nuclear_hue_deg"]))
    turned = hue[slide_id_for(str(both / "turned"))] - hue[slide_id_for(str(both / "as-given"))]
    assert turned == pytest.approx(20, abs=3)
    assert "stain" in printed
    # the check can be turned off
    again = tmp_path / "again"
    assert classify_cells.main(["--images", str(both), "--output", str(again),
                                "--max-stain-hue-deg", "none"]) == 0
    assert not any(w.startswith("stain") for ws in pl.read_parquet(
        f"{again}/slide_status/*.parquet")["warnings"].to_list() for w in ws)


def test_an_image_too_large_to_decode_is_left_out_as_unreadable(tmp_path):
    """An image past what Pillow decodes in an export (Pillow's decompression-bomb refusal,
    which is no OSError) ended the job over every export in a traceback; it is left out and
    named as a truncated image is."""
    from types import SimpleNamespace

    from tests.slides.test_bad_inputs import _png

    good = str(SHARED_DATA / "pbc" / "images" / "basophil" / "BA_100102.jpg")
    (tmp_path / "huge.png").write_bytes(_png(20_000, 20_000))
    ok, crops, bad, _ = classify_cells.read_images(
        [good, str(tmp_path / "huge.png")], 0.1, SimpleNamespace(input_mpp=0.25, input_px=96), 1)
    assert ok == [0] and crops.shape == (1, 96, 96, 3)
    assert len(bad) == 1 and bad[0].startswith("huge.png: Image size (400000000 pixels) exceeds")


def test_a_random_pick_draws_each_class_from_every_slide():
    """The galleries' and exports' ``random`` order drew each class with the same seed, so it
    took the same places in every class's rows, which come slide by slide: on a run's two
    slides, every class's cells came from the first."""
    from jobs.cell_gallery import choose

    cells = pl.DataFrame({"slide_id": [s for s in ("a", "b") for _ in range(20 * 60)],
                          "class_code": [f"C{i % 20}" for i in range(2 * 20 * 60)],
                          "class_prob": 0.5})
    picked = pl.concat(list(choose(cells, 3, "random", 0).values()))
    assert picked.height == 60 and picked["class_code"].n_unique() == 20
    share = (picked["slide_id"] == "a").mean()
    assert 0.3 < share < 0.7, share  # 0.5 expected; a binomial of 60 stays within this
    again = pl.concat(list(choose(cells, 3, "random", 0).values()))
    assert again.equals(picked)  # the seed decides


def test_one_output_holds_one_jobs_tables(tmp_path, capsys):
    """classify_cells into an output of process_slides (or the other way round) replaced the
    other's config.json: the first job's next run was refused ("classified with other
    settings (model: None -> …)", every setting listed), or ran unchecked. Each is now
    refused at once, naming the job whose output it is."""
    from engine.config import Config, StorageConfig
    from jobs import process_slides
    from jobs.common import write_run_config

    small = str(SHARED_DATA / "wsi/openslide-python/small.svs")
    slides_out = tmp_path / "slides-out"
    write_run_config(str(slides_out), Config(), {}, StorageConfig(), "process_slides")
    before = (slides_out / "config.json").read_text()
    (tmp_path / "export" / "slide-c").mkdir(parents=True)
    (tmp_path / "export" / "slide-c" / "x.jpg").write_text("not an image")
    assert classify_cells.main(["--images", str(tmp_path / "export"), "--output",
                                str(slides_out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"hemeflow: error: {slides_out} is process_slides's output, not classify_cells's: each "
        "job keeps its own config.json and tables there; write to another --output")
    assert (slides_out / "config.json").read_text() == before
    cells_out = tmp_path / "cells-out"
    assert classify_cells.main(["--images", str(tmp_path / "export"), "--output",
                                str(cells_out)]) == 0
    capsys.readouterr()
    assert process_slides.main(["--input", small, "--output", str(cells_out)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"hemeflow: error: {cells_out} is classify_cells's output, not process_slides's: each "
        "job keeps its own config.json and tables there; write to another --output")
    assert json.loads((cells_out / "config.json").read_text())["job"] == "classify_cells"


@pytest.mark.timed
def test_an_image_whose_read_hangs_is_left_out_and_three_stop_the_job(exports, tmp_path,
                                                                      capsys, monkeypatch):
    """An image whose read hangs (a named pipe no one writes, as a read on a mount that stopped
    answering) held the job for ever. It is left out as unreadable after
    ``READ_TIMEOUT_S``; three in a row stop the job, the exports committed before staying."""
    from tests.conftest import hung_pipes

    root, _ = exports
    mine = tmp_path / "images"
    for name in ("slide-a", "slide-z"):
        shutil.copytree(root / "slide-a", mine / name, symlinks=True)
    monkeypatch.setattr(classify_cells, "READ_TIMEOUT_S", 1.0)
    run = ["--images", str(mine), "--output", str(tmp_path / "out"), "--specimen", "blood"]
    with hung_pipes(mine / "slide-a", "hang.jpg"), \
            hung_pipes(mine / "slide-z", *(f"hang{i}.jpg" for i in range(3))):
        assert classify_cells.main(run) == 2
    said = capsys.readouterr()
    assert "slide-a: ok, 24 cells" in said.out
    assert "hemeflow: error: 3 images' reads hung in a row, no read ending between them (" \
        f"{mine / 'slide-z' / 'hang0.jpg'}, {mine / 'slide-z' / 'hang1.jpg'}, " \
        f"{mine / 'slide-z' / 'hang2.jpg'}): the storage they are on seems to have stopped " \
        "answering, and every image left would hang as long; stopped." in said.err
    st = pl.read_parquet(tmp_path / "out" / "slide_status" / "*.parquet")
    assert st["uri"].to_list() == [str(mine / "slide-a")]
    assert any("hang.jpg: its read had not ended after 1 s" in w for w in st["warnings"][0])
