"""Every output table's pyarrow schema, with a schema version stored in the Parquet metadata."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

SCHEMA_VERSION = 9  # 2: how far cells lie from the training data; slide_status warnings
#                    3: slides.specimen (engine/specimen.py); differentials.denominator,
#                       n_wbc, nrbc_per_100_wbc (a blood smear is counted over white cells)
#                    4: cells and image_cells blur_um, out_of_focus (engine/focus.py); differentials
#                       n_out_of_focus, out_of_focus_percent, out_of_focus
#                    5: slides.case (the case, or accession, the input list puts a slide in)
#                    6: differentials n_platelets, platelets_per_wbc (a blood film's estimate)
#                    7: differentials n_red_cells, red_cell_diameter_um (the pixel-size check)
#                    8: differentials n_large_platelets (platelets of a nucleated cell's size,
#                       told by the classifier; counted in n_platelets); cells lobe_of (a
#                       lobed cell found as two nuclei is counted once)
#                    9: differentials nuclear_hue_deg, nuclear_saturation (the stain check,
#                       engine/stain.py)
STATUSES = ("ok", "failed", "skipped")
EXPORT_FORMAT = "cell-image-export"  # slides.format of a single-cell export (jobs.classify_cells)


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"hemeflow.table": name.encode(),
                                       b"hemeflow.schema_version": str(SCHEMA_VERSION).encode()})


SLIDES = _schema("slides", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("etag", pa.string()),
    pa.field("specimen", pa.string()),
    pa.field("case", pa.string()),
    pa.field("format", pa.string()),
    pa.field("backend", pa.string()),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("level_count", pa.int32()),
    pa.field("level_downsamples", pa.list_(pa.float64())),
    pa.field("mpp_x", pa.float64()),
    pa.field("mpp_y", pa.float64()),
    pa.field("mpp_source", pa.string()),
    pa.field("objective", pa.float64()),
    pa.field("associated_images", pa.list_(pa.string())),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("notes", pa.string()),
    pa.field("inventoried_at", pa.timestamp("us", tz="UTC")),
])

SLIDE_STATUS = _schema("slide_status", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("n_tiles", pa.int64()),
    pa.field("n_cells", pa.int64()),
    pa.field("stages", pa.list_(pa.string())),
    pa.field("skipped_stages", pa.list_(pa.string())),
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("seconds", pa.float64()),
    pa.field("engine_version", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("warnings", pa.list_(pa.string())),
])

TILES = _schema("tiles", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("x", pa.int64(), nullable=False),
    pa.field("y", pa.int64(), nullable=False),
    pa.field("mpp", pa.float64()),
    pa.field("tile_px", pa.int32()),
    pa.field("tissue_fraction", pa.float32()),
    pa.field("nuclear_fraction", pa.float32()),
    pa.field("embedding", pa.list_(pa.float32())),
])

# a classified cell's fields (cells, image_cells): the call, its probabilities over the model's
# codes, and how far the cell lies from the classifier's training data
CLASSIFIED = [
    pa.field("class_code", pa.string()),
    pa.field("class_prob", pa.float32()),
    pa.field("probabilities", pa.list_(pa.float32())),
    pa.field("model_codes", pa.list_(pa.string())),
    pa.field("ood_distance", pa.float32()),
    pa.field("out_of_distribution", pa.bool_()),
]

# how blurred a cell's crop is (engine.focus; null: not measured, or no edge to measure)
FOCUS = [
    pa.field("blur_um", pa.float32()),
    pa.field("out_of_focus", pa.bool_()),     # blur_um above the run's max_blur_um
]

CELLS = _schema("cells", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("cell_id", pa.int64(), nullable=False),
    pa.field("x", pa.float64(), nullable=False),
    pa.field("y", pa.float64(), nullable=False),
    pa.field("x0", pa.float64()),
    pa.field("y0", pa.float64()),
    pa.field("x1", pa.float64()),
    pa.field("y1", pa.float64()),
    pa.field("area_um2", pa.float32()),
    pa.field("kind", pa.string()),
    pa.field("at_edge", pa.bool_()),
    pa.field("lobe_of", pa.int64()),   # the cell_id of the cell this is a lobe of
    *FOCUS,
    *CLASSIFIED,
])

# a single-cell image export's cells (jobs.classify_cells): one row per image, no slide position
IMAGE_CELLS = _schema("image_cells", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("cell_id", pa.int64(), nullable=False),
    pa.field("path", pa.string(), nullable=False),   # under the export's folder
    pa.field("source_label", pa.string()),           # the sub-folder the analyser sorted it into
    *FOCUS,
    *CLASSIFIED,
])

DIFFERENTIALS = _schema("differentials", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("level", pa.string(), nullable=False),
    pa.field("class_code", pa.string(), nullable=False),
    pa.field("lineage", pa.string()),
    pa.field("nucleated", pa.bool_()),
    pa.field("count", pa.int64()),
    pa.field("percent", pa.float64()),
    pa.field("ci_low", pa.float64()),
    pa.field("ci_high", pa.float64()),
    pa.field("n_nucleated", pa.int64()),
    pa.field("denominator", pa.string()),
    pa.field("n_wbc", pa.int64()),
    pa.field("nrbc_per_100_wbc", pa.float64()),
    pa.field("me_ratio", pa.float64()),
    pa.field("blast_percent", pa.float64()),
    pa.field("blast_ci_low", pa.float64()),
    pa.field("blast_ci_high", pa.float64()),
    pa.field("low_count", pa.bool_()),
    pa.field("codes_not_covered", pa.list_(pa.string())),
    pa.field("ood_percent", pa.float64()),
    pa.field("out_of_distribution", pa.bool_()),
    pa.field("n_out_of_focus", pa.int64()),
    pa.field("out_of_focus_percent", pa.float64()),
    pa.field("out_of_focus", pa.bool_()),
    pa.field("n_platelets", pa.int64()),
    pa.field("n_large_platelets", pa.int64()),
    pa.field("platelets_per_wbc", pa.float64()),
    pa.field("n_red_cells", pa.int64()),
    pa.field("red_cell_diameter_um", pa.float64()),
    pa.field("nuclear_hue_deg", pa.float64()),
    pa.field("nuclear_saturation", pa.float64()),
])

CELLULARITY = _schema("cellularity", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("cellularity_mean", pa.float64()),
    pa.field("cellularity_sd", pa.float64()),
    pa.field("n_bags", pa.int32()),
    pa.field("bag_size", pa.int32()),
    pa.field("n_tiles", pa.int64()),
])

# each cell's penultimate features (pipeline.classifier.features), apart from the cells table
# so that reading cells never loads them; cell_id as in cells
CELL_FEATURES = _schema("cell_features", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("cell_id", pa.int64(), nullable=False),
    pa.field("features", pa.list_(pa.float32())),
])

TABLES = {"slides": SLIDES, "slide_status": SLIDE_STATUS, "tiles": TILES, "cells": CELLS,
          "cell_features": CELL_FEATURES, "image_cells": IMAGE_CELLS,
          "differentials": DIFFERENTIALS, "cellularity": CELLULARITY}


SLIDE_ID = re.compile(r"[A-Za-z0-9_-]{1,40}-[0-9a-f]{12}")  # the shape of `slide_id_for`'s ids


def slide_id_for(uri: str) -> str:
    """Stable, readable id: the file stem (sanitised, ≤ 40 chars) plus 12 hex digits of SHA-1(uri).

    The hash keeps ids unique when two folders hold files of the same name.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    stem = name.split(".", 1)[0] if not name.startswith(".") else name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:40] or "slide"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:12]}"


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by field name) -> table with exactly ``schema``; unknown keys are an error."""
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"fields not in schema {schema.metadata[b'hemeflow.table'].decode()}: "
                           f"{sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
