import csv

import pytest

from engine.classes import (CLASSES, DEEPHEME_CODES, PBC_LABELS, covers, get_class, is_nucleated,
                            lineage_of, to_group)
from tests.conftest import SHARED_DATA


def test_deepheme_scheme_has_23_codes_with_lineages():
    assert len(DEEPHEME_CODES) == 23
    assert {lineage_of(c) for c in DEEPHEME_CODES} == {
        "erythroid", "granulocytic", "monocytic", "lymphoid", "plasma", "megakaryocytic", "other"}
    assert not is_nucleated("PL3") and not is_nucleated("U1") and is_nucleated("M1")


def test_groups_and_coverage():
    assert to_group("M3") == "IG" and to_group("M6") == "NEU" and to_group("L2") == "L2"
    assert covers(["M2", "M3", "M4", "L2"], "IG")
    assert not covers(["M2", "M3"], "IG")
    with pytest.raises(ValueError, match="valid"):
        get_class("XX")


def test_pbc_labels_map_as_the_readme_says():
    path = SHARED_DATA / "pbc" / "labels.csv"
    if not path.exists():
        pytest.skip("PBC data not present")
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["code"] for r in rows}) == 13
    for r in rows:
        assert r["code"] in CLASSES
        assert r["code"] in PBC_LABELS[r["label"]]
