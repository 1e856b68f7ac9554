"""Per-slide differential: counts and percentages per class and lineage, M:E ratio, blast %, with
Wilson 95 % intervals, over nucleated cells as DeepHeme defines them.

A peripheral blood smear is counted as a blood film is (ICSH): over white cells, with nucleated
red cells left out of the denominator and reported per 100 white cells, and no M:E ratio (a
marrow measure). A marrow aspirate, or a slide of unknown type, is counted over all nucleated
cells, erythroid precursors included.

Cells out of focus (`engine.focus`) are left out of the counts by default, as a technologist
counts only where cells are sharp, and reported: how many, and their share of the nucleated
cells found.

Platelets are no part of the differential; where the detector found them (a slide's cells, not
an image export's) their number is reported beside it and, on a blood film, per white cell (a
platelet the size of a white cell's nucleus is counted when the classifier calls it one): the
smear's platelet estimate is that ratio times the analyser's white count (platelets per white
cell x WBC 10^9/L = platelets 10^9/L), the ratio method of a manual smear review.

A slide's free-lying red cells, measured at its stated pixel size, go beside the differential
too: about 7.5 µm across when that pixel size is right. A median far outside the normal range
flags the slide (``pixel_size``): its cells were detected and classified at the wrong scale."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

from engine.classes import (BLAST_CODES, DEEPHEME_CODES, LINEAGES, MYELOID_LINEAGES,
                            PLATELET_CODE, get_class)
from engine.stain import MIN_CELLS, StainCheck


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n``, in percent; (0, 100) when ``n == 0``."""
    if n == 0:
        return 0.0, 100.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@dataclass(frozen=True)
class Differential:
    """One slide's differential.

    Attributes:
        rows: one dict per class code and per lineage: ``level`` (``class`` | ``lineage``),
            ``code``, ``lineage``, ``nucleated``, ``count``, ``percent``, ``ci_low``, ``ci_high``
            (percentages over nucleated cells; None for non-nucleated classes).
        n_cells: all classified objects.
        n_nucleated: nucleated cells (erythroid precursors included).
        denominator: what percentages are of: ``nucleated`` cells, or ``wbc`` (white cells:
            nucleated cells less the erythroid; a blood smear's).
        n_wbc: white cells.
        nrbc_per_100_wbc: nucleated red cells per 100 white cells (blood smears only).
        me_ratio: myeloid (granulocytic + monocytic) to nucleated erythroid; None if no erythroid
            or on a blood smear.
        blast_percent, blast_ci: blasts over the denominator; None if the model has no blast
            class.
        low_count: fewer cells in the denominator than the configured minimum.
        not_covered: DeepHeme codes the model cannot predict (their counts are unknown, not 0).
        ood_percent: nucleated cells out of the classifier's training distribution, in percent
            (None when the checkpoint carries no feature density).
        out_of_distribution: ``ood_percent`` above the configured limit (None as above).
        n_out_of_focus: nucleated cells out of focus (left out of the counts unless counted).
        out_of_focus_percent: their share of all nucleated cells found, in percent (None when
            focus was not measured).
        out_of_focus: ``out_of_focus_percent`` above the configured limit (None as above).
        n_platelets: platelets counted: the platelet-sized detections (those not out of
            focus, unless out-of-focus cells are counted too; the detector measures no
            platelet-sized object's focus, so all of a slide's) and ``n_large_platelets``; None
            where platelets were not detected (image exports).
        n_large_platelets: detections of a nucleated cell's size that the classifier calls a
            platelet (``PLT``): large and giant platelets, counted as nucleated cells are (out
            of focus ones left out); None as ``n_platelets``.
        platelets_per_wbc: ``n_platelets`` per white cell counted (blood smears only; None
            without white cells).
        n_red_cells: free-lying red cells measured on the slide's sample tiles, or around an
            export's cells (None where not measured: a case's pooled differential).
        red_cell_diameter_um: their median diameter at the slide's stated µm/px (None with
            fewer than 30, or not measured).
        nuclear_hue_deg, nuclear_saturation: the median colour of the counted cells' nuclei
            (`engine.stain`), to hold against the classifier's training stain; None where not
            measured or fewer than `engine.stain.MIN_CELLS` cells were.
    """

    rows: list[dict]
    n_cells: int
    n_nucleated: int
    me_ratio: float | None
    blast_percent: float | None
    blast_ci: tuple[float, float] | None
    low_count: bool
    not_covered: tuple[str, ...] = field(default_factory=tuple)
    ood_percent: float | None = None
    out_of_distribution: bool | None = None
    denominator: str = "nucleated"
    n_wbc: int = 0
    nrbc_per_100_wbc: float | None = None
    n_out_of_focus: int = 0
    out_of_focus_percent: float | None = None
    out_of_focus: bool | None = None
    n_platelets: int | None = None
    n_large_platelets: int | None = None
    platelets_per_wbc: float | None = None
    n_red_cells: int | None = None
    red_cell_diameter_um: float | None = None
    nuclear_hue_deg: float | None = None
    nuclear_saturation: float | None = None


def _share_flagged(codes, flags, limit: float) -> tuple[float | None, bool | None, int]:
    """(percent, above ``limit``, count) of the nucleated cells whose flag is set; (None,
    None, 0) where any flag is unknown (None) or no cell is nucleated."""
    if flags is None or not len(flags) or any(f is None for f in flags):
        return None, None, 0
    nucleated = [bool(f) for c, f in zip(codes, flags) if get_class(c).nucleated]
    if not nucleated:
        return None, None, 0
    percent = 100 * sum(nucleated) / len(nucleated)
    return percent, percent > limit, sum(nucleated)


def compute_differential(codes, model_codes, min_nucleated: int = 200, ood=None,
                         max_ood_percent: float = 20.0, blood: bool = False,
                         out_of_focus=None, max_out_of_focus_percent: float = 20.0,
                         count_out_of_focus: bool = False, platelets=None,
                         red_cells: tuple[int, float | None] | None = None,
                         stain: dict | None = None) -> Differential:
    """Differential from the predicted class codes of one slide's cells.

    Args:
        codes: predicted code per cell.
        model_codes: the codes the model can predict (its card's ``class_codes``).
        min_nucleated: below this many nucleated cells the slide is flagged ``low_count``.
        ood: per cell, whether it lies out of the classifier's training distribution (None
            entries, or no list, where the checkpoint carries no feature density).
        max_ood_percent: above this share of nucleated cells out of distribution the slide is
            flagged ``out_of_distribution``.
        blood: a peripheral blood smear: percentages over white cells, nucleated red cells per
            100 white cells, no M:E ratio.
        out_of_focus: per cell, whether it is out of focus (no list where focus was not
            measured).
        max_out_of_focus_percent: above this share of nucleated cells out of focus the slide is
            flagged ``out_of_focus``.
        count_out_of_focus: count the cells out of focus too (by default they are left out).
        platelets: per platelet-sized detection, whether it is out of focus (None or False
            where not measured); no list where platelets were not detected. They are counted as
            the nucleated cells are, out of focus ones left out unless ``count_out_of_focus``,
            and so are the ``codes`` called a platelet (`PLATELET_CODE`): platelets too large
            for the platelet size, which only the classifier tells from a white cell.
        red_cells: ``(n, median diameter µm or None)`` of the slide's free-lying red cells
            (`engine.pixel_size.red_cell_size`); None where not measured.
        stain: the colour of the counted cells' nuclei (`engine.stain.stain_summary`), kept
            where it rests on `engine.stain.MIN_CELLS` cells or more; None where not measured.
    """
    blur_percent, blurred, n_blurred = _share_flagged(codes, out_of_focus,
                                                      max_out_of_focus_percent)
    if blur_percent is not None and not count_out_of_focus:  # what follows rests on the rest
        keep = [not f for f in out_of_focus]
        codes = [c for c, k in zip(codes, keep) if k]
        ood = None if ood is None else [o for o, k in zip(ood, keep) if k]
    ood_percent, flagged, _ = _share_flagged(codes, ood, max_ood_percent)
    counts = collections.Counter(codes)
    by_lineage = collections.Counter()
    for code, k in counts.items():
        if get_class(code).nucleated:
            by_lineage[get_class(code).lineage] += k
    nucleated = sum(by_lineage.values())
    erythroid = by_lineage.get("erythroid", 0)
    wbc = nucleated - erythroid
    total = wbc if blood else nucleated
    n_large = None if platelets is None else counts.get(PLATELET_CODE, 0)
    n_platelets = None if platelets is None else \
        sum(1 for f in platelets if count_out_of_focus or not f) + n_large

    def share(k: int, nucleated_: bool, lineage: str) -> tuple:
        """(percent, ci_low, ci_high) of ``k`` over the denominator; None for what is not in
        it (non-nucleated classes; on a blood film, erythroid: per 100 white cells instead)."""
        if not nucleated_ or (blood and lineage == "erythroid"):
            return None, None, None
        return (100 * k / total if total else None, *wilson_interval(k, total))

    rows = []
    for code in model_codes:
        cls = get_class(code)
        k = counts.get(code, 0)
        pct, lo, hi = share(k, cls.nucleated, cls.lineage)
        rows.append({"level": "class", "code": code, "lineage": cls.lineage,
                     "nucleated": cls.nucleated, "count": k, "percent": pct, "ci_low": lo,
                     "ci_high": hi})
    for lineage in LINEAGES:
        k = by_lineage.get(lineage, 0)
        pct, lo, hi = share(k, True, lineage)
        rows.append({"level": "lineage", "code": lineage, "lineage": lineage, "nucleated": True,
                     "count": k, "percent": pct, "ci_low": lo, "ci_high": hi})
    myeloid = sum(by_lineage.get(x, 0) for x in MYELOID_LINEAGES)
    has_blasts = all(c in model_codes for c in BLAST_CODES)
    blasts = sum(counts.get(c, 0) for c in BLAST_CODES)
    return Differential(
        rows=rows, n_cells=sum(counts.values()), n_nucleated=nucleated,
        me_ratio=myeloid / erythroid if erythroid and not blood else None,
        blast_percent=(100 * blasts / total if total else None) if has_blasts else None,
        blast_ci=wilson_interval(blasts, total) if has_blasts else None,
        low_count=total < min_nucleated,
        denominator="wbc" if blood else "nucleated", n_wbc=wbc,
        nrbc_per_100_wbc=(100 * erythroid / wbc if wbc else None) if blood else None,
        # a stage predicted only as its group (ER for ER1-ER4) counts as covered at group level
        not_covered=tuple(c for c in DEEPHEME_CODES if c not in model_codes
                          and not any(c in get_class(m).members for m in model_codes)),
        ood_percent=ood_percent, out_of_distribution=flagged,
        n_out_of_focus=n_blurred, out_of_focus_percent=blur_percent, out_of_focus=blurred,
        n_platelets=n_platelets, n_large_platelets=n_large,
        platelets_per_wbc=n_platelets / wbc if blood and wbc and n_platelets is not None
        else None,
        n_red_cells=None if red_cells is None else red_cells[0],
        red_cell_diameter_um=None if red_cells is None else red_cells[1],
        **({"nuclear_hue_deg": stain["nuclear_hue_deg"],
            "nuclear_saturation": stain["nuclear_saturation"]}
           if stain and stain["n"] >= MIN_CELLS else {}),
    )


def differential_rows(slide_id: str, d: Differential) -> list[dict]:
    """``d`` as rows of the ``differentials`` table (`engine.schema.DIFFERENTIALS`): one per class
    and lineage, each carrying the slide-level numbers."""
    lo, hi = d.blast_ci if d.blast_ci else (None, None)
    return [{"slide_id": slide_id, "level": r["level"], "class_code": r["code"],
             "lineage": r["lineage"], "nucleated": r["nucleated"], "count": r["count"],
             "percent": r["percent"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
             "n_nucleated": d.n_nucleated, "denominator": d.denominator, "n_wbc": d.n_wbc,
             "nrbc_per_100_wbc": d.nrbc_per_100_wbc, "me_ratio": d.me_ratio,
             "blast_percent": d.blast_percent, "blast_ci_low": lo, "blast_ci_high": hi,
             "low_count": d.low_count, "codes_not_covered": list(d.not_covered),
             "ood_percent": d.ood_percent, "out_of_distribution": d.out_of_distribution,
             "n_out_of_focus": d.n_out_of_focus, "out_of_focus_percent": d.out_of_focus_percent,
             "out_of_focus": d.out_of_focus, "n_platelets": d.n_platelets,
             "n_large_platelets": d.n_large_platelets,
             "platelets_per_wbc": d.platelets_per_wbc, "n_red_cells": d.n_red_cells,
             "red_cell_diameter_um": d.red_cell_diameter_um,
             "nuclear_hue_deg": d.nuclear_hue_deg, "nuclear_saturation": d.nuclear_saturation}
            for r in d.rows]


def pixel_size_warning(diameter_um: float | None, n_red_cells: int | None,
                       limits: tuple[float, float] | None) -> str | None:
    """Why a slide's pixel size is in doubt: its free-lying red cells' median diameter
    (``diameter_um``, of ``n_red_cells``) lies outside ``limits`` (low, high µm); None where it
    does not, or either is unknown."""
    if limits is None or diameter_um is None or limits[0] <= diameter_um <= limits[1]:
        return None
    return (f"free-lying red cells measure {diameter_um:.1f} µm across at the slide's pixel "
            f"size (median of {n_red_cells}; outside {limits[0]:g}-{limits[1]:g}, where normal "
            f"red cells are 6.2-8.2): check its pixel size; its cells were detected and "
            f"classified at this scale")


def review_warnings(d: Differential, min_nucleated: int,
                    red_cell_diameter_um: tuple[float, float] | None = None,
                    stain: StainCheck | None = None) -> dict[str, str]:
    """Why a slide's differential needs review before it is trusted, by flag (``pixel_size``,
    ``stain``, ``out_of_focus``, ``out_of_distribution``, ``low_count``, in that order; none
    when none is set). ``pixel_size``: the red cells' median diameter lies outside
    ``red_cell_diameter_um`` (low, high). ``stain``: the nuclei's colour is not the
    classifier's training stain (`engine.stain.StainCheck`)."""
    out = {}
    size = pixel_size_warning(d.red_cell_diameter_um, d.n_red_cells, red_cell_diameter_um)
    if size:
        out["pixel_size"] = size
    unlike = stain.warning(d.nuclear_hue_deg, d.nuclear_saturation) if stain else None
    if unlike:
        out["stain"] = unlike
    if d.out_of_focus:
        out["out_of_focus"] = (f"{d.out_of_focus_percent:.0f}% of nucleated cells are out of "
                               f"focus ({d.n_out_of_focus}); rescan, or review the cells "
                               f"counted")
    if d.out_of_distribution:
        out["out_of_distribution"] = (f"{d.ood_percent:.0f}% of nucleated cells lie outside the "
                                      f"classifier's training data")
    if d.low_count:
        wbc = d.denominator == "wbc"
        out["low_count"] = (f"{d.n_wbc if wbc else d.n_nucleated} "
                            f"{'white' if wbc else 'nucleated'} cells (< {min_nucleated})")
    return out
