"""Output layout and the per-slide commit protocol.

``<out>/<table>/<slide_id>.parquet`` holds one slide's rows of one table, written whole (temp
name + rename locally, one PUT on S3), so a table never shows part of a slide and a rerun
overwrites rather than duplicates. ``<out>/slide_status/<slide_id>.parquet`` is written last: it
is the slide's commit marker. A rerun skips slides that have one and deletes the other files of
slides that do not (a crash between two tables).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

import pyarrow as pa

from engine.config import StorageConfig
from engine.outputs import TMP_MARK, join_uri, run_stamp, write_bytes, write_parquet
from engine.schema import SLIDE_ID, TABLES, table_from_rows
from engine.slides.storage import (InputError, get_filesystem, is_remote, normalize_uri,
                                   process_alive, remove)

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
        self.foreign: list[str] = []  # files `clean_partial` found that are no slide's

    def uri(self, *parts: str) -> str:
        return join_uri(self.root, *parts)

    def slide_ids(self, table: str, suffix: str = ".parquet") -> set[str]:
        """Slide ids with a file in ``table`` (committed or not)."""
        return {n[: -len(suffix)] for n in self._names(table) if n.endswith(suffix)}

    def _names(self, folder: str) -> list[str]:
        """The names of the files in ``folder`` below the root (none where it is missing)."""
        try:
            names = self.fs.ls(f"{self.path.rstrip('/')}/{folder}", detail=False)
        except FileNotFoundError:
            return []
        return [n.rsplit("/", 1)[-1] for n in names]

    def committed(self) -> set[str]:
        """Slide ids with a commit marker."""
        self.fs.invalidate_cache()
        return self.slide_ids(STATUS_TABLE)

    def stamps(self) -> dict[str, str]:
        """Each committed slide's stamp (`engine.pipeline.compact.stamp`: its commit marker's
        size and ETag or modification time), from the one listing `committed` makes."""
        from engine.pipeline.compact import stamp

        return {sid: stamp(info) for sid, info in self._markers().items()}

    def commit_times(self) -> dict[str, float]:
        """Each committed slide's commit time: its marker's last write as POSIX seconds, by the
        storage's clock (one listing)."""
        return {sid: _modified(info) for sid, info in self._markers().items()}

    def modified(self, *parts: str) -> float | None:
        """The last write of the file at ``parts`` below the root, by the storage's clock (the
        clock `commit_times` reads), or None where there is none."""
        path = "/".join([self.path.rstrip("/"), *parts])
        self.fs.invalidate_cache(path)
        try:
            return _modified(self.fs.info(path))
        except FileNotFoundError:
            return None

    def _markers(self) -> dict[str, dict]:
        """The commit markers' fsspec entries by slide id, listed past any cache."""
        self.fs.invalidate_cache()
        try:
            infos = self.fs.ls(f"{self.path.rstrip('/')}/{STATUS_TABLE}", detail=True)
        except FileNotFoundError:
            return {}
        return {i["name"].rsplit("/", 1)[-1][:-len(".parquet")]: i for i in infos
                if i["name"].endswith(".parquet")}

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
        column newer than the output's schema version). A compacted table
        (`engine.pipeline.compact`) gives each slide's rows from its compacted file while the
        slide's commit is the one that file holds, from the slide's own file otherwise."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        from engine.pipeline.compact import compacted_reads, read_manifest

        folder = f"{self.path.rstrip('/')}/{table}"
        parts = read_manifest(self, table)
        stamps = self.stamps() if parts else {}
        sids = set(stamps) if parts else self.committed()
        if slide_ids is not None:
            sids &= set(slide_ids)
        # slides whose compacted copy is of their commit come from it (engine.pipeline.compact)
        reads, sids = compacted_reads(self, table, parts, sids, stamps) if parts else ([], sids)

        def rows(source, only=None) -> pa.Table:
            data = pads.dataset(source, filesystem=self.fs, format="parquet")
            cols = None if columns is None else \
                [*columns, *(c for c in optional if c in data.schema.names)]
            where = None if only is None else \
                pc.field("slide_id").isin(pa.array(sorted(only), pa.string()))
            return data.to_table(columns=cols, filter=where)

        got = []
        for path, take in reads:
            try:
                got.append(rows(path, take))
            except FileNotFoundError:  # replaced by a compaction meanwhile: their own files
                sids |= take
        if sids and table != STATUS_TABLE:  # a committed slide has a status, not every table
            sids &= self.slide_ids(table)
        if sids:
            got.append(rows([f"{folder}/{sid}.parquet" for sid in sorted(sids)]))
        return pa.concat_tables(got, promote_options="permissive") if got else None

    def uncommit(self, slide_ids) -> None:
        """Take slides out of the output so that the next run processes them again: their
        commit markers go first, so a crash midway leaves them uncommitted, whose remaining
        files `clean_partial` deletes."""
        base = self.path.rstrip("/")
        markers = [f"{base}/{STATUS_TABLE}/{sid}.parquet" for sid in sorted(slide_ids)]
        if markers:
            remove(self.fs, markers)
        self.clean_partial()

    def clean_partial(self) -> list[str]:
        """Delete files of slides that never committed; returns their slide ids. The files go
        in one call (S3 deletes up to 1,000 objects a request), where one request per file
        adds up to hours for a reprocessed archive of tens of thousands of slides. A local
        file a killed run left half written (`engine.outputs.TMP_MARK`: no table reads it,
        but it holds its space) goes too. A file whose name is no slide's
        (`engine.schema.SLIDE_ID`: a table someone wrote beside the slides', say every slide's
        cells in one file) is left, and listed in ``foreign`` (it was deleted)."""
        done = self.committed()
        base = self.path.rstrip("/")
        doomed, halves, self.foreign = set(), [], []
        for folder, suffix in [*((t, ".parquet") for t in (*DATA_TABLES, STATUS_TABLE)),
                               ("geojson", ".geojson")]:
            names = self._names(folder)
            halves += [f"{base}/{folder}/{n}" for n in names if TMP_MARK in n]
            if folder == STATUS_TABLE:
                continue
            for n in names:
                if n.endswith(suffix) and n[: -len(suffix)] not in done:
                    if SLIDE_ID.fullmatch(n[: -len(suffix)]):
                        doomed.add((folder, suffix, n[: -len(suffix)]))
                    elif TMP_MARK not in n:
                        self.foreign.append(f"{folder}/{n}")
        if doomed or halves:
            remove(self.fs, [f"{base}/{table}/{sid}{suffix}"
                             for table, suffix, sid in sorted(doomed)] + halves)
        return sorted({sid for _, _, sid in doomed})

    def foreign_note(self) -> str | None:
        """What a job says of the files `clean_partial` left as no slide's (``foreign``)."""
        if not self.foreign:
            return None
        shown = ", ".join(self.foreign[:3]) + (", …" if len(self.foreign) > 3 else "")
        return (f"warning: {len(self.foreign)} file(s) in {self.root} are no slide's table and "
                f"were left ({shown}): a reader of those folders' files takes them for the "
                "slides'; move them out of the output")

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
        for write in self.table_writes(slide_id, tables, geojson):
            write()

    def table_writes(self, slide_id: str, tables: dict[str, list[dict] | pa.Table],
                     geojson: dict | str | None = None) -> list[Callable[[], None]]:
        """`write_tables`' writes, one callable per file, to be run in any order or at once."""
        writes: list[Callable[[], None]] = [
            functools.partial(self.write_table, table, slide_id, tables[table])
            for table in DATA_TABLES if table in tables]
        if geojson is not None:
            writes.append(functools.partial(self.write_json, "geojson", f"{slide_id}.geojson",
                                            geojson))
        return writes

    def discard(self, slide_id: str) -> None:
        """Delete an uncommitted slide's tables (it failed after some were written)."""
        base = self.path.rstrip("/")
        for path in [f"{base}/{t}/{slide_id}.parquet" for t in DATA_TABLES] + \
                [f"{base}/geojson/{slide_id}.geojson"]:
            if self.fs.exists(path):
                remove(self.fs, path)

    def commit(self, slide_id: str, tables: dict[str, list[dict] | pa.Table],
               status_row: dict, geojson: dict | str | None = None) -> None:
        """Write a slide's tables, then its status row last (the commit)."""
        self.write_tables(slide_id, tables, geojson)
        self.write_table(STATUS_TABLE, slide_id, [status_row])


class OutputInUse(InputError):
    """Another run is writing to the output (`RunLease`)."""


class RunLease:
    """This run's mark on an output, ``<out>/_running/<run id>.json``, held while it writes.

    A second run into an output that a live run is writing is refused before it changes
    anything: at its start a run deletes the files of slides that never committed, and those
    include the slides the first run is writing, whose commit markers would then land on
    missing tables (a job submitted twice: ``ray job submit`` left by Ctrl-C goes on running).

    The mark is rewritten every ``heartbeat_s`` by a thread and deleted when the run ends.
    Another run's mark counts as live unless it was last written ``stale_s`` or more before
    this run's own (both times are the storage's, so clocks of different hosts never meet), or
    it names this host and a process that has ended (a run killed outright). Two runs that
    start at the same instant see each other and both refuse, which loses nothing.
    """

    FOLDER = "_running"

    def __init__(self, store: OutputStore, job: str, heartbeat_s: float = 30.0,
                 stale_s: float = 180.0):
        self.store, self.job = store, job
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.run_id = run_stamp()
        self.folder = f"{store.path.rstrip('/')}/{self.FOLDER}"
        self.path = f"{self.folder}/{self.run_id}.json"
        self.doc = {"run_id": self.run_id, "job": job, "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.store.write_json(self.FOLDER, f"{self.run_id}.json", self.doc)

    def others(self, now: float | None = None) -> list[dict]:
        """The live marks of other runs, each with ``silent_s`` (how long before this run's
        own mark it was last written) and ``uri``; dead runs' marks are cleared. Needs this
        run's mark written, unless ``now`` (this host's clock) stands in for its time: a look
        that writes nothing and clears nothing (``--dry-run``)."""
        fs = self.store.fs
        fs.invalidate_cache(self.folder)
        try:
            found = fs.ls(self.folder, detail=True)
        except FileNotFoundError:
            return []
        times = {f["name"].rstrip("/"): _modified(f) for f in found}
        mine = now if now is not None else times.get(self.path.rstrip("/"))
        if mine is None:
            mine = _modified(fs.info(self.path))
        live = []
        for name, when in sorted(times.items()):
            if name == self.path or not name.endswith(".json"):
                continue
            silent = max(mine - when, 0.0)
            doc = {}
            if silent < self.stale_s:
                try:
                    with fs.open(name) as fh:
                        doc = json.load(fh)
                except (FileNotFoundError, ValueError):
                    continue  # ended and deleted meanwhile, or not a mark
            if silent >= self.stale_s or _ended_here(doc):
                if now is None:
                    with contextlib.suppress(OSError):  # a dead run's: cleared, not piled up
                        remove(fs, name)
                continue
            live.append({**doc, "silent_s": silent,
                         "uri": self.store.uri(self.FOLDER, name.rsplit("/", 1)[-1])})
        return live

    def acquire(self, sleep=time.sleep) -> None:
        """Write this run's mark and start its heartbeat. Where every other live mark has
        missed two beats (its run most likely killed on another host: a restarted head, a
        retried cluster job), wait for it to lapse rather than refuse at once.

        Raises:
            OutputInUse: another run's mark is live (this run's own is taken back).
        """
        self._write()
        live = self.others()
        while live and min(o["silent_s"] for o in live) >= 2 * self.heartbeat_s:
            o = live[0]
            print(f"hemeflow: {o.get('job')} on {o.get('host')} (pid {o.get('pid')}) last "
                  f"wrote {self.store.root} {o['silent_s']:.0f} s ago; waiting up to "
                  f"{self.stale_s - o['silent_s']:.0f} s for its mark to lapse",
                  file=sys.stderr, flush=True)
            sleep(min(self.heartbeat_s, max(self.stale_s - o["silent_s"], 0.0) + 1.0))
            self._write()  # this run's time, by the storage's clock, moves on
            live = self.others()
        if live:
            self.release()
            o = live[0]
            raise OutputInUse(
                f"{self.store.root} is being written by another run: {describe_run(o)} "
                f"({o['uri']}). Two runs into one output "
                "delete each other's unfinished slides. Wait for it to end (`ray job list` "
                "shows a submitted one), or write to another --output; if that run is dead, "
                f"its mark lapses {self.stale_s / 60:.0f} min after it was last heard, or "
                "delete the file")
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except Exception as err:  # noqa: BLE001 - a missed beat is retried at the next
                print(f"warning: could not renew {self.store.uri(self.FOLDER)} mark: {err}",
                      file=sys.stderr)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):  # gone already; another run's mark in the folder
            remove(self.store.fs, self.path)
            if not is_remote(self.store.root):
                os.rmdir(self.folder)  # the folder goes with the last mark

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def runs_writing(store: OutputStore) -> list[dict]:
    """The runs writing ``store`` now, by their live marks (`RunLease.others`), read by this
    host's clock; writes nothing and clears nothing (a dry run's or a summary's look)."""
    return RunLease(store, "look").others(now=time.time())


def describe_run(mark: dict) -> str:
    """Another run, from its mark (`RunLease.others`): ``process_slides on node-7 (pid 12),
    started 2026-12-05 18:05:27 UTC, last heard 12 s ago``."""
    return (f"{mark.get('job')} on {mark.get('host')} (pid {mark.get('pid')}), started "
            f"{mark.get('started_at')}, last heard {mark['silent_s']:.0f} s ago")


def _modified(info: dict) -> float:
    """A file's last write as POSIX seconds, from an fsspec ``info`` (local or S3)."""
    when = info.get("LastModified", info.get("mtime"))
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def _ended_here(doc: dict) -> bool:
    """A mark written by a process of this host that is no longer running."""
    if doc.get("host") != socket.gethostname() or not isinstance(doc.get("pid"), int):
        return False
    return not process_alive(doc["pid"])


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
