"""Inventory a slide archive: one row per file with format, size, levels, MPP and status.

    python -m jobs.inventory --input <dir | s3://bucket/prefix | list.txt | list.csv> \
        --output <dir | s3://bucket/prefix> [--mpp 0.25 | --mpp-table mpp.csv]
        [--specimen aspirate|blood|biopsy|clot]

Writes ``<output>/slides/slides.parquet`` and ``<output>/config.json`` and prints a summary line.
Each row records the slide's specimen type (a ``specimen`` column of a .csv list, else
``--specimen``), which ``process_slides --input <that slides.parquet>`` follows, and its case
(a ``case`` column: the accession the slide belongs to), which it carries on.
"""

from __future__ import annotations

import argparse
import collections
import sys
from concurrent.futures import ThreadPoolExecutor

from engine.errors import HemeflowError
from engine.outputs import join_uri, write_parquet
from engine.schema import SLIDES, table_from_rows
from engine.slides.inventory import MppOverrides, inventory_file
from engine.slides.storage import StagingArea, is_remote
from engine.specimen import SPECIMENS, UNKNOWN, Specimens
from jobs.common import (add_common_args, count_arg, expand_inputs, fail, job_main, load_config,
                         progress, read_cases, read_mpp_table, read_specimens, slide_mpp_arg,
                         write_run_config)

DEFAULT_INPUT = "../shared/data/wsi"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.inventory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT,
                   help=f"folder, s3:// prefix, or .txt/.csv list of slides (default {DEFAULT_INPUT})")
    p.add_argument("--output", default="hemeflow-out", help="output folder or s3:// prefix")
    p.add_argument("--mpp", type=slide_mpp_arg, help="µm/px for slides whose metadata has none")
    p.add_argument("--mpp-table", help="CSV with uri (or slide_id) and mpp columns")
    p.add_argument("--specimen", choices=sorted(SPECIMENS), default=UNKNOWN,
                   help="specimen type of slides the .csv list does not type (engine/specimen.py)")
    p.add_argument("--workers", type=count_arg(), default=4, help="slides opened in parallel")
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


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
        overrides = MppOverrides(
            default=args.mpp,
            table=read_mpp_table(args.mpp_table, cfg.storage) if args.mpp_table else {})
        entries = expand_inputs(args.input, cfg.storage)
        if not entries:
            return fail(f"no files found under {args.input}")
        specimens = Specimens(args.specimen, read_specimens(args.input, cfg.storage))
        cases = read_cases(args.input, cfg.storage)
        with StagingArea(cfg.storage) as staging, ThreadPoolExecutor(args.workers) as pool:
            work = pool.map(lambda e: inventory_file(e, cfg.storage, staging, overrides,
                                                     specimens.of(e.uri), cases.get(e.uri)),
                            entries)
            rows = list(progress(work, len(entries), "inventory"))
            staging.purge()  # the staged copies served this job only
        opened = sum(1 for r in rows if r["status"] != "skipped" and is_remote(r["uri"]))
        out = join_uri(args.output, "slides", "slides.parquet")
        write_parquet(table_from_rows(rows, SLIDES), out, cfg.storage)
        write_run_config(args.output, cfg, vars(args), cfg.storage)
    except (HemeflowError, OSError) as err:
        return fail(str(err))
    line = summarize(rows)
    if opened:  # a remote SVS or generic TIFF is read by range (engine.slides.header_copy)
        line += (f"; {staging.downloads} of {opened} remote slides downloaded whole, the "
                 "others read by range")
    print(f"inventory: {line} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
