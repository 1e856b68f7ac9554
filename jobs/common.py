"""Shared pieces of the command-line jobs: config loading, storage flags, input expansion."""

from __future__ import annotations

import argparse
import atexit
import collections
import csv
import dataclasses
import functools
import gc
import io
import json
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import yaml

from engine.config import Config, StorageConfig
from engine.first_contact import checking_first_contact
from engine.outputs import join_uri, write_bytes
from engine.pipeline.progress import duration
from engine.slides.storage import (FileEntry, InputError, call_with_retries, get_filesystem,
                                   is_remote, list_files, normalize_uri, request_pool,
                                   stat_file, storage_failure)
from engine.errors import ConfigError, HemeflowError, SlideError, StorageCredentialsError
from engine.specimen import parse_specimen
from engine.watchdog import short_stop_wait, still_going

T = TypeVar("T")
U = TypeVar("U")
LIST_SUFFIXES = (".txt", ".csv")
STAT_THREADS = 16  # a list's files looked up at once (`expand_inputs`)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see jobs/configs/default.yaml)")
    add_storage_args(parser)


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("object storage (credentials come from the environment or an "
                                  "AWS profile, never from flags)")
    g.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, Ceph, a local test server)")
    g.add_argument("--s3-region", help="S3 region")
    g.add_argument("--s3-profile", help="AWS profile name")
    g.add_argument("--s3-anon", action="store_true", help="read public buckets anonymously")


def config_from_yaml(path: str | None) -> Config:
    """Config from the YAML file at ``path`` (jobs/configs/default.yaml's keys), the defaults
    where None."""
    data = {}
    if path:
        try:
            # as bytes: PyYAML reads UTF-8 and, by their byte-order mark, UTF-16 files
            # (Windows' "Unicode"), and names what it cannot decode (a YAMLError) where the
            # text read of this machine's encoding raised a traceback
            with open(path, "rb") as fh:
                data = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return Config.from_dict(data)


def load_config(args: argparse.Namespace) -> Config:
    """Config from ``--config`` YAML (if any) with the storage flags applied on top."""
    cfg = config_from_yaml(args.config)
    return cfg.replace(storage=storage_from_args(args, cfg.storage))


def storage_from_args(args: argparse.Namespace,
                      base: StorageConfig | None = None) -> StorageConfig:
    """``base`` (default settings when None) with the ``--s3-*`` flags applied on top."""
    base = base or StorageConfig()
    changes = {k: v for k, v in {"endpoint_url": args.s3_endpoint, "region": args.s3_region,
                                 "profile": args.s3_profile,
                                 "anon": True if args.s3_anon else None}.items() if v is not None}
    return dataclasses.replace(base, **changes)


def read_text(uri: str, storage: StorageConfig) -> str:
    fs, path = get_filesystem(normalize_uri(uri), storage)
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as err:
        raise InputError(f"file not found: {uri}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # a sheet saved in Excel's own code page (cp1252)
        line = data[:err.start].count(b"\n") + 1
        raise InputError(f"{uri}: line {line} is not UTF-8 text (byte {data[err.start]:#x}): "
                         "save the sheet as 'CSV UTF-8'") from err


_WINDOWS_PATH = re.compile(r"[A-Za-z]:[\\/]|\\\\")  # C:\slides\x.svs, \\server\share


def _resolve(item: str, list_uri: str) -> str:
    """A relative path in a list file is relative to the list file's folder.

    Raises:
        InputError: a Windows path (a list made on a lab PC), which is no path here.
    """
    if _WINDOWS_PATH.match(item):
        raise InputError(f"{list_uri}: {item} is a Windows path: list each slide as the machine "
                         "that runs the job sees it (the share's mount point there, or s3://…)")
    if "://" in item or item.startswith("/"):
        return normalize_uri(item)
    base = normalize_uri(list_uri).rsplit("/", 1)[0]
    return normalize_uri(f"{base}/{item}")


_DECIMAL_COMMA = re.compile(r"\s*[+-]?\d+,\d+\s*")


def read_csv_rows(uri: str, storage: StorageConfig) -> list[dict[str, str]]:
    """A CSV sheet's rows, by its header. Its delimiter is a comma, or where its header has
    none a semicolon or tab: what Excel writes as CSV where the decimal mark is a comma, so in
    such a sheet a number written ``12,5`` reads as ``12.5``. In a comma-separated sheet a
    comma in a number (``"250,000"``, a thousands separator) is left as it is, for the job to
    refuse rather than read as 250."""
    text = read_text(uri, storage)
    head = text.split("\n", 1)[0]
    delimiter = next((d for d in ",;\t" if d in head), ",")
    rows = list(csv.DictReader(io.StringIO(text), delimiter=delimiter))
    if delimiter != ",":
        for row in rows:
            for k, v in row.items():
                if isinstance(v, str) and _DECIMAL_COMMA.fullmatch(v):
                    row[k] = v.strip().replace(",", ".")
    return rows


def _uri_column(row: dict[str, str]) -> str:
    """The column of a ``.csv`` list that names the slides: ``uri``, ``path``, ``slide`` or the
    first."""
    return next((c for c in ("uri", "path", "slide") if c in row), next(iter(row)))


def read_uri_list(uri: str, storage: StorageConfig) -> list[str]:
    """URIs from a ``.txt`` (one per line, ``#`` comments) or ``.csv`` (``uri`` or ``path`` column)."""
    if uri.lower().endswith(".csv"):
        rows = read_csv_rows(uri, storage)
        if not rows:
            return []
        col = _uri_column(rows[0])
        items = [r[col].strip() for r in rows if r.get(col, "").strip()]
    else:
        lines = (ln.strip() for ln in read_text(uri, storage).splitlines())
        items = [ln for ln in lines if ln and not ln.startswith("#")]
    return [_resolve(i, uri) for i in items]


def expand_inputs(uri: str, storage: StorageConfig, folders: dict[str, str] | None = None
                  ) -> list[FileEntry]:
    """The files a job's ``--input`` names: a folder, an S3 prefix, a single file or a list file.

    Entries of a list that do not exist are kept (size unknown) so they end as status rows.
    A list's entry that is a folder (a DICOM series', a case's) stands for the files under it,
    as an ``--input`` folder does; ``folders``, where given, gets the list's entry each of them
    came from, by URI (`for_slides` gives them that line's specimen type and case).
    The instances of a DICOM series but one are marked ``part_of`` it (`fold_series`). A local
    file reached under two names (a link) is taken once (`engine.slides.storage.local_files`),
    which is said on stderr. A list's files are looked up ``STAT_THREADS`` at a time: one
    request each on S3, whose round trips one after another add up to many minutes for a list
    of 50,000 slides. A listing still going after ``LISTING_NOTICE_S`` says so on stderr, and
    again each time it has gone on twice as long: on a mount that stopped answering the job
    waited silently for ever.
    """
    with still_going(lambda s: print(
            f"hemeflow: still listing {uri} after {duration(s)}: a large archive takes long, and "
            "a network mount that stopped answering holds the listing for ever (does `ls` of "
            "it answer?)", file=sys.stderr, flush=True), LISTING_NOTICE_S):
        entries, twins = _listed(uri, storage, folders)
        if twins:
            other, name = sorted(twins.items())[0]
            print(f"hemeflow: {uri}: {len(twins)} file(s) reached under another name too (a "
                  f"link) are taken once, by the first name: {other} is {name}"
                  f"{', …' if len(twins) > 1 else ''}", file=sys.stderr, flush=True)
        return fold_series(entries, storage, uri)


LISTING_NOTICE_S = 300.0  # a listing that has gone on this long says so (`expand_inputs`)


def _listed(uri: str, storage: StorageConfig, folders: dict[str, str] | None
            ) -> tuple[list[FileEntry], dict[str, str]]:
    """`expand_inputs`' files, not yet folded into series, and the local files it found under
    two names (``twins``)."""
    twins: dict[str, str] = {}
    if uri.lower().endswith(LIST_SUFFIXES):
        items = once_each(read_uri_list(uri, storage), uri)

        def entry(item: str) -> list[FileEntry]:
            try:
                found = stat_file(item, storage, folders=True)
            except StorageCredentialsError:
                raise  # every other lookup would meet it: the job stops
            except SlideError:
                return [FileEntry(item)]
            return [found] if found is not None else list_files(item, storage, twins)

        found = each_looked_up(entry, items)
        entries, seen = [], set()
        for item, files in zip(items, found):
            for e in files:
                if folders is not None and e.uri != item:
                    folders.setdefault(e.uri, item)
                if e.uri not in seen:  # listed itself and in a listed folder: once
                    seen.add(e.uri)
                    entries.append(e)
    else:
        entries = list_files(uri, storage, twins)
    return entries, twins


def each_looked_up(fn: Callable[[T], U], items: list[T]) -> list[U]:
    """``fn`` of each of ``items``, in order, ``STAT_THREADS`` at a time: each a request on S3
    (a lookup), whose round trips one after another add up for thousands of slides."""
    with request_pool(max(1, min(STAT_THREADS, len(items))), "stat") as pool:
        return list(pool.map(fn, items))


def read_list_values(uri: str, storage: StorageConfig, folders: dict[str, str]
                     ) -> tuple[dict[str, str], dict[str, str]]:
    """The specimen types and cases the input gives its slides, by URI (`read_specimens`,
    `read_cases`), a listed folder's given to each of its files (``folders``: from
    `expand_inputs`; `for_slides`)."""
    return (for_slides(read_specimens(uri, storage), folders, uri, "specimen type"),
            for_slides(read_cases(uri, storage), folders, uri, "case"))


def for_slides(values: dict[str, T], folders: dict[str, str], uri: str, what: str
               ) -> dict[str, T]:
    """``values`` (a list's column by entry: `read_specimens`, `read_cases`) with each file of
    a listed folder given its folder's (``folders``: from `expand_inputs`).

    Raises:
        InputError: a file listed itself with one value and in a folder with another.
    """
    out = dict(values)
    for file, folder in folders.items():
        if folder in values:
            if out.setdefault(file, values[folder]) != values[folder]:
                raise InputError(f"{uri}: {file} has {what} {out[file]!r} and, in {folder}, "
                                 f"{values[folder]!r}: one slide, one {what}")
    return out


def fold_series(entries: list[FileEntry], storage: StorageConfig, where: str
                ) -> list[FileEntry]:
    """``entries`` with each DICOM series' instances but one marked ``part_of`` it
    (`engine.slides.dicom.group_series`), saying so on stderr."""
    from engine.slides.dicom import group_series

    entries = group_series(entries, storage)
    folded = [e for e in entries if e.part_of]
    if folded:
        print(f"hemeflow: {where}: {len(folded)} DICOM file(s) are instances of a series read "
              f"through another of its files, not slides of their own: {folded[0].uri} "
              f"(read through {folded[0].part_of}){', …' if len(folded) > 1 else ''}",
              file=sys.stderr, flush=True)
    return entries


def once_each(uris: list[str], where: str) -> list[str]:
    """A list's slides in its order, each once: one slide, one set of rows. A repeat is said
    (on stderr), not run twice."""
    unique = list(dict.fromkeys(uris))
    if len(unique) < len(uris):
        repeated = sorted(u for u, n in collections.Counter(uris).items() if n > 1)
        print(f"hemeflow: {where}: {len(repeated)} slide(s) listed more than once, each taken "
              f"once: {', '.join(repeated[:3])}{', …' if len(repeated) > 3 else ''}",
              file=sys.stderr, flush=True)
    return unique


def _list_column(uri: str, storage: StorageConfig, column: str) -> list[tuple[int, str, str]]:
    """``(line, uri, value)`` of each row of a ``.csv`` input list with a slide and a non-blank
    ``column``; [] for other inputs and lists without the column."""
    if not uri.lower().endswith(".csv"):
        return []
    rows = read_csv_rows(uri, storage)
    if not rows or column not in rows[0]:
        return []
    col = _uri_column(rows[0])
    return [(i + 2, _resolve(r[col].strip(), uri), r[column].strip()) for i, r in enumerate(rows)
            if (r.get(col) or "").strip() and (r[column] or "").strip()]


def read_specimens(uri: str, storage: StorageConfig) -> dict[str, str]:
    """The ``specimen`` column of a ``.csv`` input list, by URI (`engine.specimen`; a blank
    cell leaves its slide to ``--specimen``); {} for other inputs and lists without the column.

    Raises:
        SpecimenError: a cell that names no specimen type (its row is in the message).
        InputError: one slide listed with two types.
    """
    return one_value_each(((f"line {line}", u, parse_specimen(v, f"{uri} line {line}"))
                           for line, u, v in _list_column(uri, storage, "specimen")),
                          uri, "specimen type")


def one_value_each(rows: Iterable[tuple[str, str, T]], uri: str, what: str
                   ) -> dict[str, T]:
    """``{key: value}`` from a list's ``(place, key, value)`` rows (place: ``line 3`` of a
    CSV, ``row 2`` of a Parquet inventory), a key listed again with the same value taken once.

    Raises:
        InputError: a key listed with two values (both places named), which would otherwise
            leave the slide the later one's unawares.
    """
    out: dict[str, T] = {}
    first: dict[str, str] = {}
    for place, key, value in rows:
        if key in out and out[key] != value:
            raise InputError(f"{uri} {place}: {key} has {what} {value!r} here and "
                             f"{out[key]!r} on {first[key]}: one slide, one {what}")
        first.setdefault(key, place)
        out[key] = value
    return out


def without_lobes(cells):
    """A polars frame of a run's cells without the second lobes of cells counted once
    (``lobe_of`` set: `engine.cells.lobes`), as the differential counts them; unchanged where
    the frame has no such column (an output of schema 7 or before, an export's images)."""
    import polars as pl

    return cells.filter(pl.col("lobe_of").is_null()) if "lobe_of" in cells.columns else cells


def put_in_case(cases: dict[str, str], key: str, case: str, name: str) -> None:
    """Record in ``cases`` that ``key`` (said ``name`` in the message) belongs to ``case``.

    Raises:
        ValueError: ``cases`` already puts it in another case.
    """
    if cases.setdefault(key, case) != case:
        raise ValueError(f"{name} is in case {cases[key]} and in case {case}: a slide belongs "
                         "to one case")


def read_cases(uri: str, storage: StorageConfig) -> dict[str, str]:
    """The ``case`` column of a ``.csv`` input list (the case, or accession, each slide
    belongs to; a blank cell: none), by URI; {} for other inputs and lists without the column.

    Raises:
        InputError: one slide listed in two cases.
    """
    cases: dict[str, str] = {}
    for line, u, case in _list_column(uri, storage, "case"):
        try:
            put_in_case(cases, u, case, u)
        except ValueError as err:
            raise InputError(f"{uri} line {line}: {err}") from None
    return cases


def read_mpp_table(uri: str, storage: StorageConfig) -> dict[str, float]:
    """``--mpp-table`` CSV: a ``uri``/``path`` or ``slide_id`` column and an ``mpp`` column (a
    blank cell gives that slide none).

    Raises:
        InputError: no ``mpp`` column, a value that is no pixel size (`slide_mpp_arg`), or one
            slide given two.
    """
    rows = []
    for i, row in enumerate(read_csv_rows(uri, storage)):
        if "mpp" not in row:
            raise InputError(f"{uri}: needs an 'mpp' column and a 'uri' or 'slide_id' column")
        key = (row.get("uri") or row.get("path") or "").strip()
        key = _resolve(key, uri) if key else (row.get("slide_id") or "").strip()
        if key and (row["mpp"] or "").strip():  # a blank cell gives none
            try:
                mpp = slide_mpp_arg(row["mpp"])
            except argparse.ArgumentTypeError as err:
                raise InputError(f"{uri} line {i + 2}: mpp for {key}: {err}") from None
            rows.append((f"line {i + 2}", key, mpp))
    return one_value_each(rows, uri, "pixel size")


def warn_unused_mpp(overrides, uris, source: str) -> None:
    """Say on stderr which lines of the ``--mpp-table`` ``source`` name no slide of the input
    (`engine.slides.inventory.MppOverrides.unused`)."""
    unused = overrides.unused(uris)
    if unused:
        print(f"hemeflow: {source}: {len(unused)} line(s) name no slide of the input (a typo? a "
              f"slide listed under another path?), so state no size: {unused[0]}"
              f"{', …' if len(unused) > 1 else ''}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """tqdm bar on a terminal, silent otherwise (logs stay clean in ``ray job`` output)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return iter(tqdm(items, total=total, desc=desc, unit="slide"))
    return iter(items)


def write_run_config(output: str, cfg: Config, args: dict, storage: StorageConfig,
                     job: str) -> None:
    """The resolved config and job arguments, next to the outputs (no credentials live in
    either), and the job whose output it is (`refuse_another_jobs_output`)."""
    import engine
    from engine.schema import SCHEMA_VERSION

    doc = {"job": job, "config": cfg.to_dict(), "config_hash": cfg.hash(), "args": args,
           "schema_version": SCHEMA_VERSION, "engine_version": engine.__version__}
    write_bytes(join_uri(output, "config.json"), json.dumps(doc, indent=2, default=str).encode(),
                storage)


INVENTORY_TABLE = ("slides", "slides.parquet")  # an inventory's table, below its output


def output_job(output: str, storage: StorageConfig) -> str | None:
    """The job whose output ``output`` is: its config.json's ``job`` (release 0.8.9 on;
    classify_cells' always), else an inventory's where its table is there, else
    process_slides' where a config.json is; None where it holds none."""
    try:
        doc = json.loads(read_text(join_uri(output, "config.json"), storage))
    except (InputError, ValueError):
        doc = {}
    if isinstance(doc, dict) and doc.get("job"):
        return str(doc["job"])
    fs, root = get_filesystem(join_uri(output, *INVENTORY_TABLE), storage)
    if fs.exists(root):
        return "inventory"
    return "process_slides" if isinstance(doc, dict) and "config" in doc else None


def refuse_another_jobs_output(output: str, storage: StorageConfig, job: str) -> None:
    """Refuse to write ``job``'s tables into an output another job's are in (`output_job`).
    Each keeps its own config.json there, which the other's would replace; and an
    inventory's table (``slides/slides.parquet``) lies in the folder of process_slides'
    per-slide ``slides`` files, where a run took it for an uncommitted slide's and deleted it.

    Raises:
        HemeflowError: such an output.
    """
    theirs = output_job(output, storage)
    if theirs is None or theirs == job:
        return
    why = {"inventory": f"its table, {join_uri(output, *INVENTORY_TABLE)}, lies among the "
                        "files of the slides table, which a run of this job would take for "
                        "an unfinished slide's and delete; process it with --input "
                        f"{join_uri(output, *INVENTORY_TABLE)} and another --output"}.get(
        theirs, "each job keeps its own config.json and tables there; write to another "
                "--output")
    raise HemeflowError(f"{output} is {theirs}'s output, not {job}'s: {why}")


def number_arg(text: str, ok, expected: str) -> float:
    """``float(text)`` where ``ok`` holds for it, else argparse's error naming what was
    expected (the shared part of the number flags' types below)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def mpp_arg(text: str) -> float | str:
    """argparse type of a pixel size: a positive number of µm/px, or ``auto`` (measured on the
    images' red cells, `engine.pixel_size`)."""
    if text.strip().lower() == "auto":
        return "auto"
    return number_arg(text, lambda v: v > 0, "µm/px > 0 or 'auto'")


def count_arg(low: int = 1):
    """argparse type of a whole number of ``low`` or more (images, epochs, a batch's size)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {low} or more, got {text}")
        return value

    return parse


def positive_arg(text: str) -> float:
    """argparse type of a number above 0 (a learning rate, a distance in µm)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def or_none(parse):
    """argparse type of ``parse``'s value, or ``none`` (a check turned off): None."""
    def parsed(text: str):
        return None if text.strip().lower() == "none" else parse(text)

    return parsed


def percent_arg(text: str) -> float:
    """argparse type of a share in percent, 0 to 100."""
    return number_arg(text, lambda v: 0 <= v <= 100, "a percentage from 0 to 100")


def slide_mpp_arg(text: str) -> float:
    """argparse type of a slide's pixel size given by hand (``--mpp``): µm/px within the range
    a scanner's metadata is taken from (`engine.slides.base.PLAUSIBLE_MPP`)."""
    from engine.slides.base import PLAUSIBLE_MPP

    lo, hi = PLAUSIBLE_MPP
    return number_arg(text, lambda v: lo <= v <= hi,
                       f"µm/px from {lo} to {hi} (a 40x scan is about 0.25)")


def limits_arg(text: str) -> tuple[float, float] | None:
    """argparse type of a range ``LOW,HIGH`` with 0 <= LOW < HIGH, or ``none`` (no range)."""
    if text.strip().lower() == "none":
        return None
    try:
        limits = tuple(float(v) for v in text.split(","))
    except ValueError:
        limits = ()
    if len(limits) != 2 or not 0 <= limits[0] < limits[1]:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 <= LOW < HIGH, or none, "
                                         f"got {text!r}")
    return limits


def refit_parser(module: str, doc: str, output_help: str) -> argparse.ArgumentParser:
    """The parser of a job that refits part of a float cell classifier on its training data:
    ``--checkpoint``, ``--data``, ``--output`` and the split flags (`add_split_args`)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the float checkpoint (.safetensors)")
    add_data_arg(p, "its training data: folder or s3:// prefix with labels.csv")
    p.add_argument("--output", required=True, help=output_help)
    add_split_args(p)
    add_storage_args(p)
    return p


def local_data(args: argparse.Namespace) -> None:
    """Point ``args.data`` (a folder or ``s3://`` prefix with ``labels.csv``, or a list of them:
    ``--data`` repeated) at local folders to read it from (`engine.train.data.fetch_labelled`
    mirrors remote images), and keep what was given as ``args.data_source`` for what a job
    records (a list where several were given).

    Raises:
        FileNotFoundError, ValueError: with a message for the user.
    """
    from engine.train.data import fetch_labelled

    given = args.data if isinstance(args.data, list) else [args.data]
    sources = [normalize_uri(d) if is_remote(d) else os.path.abspath(d) for d in given]
    local = [fetch_labelled(d, storage_from_args(args)) for d in given]
    args.data = local if isinstance(args.data, list) else local[0]
    args.data_source = sources if len(sources) > 1 else sources[0]


def read_data(args: argparse.Namespace):
    """The labelled rows of the local folder(s) ``args.data`` (`local_data`): one table, or
    several read as one (`engine.train.data.merge_labelled`), each named by what was given
    (``args.data_source``, where `local_data` set it)."""
    from engine.train.data import merge_labelled, read_labels

    folders = args.data if isinstance(args.data, list) else [args.data]
    sources = getattr(args, "data_source", folders)
    sources = sources if isinstance(sources, list) else [sources]
    return merge_labelled([(s, read_labels(d)) for s, d in zip(sources, folders)])


def labelled_data(args: argparse.Namespace, resolve_mpp: bool = True):
    """``--data`` fetched (`local_data`) and read as one table (`read_data`); with
    ``resolve_mpp``, ``args.source_mpp`` set to its images' µm/px (`data_mpp`: a pack's own,
    else the given figure, measured on all its images for ``auto``, as the train job measured
    them).

    Raises:
        FileNotFoundError, ValueError: with a message for the user.
    """
    local_data(args)
    data = read_data(args)
    if resolve_mpp:
        args.source_mpp = data_mpp(args.source_mpp, args.data, data.paths)
    return data


def add_data_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """``--data``, repeatable: several labels tables read as one (`read_data`)."""
    parser.add_argument("--data", required=True, action="append",
                        help=f"{help}; repeat to read several as one (rounds of labelling, or "
                             "a lab's cells beside a PBC pack), all at one µm/px")


def add_split_args(parser: argparse.ArgumentParser) -> None:
    """The flags that rebuild ``jobs.train_cell_classifier``'s split of a checkpoint's training
    data (jobs that fit on its training rows and must never touch its test rows)."""
    parser.add_argument("--source-mpp", type=mpp_arg,
                        help="µm/px of the images, or auto: measured on their red cells "
                             "(default: a pack's own, from its pack.json; else 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--exclude-codes", default="IG,NEU")


def image_source(path: str, storage: StorageConfig | None = None):
    """What PIL opens for the image at ``path``: the path itself on disk, its bytes from object
    storage."""
    if not is_remote(path):
        return path
    storage = storage or StorageConfig()
    fs, key = get_filesystem(path, storage)
    # a dropped connection is retried, never taken for an unreadable image
    return io.BytesIO(call_with_retries(lambda: fs.cat_file(key), storage, f"read {path}"))


def find_exports(root: str, storage: StorageConfig) -> dict[str, list[str]]:
    """``export (slide) name -> sorted image paths or URIs`` under a local folder or an
    ``s3://`` prefix laid out ``<root>/<slide>/…/<image>`` (`engine.bags.find_patient_images`
    on disk; hidden files and folders are left out in both).

    Raises:
        FileNotFoundError: no slide folder with images under ``root``.
    """
    from engine.bags import find_patient_images, is_image_path

    root = normalize_uri(root)
    if not is_remote(root):
        return find_patient_images(root)
    fs, base = get_filesystem(root, storage)
    base, protocol = base.rstrip("/"), root.split("://", 1)[0]
    exports: dict[str, list[str]] = {}
    for key in sorted(fs.find(base)):
        parts = key[len(base) + 1:].split("/")
        if len(parts) > 1 and is_image_path(parts):
            exports.setdefault(parts[0], []).append(f"{protocol}://{key}")
    if not exports:
        raise FileNotFoundError(f"no <slide>/…/<image> files under {root}")
    return exports


def measure_pixel_size(paths, sample: int = 300, seed: int = 0, rbc_diameter_um: float = 7.5,
                       storage: StorageConfig | None = None):
    """`engine.pixel_size.estimate_mpp` over up to ``sample`` of the image files ``paths`` (on
    disk or in object storage; a seeded draw, so a rerun measures the same images)."""
    import random

    import numpy as np
    from PIL import Image

    from engine.pixel_size import estimate_mpp

    paths = sorted(paths)
    picked = random.Random(seed).sample(paths, min(sample, len(paths)))

    unreadable = []

    def images():
        for path in picked:
            try:
                with Image.open(image_source(path, storage)) as im:
                    yield np.asarray(im.convert("RGB"))
            except (OSError, Image.DecompressionBombError) as err:
                unreadable.append(f"{path}: {err}")

    try:
        return estimate_mpp(images(), rbc_diameter_um)
    finally:
        if unreadable:
            print(f"pixel size: skipped {len(unreadable)} unreadable images, first: "
                  f"{unreadable[0]}", file=sys.stderr)


def read_pack(data: str) -> dict | None:
    """``pack.json`` of a folder written by `jobs.pack_cell_images`, or None."""
    path = os.path.join(data, "pack.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def pack_or_given_mpp(given: float | str | None, data: str | list[str]) -> float | str:
    """The images' µm/px: a pack's own (``given`` must be None or the same), else ``given``
    (0.1 when None, about PBC / CellaVision's; ``auto`` is measured later). A pack is a folder
    `jobs.pack_cell_images` or `jobs.export_cells` wrote, or the test split
    `jobs.train_cell_classifier` wrote (its ``pack.json`` names the images' µm/px). Of several
    folders, one µm/px for all.

    Raises:
        ValueError: a pack's is not ``given``, or the folders' differ.
    """
    if not isinstance(data, str):
        mpps = {d: pack_or_given_mpp(given, d) for d in data}
        if len(set(mpps.values())) > 1:
            raise ValueError("the --data folders' images are at different µm/px (" + ", ".join(
                f"{d}: {m}" for d, m in mpps.items()) + "): they are read at one; pack the "
                "others to 0.25 first (python -m jobs.pack_cell_images), as exports are")
        return next(iter(mpps.values()))
    pack = read_pack(data)
    if pack is None:
        return 0.1 if given is None else given
    if given not in (None, pack["mpp"]):
        raise ValueError(f"{data} is a pack at {pack['mpp']} µm/px (pack.json): leave "
                         f"--source-mpp out")
    return pack["mpp"]


def data_mpp(given: float | str | None, data: str | list[str], paths,
             storage: StorageConfig | None = None) -> float:
    """The µm/px of the labelled images ``paths`` in the local folder(s) ``data``: a pack's own,
    else ``given`` (0.1 when None), measured on them for ``auto`` (`pack_or_given_mpp`,
    `resolve_source_mpp`).

    Raises:
        ValueError: ``given`` is not the pack's, or too few red cells to measure.
    """
    return resolve_source_mpp(pack_or_given_mpp(given, data), paths, storage)


def resolve_source_mpp(value: float | str, paths, storage: StorageConfig | None = None
                       ) -> float:
    """``value`` itself, or for ``auto`` the pixel size measured on ``paths`` (said on stderr).

    Raises:
        ValueError: too few red cells to measure (the message says to give the figure).
    """
    if value != "auto":
        return float(value)
    est = measure_pixel_size(paths, storage=storage)
    lo, hi = est.mpp_range
    print(f"source pixel size: {est.mpp:.4f} µm/px (interquartile {lo:.4f}-{hi:.4f}), measured "
          f"on {est.n_cells} red cells of {est.rbc_diameter_um} µm in {est.n_images} images",
          file=sys.stderr)
    return est.mpp


def committed_slide(store, name: str) -> dict:
    """The ``slides`` row of the committed slide ``name`` names in an output (an
    `engine.pipeline.commit.OutputStore`): its slide_id, or its file (an export's folder) name,
    or a DICOM series' folder name (its files are named by level or UID, not by slide). A slide
    still running, or left by a crash, is not there.

    Raises:
        FileNotFoundError: the output has no committed slide.
        ValueError: no slide, or more than one, goes by that name.
    """
    import polars as pl

    # a slide id names its file; a file name means looking through the slides table
    committed = store.read("slides", slide_ids={name})
    if committed is None:
        committed = store.read("slides")
    if committed is None:
        raise FileNotFoundError(f"no committed slides under {store.root}")
    slides = pl.from_arrow(committed)
    uri = pl.col("uri").str.strip_chars_end("/")
    match = slides.filter((pl.col("slide_id") == name) | uri.str.ends_with("/" + name.strip("/"))
                          | ((pl.col("format") == "dicom") & uri.str.replace(r"/[^/]*$", "")
                             .str.ends_with("/" + name.strip("/"))))
    if len(match) != 1:
        raise ValueError(f"no single slide {name!r} in {store.root}; slides: "
                         f"{sorted(slides['slide_id'].to_list())[:20]}")
    return match.row(0, named=True)


def in_rays_copy() -> bool:
    """Whether this job runs under ``ray job submit --working-dir`` (Ray's job supervisor
    gives its driver its runtime environment in ``RAY_JOB_CONFIG_JSON_ENV_VAR``), in Ray's
    temporary copy of the project, where a relative path is one in that copy."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return bool(job and (json.loads(job).get("runtime_env") or {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def in_rays_copy_said(said: str) -> str:
    """A job's error ``said`` with what it needs where it names a path in Ray's temporary copy
    of the project (`in_rays_copy`): a relative path given to a job under ``ray job submit
    --working-dir`` (its input, a list, a config) is looked up there."""
    here = os.getcwd()
    if not in_rays_copy() or here not in said or "Ray's temporary copy" in said:
        return said
    return (f"{said} (a relative path: under `ray job submit --working-dir` it is looked up in "
            f"Ray's temporary copy of the project, {here}, which holds only what was uploaded "
            "with it; give an absolute path or s3://)")


def refuse_output_in_rays_copy(argv: list[str]) -> None:
    """Refuse a relative ``--output`` where the job runs under ``ray job submit --working-dir``
    (`in_rays_copy`): the output would be written in Ray's temporary copy of the project, not
    where the job was submitted from, and would go with the cluster's session.

    Raises:
        HemeflowError: such an output.
    """
    if not in_rays_copy():
        return
    for i, arg in enumerate(argv):
        given = argv[i + 1] if arg == "--output" and i + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--output=") else None
        if given and "://" not in given and not os.path.isabs(given):
            raise HemeflowError(
                f"--output {given} is a relative path, and this job runs under `ray job submit "
                f"--working-dir`, whose driver runs in Ray's temporary copy of the project "
                f"({os.getcwd()}): the output would be written there and go with the "
                "cluster's session. Give an s3:// prefix or an absolute path")


def job_main(main):
    """A job's ``main`` that ends an error hemeflow raises on purpose
    (`engine.errors.HemeflowError`: an input, output, config or checkpoint it refuses,
    labelled images it cannot read) in ``hemeflow: error: <what and why>`` and exit code 2,
    not a traceback; so do the system's errors (`OSError`: a path missing, access denied, a
    disk full) and object storage that cannot be used (`engine.slides.storage.storage_failure`).
    Ctrl-C and SIGTERM stop it through its cleanup, saying so (exit 130 and 143). Every job's
    ``main`` is one (``tests/test_layering.py``)."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        _no_collection_at_exit()
        previous = _stop_on_sigterm()
        if warning := short_stop_wait():
            print(f"hemeflow: {warning}", file=sys.stderr, flush=True)
        try:
            argv = args[0] if args else kwargs.get("argv")
            refuse_output_in_rays_copy(sys.argv[1:] if argv is None else argv)
            with checking_first_contact():
                return main(*args, **kwargs)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (`_stop_on_sigterm`)
            # Ray Train turns what stops its fit into a KeyboardInterrupt of its own
            code = 143 if isinstance(err, Terminated) or _SIGTERM.is_set() else 130
            print(f"hemeflow: stopped ({'SIGTERM' if code == 143 else 'interrupted'}): what it "
                  "committed stays (process_slides and classify_cells go on from it when run "
                  "again)", file=sys.stderr)
            return code
        except HemeflowError as err:
            return fail(str(err))
        except OSError as err:  # the system's word: a path missing, access denied, disk full
            # (botocore's connect timeout is one too: named as a store that cannot be reached)
            return fail(storage_failure(err) or f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - re-raised unless storage cannot be used
            if (said := storage_failure(err)) is None:
                raise
            return fail(said)
        finally:
            if previous is not False:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    wrapped.job_main = True
    return wrapped


_SIGTERM = threading.Event()  # set by the job's SIGTERM handler


@functools.cache
def _no_collection_at_exit() -> None:
    """Have the interpreter's last garbage collection, as it exits, pass over what the job
    left: a job that ran Ray Data and torch held a heap that collection took 1.0-1.5 s of its
    3.5 s exit to visit, only to free it as the process ends (`gc.freeze` at exit: objects
    still referenced are freed as before; nothing hemeflow writes waits on a collection, and
    Python never promised finalizers at exit). Once per process, at its exit only: a test
    calling jobs in-process keeps its collections."""
    atexit.register(gc.freeze)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is: ``ray job stop``, a Kubernetes pod
    deleted or preempted (30 s before its SIGKILL, by default)."""


def _stop_on_sigterm():
    """Make SIGTERM stop a job as Ctrl-C does, so that its ``finally`` blocks run: the writes
    under way end and their slides commit, the run's mark leaves the output (``ray.init``
    puts in a handler of its own). Returns the handler it replaced (None: one not set from
    Python), or False off the main thread, where signals cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _SIGTERM.clear()

    def stop(signum, frame):
        _SIGTERM.set()
        raise Terminated()

    return signal.signal(signal.SIGTERM, stop)


def fail(message: str, code: int = 2) -> int:
    print(f"hemeflow: error: {in_rays_copy_said(message)}", file=sys.stderr)
    return code


def float_classifier_split(args):
    """What a job refitting part of a float cell classifier on its training data starts from:
    the checkpoint (a quantized one is refused), its model, and ``jobs.train_cell_classifier``'s
    split of ``args.data``, rebuilt from the split flags (`add_split_args`); resolves
    ``args.source_mpp``.

    Returns:
        ``(state, card, model, trainable, dev_idx, test_rows)`` (see ``split_for_training``).

    Raises:
        CheckpointError, FileNotFoundError, KeyError, ValueError: with a message for the user.
    """
    from engine.models import create_model, read_checkpoint
    from jobs.train_cell_classifier import split_for_training

    storage = storage_from_args(args)
    state, card = read_checkpoint(args.checkpoint, storage)
    if card.get("quantization"):
        raise ValueError(f"{args.checkpoint} is already quantized: give its float checkpoint "
                         "(quantize last; the int8 checkpoint keeps what the float one carries)")
    model = create_model(card["name"], args.checkpoint, storage=storage)
    if model.spec.task != "classification":
        raise ValueError(f"{card['name']} is not a cell classifier")
    data = labelled_data(args)
    excluded = {c.strip() for c in args.exclude_codes.split(",") if c.strip()}
    trainable, _, _, _, dev_idx, test_rows = split_for_training(
        data, excluded, args.test_fraction, args.seed)
    return state, card, model, trainable, dev_idx, test_rows
