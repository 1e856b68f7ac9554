"""Inventory a slide archive: one row per file with format, size, levels, MPP and status.

    python -m jobs.inventory --input <dir | s3://bucket/prefix | list.txt | list.csv> \
        --output <dir | s3://bucket/prefix> [--mpp 0.25 | --mpp-table mpp.csv]
        [--specimen aspirate|blood|biopsy|clot]

Writes ``<output>/slides/slides.parquet`` and ``<output>/config.json`` and prints a summary line.
Each row records the slide's specimen type (a ``specimen`` column of a .csv list, else
``--specimen``), which ``process_slides --input <that slides.parquet>`` follows, and its case
(a ``case`` column: the accession the slide belongs to), which it carries on. A list's line
may name a folder (a DICOM series', a case's): its slides take that line's type and case.
Objects in an archive storage class (S3 Glacier) fail ``SlideArchived``; their keys go to
``<output>/slides/archived.csv``, a manifest for S3 Batch Operations to restore them.

A rerun on the same output reads only what it must. The rows of an earlier inventory there are
kept for files that have not changed since (the same URI, size and, on S3, ETag), with this
run's specimen types, cases and pixel sizes; a new or changed file is read. The rows of files no
longer listed are dropped: the table describes the input as it is now. Failed rows are kept
too (``--retry-failed`` reads those files again; ``--reprocess`` every file). Rows go to
``<output>/_inventory_progress/`` as the job goes, so a rerun after a crash or a kill takes up
where it stopped; the folder goes once ``slides.parquet`` is written.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time

from engine.config import StorageConfig
from engine.errors import (NOT_COMMITTED, HemeflowError, SlideArchived, SlideReadTimeout,
                           hung_in_a_row, read_timed_out, stop_if_it_stops_the_job)
from engine.outputs import join_uri, run_stamp, write_bytes, write_parquet
from engine.pipeline.progress import Progress as RunProgress
from engine.pipeline.progress import duration
from engine.schema import SCHEMA_VERSION, SLIDES, table_from_rows
from engine.slides.inventory import MppOverrides, error_row, inventory_file, modified_since_read
from engine.slides.registry import looks_like_slide
from engine.slides.storage import (FileEntry, StagingArea, get_filesystem, is_remote,
                                   on_network_filesystem, remove)
from engine.specimen import SPECIMENS, UNKNOWN, Specimens
from engine.watchdog import in_time
from jobs.common import (add_common_args, count_arg, expand_inputs, fail, job_main, load_config,
                         progress, read_list_values, read_mpp_table, refuse_another_jobs_output,
                         refuse_output_in_rays_copy, slide_mpp_arg, warn_unused_mpp,
                         write_run_config)

DEFAULT_INPUT = "../shared/data/wsi"
ARCHIVED = "archived.csv"  # under slides/: the archived slides' objects (`write_archived`)
REPROCESSING = "reprocess.json"  # in PROGRESS: its files are a --reprocess's (`reprocess_rows`)
PROGRESS = "_inventory_progress"  # rows written as the job goes, until slides.parquet is
FLUSH_ROWS, FLUSH_S = 500, 60.0  # a progress file each this many rows read, or seconds
# slides opened at once: a remote slide's read is a few requests one after another (its
# structure, then its thumbnail's tiles), so 4 at a time left the job waiting on round trips
# (benchmarks/inventory_workers.py, 16 against 4: x1.5 with 30 ms a request, x2.0 with 100;
# x0.95 where the store answers at once and the CPUs bound the job); so is one on a network
# file system (NFS, SMB), each of whose reads is a round trip
LOCAL_WORKERS, REMOTE_WORKERS = 4, 16


def default_workers(entries: list[FileEntry]) -> int:
    """``REMOTE_WORKERS`` where a slide is read from an object store or a network file system
    (`engine.slides.storage.network_filesystem`: an NFS or SMB mount is a local path),
    ``LOCAL_WORKERS`` where every one is on a local disk."""
    uris = [e.uri for e in entries]
    return REMOTE_WORKERS if any(map(is_remote, uris)) or on_network_filesystem(uris) \
        else LOCAL_WORKERS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.inventory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT,
                   help=f"folder, s3:// prefix, or .txt/.csv list of slides (default {DEFAULT_INPUT})")
    p.add_argument("--output", default="hemeflow-inventory",
                   help="output folder or s3:// prefix (not process_slides' own: it refuses it)")
    p.add_argument("--mpp", type=slide_mpp_arg, help="µm/px for slides whose metadata has none")
    p.add_argument("--mpp-table", help="CSV with uri (or slide_id) and mpp columns; a uri may "
                                       "name a folder or S3 prefix, for the slides under it")
    p.add_argument("--specimen", choices=sorted(SPECIMENS), default=UNKNOWN,
                   help="specimen type of slides the .csv list does not type (engine/specimen.py)")
    p.add_argument("--workers", type=count_arg(),
                   help=f"slides opened in parallel (default {LOCAL_WORKERS}; {REMOTE_WORKERS} "
                        "where slides are read from a store such as S3 or a network file "
                        "system such as NFS or SMB: each waits on its reads' round trips)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--retry-failed", action="store_true",
                       help="read again the unchanged files an earlier inventory at the output "
                            "failed on (after a permission was fixed, say); its other rows are "
                            "kept")
    again.add_argument("--reprocess", action="store_true",
                       help="read every file again, keeping no row of an earlier inventory at "
                            "the output (after a hemeflow upgrade reads more formats, say)")
    add_common_args(p)
    return p.parse_args(argv)


def summarize(rows: list[dict]) -> str:
    by_status = collections.Counter(r["status"] for r in rows)
    failed = collections.Counter(r["error_type"] for r in rows if r["status"] == "failed")
    parts = [f"{by_status['ok']} ok"]
    if failed:
        parts.append(f"{by_status['failed']} failed ("
                     + ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) + ")")
    instances = sum(1 for r in rows if r["error_type"] == "PartOfSlide")
    if by_status["skipped"] > instances:
        parts.append(f"{by_status['skipped'] - instances} skipped (not slides)")
    if instances:
        parts.append(f"{instances} skipped (DICOM instances of a series read through another "
                     "of its files)")
    no_mpp = sum(1 for r in rows if r["status"] == "ok" and r.get("mpp_source") == "missing")
    kinds = collections.Counter(r.get("specimen") or UNKNOWN for r in rows)
    if set(kinds) != {UNKNOWN}:
        parts.append("specimen " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    cases = [r["case"] for r in rows if r.get("case")]
    if cases:
        parts.append(f"{len(cases)} in {len(set(cases))} case(s)")
    line = f"{len(rows)} files: " + ", ".join(parts)
    if no_mpp:
        line += f"; {no_mpp} ok without MPP (supply --mpp or --mpp-table)"
    return line


TABLE_GIVEN = b"hemeflow.mpp_table"  # whether the run that wrote a file had --mpp-table


def slides_table(rows: list[dict], table_given: bool):
    """The inventory's ``slides`` rows as a table that says whether ``--mpp-table`` was given
    (`MppOverrides.restate`)."""
    table = table_from_rows(rows, SLIDES)
    return table.replace_schema_metadata({**table.schema.metadata,
                                          TABLE_GIVEN: b"1" if table_given else b"0"})


def earlier_rows(output: str, storage, progress_only: bool = False
                 ) -> tuple[dict[str, tuple[dict, bool]], str]:
    """The rows an earlier inventory left at ``output``, by URI, each with whether its run had
    ``--mpp-table``: its ``slides.parquet`` (unless ``progress_only``), then the progress
    files of a run that did not finish (later rows win). Returns them and what they are, for
    the log; none where the earlier table is of another schema version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = get_filesystem(join_uri(output), storage)
    fs.invalidate_cache()
    files = [] if progress_only else [f"{root.rstrip('/')}/slides/slides.parquet"]
    try:
        files += sorted(fs.ls(f"{root.rstrip('/')}/{PROGRESS}", detail=False))
    except FileNotFoundError:
        pass
    rows: dict[str, tuple[dict, bool]] = {}
    found = 0
    for path in files:
        if not path.endswith(".parquet"):
            continue
        try:
            table = pq.read_table(path, filesystem=fs)
        except FileNotFoundError:  # no earlier table
            continue
        except (pa.ArrowInvalid, OSError) as err:  # its files are read again
            print(f"inventory: {path} is unreadable ({err}): left out", file=sys.stderr)
            continue
        meta = table.schema.metadata or {}
        version = meta.get(b"hemeflow.schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION):
            return {}, (f"the earlier inventory at {output} is of table schema {version}, not "
                        f"{SCHEMA_VERSION}: every file is read again")
        given = meta.get(TABLE_GIVEN, b"1") != b"0"
        rows.update((r["uri"], (r, given)) for r in table.to_pylist())
        found += 1
    return rows, f"{len(rows)} rows of an earlier inventory ({found} file(s))" if found else ""


def hung_row(entry: FileEntry, seconds: float, specimen: str, case: str | None) -> dict:
    """The row of a file whose reading had not ended after ``seconds``, given up on
    (`engine.watchdog.in_time`): a decoder in a loop, a mount that stopped answering."""
    return error_row(entry, read_timed_out(entry.uri, duration(seconds), then="given up on"),
                     specimen=specimen, case=case)


def kept_row(earlier: tuple[dict, bool] | None, entry: FileEntry, overrides: MppOverrides,
             specimen: str, case: str | None, retry_failed: bool) -> dict | None:
    """An earlier inventory's row for ``entry``'s file (`earlier_rows`), with this run's
    specimen type, case and pixel sizes; None where the file must be read: no such row, the
    file changed (its size, its S3 ETag, or a local file's time: `modified_since_read`), a
    row that was skipped (its reason is this listing's: a DICOM series' instances) or failed
    (with ``retry_failed``; or for a moment's reason, `NOT_COMMITTED`: no room to stage the
    file), or a pixel size only a read tells (`MppOverrides.restate`)."""
    if earlier is None or entry.part_of or entry.size is None:
        return None
    row, table_given = earlier
    if row["size_bytes"] != entry.size or row["etag"] != entry.etag or \
            modified_since_read(row, entry):
        return None
    if row["status"] == "skipped" or (row["status"] == "failed" and retry_failed) or \
            row["error_type"] in NOT_COMMITTED:  # a failure of the moment: read again
        return None
    row = overrides.restate(row, table_given)
    return None if row is None else {**row, "specimen": specimen, "case": case}


def reprocess_begun(output: str, storage) -> bool:
    """Whether a ``--reprocess`` into ``output`` began and has not ended (its mark
    `REPROCESSING` stands): a run, with ``--reprocess`` or without, goes on with it."""
    fs, root = get_filesystem(join_uri(output), storage)
    fs.invalidate_cache()
    return fs.exists(f"{root.rstrip('/')}/{PROGRESS}/{REPROCESSING}")


def reprocess_rows(output: str, storage) -> tuple[dict[str, tuple[dict, bool]], str]:
    """``--reprocess``'s earlier rows: those an interrupted ``--reprocess`` read (its progress
    files, under its mark `REPROCESSING`), which a rerun of the command after a crash keeps
    where their files are unchanged, as `earlier_rows` are kept (it read every file again);
    else none, the progress of any other run cleared and the mark written."""
    if reprocess_begun(output, storage):
        rows, found = earlier_rows(output, storage, progress_only=True)
        return rows, f"an interrupted --reprocess goes on from {found or 'its start'}"
    Progress(output, storage, False).remove()  # another run's: its reads are no --reprocess's
    write_bytes(join_uri(output, PROGRESS, REPROCESSING), json.dumps(
        {"started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode(), storage)
    return {}, ""


class Progress:
    """Rows read by this run, written to ``<output>/_inventory_progress/`` a file each
    `FLUSH_ROWS` rows or `FLUSH_S` seconds, so that a crash loses at most that."""

    def __init__(self, output: str, storage, table_given: bool):
        self.folder, self.storage = join_uri(output, PROGRESS), storage
        self.table_given = table_given
        self.pending: list[dict] = []
        self.written = 0
        self.since = time.monotonic()
        self.stamp = run_stamp()  # names sort in the order they were written

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= FLUSH_ROWS or time.monotonic() - self.since > FLUSH_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            name = f"{self.stamp}-{self.written:06d}.parquet"
            write_parquet(slides_table(self.pending, self.table_given),
                          join_uri(self.folder, name), self.storage)
            self.written += 1
            self.pending = []
        self.since = time.monotonic()

    def remove(self) -> None:
        fs, path = get_filesystem(self.folder, self.storage)
        try:
            remove(fs, path, recursive=True)
        except FileNotFoundError:
            pass


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_output_in_rays_copy(["--output", args.output])  # its default too
    try:
        cfg = load_config(args)
        refuse_another_jobs_output(args.output, cfg.storage, "inventory")
        overrides = MppOverrides(
            default=args.mpp,
            table=read_mpp_table(args.mpp_table, cfg.storage) if args.mpp_table else {})
        folders: dict[str, str] = {}
        entries = expand_inputs(args.input, cfg.storage, folders)
        if not entries:
            return fail(f"no files found under {args.input}")
        warn_unused_mpp(overrides, [e.uri for e in entries], args.mpp_table)
        typed, cases = read_list_values(args.input, cfg.storage, folders)
        specimens = Specimens(args.specimen, typed)
        # a plain run too: else it would keep the rows the interrupted one had not read yet
        earlier, found = reprocess_rows(args.output, cfg.storage) \
            if args.reprocess or reprocess_begun(args.output, cfg.storage) else \
            earlier_rows(args.output, cfg.storage)
        rows = {e.uri: kept_row(earlier.get(e.uri), e, overrides, specimens.of(e.uri),
                                cases.get(e.uri), args.retry_failed) for e in entries}
        todo = [e for e in entries if rows[e.uri] is None]
        kept = len(entries) - len(todo)
        # files skipped by name or as a series' instance give their row without a read
        read = {e.uri for e in todo if not e.part_of and looks_like_slide(e.uri)}
        if found:
            print(f"inventory: {found}; {kept} kept (their files unchanged), {len(read)} "
                  "file(s) to read", file=sys.stderr, flush=True)
        done = Progress(args.output, cfg.storage, bool(args.mpp_table))
        workers = args.workers or default_workers(todo)
        # a read that hangs (a file on a stalled mount) gives a failed row, where it held the job
        with StagingArea(cfg.storage) as staging, contextlib.closing(in_time(
                lambda e: inventory_file(e, cfg.storage, staging, overrides, specimens.of(e.uri),
                                         cases.get(e.uri)),
                todo, workers, 60.0 * cfg.pipeline.read_timeout_minutes,
                lambda e, s: hung_row(e, s, specimens.of(e.uri), cases.get(e.uri)),
                "inventory")) as work:
            # where no bar is drawn (a log: ray job submit, a batch script), a line at most
            # once a minute: an archive's inventory takes hours and said nothing until it ended
            said = None if sys.stderr.isatty() else RunProgress(len(todo), what="files")
            try:
                hung: list[str] = []  # the files that hung in a row
                for row in progress(work, len(todo), "inventory"):
                    # refused credentials: every other slide would meet them
                    stop_if_it_stops_the_job(row["error_type"], row["error_message"])
                    rows[row["uri"]] = row
                    done.add(row)
                    # a mount that stopped answering (the rows kept for a rerun)
                    hung = hung_in_a_row(hung, row["uri"],
                                         row["error_type"] == SlideReadTimeout.__name__)
                    if said is not None and (line := said.tick()):
                        print(f"inventory: {line}", file=sys.stderr, flush=True)
            finally:
                done.flush()  # what was read is kept for a rerun, whatever stopped this one
            staging.purge()  # the staged copies served this job only
        rows = [rows[e.uri] for e in entries]
        opened = sum(1 for uri in read if is_remote(uri))
        out = join_uri(args.output, "slides", "slides.parquet")
        write_parquet(slides_table(rows, bool(args.mpp_table)), out, cfg.storage)
        archived = write_archived(rows, entries, args.output, cfg.storage)
        write_run_config(args.output, cfg, vars(args), cfg.storage, "inventory")
        done.remove()
    except (HemeflowError, OSError) as err:
        return fail(str(err))
    line = summarize(rows)
    if earlier:
        gone = len(earlier.keys() - {r["uri"] for r in rows})
        line += f"; {kept} row(s) kept from the earlier inventory, {len(read)} file(s) read"
        if gone:
            line += f", {gone} row(s) of files no longer listed dropped"
        failed = sum(1 for r in rows if r["status"] == "failed" and r["uri"] not in read)
        if failed:
            line += f" ({failed} failed row(s) kept: --retry-failed reads them again)"
    if opened:  # a remote SVS, generic TIFF or DICOM series is read by range (header_copy)
        line += (f"; {staging.downloads} of {opened} remote slides downloaded whole, the "
                 "others read by range")
    print(f"inventory: {line} -> {out}")
    if archived:
        print(f"inventory: {archived[1]} file(s) in an archive storage class: restore them "
              "(each failed row's message gives its command; S3 Batch Operations restores "
              f"them in one job from the manifest {archived[0]}, which lists their objects), "
              "then run again with --retry-failed", file=sys.stderr)
    return 0


def write_archived(rows: list[dict], entries: list[FileEntry], output: str,
                   storage: StorageConfig) -> tuple[str, int] | None:
    """Write ``<output>/slides/archived.csv``: the objects of the slides found in an archive
    storage class (``SlideArchived``), a DICOM series' other files with its own, as S3 Batch
    Operations takes a manifest (a line a object: its bucket and URL-encoded key); return its
    URI and how many rows, or None (and remove an earlier one) where there are none. A DICOM
    series' headers cannot be read until it is restored either, so an archived series is not
    known as one: each of its files is a row of its own until then."""
    import urllib.parse

    slides = {r["uri"] for r in rows if r["error_type"] == SlideArchived.__name__}
    uri = join_uri(output, "slides", ARCHIVED)
    if not slides:
        fs, path = get_filesystem(uri, storage)
        if fs.exists(path):
            remove(fs, path)
        return None
    objects = [e.uri.split("://", 1)[1].partition("/") for e in entries
               if e.uri in slides or e.part_of in slides]
    write_bytes(uri, "".join(f"{bucket},{urllib.parse.quote(key)}\n"
                             for bucket, _, key in objects).encode(), storage)
    return uri, len(slides)


if __name__ == "__main__":
    sys.exit(main())
