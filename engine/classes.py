"""Cell class schemes: the DeepHeme 23-code bone-marrow scheme, lineage groups, and mappings from
other label sets (PBC / CellaVision).

Group codes (``ER``, ``IG``, ``NEU``) stand for a stage range when a source labels only the group;
``PLT`` is a single platelet (DeepHeme's ``PL3`` is a platelet clump). A model may cover any subset
of codes; its checkpoint card lists which.
"""

from __future__ import annotations

from dataclasses import dataclass

LINEAGES = ("erythroid", "granulocytic", "monocytic", "lymphoid", "plasma", "megakaryocytic",
            "other")


@dataclass(frozen=True)
class CellClass:
    """One class code.

    Attributes:
        code: short code (``M1``).
        name: what a hematologist calls it.
        lineage: one of `LINEAGES`.
        nucleated: counts towards the nucleated differential (False for platelets, artefacts…).
        members: for a group code, the stage codes it stands for.
    """

    code: str
    name: str
    lineage: str
    nucleated: bool = True
    members: tuple[str, ...] = ()


_DEEPHEME = [
    CellClass("B1", "mast cell", "granulocytic"),
    CellClass("B2", "basophil", "granulocytic"),
    CellClass("E1", "immature eosinophil", "granulocytic"),
    CellClass("E4", "mature eosinophil", "granulocytic"),
    CellClass("ER1", "proerythroblast", "erythroid"),
    CellClass("ER2", "basophilic erythroblast", "erythroid"),
    CellClass("ER3", "polychromatic erythroblast", "erythroid"),
    CellClass("ER4", "orthochromatic erythroblast", "erythroid"),
    CellClass("ER5", "polychromatic erythrocyte", "erythroid", nucleated=False),
    CellClass("ER6", "mature erythrocyte", "erythroid", nucleated=False),
    CellClass("L2", "lymphocyte", "lymphoid"),
    CellClass("L4", "plasma cell", "plasma"),
    CellClass("M1", "myeloblast", "granulocytic"),
    CellClass("M2", "promyelocyte", "granulocytic"),
    CellClass("M3", "myelocyte", "granulocytic"),
    CellClass("M4", "metamyelocyte", "granulocytic"),
    CellClass("M5", "band neutrophil", "granulocytic"),
    CellClass("M6", "segmented neutrophil", "granulocytic"),
    CellClass("MO2", "monocyte", "monocytic"),
    CellClass("PL2", "megakaryocyte", "megakaryocytic"),
    CellClass("PL3", "platelet clump", "megakaryocytic", nucleated=False),
    CellClass("U1", "artifact", "other", nucleated=False),
    CellClass("U4", "mitotic body", "other", nucleated=False),
]

_GROUPS = [
    CellClass("ER", "erythroblast, stage not given", "erythroid",
              members=("ER1", "ER2", "ER3", "ER4")),
    CellClass("IG", "immature granulocyte, stage not given", "granulocytic",
              members=("M2", "M3", "M4")),
    CellClass("NEU", "neutrophil, stage not given", "granulocytic", members=("M5", "M6")),
    CellClass("PLT", "platelet", "megakaryocytic", nucleated=False),
]

DEEPHEME_CODES: tuple[str, ...] = tuple(c.code for c in _DEEPHEME)
CLASSES: dict[str, CellClass] = {c.code: c for c in _DEEPHEME + _GROUPS}

# Myeloid (granulocytic + monocytic) and erythroid codes for the M:E ratio; blasts for blast %.
MYELOID_LINEAGES = ("granulocytic", "monocytic")
BLAST_CODES = ("M1",)
# a single platelet: the class that tells a large platelet from a white cell's nucleus of the
# same size (a clump, PL3, is not one platelet)
PLATELET_CODE = "PLT"
# cells whose nucleus is two lobes apart: the detector may find one such cell as two nuclei,
# their bridge paler than the threshold (`engine.cells.lobes`). A segmented neutrophil's lobes
# lie closer, and the detector joins them (1 of 60 PBC neutrophils found as two)
LOBED_CODES = ("B2", "E4")

# PBC dataset (Acevedo et al. 2020) folder labels -> codes, as ../shared/data/pbc/README says;
# labels.csv already carries the code, this documents and checks it.
PBC_LABELS = {"basophil": ("B2",), "eosinophil": ("E4",), "erythroblast": ("ER",),
              "lymphocyte": ("L2",), "monocyte": ("MO2",), "ig": ("M2", "M3", "M4", "IG"),
              "neutrophil": ("M5", "M6", "NEU"), "platelet": ("PLT",)}


def get_class(code: str) -> CellClass:
    """The class for ``code``; raises ValueError listing the valid codes."""
    try:
        return CLASSES[code]
    except KeyError:
        raise ValueError(f"unknown cell class code {code!r}; valid: {sorted(CLASSES)}") from None


def ordered_codes(codes) -> list[str]:
    """Codes in DeepHeme scheme order, then any others alphabetically."""
    order = {c: i for i, c in enumerate(DEEPHEME_CODES)}
    return sorted(set(codes), key=lambda c: (order.get(c, len(order)), c))


def lineage_of(code: str) -> str:
    return get_class(code).lineage


def is_nucleated(code: str) -> bool:
    return get_class(code).nucleated


def covers(model_codes: tuple[str, ...] | list[str], code: str) -> bool:
    """Whether a model predicting ``model_codes`` can produce ``code`` (directly or as a group)."""
    if code in model_codes:
        return True
    cls = get_class(code)
    return bool(cls.members) and set(cls.members) <= set(model_codes)


def to_group(code: str) -> str:
    """The group code a stage code falls in (``M3`` -> ``IG``), or the code itself."""
    for group in _GROUPS:
        if code in group.members:
            return group.code
    return code
