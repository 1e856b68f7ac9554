"""Compacted copies of an output's tables: many slides' rows in one file.

An output holds one file per slide per table (`engine.pipeline.commit`): what lets slides
commit one by one and a rerun resume. Across an archive that is 50,000 files a table, and a
query over one opens each: a footer and its rows, some 100,000 requests on S3, minutes before
the first answer. `compact_table` writes a table's committed rows into files of about
``target_bytes`` each, sorted by slide (``<output>/compact/<table>/part-*.parquet``), and a
manifest beside them (``manifest.json``) names each file's slides, each with the stamp of its
commit: its status file's size and ETag (S3) or modification time, as the status folder's
listing gives them, so that no file is read to tell. The slides' own files stay: they remain
what the output is, the compacted files a copy that can always be made again.

A rerun keeps the files whose slides are all committed as they were, and writes the others'
slides, with the slides committed since, into new files (small files left by earlier reruns
are merged into them). `engine.pipeline.commit.OutputStore.read` (and so ``read_table``)
reads a slide from its compacted file where its stamp still matches and from its own file
otherwise: never stale, however far the output moved on since. A plain ``pl.read_parquet(
"<output>/compact/cells/*.parquet")`` reads the slides as they were at the last compaction.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow as pa

from engine.outputs import run_stamp, write_bytes, write_parquet
from engine.slides.storage import object_etag, remove

FOLDER = "compact"
MANIFEST = "manifest.json"
TARGET_BYTES = 256 * 2**20  # in memory (Arrow); a file is smaller, compressed
ROW_GROUP_BYTES = 64 * 2**20
SMALL = 0.25  # a file under this share of the target is merged into the next rerun's files


@dataclass(frozen=True)
class Part:
    """One compacted file: its name in ``compact/<table>/``, its rows, and its slides with the
    stamp each had when it was written."""

    file: str
    rows: int
    nbytes: int
    slides: dict[str, str]

    def current(self, stamps: dict[str, str]) -> set[str]:
        """Its slides whose commit is still the one it holds."""
        return {s for s, stamp in self.slides.items() if stamps.get(s) == stamp}


def stamp(info: dict) -> str:
    """A status file's stamp from its listing entry: size and ETag, or size and mtime."""
    tag = object_etag(info) or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{tag}"


def read_manifest(store, table: str) -> list[Part] | None:
    """The compacted files of ``table`` (None where it was never compacted)."""
    path = f"{store.path.rstrip('/')}/{FOLDER}/{table}/{MANIFEST}"
    try:
        doc = json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        return None
    return [Part(**p) for p in doc["parts"]]


def compacted_reads(store, table: str, parts: list[Part], slide_ids: set[str],
                    stamps: dict[str, str]) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """Where to read ``slide_ids`` of ``table`` from its compacted files ``parts``: ``(file
    path, the slides to take from it)`` pairs, and the slides left to their own files."""
    folder = f"{store.path.rstrip('/')}/{FOLDER}/{table}"
    reads, left = [], set(slide_ids)
    for part in parts:
        take = part.current(stamps) & left
        if take:
            reads.append((f"{folder}/{part.file}", take))
            left -= take
    return reads, left


def compact_table(store, table: str, stamps: dict[str, str],
                  target_bytes: int = TARGET_BYTES) -> dict:
    """Compact ``table`` of the output ``store`` for its committed slides (``stamps``:
    `OutputStore.stamps`); returns what it did (files kept, written and removed, slides,
    rows)."""
    import pyarrow.dataset as pads

    base = f"{store.path.rstrip('/')}/{FOLDER}/{table}"
    have = store.slide_ids(table) & stamps.keys()
    old = read_manifest(store, table) or []
    keep = [p for p in old if len(p.current(stamps)) == len(p.slides) and p.slides.keys() <= have]
    if have - {s for p in keep for s in p.slides}:  # slides to write: small files join them
        keep = [p for p in keep if p.nbytes >= SMALL * target_bytes]
    todo = sorted(have - {s for p in keep for s in p.slides})
    made: list[Part] = []
    batch: list[pa.Table] = []
    slides: dict[str, str] = {}
    run = run_stamp()

    def flush() -> None:
        if not batch:
            return
        rows = pa.concat_tables(batch, promote_options="permissive").sort_by("slide_id")
        name = f"part-{run}-{len(made):05d}.parquet"
        group = max(1024, int(rows.num_rows * ROW_GROUP_BYTES / max(rows.nbytes, 1)))
        write_parquet(rows, f"{store.uri(FOLDER, table, name)}", store.storage,
                      row_group_size=group)
        made.append(Part(name, rows.num_rows, rows.nbytes, dict(slides)))
        batch.clear()
        slides.clear()

    size, i, step, seen, read = 0, 0, 1, 0, 0
    while i < len(todo):
        group, i = todo[i:i + step], i + step
        files = [f"{store.path.rstrip('/')}/{table}/{sid}.parquet" for sid in group]
        try:
            got = pads.dataset(files, filesystem=store.fs, format="parquet").to_table()
        except OSError:  # a slide taken out meanwhile (--reprocess)? The others, one by one
            got, group = _each(store, files, group)
        if got is None:
            continue
        for sid in group:
            slides[sid] = stamps[sid]
        batch.append(got)
        size += got.nbytes
        seen, read = seen + len(group), read + got.nbytes
        # files read at once (concurrently on S3): up to 64, a quarter of a file's rows
        step = max(1, min(64, int(target_bytes / 4 / max(read / seen, 1))))
        if size >= target_bytes:
            flush()
            size = 0
    flush()
    parts = keep + made
    doc = {"table": table, "written_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "parts": [p.__dict__ for p in parts]}
    write_bytes(f"{store.uri(FOLDER, table, MANIFEST)}", json.dumps(doc).encode(), store.storage)
    listed = [n.rsplit("/", 1)[-1] for n in _ls(store, base)]
    stale = sorted(n for n in listed if n.endswith(".parquet") and n not in
                   {p.file for p in parts})
    if stale:  # after the manifest: a reader that globs may see a slide twice meanwhile
        remove(store.fs, [f"{base}/{n}" for n in stale])
    return {"table": table, "slides": len(have), "files": len(parts), "kept": len(keep),
            "written": len(made), "removed": len(stale), "rows": sum(p.rows for p in parts)}


def _each(store, files: list[str], sids: list[str]) -> tuple[pa.Table | None, list[str]]:
    """The files of ``sids`` one by one, leaving out those gone since the listing."""
    import pyarrow.parquet as pq

    got, kept = [], []
    for path, sid in zip(files, sids):
        try:
            got.append(pq.read_table(path, filesystem=store.fs))
            kept.append(sid)
        except FileNotFoundError:
            continue
    return (pa.concat_tables(got) if got else None), kept


def _ls(store, folder: str) -> list[str]:
    store.fs.invalidate_cache(folder)
    try:
        return store.fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
