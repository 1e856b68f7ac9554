"""Pixel size from red cells: synthetic smears of known scale, the real PBC export, the job."""

from __future__ import annotations

import csv
import json
import random
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.pixel_size import estimate_mpp, red_cell_diameters, red_cell_size
from jobs import estimate_pixel_size
from jobs.common import mpp_arg, resolve_source_mpp
from tests.conftest import SHARED_DATA

PBC = SHARED_DATA / "pbc"
needs_pbc = pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")


def grid(diameter_px: float, size: int) -> list[tuple[int, int]]:
    """Centres of the free-lying cells: a grid above a strip kept for the doublet."""
    step = int(diameter_px * 1.6)
    return [(x, y) for y in range(step // 2 + 4, size - 2 * step, step)
            for x in range(step // 2 + 4, size - step // 2, step)]


def smear_field(diameter_px: float, seed: int, size: int = 0) -> np.ndarray:
    """Light glass with free-lying pink red cells of ``diameter_px`` (±4 %), some with pallor,
    a purple nucleated cell of the same size, and a pair of overlapping red cells."""
    size = size or max(400, int(diameter_px * 10))
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (222, 220, 226), np.uint8)
    r = diameter_px / 2
    for i, (x, y) in enumerate(grid(diameter_px, size)):
        rr = r * rng.uniform(0.96, 1.04)
        purple = i == 0
        cv2.circle(img, (x, y), int(round(rr)), (150, 90, 190) if purple else (205, 140, 150),
                   thickness=-1, lineType=cv2.LINE_AA)
        if not purple and i % 2:
            cv2.circle(img, (x, y), int(round(rr / 3)), (215, 190, 195), -1)  # central pallor
    cv2.circle(img, (size // 2, size - int(r) - 2), int(r), (205, 140, 150), -1)  # a doublet
    cv2.circle(img, (size // 2 + int(r), size - int(r) - 2), int(r), (205, 140, 150), -1)
    return img


@pytest.mark.parametrize("diameter_px", [24.0, 40.0, 70.0])
def test_known_scale_is_recovered(diameter_px):
    images = [smear_field(diameter_px, seed) for seed in range(6)]
    est = estimate_mpp(images)
    assert est.mpp == pytest.approx(7.5 / diameter_px, rel=0.03)
    assert est.n_cells >= 30
    lo, hi = est.mpp_range
    assert lo <= est.mpp <= hi


def test_nucleated_cells_and_overlaps_are_not_red_cells():
    img = smear_field(40.0, 0)
    d = red_cell_diameters(img)
    assert len(d) == len(grid(40.0, 400)) - 1  # every free red cell; not the purple one, not the doublet
    assert d.max() < 40 * 1.1


def test_too_few_red_cells_is_a_clear_refusal():
    blank = np.full((200, 200, 3), 230, np.uint8)
    with pytest.raises(ValueError, match="give it instead"):
        estimate_mpp([blank, smear_field(40.0, 0, size=120)])


def test_mpp_argument():
    assert mpp_arg("auto") == "auto"
    assert mpp_arg("0.25") == 0.25
    assert resolve_source_mpp(0.1, []) == 0.1
    for bad in ("0", "-1", "x"):
        with pytest.raises(Exception, match="auto"):
            mpp_arg(bad)


def pbc_sample(n: int, seed: int = 0) -> list[str]:
    with open(PBC / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [str(PBC / r["path"]) for r in random.Random(seed).sample(rows, n)]


@needs_pbc
def test_pbc_export_is_about_a_tenth_of_a_micron():
    """CellaVision images are commonly taken at about 0.1 µm/px; their red cells say 0.105-0.11.
    Halving the images doubles the estimate."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in pbc_sample(150)]
    est = estimate_mpp(images)
    assert 0.095 < est.mpp < 0.12, est.to_dict()
    half = [cv2.resize(im, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA) for im in images]
    assert estimate_mpp(half).mpp == pytest.approx(2 * est.mpp, rel=0.05)


@needs_pbc
def test_red_cells_measured_at_a_stated_pixel_size():
    """A slide's pixel-size check: PBC's red cells at 0.1 µm/px measure about 7 µm (the export
    is nearer 0.107); halved and stated 0.2 the same; halved and stated 0.4 (a 20x scan recorded
    as 10x) twice that. Two images hold too few to give a size."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in pbc_sample(80, seed=1)]
    diameters = [red_cell_diameters(im) for im in images]
    size = red_cell_size(diameters, 0.1)
    assert size.n_cells >= 30 and 6.2 < size.diameter_um < 8.2
    assert size.iqr_um[0] < size.diameter_um < size.iqr_um[1]
    half = [cv2.resize(im, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA) for im in images]
    half = [red_cell_diameters(im) for im in half]
    assert red_cell_size(half, 0.2).diameter_um == pytest.approx(size.diameter_um, rel=0.05)
    assert red_cell_size(half, 0.4).diameter_um == pytest.approx(2 * size.diameter_um, rel=0.05)
    few = red_cell_size(diameters[:2], 0.1)
    assert few.n_cells < 30 and few.diameter_um is None and few.iqr_um is None
    assert red_cell_size([], 0.1).n_cells == 0


@needs_pbc
def test_job_prints_json(tmp_path, capsys):
    tmp_path = tmp_path / "export [batch 2]"  # a folder name glob reads as a pattern
    tmp_path.mkdir()
    for p in pbc_sample(120, seed=1):
        shutil.copy(p, tmp_path)
    assert estimate_pixel_size.main(["--data", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images_found"] == 120 and 0.095 < out["mpp"] < 0.12
    assert out["mpp_iqr"][0] <= out["mpp"] <= out["mpp_iqr"][1]
    assert estimate_pixel_size.main(["--data", str(tmp_path), "--red-cell-um", "8.0"]) == 0
    assert json.loads(capsys.readouterr().out)["mpp"] == pytest.approx(out["mpp"] * 8 / 7.5,
                                                                        rel=1e-3)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert estimate_pixel_size.main(["--data", str(empty)]) == 2
    assert "no images" in capsys.readouterr().err


@needs_pbc
def test_auto_source_mpp_is_measured_and_said(capsys):
    mpp = resolve_source_mpp("auto", pbc_sample(200, seed=2))
    assert 0.095 < mpp < 0.12
    assert f"{mpp:.4f} µm/px" in capsys.readouterr().err
