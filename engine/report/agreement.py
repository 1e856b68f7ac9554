"""Agreement of hemeflow's differentials with a lab's manual ones: the comparison a lab makes
before it trusts automated counts (as in CellaVision validation studies).

A manual differential names its categories as the lab counts them: DeepHeme codes (``M6``),
group codes (``IG``, ``NEU``, ``ER``), lineages (``granulocytic``) or PBC / CellaVision labels
(``neutrophil``). Each becomes the set of DeepHeme codes it stands for (`category_codes`). Both
sides are then expressed as percentages of the same cells: those of the categories the manual
sheet lists and the model can call, so a sheet without, say, basophils is compared over the rest
on both sides.

Per category over the slides: bias (mean automated - manual, in points), the standard deviation
of the differences and the 95 % limits of agreement (Bland-Altman), the mean absolute difference,
Pearson's r, and the share of slides where the automated percentage lies within the 95 % interval
that the manual count itself carries (Wilson, from its number of cells: a 100-cell count cannot
tell 10 % from 16 %; Rümke's table says the same).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from engine.classes import CLASSES, LINEAGES, PBC_LABELS, get_class
from engine.differential import wilson_interval


# what a lab's manual differential (or a CellaVision export's class folder) calls a category,
# beyond the codes, lineages, PBC labels and the classes' own names: the counting-sheet words
# and abbreviations of hematology, each as one code (its group's stages follow)
ALIASES = {
    "seg": "M6", "segmented": "M6", "neutrophil segmented": "M6", "band": "M5", "stab": "M5",
    "neutrophil band": "M5", "neut": "NEU", "poly": "NEU", "pmn": "NEU", "lymph": "L2",
    "mono": "MO2", "eo": "E4", "eos": "E4", "baso": "B2", "blast": "M1", "pro": "M2",
    "myelo": "M3", "meta": "M4", "immature granulocyte": "IG", "nrbc": "ER",
    "nucleated red cell": "ER", "nucleated red blood cell": "ER", "normoblast": "ER",
    "plasma": "L4", "mast": "B1", "mega": "PL2",
}


def _words(name: str) -> list[str]:
    """``name`` as the ways a sheet might write one category: lower case, ``_``/``-`` as
    spaces, ``"neutrophil, segmented"`` also as ``"segmented neutrophil"``, and each of these
    without a plural ``s``."""
    text = " ".join(name.lower().replace("_", " ").replace("-", " ").split())
    forms = [text]
    if "," in text:
        head, _, tail = text.partition(",")
        forms.append(f"{tail.strip()} {head.strip()}")
        forms.append(" ".join(text.replace(",", " ").split()))
    return forms + [f[:-1] for f in forms if f.endswith("s") and len(f) > 3]


_NAMED = {cls.name: code for code, cls in CLASSES.items()}  # "segmented neutrophil": "M6"


def codes_named(name: str) -> set[str] | None:
    """The codes ``name`` names as it stands (a group's stages not added: `category_codes`
    adds them), or None where it names none."""
    if name in CLASSES:
        return {name}
    for form in _words(name):
        if form.upper() in CLASSES and len(form) > 1:
            return {form.upper()}
        if form in LINEAGES:
            return {c for c, cls in CLASSES.items() if cls.lineage == form}
        if form in PBC_LABELS:
            return set(PBC_LABELS[form])
        if form in _NAMED:
            return {_NAMED[form]}
        if form in ALIASES:
            return {ALIASES[form]}
    return None


def category_codes(name: str) -> frozenset[str]:
    """The DeepHeme codes (stages and the group codes over them) that a manual column stands for:
    a code, a lineage, a PBC label, a class's name or one of `ALIASES` (in any case, plural or
    singular: ``Segs``, ``Neutrophil, band``, ``NRBC``).

    Raises:
        KeyError: ``name`` is none of these; the message lists the codes, lineages and labels.
    """
    base = codes_named(name)
    if base is None:
        raise KeyError(f"{name!r} is not a cell class code ({', '.join(sorted(CLASSES))}), "
                       f"a lineage ({', '.join(LINEAGES)}), a PBC label "
                       f"({', '.join(sorted(PBC_LABELS))}) or a class's name (segmented "
                       f"neutrophil, myelocyte, plasma cell …)")
    out = set(base)
    for code in base:  # a group brings its stages
        out |= set(get_class(code).members)
    for code, cls in CLASSES.items():  # a group whose stages are all in brings itself
        if cls.members and set(cls.members) <= out:
            out.add(code)
    return frozenset(out)


def resolve_categories(columns: list[str], model_codes: set[str]
                       ) -> tuple[dict[str, frozenset[str]], dict[str, str]]:
    """``(compared, ignored)``: each manual column that can be compared, with the model codes it
    counts, and why each other column is not compared.

    A column is compared when its cells are nucleated (a differential's), the model calls at least
    one of its codes, and no code the model calls lies partly inside it (a model that calls only
    ``NEU`` cannot be compared on ``M6``).

    Raises:
        ValueError: two compared columns share cells (``neutrophil`` and ``granulocytic``): the
            percentages would count those cells twice.
    """
    compared: dict[str, frozenset[str]] = {}
    ignored: dict[str, str] = {}
    for col in columns:
        try:
            codes = category_codes(col)
        except KeyError as err:
            ignored[col] = str(err.args[0])
            continue
        if not any(get_class(c).nucleated for c in codes):
            ignored[col] = "not nucleated cells: not part of a differential"
            continue
        split = sorted(c for c in model_codes - codes if CLASSES[c].members
                       and set(CLASSES[c].members) & codes)
        if split:
            ignored[col] = (f"the model calls {', '.join(split)}, which this column splits: "
                            f"compare at the group's level")
            continue
        called = codes & model_codes
        if not called:
            ignored[col] = (f"the model calls none of its cells ({', '.join(sorted(codes))}): "
                            f"its count is unknown, not 0")
            continue
        compared[col] = frozenset(called)
    names = sorted(compared)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if compared[a] & compared[b]:
                raise ValueError(f"columns {a!r} and {b!r} both count "
                                 f"{', '.join(sorted(compared[a] & compared[b]))}: give each "
                                 f"cell one column")
    return compared, ignored


def compare_slide(manual: dict[str, float], auto: dict[str, int],
                  categories: dict[str, frozenset[str]]) -> list[dict] | str:
    """One slide's rows (one per category), or why it cannot be compared. ``manual``: count per
    column; ``auto``: count per model code."""
    m_total = sum(manual.get(c, 0) for c in categories)
    a_counts = {c: sum(auto.get(code, 0) for code in codes) for c, codes in categories.items()}
    a_total = sum(a_counts.values())
    if m_total <= 0:
        return "the manual sheet counts no cells of the compared categories"
    if a_total <= 0:
        return "hemeflow found no cells of the compared categories"
    rows = []
    for c in categories:
        k = manual.get(c, 0)
        m_pct, a_pct = 100 * k / m_total, 100 * a_counts[c] / a_total
        lo, hi = wilson_interval(round(k), round(m_total))
        rows.append({"category": c, "manual_count": float(k), "manual_total": float(m_total),
                     "manual_percent": m_pct, "manual_ci_low": lo, "manual_ci_high": hi,
                     "auto_count": a_counts[c], "auto_total": a_total, "auto_percent": a_pct,
                     "difference": a_pct - m_pct, "within_manual_ci": lo <= a_pct <= hi})
    return rows


def bland_altman(auto: np.ndarray, reference: np.ndarray) -> dict:
    """Agreement of paired measures: the bias (mean of ``auto - reference``), the sd of the
    differences and the 95 % limits of agreement (None for one pair), and Pearson's r (None
    where either side does not vary)."""
    d = auto - reference
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else None
    r = (float(np.corrcoef(reference, auto)[0, 1])
         if len(d) > 1 and np.std(reference) > 0 and np.std(auto) > 0 else None)
    bias = float(d.mean())
    return {"bias": bias, "sd_difference": sd,
            "loa_low": bias - 1.96 * sd if sd is not None else None,
            "loa_high": bias + 1.96 * sd if sd is not None else None,
            "pearson_r": None if r is None or math.isnan(r) else r}


def agreement_table(per_slide: pl.DataFrame) -> pl.DataFrame:
    """Per category over the slides of ``per_slide`` (`compare_slide`'s rows, with
    ``slide_id``): n_slides, manual and automated mean percent, bias, sd of the differences,
    95 % limits of agreement, mean absolute difference, Pearson's r (None where either side
    does not vary) and the share of slides within the manual count's interval."""
    out = []
    for (cat,), g in per_slide.group_by("category", maintain_order=True):
        m, a = g["manual_percent"].to_numpy(), g["auto_percent"].to_numpy()
        out.append({"category": cat, "n_slides": len(g), "manual_mean": float(m.mean()),
                    "auto_mean": float(a.mean()), **bland_altman(a, m),
                    "mean_abs_difference": float(np.abs(g["difference"].to_numpy()).mean()),
                    "within_manual_ci": float(g["within_manual_ci"].mean())})
    return pl.DataFrame(out, schema={
        "category": pl.Utf8, "n_slides": pl.Int64, "manual_mean": pl.Float64,
        "auto_mean": pl.Float64, "bias": pl.Float64, "sd_difference": pl.Float64,
        "loa_low": pl.Float64, "loa_high": pl.Float64, "mean_abs_difference": pl.Float64,
        "pearson_r": pl.Float64, "within_manual_ci": pl.Float64})


def cell_agreement(labels: list[str], calls: list[str],
                   categories: dict[str, frozenset[str]]) -> dict:
    """Image by image: each cell's own label (a category) against the model's call (the
    category its code falls in, ``other`` for a code of none), over the cells whose label is a
    compared category. Returns accuracy, Cohen's kappa, per category its sensitivity (of the
    cells so labelled, the share called so), positive predictive value (of the cells called so,
    the share so labelled) and support, and the confusion as ``{label: {call: n}}``."""
    of_code = {code: c for c, codes in categories.items() for code in codes}
    pairs = [(lab, of_code.get(call, "other")) for lab, call in zip(labels, calls)
             if lab in categories]
    n = len(pairs)
    names = list(categories)
    confusion = {lab: {c: 0 for c in [*names, "other"]} for lab in names}
    for lab, call in pairs:
        confusion[lab][call] += 1
    if not n:
        return {"n_cells": 0}
    agree = sum(confusion[c][c] for c in names) / n
    called = {c: sum(confusion[lab][c] for lab in names) for c in [*names, "other"]}
    support = {lab: sum(confusion[lab].values()) for lab in names}
    chance = sum(support[c] * called[c] for c in names) / (n * n)
    return {
        "n_cells": n, "accuracy": agree,
        "kappa": (agree - chance) / (1 - chance) if chance < 1 else None,
        "per_category": {c: {"support": support[c],
                             "sensitivity": confusion[c][c] / support[c] if support[c] else None,
                             "ppv": confusion[c][c] / called[c] if called[c] else None}
                         for c in names},
        "confusion": confusion,
    }


PLATELET_GRADES = ("decreased", "adequate", "increased")


def platelet_grade(count: float, limits: tuple[float, float]) -> str:
    """``decreased`` below ``limits[0]``, ``increased`` above ``limits[1]``, else ``adequate``
    (a smear review's words for its platelet estimate)."""
    return PLATELET_GRADES[0] if count < limits[0] else \
        PLATELET_GRADES[2] if count > limits[1] else PLATELET_GRADES[1]


def platelet_rows(slide_id: str, per_wbc: float, wbc_count: float, platelet_count: float,
                  limits: tuple[float, float]) -> dict:
    """One slide's platelet estimate (its platelets per white cell times the analyser's white
    count: the ratio method) against the analyser's platelet count, in the sheet's units."""
    estimate = per_wbc * wbc_count
    return {"slide_id": slide_id, "platelets_per_wbc": per_wbc, "wbc_count": wbc_count,
            "platelet_count": platelet_count, "estimate": estimate,
            "difference": estimate - platelet_count,
            "grade_analyser": platelet_grade(platelet_count, limits),
            "grade_estimate": platelet_grade(estimate, limits)}


def platelet_agreement(per_slide: pl.DataFrame) -> dict:
    """Over the slides of ``per_slide`` (`platelet_rows`' rows): the estimate's bias against the
    analyser's count and its 95 % limits of agreement (the count's units), the median ratio
    estimate / count (a detector that misses a share of platelets shows here whatever the
    count), Pearson's r, how often both give the slide the same grade, and the grades'
    confusion ``{analyser grade: {estimate grade: n}}``."""
    est, ref = per_slide["estimate"].to_numpy(), per_slide["platelet_count"].to_numpy()
    ratio = est[ref > 0] / ref[ref > 0]
    grades = {g: {h: 0 for h in PLATELET_GRADES} for g in PLATELET_GRADES}
    for g, h in zip(per_slide["grade_analyser"], per_slide["grade_estimate"]):
        grades[g][h] += 1
    return {"slides_compared": len(est), **bland_altman(est, ref),
            "median_ratio": float(np.median(ratio)) if len(ratio) else None,
            "grade_agreement": float((per_slide["grade_analyser"]
                                      == per_slide["grade_estimate"]).mean()),
            "grades": grades}
