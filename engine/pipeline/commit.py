"""Output layout and the per-slide commit protocol.

``<out>/<table>/<slide_id>.parquet`` holds one slide's rows of one table, written whole (temp
name + rename locally, one PUT on S3), so a table never shows part of a slide and a rerun
overwrites rather than duplicates. ``<out>/slide_status/<slide_id>.parquet`` is written last: it
is the slide's commit marker. A rerun skips slides that have one and deletes the other files of
slides that do not (a crash between two tables).
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from engine.config import StorageConfig
from engine.outputs import join_uri, write_bytes, write_parquet
from engine.schema import TABLES, table_from_rows
from engine.slides.storage import InputError, get_filesystem, is_remote, normalize_uri

STATUS_TABLE = "slide_status"
DATA_TABLES = ("slides", "tiles", "cells", "cell_features", "image_cells", "differentials",
               "cellularity")
EXTRA_DIRS = ("geojson",)


class OutputStore:
    """One output folder or S3 prefix."""

    def __init__(self, root: str, storage: StorageConfig):
        self.root = normalize_uri(root)
        self.storage = storage
        if not is_remote(self.root) and os.path.isfile(self.root):
            raise InputError(f"the output {self.root} is a file: give a folder (a new one, or "
                             "one a run of the same input wrote)")
        self.fs, self.path = get_filesystem(self.root, storage)

    def uri(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def slide_ids(self, table: str, suffix: str = ".parquet") -> set[str]:
        """Slide ids with a file in ``table`` (committed or not)."""
        folder = f"{self.path.rstrip('/')}/{table}"
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        return {n.rsplit("/", 1)[-1][: -len(suffix)] for n in names if n.endswith(suffix)}

    def committed(self) -> set[str]:
        """Slide ids with a commit marker."""
        self.fs.invalidate_cache()
        return self.slide_ids(STATUS_TABLE)

    def failed(self, slide_ids: set[str]) -> set[str]:
        """Those of the committed ``slide_ids`` whose status is ``failed``."""
        rows = self.read(STATUS_TABLE, ["slide_id", "status"], slide_ids)
        return set() if rows is None else \
            {r["slide_id"] for r in rows.to_pylist() if r["status"] == "failed"}

    def read(self, table: str, columns: list[str] | None = None,
             slide_ids: set[str] | None = None, optional: tuple[str, ...] = ()
             ) -> pa.Table | None:
        """``table``'s rows of the committed slides only (a crashed or running job's uncommitted
        files left out), of ``slide_ids`` alone when given; None where no such slide has a file
        in it. With ``columns``, the ``optional`` columns too where the table has them (a
        column newer than the output's schema version)."""
        import pyarrow.dataset as pads

        folder = f"{self.path.rstrip('/')}/{table}"
        sids = self.committed()
        if slide_ids is not None:
            sids &= set(slide_ids)
        if table != STATUS_TABLE:  # every committed slide has a status; not every one a table
            sids &= self.slide_ids(table)
        files = [f"{folder}/{sid}.parquet" for sid in sorted(sids)]
        if not files:
            return None
        data = pads.dataset(files, filesystem=self.fs, format="parquet")
        if columns is not None:
            columns = [*columns, *(c for c in optional if c in data.schema.names)]
        return data.to_table(columns=columns)

    def uncommit(self, slide_ids) -> None:
        """Take slides out of the output so that the next run processes them again: their
        commit markers go first, so a crash midway leaves them uncommitted, whose remaining
        files `clean_partial` deletes."""
        base = self.path.rstrip("/")
        markers = [f"{base}/{STATUS_TABLE}/{sid}.parquet" for sid in sorted(slide_ids)]
        if markers:
            self.fs.rm(markers)
        self.clean_partial()

    def clean_partial(self) -> list[str]:
        """Delete files of slides that never committed; returns their slide ids."""
        done = self.committed()
        removed = set()
        for table in DATA_TABLES:
            for sid in self.slide_ids(table) - done:
                self.fs.rm(f"{self.path.rstrip('/')}/{table}/{sid}.parquet")
                removed.add(sid)
        for sid in self.slide_ids("geojson", ".geojson") - done:
            self.fs.rm(f"{self.path.rstrip('/')}/geojson/{sid}.geojson")
            removed.add(sid)
        return sorted(removed)

    def write_table(self, table: str, slide_id: str, rows: list[dict] | pa.Table) -> None:
        t = rows if isinstance(rows, pa.Table) else table_from_rows(rows, TABLES[table])
        write_parquet(t, self.uri(table, f"{slide_id}.parquet"), self.storage)

    def write_json(self, folder: str, name: str, doc: dict | str) -> None:
        """``doc``: a JSON-able object, or JSON text already."""
        text = doc if isinstance(doc, str) else json.dumps(doc)
        write_bytes(self.uri(folder, name), text.encode(), self.storage)

    def write_tables(self, slide_id: str, tables: dict[str, list[dict] | pa.Table],
                     geojson: dict | str | None = None) -> None:
        """Write some of a slide's tables; they count only once the slide commits."""
        for table in DATA_TABLES:
            if table in tables:
                self.write_table(table, slide_id, tables[table])
        if geojson is not None:
            self.write_json("geojson", f"{slide_id}.geojson", geojson)

    def discard(self, slide_id: str) -> None:
        """Delete an uncommitted slide's tables (it failed after some were written)."""
        base = self.path.rstrip("/")
        for path in [f"{base}/{t}/{slide_id}.parquet" for t in DATA_TABLES] + \
                [f"{base}/geojson/{slide_id}.geojson"]:
            if self.fs.exists(path):
                self.fs.rm(path)

    def commit(self, slide_id: str, tables: dict[str, list[dict] | pa.Table],
               status_row: dict, geojson: dict | str | None = None) -> None:
        """Write a slide's tables, then its status row last (the commit)."""
        self.write_tables(slide_id, tables, geojson)
        self.write_table(STATUS_TABLE, slide_id, [status_row])


def read_table(output: str, table: str, columns: list[str] | None = None,
               storage: StorageConfig | None = None, optional: tuple[str, ...] = ()):
    """One table of a hemeflow output (folder or ``s3://`` prefix) as a polars DataFrame, with
    the rows of committed slides only: what a finished run wrote, and while a run goes on (or
    after a crash) nothing of a slide that has not committed.

        from engine.pipeline.commit import read_table
        cells = read_table("hemeflow-out", "cells")

    Raises:
        ValueError: ``table`` is not one of the output's tables.
        FileNotFoundError: no committed slide has rows in ``table``.

    ``optional`` columns are read too where the table has them (`OutputStore.read`).
    """
    import polars as pl

    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; the tables: {', '.join(sorted(TABLES))}")
    got = OutputStore(output, storage or StorageConfig()).read(table, columns,
                                                               optional=optional)
    if got is None:
        raise FileNotFoundError(f"no committed slide has rows in {table!r} under {output}")
    return pl.from_arrow(got)
