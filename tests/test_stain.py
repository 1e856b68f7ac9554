"""The colour of cells' nuclei (`engine.stain`): real PBC cells read as one lab's stain, and a
stain turned or paled by a known amount reads as turned or paled by that amount."""

import csv

import numpy as np
import pytest

from engine.stain import StainCheck, nuclear_colour, stain_summary
from tests.conftest import SHARED_DATA

PBC = SHARED_DATA / "pbc"


@pytest.fixture(scope="module")
def pbc_cells():
    """Real PBC white cells and erythroblasts (one of every 100 nucleated rows), and the same
    images with their hue turned 20° and their saturation halved, at 0.25 µm/px."""
    if not (PBC / "labels.csv").exists():
        pytest.skip("PBC data not present")
    from engine.train.data import Shift, load_cell_images

    with open(PBC / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["code"] not in ("PLT", "IG", "NEU")][::100]
    paths = [str(PBC / r["path"]) for r in rows]
    return {name: load_cell_images(paths, 0.1, 0.25, 96, shift=shift) for name, shift in (
        ("as given", Shift()), ("turned", Shift(hue_deg=20)), ("paler", Shift(saturation=0.5)))}


def test_one_labs_nuclei_read_alike_and_a_shifted_stain_reads_shifted(pbc_cells):
    given = nuclear_colour(pbc_cells["as given"], 0.25)
    assert given.shape == (len(pbc_cells["as given"]), 3)
    hue, sat, val = given.T
    # a Romanowsky nucleus: purple (about 267°), deeply stained, and tight across one lab
    assert 255 < np.median(hue) < 280 and np.percentile(hue, 90) - np.percentile(hue, 10) < 15
    assert np.median(sat) > 0.6 and np.median(val) < 0.6
    turned = nuclear_colour(pbc_cells["turned"], 0.25)
    assert np.median(turned[:, 0] - hue) == pytest.approx(20, abs=2)
    paler = nuclear_colour(pbc_cells["paler"], 0.25)
    assert np.median(paler[:, 1] / sat) == pytest.approx(0.5, abs=0.05)
    summary = stain_summary(given)
    assert summary["n"] == len(given)
    assert summary["nuclear_hue_deg"] == pytest.approx(np.median(hue), abs=0.1)
    assert stain_summary(turned)["nuclear_hue_deg"] - summary["nuclear_hue_deg"] == \
        pytest.approx(20, abs=2)


def test_hues_either_side_of_red_have_their_median_at_red():
    colour = np.array([[350.0, 0.5, 0.5], [10.0, 0.5, 0.5], [355.0, 0.5, 0.5]])
    assert stain_summary(colour)["nuclear_hue_deg"] == pytest.approx(355)
    crop = np.full((1, 32, 32, 3), 230, np.uint8)  # grey glass
    crop[0, 8:24, 8:24] = (120, 40, 80)  # a dark red-violet nucleus: hue -30°
    assert nuclear_colour(crop, 0.25)[0] == pytest.approx([330, 80 / 120, 120 / 255], abs=0.01)


def test_nothing_to_read_and_what_is_not_crops():
    assert nuclear_colour(np.zeros((0, 96, 96, 3), np.uint8), 0.25).shape == (0, 3)
    assert stain_summary(np.zeros((0, 3)))["nuclear_hue_deg"] is None
    with pytest.raises(ValueError, match="uint8 crops"):
        nuclear_colour(np.zeros((2, 96, 96, 3), np.float32), 0.25)


def test_a_stain_check_flags_another_hue_and_a_paler_stain_not_a_deeper_one():
    check = StainCheck.of({"stain": {"nuclear_hue_deg": 269.5, "nuclear_saturation": 0.775}},
                          10.0, 0.75)
    assert check == StainCheck(269.5, 0.775, 10.0, 0.75)
    assert check.warning(266.8, 0.737) is None  # PBC's own test images
    assert check.warning(266.8, 0.95) is None  # deeper
    assert "hue 287°, +18°" in check.warning(287.2, 0.73)
    assert "hue 250°, -20°" in check.warning(249.5, 0.775)
    assert "hue 5°, +96°" in check.warning(5.0, 0.775)  # across 0°
    assert "saturation 0.44, 0.57 of it" in check.warning(266.8, 0.44)
    assert check.warning(None, None) is None
    # no training stain on the card (a checkpoint before 0.8.0), or both limits off: no check
    assert StainCheck.of({}, 10.0, 0.75) is None
    assert StainCheck.of({"stain": {"nuclear_hue_deg": 1, "nuclear_saturation": 1}}, None,
                         None) is None
    hue_only = StainCheck(269.5, 0.775, 10.0, None)
    assert hue_only.warning(266.8, 0.1) is None and hue_only.warning(290, 0.7)
