"""One row per slide with its headline results, joined from a run's per-slide tables: what a lab
reads first (and opens in a spreadsheet), before going to the cells and tiles.

Only committed slides (those with a ``slide_status`` row) are summarised; a crash's leftovers in
the other tables are not.
"""

from __future__ import annotations

import polars as pl

from engine.classes import LINEAGES

DIFFERENTIAL_COLUMNS = {"denominator": pl.String, "n_nucleated": pl.Int64, "n_wbc": pl.Int64,
                        "blast_percent": pl.Float64, "blast_ci_low": pl.Float64,
                        "blast_ci_high": pl.Float64, "me_ratio": pl.Float64,
                        "nrbc_per_100_wbc": pl.Float64, "low_count": pl.Boolean,
                        "ood_percent": pl.Float64, "out_of_distribution": pl.Boolean,
                        "n_out_of_focus": pl.Int64, "out_of_focus_percent": pl.Float64,
                        "out_of_focus": pl.Boolean, "n_platelets": pl.Int64,
                        "n_large_platelets": pl.Int64, "platelets_per_wbc": pl.Float64,
                        "n_red_cells": pl.Int64, "red_cell_diameter_um": pl.Float64,
                        "nuclear_hue_deg": pl.Float64, "nuclear_saturation": pl.Float64}
LINEAGE_COLUMNS = {f"pct_{lineage}": pl.Float64 for lineage in LINEAGES}


def slide_summary(status: pl.DataFrame, slides: pl.DataFrame | None = None,
                  differentials: pl.DataFrame | None = None,
                  cellularity: pl.DataFrame | None = None) -> pl.DataFrame:
    """The summary: a row per ``status`` row, in slide_id order.

    Columns: slide_id, uri, case, specimen, status, error_type, error_message, warnings
    (joined by ``; ``), n_tiles, n_cells; from the differential its slide-level numbers
    (`DIFFERENTIAL_COLUMNS`) and each lineage's percentage (``pct_<lineage>``, null where the
    lineage is not in the denominator); cellularity_image_analysis, and cellularity_abmil with
    its sd. A slide without a table's rows gets nulls there.
    """
    out = status.select(
        "slide_id", "uri", "status", "error_type", "error_message",
        pl.col("warnings").list.join("; ").alias("warnings"), "n_tiles", "n_cells")
    for name in ("case", "specimen"):  # an older inventory lacks them
        out = out.join(slides.select("slide_id", name), on="slide_id", how="left") \
            if slides is not None and name in slides.columns else \
            out.with_columns(pl.lit(None, pl.String).alias(name))
    if differentials is not None and len(differentials):
        per_slide = differentials.group_by("slide_id").agg(
            pl.col(c).first() for c in DIFFERENTIAL_COLUMNS if c in differentials.columns)
        lineages = (differentials.filter(pl.col("level") == "lineage")
                    .select("slide_id", pl.format("pct_{}", "class_code").alias("lineage"),
                            "percent")
                    .pivot("lineage", index="slide_id", values="percent"))
        out = out.join(per_slide, on="slide_id", how="left").join(lineages, on="slide_id",
                                                                   how="left")
    for name, dtype in {**DIFFERENTIAL_COLUMNS, **LINEAGE_COLUMNS}.items():
        if name not in out.columns:  # no differential (a section, a tiles-only run)
            out = out.with_columns(pl.lit(None, dtype).alias(name))
    cel = {"cellularity_image_analysis": ("image_analysis", "cellularity_mean"),
           "cellularity_abmil": ("abmil", "cellularity_mean"),
           "cellularity_abmil_sd": ("abmil", "cellularity_sd")}
    for name, (method, column) in cel.items():
        if cellularity is not None and len(cellularity):
            values = cellularity.filter(pl.col("method") == method).select(
                "slide_id", pl.col(column).alias(name))
            out = out.join(values, on="slide_id", how="left")
        else:
            out = out.with_columns(pl.lit(None, pl.Float64).alias(name))
    first = ["slide_id", "uri", "case", "specimen", "status", "error_type", "error_message",
             "warnings", "n_tiles", "n_cells"]
    return out.select(*first, *DIFFERENTIAL_COLUMNS, *LINEAGE_COLUMNS, *cel).sort("slide_id")
