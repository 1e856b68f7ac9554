"""Every output table's pyarrow schema, with a schema version stored in the Parquet metadata."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "skipped")


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={b"hemeflow.table": name.encode(),
                                       b"hemeflow.schema_version": str(SCHEMA_VERSION).encode()})


SLIDES = _schema("slides", [
    pa.field("slide_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("size_bytes", pa.int64()),
    pa.field("etag", pa.string()),
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

TABLES = {"slides": SLIDES}


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
