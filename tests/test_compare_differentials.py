"""jobs.compare_differentials: a classify_cells output of real held-out PBC exports against the
experts' own counts of the same images (their class folders), and the category rules."""

import collections
import json

import numpy as np
import polars as pl
import pytest

from engine.report.agreement import (agreement_table, category_codes, compare_slide,
                                     platelet_agreement, platelet_rows, resolve_categories)
from engine.schema import slide_id_for
from jobs import classify_cells, compare_differentials
from tests.test_classify_cells import FOLDERS, exports  # noqa: F401 - the shared fixture

REFERENCE_CODES = {"B2", "E4", "ER", "L2", "M2", "M3", "M4", "M5", "M6", "MO2", "PLT"}


def test_categories_stand_for_their_codes():
    assert category_codes("IG") == {"IG", "M2", "M3", "M4"}
    assert category_codes("neutrophil") == {"M5", "M6", "NEU"}  # a PBC label
    assert category_codes("ER") == {"ER", "ER1", "ER2", "ER3", "ER4"}
    gran = category_codes("granulocytic")
    assert {"M1", "M6", "B1", "E4", "IG", "NEU"} <= gran and "L2" not in gran
    with pytest.raises(KeyError, match="lineage"):
        category_codes("lymphocyts")


@pytest.mark.parametrize("column,codes", [
    ("Segs", {"M6"}), ("Bands", {"M5"}), ("Neutrophils", {"M5", "M6", "NEU"}),
    ("Neutrophil, segmented", {"M6"}), ("Neutrophil, band", {"M5"}), ("Lymphs", {"L2"}),
    ("Monocytes", {"MO2"}), ("Eos", {"E4"}), ("Basophils", {"B2"}), ("Blasts", {"M1"}),
    ("Promyelocytes", {"M2"}), ("Myelos", {"M3"}), ("Metamyelocytes", {"M4"}),
    ("NRBC", {"ER", "ER1", "ER2", "ER3", "ER4"}), ("Plasma_cells", {"L4"}),
    ("Immature granulocytes", {"IG", "M2", "M3", "M4"}), ("mo2", {"MO2"}),
])
def test_a_labs_counting_sheet_words_stand_for_their_codes(column, codes):
    """A manual differential's columns (or an export's class folders) as labs write them:
    abbreviations, plurals, CellaVision's 'Neutrophil, band', the classes' own names."""
    assert category_codes(column) == codes


@pytest.mark.parametrize("column", ["Reactive lymphocytes", "Smudge cells", "Monoblasts"])
def test_words_that_name_no_class_are_not_guessed(column):
    with pytest.raises(KeyError, match="a class's name"):
        category_codes(column)


def test_columns_the_model_cannot_answer_are_not_compared():
    compared, ignored = resolve_categories(
        ["lymphocyte", "M6", "M1", "platelet", "comment", "IG"], REFERENCE_CODES)
    assert compared == {"lymphocyte": {"L2"}, "M6": {"M6"}, "IG": {"M2", "M3", "M4"}}
    assert "calls none" in ignored["M1"]  # the reference has no blast class: unknown, not 0
    assert "not nucleated" in ignored["platelet"] and "not a cell class" in ignored["comment"]
    # a model that calls only the group cannot be compared on one stage of it
    _, ignored = resolve_categories(["M6"], {"NEU", "L2"})
    assert "calls NEU, which this column splits" in ignored["M6"]
    with pytest.raises(ValueError, match="'granulocytic' and 'neutrophil' both count"):
        resolve_categories(["neutrophil", "granulocytic"], REFERENCE_CODES)


def test_one_slide_and_the_agreement_over_slides_by_hand():
    cats = {"lymphocyte": frozenset({"L2"}), "neutrophil": frozenset({"M5", "M6"})}
    rows = compare_slide({"lymphocyte": 30, "neutrophil": 70}, {"L2": 40, "M6": 50, "M5": 10,
                                                                "PLT": 99}, cats)
    by = {r["category"]: r for r in rows}
    assert by["lymphocyte"]["manual_percent"] == 30 and by["lymphocyte"]["auto_percent"] == 40
    assert by["neutrophil"]["auto_count"] == 60 and by["neutrophil"]["difference"] == -10
    # 30 of 100 counted cells: the Wilson interval is about 21.9-39.6 %; 40 % lies outside
    assert by["lymphocyte"]["manual_ci_low"] == pytest.approx(21.9, abs=0.1)
    assert not by["lymphocyte"]["within_manual_ci"]
    assert compare_slide({"lymphocyte": 0, "neutrophil": 0}, {"L2": 4}, cats).startswith(
        "the manual sheet counts no cells")
    other = compare_slide({"lymphocyte": 20, "neutrophil": 80}, {"L2": 20, "M6": 80}, cats)
    table = agreement_table(pl.DataFrame([{"slide_id": "a", **r} for r in rows]
                                         + [{"slide_id": "b", **r} for r in other]))
    ly = table.filter(pl.col("category") == "lymphocyte").row(0, named=True)
    assert ly["n_slides"] == 2 and ly["bias"] == pytest.approx(5.0)  # (10 + 0) / 2
    sd = np.std([10.0, 0.0], ddof=1)
    assert ly["sd_difference"] == pytest.approx(sd) and ly["loa_high"] == pytest.approx(
        5 + 1.96 * sd)
    assert ly["mean_abs_difference"] == pytest.approx(5.0) and ly["within_manual_ci"] == 0.5


def test_the_platelet_estimate_against_the_analyser_by_hand():
    """Per white cell times the analyser's white count, against its platelet count."""
    limits = (150.0, 450.0)
    rows = [platelet_rows("a", 20.0, 7.0, 160.0, limits),   # 140: decreased, analyser adequate
            platelet_rows("b", 30.0, 8.0, 250.0, limits),   # 240: both adequate
            platelet_rows("c", 60.0, 10.0, 500.0, limits)]  # 600: both increased
    assert rows[0]["estimate"] == 140 and rows[0]["difference"] == -20
    assert (rows[0]["grade_analyser"], rows[0]["grade_estimate"]) == ("adequate", "decreased")
    got = platelet_agreement(pl.DataFrame(rows))
    assert got["slides_compared"] == 3 and got["bias"] == pytest.approx(70 / 3)
    sd = np.std([-20.0, -10.0, 100.0], ddof=1)
    assert got["loa_low"] == pytest.approx(70 / 3 - 1.96 * sd)
    assert got["median_ratio"] == pytest.approx(240 / 250)
    assert got["grade_agreement"] == pytest.approx(2 / 3)
    assert got["grades"]["adequate"] == {"decreased": 1, "adequate": 1, "increased": 0}
    assert got["grades"]["increased"]["increased"] == 1 and got["pearson_r"] > 0.9


@pytest.fixture(scope="module")
def classified(exports, tmp_path_factory):  # noqa: F811
    root, truth = exports
    out = tmp_path_factory.mktemp("cmp") / "out"
    assert classify_cells.main(["--images", str(root), "--output", str(out), "--specimen",
                                "blood"]) == 0
    return root, truth, out


def _sheet(path, rows: dict[str, dict], extra: str = "") -> str:
    cols = list(FOLDERS.values())
    lines = ["slide," + ",".join(cols) + ",platelet,comment" + extra]
    for name, counts in rows.items():
        lines.append(name + "," + ",".join(str(counts.get(c, "")) for c in cols) + ",3,ok")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _expert_counts(truth, out) -> dict[str, collections.Counter]:
    """Per slide folder, the experts' count per PBC label of the images the job read."""
    cells = pl.read_parquet(f"{out}/image_cells/*.parquet")
    counts = {}
    for sid, path in zip(cells["slide_id"], cells["path"]):
        counts.setdefault(sid, collections.Counter())[FOLDERS[truth[path.rsplit("/", 1)[-1]]]] += 1
    return counts


def test_agreement_with_the_experts_own_counts(classified, tmp_path, capsys):
    root, truth, out = classified
    expert = _expert_counts(truth, out)
    sid_a, sid_b = (slide_id_for(str(root / s)) for s in ("slide-a", "slide-b"))
    sheet = _sheet(tmp_path / "manual.csv", {"slide-a": expert[sid_a], sid_b: expert[sid_b],
                                             "slide-c": {}, "slide-z": {"lymphocyte": 5}})
    assert compare_differentials.main(["--output", str(out), "--manual", sheet]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["slides_compared"] == 2 and report["unmatched"] == ["slide-z"]
    assert "NoReadableImages" in report["not_compared"]["slide-c"]
    assert set(report["columns_not_compared"]) == {"platelet", "comment"}
    assert "not compared: column 'comment'" in captured.err
    assert set(report["categories"]) == set(FOLDERS.values())
    assert report["categories"]["neutrophil"]["codes"] == ["M5", "M6"]
    # the job's numbers, against the same computed here from the cells table: the model's call
    # against the expert's folder, each side over the five compared categories
    cells = pl.read_parquet(f"{out}/image_cells/*.parquet")
    per_slide = pl.read_parquet(f"{out}/agreement/agreement_slides.parquet")
    names = {c: set(category_codes(c)) for c in FOLDERS.values()}
    for sid in (sid_a, sid_b):
        calls = collections.Counter(
            next((c for c, codes in names.items() if code in codes), None)
            for code in cells.filter(pl.col("slide_id") == sid)["class_code"])
        calls.pop(None, None)  # called a class the sheet does not list (M2, B2 ...)
        for r in per_slide.filter(pl.col("slide_id") == sid).iter_rows(named=True):
            assert r["auto_percent"] == pytest.approx(100 * calls[r["category"]]
                                                      / sum(calls.values()))
            assert r["manual_percent"] == pytest.approx(100 * expert[sid][r["category"]]
                                                        / sum(expert[sid].values()))
    # the reference agrees with the experts on most of these cells (>= 80 % of images)
    assert report["mean_abs_difference"] < 8
    assert report["within_manual_ci"] >= 0.8
    table = pl.read_parquet(f"{out}/agreement/agreement.parquet")
    assert table["n_slides"].to_list() == [2] * 5
    assert (out / "agreement" / "bland_altman.png").read_bytes()[:4] == b"\x89PNG"
    assert report["slides_with_review_flags"] == ["slide-a", sid_b]  # low count (24 < 200)

    # the same slides with two categories' counts swapped: told apart
    swapped = {k: collections.Counter(v) for k, v in expert.items()}
    for counts in swapped.values():
        counts["lymphocyte"], counts["neutrophil"] = counts["neutrophil"] + 6, \
            counts["lymphocyte"]
    sheet = _sheet(tmp_path / "wrong.csv", {"slide-a": swapped[sid_a], "slide-b": swapped[sid_b]})
    assert compare_differentials.main(["--output", str(out), "--manual", sheet, "--to",
                                       str(tmp_path / "wrong")]) == 0
    wrong = json.loads(capsys.readouterr().out)
    assert wrong["mean_abs_difference"] > 2 * report["mean_abs_difference"]
    assert wrong["within_manual_ci"] < report["within_manual_ci"]
    assert (tmp_path / "wrong" / "agreement.parquet").exists()


def test_sheets_that_cannot_be_compared_are_refused(classified, tmp_path, capsys):
    _, _, out = classified
    sheet = tmp_path / "m.csv"
    sheet.write_text("slide,neutrophil,granulocytic\nslide-a,3,4\n")
    assert compare_differentials.main(["--output", str(out), "--manual", str(sheet)]) == 2
    assert "both count" in capsys.readouterr().err
    sheet.write_text("slide,lymphocyte\nslide-a,x\n")
    assert compare_differentials.main(["--output", str(out), "--manual", str(sheet)]) == 2
    assert "'x' is not a count" in capsys.readouterr().err
    sheet.write_text("name,lymphocyte\nslide-a,3\n")
    assert compare_differentials.main(["--output", str(out), "--manual", str(sheet)]) == 2
    assert "no slide column" in capsys.readouterr().err


def test_a_sheet_of_percentages_with_the_cells_counted(classified, tmp_path, capsys):
    """Percentages as a lab writes them (one decimal) with each slide's number of cells counted
    give the same comparison as the counts; without that number they are refused, not read as
    counts."""
    _, truth, out = classified
    expert = _expert_counts(truth, out)
    cols = list(FOLDERS.values())
    counts = _sheet(tmp_path / "counts.csv", expert)
    lines = ["slide," + ",".join(cols) + ",counted"]
    for sid, c in expert.items():
        n = sum(c.values())
        lines.append(sid + "," + ",".join(f"{100 * c[k] / n:.1f}" for k in cols) + f",{n}")
    percent = tmp_path / "percent.csv"
    percent.write_text("\n".join(lines) + "\n")
    # the same sheet as Excel writes it where the decimal mark is a comma: ';' and 12,5
    europe = tmp_path / "europe.csv"
    europe.write_text("\n".join(";".join(v.replace(".", ",") if k else v
                                         for k, v in enumerate(ln.split(",")))
                                for ln in lines) + "\n")
    # one slide's row without the column, its count given by --counted
    first = next(iter(expert))
    one = tmp_path / "one.csv"
    one.write_text(lines[0].rsplit(",", 1)[0] + "\n" + lines[1].rsplit(",", 1)[0] + "\n")
    for sheet, extra in ((counts, []), (str(percent), []), (str(europe), []),
                         (str(one), ["--counted", str(sum(expert[first].values()))])):
        assert compare_differentials.main(["--output", str(out), "--manual", sheet, "--to",
                                           f"{sheet}.out", *extra]) == 0
    capsys.readouterr()
    keep = ["slide_id", "category", "manual_percent", "manual_ci_low", "manual_ci_high",
            "within_manual_ci"]
    got = {name: pl.read_parquet(f"{tmp_path}/{name}.out/agreement_slides.parquet")
           .select(keep).sort("slide_id", "category") for name in ("counts.csv", "percent.csv",
                                                                   "europe.csv", "one.csv")}
    a = got["counts.csv"]
    assert got["europe.csv"].equals(got["percent.csv"])
    # the same sheet headed as a lab's counting sheet: the same comparison, by its own names
    words = {"lymphocyte": "Lymphs", "neutrophil": "Neutrophils", "erythroblast": "NRBC",
             "monocyte": "Monos", "eosinophil": "Eos"}
    lab = tmp_path / "lab.csv"
    lab.write_text("\n".join([",".join(words.get(c, c) for c in lines[0].split(",")),
                              *lines[1:]]) + "\n")
    assert compare_differentials.main(["--output", str(out), "--manual", str(lab), "--to",
                                       f"{lab}.out"]) == 0
    capsys.readouterr()
    back = {v: k for k, v in words.items()}
    named = pl.read_parquet(f"{lab}.out/agreement_slides.parquet").select(keep).with_columns(
        pl.col("category").replace(back)).sort("slide_id", "category")
    assert named.equals(got["percent.csv"])
    for b in (got["percent.csv"], got["one.csv"]):
        a_ = a.filter(pl.col("slide_id").is_in(b["slide_id"].to_list()))
        assert len(b) == len(a_) > 0 and b["category"].equals(a_["category"])
        np.testing.assert_allclose(b["manual_percent"], a_["manual_percent"], atol=0.06)
        for col in ("manual_ci_low", "manual_ci_high", "within_manual_ci"):
            assert b[col].equals(a_[col]), col  # the same number of cells behind each
    # without the number of cells counted
    assert compare_differentials.main(["--output", str(out), "--manual", str(one)]) == 2
    err = capsys.readouterr().err
    assert "is not a whole count" in err and "--counted" in err
    bad = tmp_path / "bad.csv"
    bad.write_text(f"slide,lymphocyte,neutrophil,counted\n{first},60,50,100\n")
    assert compare_differentials.main(["--output", str(out), "--manual", str(bad)]) == 2
    assert "add up to 110.0 %, more than 100" in capsys.readouterr().err
    assert compare_differentials.main(["--output", str(out), "--manual", str(bad),
                                       "--counted", "0"]) == 2
    assert "--counted takes a positive number" in capsys.readouterr().err


def test_source_labels_are_the_manual_differential_and_compared_cell_by_cell(classified,
                                                                             tmp_path, capsys):
    root, truth, out = classified
    expert = _expert_counts(truth, out)
    sheet = _sheet(tmp_path / "manual.csv", {sid: counts for sid, counts in expert.items()})
    assert compare_differentials.main(["--output", str(out), "--manual", sheet, "--to",
                                       str(tmp_path / "sheet")]) == 0
    capsys.readouterr()
    assert compare_differentials.main(["--output", str(out), "--source-labels", "--to",
                                       str(tmp_path / "labels")]) == 0
    report = json.loads(capsys.readouterr().out)
    # the export's folders are the experts' labels: the same comparison as their sheet's
    cols = ["slide_id", "category", "manual_percent", "auto_percent", "within_manual_ci"]
    a, b = (pl.read_parquet(tmp_path / d / "agreement_slides.parquet").select(cols)
            .sort("slide_id", "category") for d in ("sheet", "labels"))
    assert a.equals(b) and report["slides_compared"] == 2
    # image by image, against the same computed here
    cells = pl.read_parquet(f"{out}/image_cells/*.parquet")
    names = {c: set(category_codes(c)) for c in FOLDERS.values()}
    call = [next((c for c, codes in names.items() if code in codes), "other")
            for code in cells["class_code"]]
    assert report["cells"]["n_cells"] == len(cells) == 48
    assert report["cells"]["accuracy"] == pytest.approx(
        np.mean([c == lab for c, lab in zip(call, cells["source_label"])]))
    ly = report["cells"]["per_category"]["lymphocyte"]
    labelled = [c for c, lab in zip(call, cells["source_label"]) if lab == "lymphocyte"]
    assert ly["support"] == len(labelled)
    assert ly["sensitivity"] == pytest.approx(labelled.count("lymphocyte") / len(labelled))
    assert -1 <= report["cells"]["kappa"] <= 1
    assert sum(sum(row.values()) for row in report["cells"]["confusion"].values()) == 48
    # how far its probabilities hold on these cells: each call's category's probability
    # against whether the category is the label, over the same cells
    cal = report["cells"]["calibration"]
    assert cal["accuracy"] == pytest.approx(report["cells"]["accuracy"], abs=1e-4)
    assert sum(b["n"] for b in cal["reliability"]) == 48 and 0 <= cal["ece"] <= 1
    first = cells.row(0, named=True)
    called = call[0]
    mass = sum(p for p, c in zip(first["probabilities"], first["model_codes"])
               if c in names.get(called, ()))
    assert mass >= first["class_prob"] - 1e-6  # the category holds the called code
