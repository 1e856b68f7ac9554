import json

import pytest

from engine.differential import (compute_differential, differential_rows, review_warnings,
                                 wilson_interval)
from engine.report.geojson import cells_to_geojson

MODEL = ("B2", "E4", "L2", "M1", "M2", "M6", "MO2", "ER", "PLT", "U1")


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(10, 100)
    assert lo == pytest.approx(5.52, abs=0.01) and hi == pytest.approx(17.44, abs=0.01)
    assert wilson_interval(0, 0) == (0.0, 100.0)
    assert wilson_interval(0, 50)[0] == 0.0


def test_differential_counts_percentages_indices():
    codes = ["M6"] * 40 + ["M2"] * 10 + ["M1"] * 5 + ["MO2"] * 5 + ["ER"] * 20 + ["L2"] * 20 \
        + ["PLT"] * 30 + ["U1"] * 7
    d = compute_differential(codes, MODEL, min_nucleated=200)
    assert d.n_cells == 137 and d.n_nucleated == 100   # platelets and artefacts excluded
    rows = {(r["level"], r["code"]): r for r in d.rows}
    assert rows[("class", "M6")]["percent"] == 40.0
    assert rows[("class", "PLT")]["percent"] is None and rows[("class", "PLT")]["count"] == 30
    assert rows[("lineage", "granulocytic")]["count"] == 55
    assert d.me_ratio == pytest.approx(60 / 20)
    assert d.blast_percent == 5.0 and d.blast_ci == wilson_interval(5, 100)
    assert d.low_count
    assert "M3" in d.not_covered and "ER1" not in d.not_covered  # ER covers ER1-ER4 as a group
    assert "B1" in d.not_covered


def test_a_blood_film_is_counted_over_white_cells():
    """ICSH: nucleated red cells are left out of a blood film's denominator and reported per
    100 white cells; the M:E ratio is a marrow measure."""
    codes = ["M6"] * 40 + ["M2"] * 10 + ["M1"] * 5 + ["MO2"] * 5 + ["ER"] * 20 + ["L2"] * 20 \
        + ["PLT"] * 30
    marrow = compute_differential(codes, MODEL)
    d = compute_differential(codes, MODEL, blood=True)
    assert (marrow.denominator, marrow.n_wbc, marrow.nrbc_per_100_wbc) == ("nucleated", 80, None)
    assert d.denominator == "wbc" and d.n_nucleated == 100 and d.n_wbc == 80
    assert d.nrbc_per_100_wbc == 25.0 and d.me_ratio is None
    rows = {(r["level"], r["code"]): r for r in d.rows}
    assert rows[("class", "M6")]["percent"] == 50.0 and rows[("class", "L2")]["percent"] == 25.0
    assert sum(r["percent"] for (lvl, _), r in rows.items()
               if lvl == "class" and r["percent"] is not None) == pytest.approx(100)
    for key in (("class", "ER"), ("lineage", "erythroid")):  # counted, not in the percentages
        assert rows[key]["count"] == 20 and rows[key]["percent"] is None
    assert d.blast_percent == 100 * 5 / 80 and d.blast_ci == wilson_interval(5, 80)
    assert compute_differential(["L2"] * 150 + ["ER"] * 60, MODEL, 200, blood=True).low_count
    # more nucleated red cells than white cells (a neonate's film; another lab's stain)
    d = compute_differential(["L2"] * 10 + ["ER"] * 25, MODEL, blood=True)
    assert d.nrbc_per_100_wbc == 250.0 and d.n_wbc == 10
    assert not compute_differential(["L2"] * 150 + ["ER"] * 60, MODEL, 200).low_count


def test_platelets_beside_the_differential_and_per_white_cell_on_a_blood_film():
    """Platelet-sized detections are no part of the counts; a blood film reports them per white
    cell (the estimate's ratio), out of focus ones left out unless those are counted."""
    codes = ["L2"] * 8 + ["ER"] * 2
    flags = [False] * 30 + [True] * 6
    d = compute_differential(codes, MODEL, blood=True, platelets=flags)
    assert d.n_platelets == 30 and d.platelets_per_wbc == 30 / 8 and d.n_wbc == 8
    assert compute_differential(codes, MODEL, blood=True, platelets=flags,
                                count_out_of_focus=True).n_platelets == 36
    marrow = compute_differential(codes, MODEL, platelets=flags)
    assert marrow.n_platelets == 30 and marrow.platelets_per_wbc is None
    export = compute_differential(codes, MODEL, blood=True)  # no detector: not known, not 0
    assert export.n_platelets is None and export.platelets_per_wbc is None
    assert compute_differential(["ER"] * 3, MODEL, blood=True,
                                platelets=flags).platelets_per_wbc is None  # no white cell


def test_a_platelet_of_a_white_cells_size_is_counted_as_a_platelet():
    """A detection of a nucleated cell's size that the classifier calls a platelet (a large or
    giant one) is no white cell: it is counted with the platelets, out of focus ones left out
    as a blurred white cell is; an image export (no detector) has no platelet count at all."""
    codes = ["L2"] * 8 + ["PLT"] * 3
    blur = [False] * 10 + [True]
    d = compute_differential(codes, MODEL, blood=True, out_of_focus=blur, platelets=[False] * 5)
    assert (d.n_large_platelets, d.n_platelets, d.n_wbc, d.n_nucleated) == (2, 7, 8, 8)
    assert d.platelets_per_wbc == 7 / 8
    rows = {r["code"]: r for r in d.rows if r["level"] == "class"}
    assert rows["PLT"]["count"] == 2 and rows["PLT"]["percent"] is None
    assert compute_differential(codes, MODEL, blood=True, out_of_focus=blur, platelets=[],
                                count_out_of_focus=True).n_platelets == 3
    assert compute_differential(codes, MODEL, blood=True).n_large_platelets is None
    assert compute_differential(["L2"], MODEL, platelets=[False]).n_large_platelets == 0


def test_no_blast_class_means_unknown_not_zero():
    d = compute_differential(["L2"] * 300, ("L2", "M6"), min_nucleated=200)
    assert d.blast_percent is None and d.me_ratio is None and not d.low_count


def test_geojson_has_the_structure_qupath_imports():
    cells = [{"cell_id": "s1-0", "x0": 10, "y0": 20, "x1": 40, "y1": 52, "class_code": "M6",
              "class_prob": 0.93},
             {"cell_id": "s1-1", "x0": 100, "y0": 20, "x1": 140, "y1": 52, "class_code": "ER",
              "class_prob": 0.71}]
    doc = json.loads(json.dumps(cells_to_geojson(cells)))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["id"], str)
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        props = f["properties"]
        assert props["objectType"] == "detection"
        cls = props["classification"]
        assert isinstance(cls["name"], str) and len(cls["color"]) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
        assert all(isinstance(v, float) for v in props["measurements"].values())
    assert doc["features"][0]["properties"]["classification"]["name"] == \
        "M6 segmented neutrophil"


def test_share_of_nucleated_cells_out_of_distribution_flags_the_slide():
    codes = ["M6"] * 60 + ["L2"] * 40 + ["PLT"] * 50
    far = [True] * 30 + [False] * 70 + [True] * 50  # platelets do not count
    d = compute_differential(codes, MODEL, ood=far, max_ood_percent=20)
    assert d.ood_percent == 30.0 and d.out_of_distribution
    d = compute_differential(codes, MODEL, ood=far, max_ood_percent=40)
    assert d.ood_percent == 30.0 and d.out_of_distribution is False
    for ood in (None, [None] * len(codes)):  # the checkpoint carries no density: unknown
        d = compute_differential(codes, MODEL, ood=ood)
        assert d.ood_percent is None and d.out_of_distribution is None
    assert compute_differential(["PLT"] * 5, MODEL, ood=[True] * 5).ood_percent is None
    geo = cells_to_geojson([{"cell_id": 0, "x0": 0, "y0": 0, "x1": 1, "y1": 1,
                             "class_code": "M6", "class_prob": 0.9, "ood_distance": 31.5},
                            {"cell_id": 1, "x0": 0, "y0": 0, "x1": 1, "y1": 1,
                             "class_code": "ER", "class_prob": 0.8, "blur_um": 0.42,
                             "ood_distance": float("nan")}])
    assert geo["features"][0]["properties"]["measurements"] == {"class_prob": 0.9,
                                                                "ood_distance": 31.5}
    assert geo["features"][1]["properties"]["measurements"] == {"class_prob": 0.8,
                                                                "blur_um": 0.42}


def test_cells_out_of_focus_are_left_out_of_the_counts_and_reported():
    # 20 sharp neutrophils and 10 lymphocytes; 30 blurred cells, most called erythroblasts (as
    # the classifier calls blurred cells), a few platelets among them
    codes = ["M6"] * 20 + ["L2"] * 10 + ["ER"] * 25 + ["M6"] * 5 + ["PLT"] * 4
    blurred = [False] * 30 + [True] * 30 + [True, True, False, False]
    far = [False] * 55 + [True] * 5 + [False] * 4
    d = compute_differential(codes, MODEL, ood=far, out_of_focus=blurred,
                             max_out_of_focus_percent=20)
    rows = {r["code"]: r for r in d.rows if r["level"] == "class"}
    assert d.n_nucleated == 30 and rows["M6"]["count"] == 20 and rows["ER"]["count"] == 0
    assert rows["PLT"]["count"] == 2  # the sharp platelets
    assert d.me_ratio is None  # no erythroid left: the blurred "erythroblasts" were not counted
    assert d.n_out_of_focus == 30 and d.out_of_focus_percent == 50.0 and d.out_of_focus
    assert d.ood_percent == 0.0  # of the cells counted: the far ones were the blurred
    warnings = review_warnings(d, 200)
    assert list(warnings) == ["out_of_focus", "low_count"]
    assert "50% of nucleated cells are out of focus (30)" in warnings["out_of_focus"]
    row = differential_rows("s", d)[0]
    assert (row["n_out_of_focus"], row["out_of_focus_percent"], row["out_of_focus"]) == \
        (30, 50.0, True)

    counted = compute_differential(codes, MODEL, ood=far, out_of_focus=blurred,
                                   max_out_of_focus_percent=60, count_out_of_focus=True)
    assert counted.n_nucleated == 60 and counted.me_ratio == 25 / 25  # M6 : ER
    assert counted.out_of_focus_percent == 50.0 and counted.out_of_focus is False
    assert counted.ood_percent == pytest.approx(100 * 5 / 60)
    unmeasured = compute_differential(codes, MODEL, ood=far)
    assert unmeasured.n_nucleated == 60 and unmeasured.out_of_focus_percent is None
    assert unmeasured.out_of_focus is None and unmeasured.n_out_of_focus == 0


def test_red_cells_far_from_their_size_flag_the_slides_pixel_size():
    """The red cells' median diameter beside the differential; outside the configured range the
    slide is flagged ``pixel_size``, first among its flags. Not measured, or too few, no flag."""
    codes = ["L2"] * 5
    limits = (5.0, 10.5)
    d = compute_differential(codes, ("L2",), min_nucleated=10, red_cells=(212, 14.2))
    assert (d.n_red_cells, d.red_cell_diameter_um) == (212, 14.2)
    rows = differential_rows("s", d)
    assert rows[0]["n_red_cells"] == 212 and rows[0]["red_cell_diameter_um"] == 14.2
    warnings = review_warnings(d, 10, limits)
    assert list(warnings) == ["pixel_size", "low_count"]
    assert "14.2 µm" in warnings["pixel_size"] and "median of 212" in warnings["pixel_size"]
    assert "outside 5-10.5" in warnings["pixel_size"]
    assert "pixel_size" in review_warnings(
        compute_differential(codes, ("L2",), 1, red_cells=(40, 3.6)), 1, limits)
    for red in ((300, 7.2), (300, 5.0), (12, None), None):  # in range (bounds too), too few, none
        d = compute_differential(codes, ("L2",), 1, red_cells=red)
        assert "pixel_size" not in review_warnings(d, 1, limits)
    assert compute_differential(codes, ("L2",)).n_red_cells is None  # an export: not measured
    d = compute_differential(codes, ("L2",), 1, red_cells=(212, 14.2))
    assert review_warnings(d, 1) == {}  # no range: no check


def test_the_nuclei_stain_beside_the_differential_flags_another_labs_stain():
    """The counted cells' nuclear colour goes into the differential where it rests on
    `MIN_CELLS` or more; held against the training stain it flags the slide ``stain``, after
    ``pixel_size`` and before the other flags."""
    from engine.stain import MIN_CELLS, StainCheck

    check = StainCheck(269.5, 0.775)
    codes = ["L2"] * 5
    pale = {"n": MIN_CELLS, "nuclear_hue_deg": 280.5, "nuclear_saturation": 0.22,
            "nuclear_value": None}
    d = compute_differential(codes, ("L2",), 10, red_cells=(212, 14.2), stain=pale)
    assert (d.nuclear_hue_deg, d.nuclear_saturation) == (280.5, 0.22)
    row = differential_rows("s", d)[0]
    assert (row["nuclear_hue_deg"], row["nuclear_saturation"]) == (280.5, 0.22)
    assert list(review_warnings(d, 10, (5.0, 10.5), check)) == ["pixel_size", "stain",
                                                               "low_count"]
    assert "stain" not in review_warnings(d, 10)  # no training stain to hold it against
    few = compute_differential(codes, ("L2",), 1, stain={**pale, "n": MIN_CELLS - 1})
    assert few.nuclear_hue_deg is None and review_warnings(few, 1, None, check) == {}
    same = compute_differential(codes, ("L2",), 1, stain={**pale, "nuclear_hue_deg": 266.8,
                                                         "nuclear_saturation": 0.74})
    assert review_warnings(same, 1, None, check) == {}
