"""Compact an output's tables: each table's committed rows in a few large files, for queries.

    python -m jobs.compact --output <process_slides or classify_cells output>
        [--tables cells,differentials,...] [--target-mb 256]

An output keeps one file per slide per table, so that slides commit one by one; over an archive
a query opens tens of thousands of them. This writes each table's rows of the committed slides
into files of about ``--target-mb`` (in memory; smaller on disk), sorted by slide, under
``<output>/compact/<table>/``, with a ``manifest.json`` of the slides each holds and the commit
it holds of each (`engine.pipeline.compact`). The slides' own files stay.

``read_table`` (and every job that reads the output) then reads each slide from its compacted
file where the slide has not been committed again since, and from its own file otherwise: run
this after a run that added or redid slides to bring the copy up to date; a rerun keeps the
files whose slides are unchanged. ``pl.read_parquet("<output>/compact/cells/*.parquet")`` reads
the tables as they were at the last compaction. A compaction while a run writes the output is
safe: what it copies of a slide committed again meanwhile is never read.
"""

from __future__ import annotations

import argparse
import sys

from engine.errors import HemeflowError
from engine.pipeline.commit import DATA_TABLES, STATUS_TABLE, OutputStore
from engine.pipeline.compact import TARGET_BYTES, compact_table
from jobs.common import add_storage_args, fail, job_main, storage_from_args

TABLES = (STATUS_TABLE, *DATA_TABLES)


def tables_arg(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TABLES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or text!r}: not a table of an "
                                         f"output; the tables: {', '.join(TABLES)}")
    return names


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.compact", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="an output folder or s3:// prefix")
    p.add_argument("--tables", type=tables_arg, default=TABLES,
                   help=f"comma-separated (default: all: {','.join(TABLES)})")
    p.add_argument("--target-mb", type=float, default=TARGET_BYTES / 2**20,
                   help="rows a file holds, in MB of memory (default 256)")
    add_storage_args(p)
    args = p.parse_args(argv)
    if args.target_mb <= 0:
        return fail(f"--target-mb must be positive, got {args.target_mb}")
    try:
        store = OutputStore(args.output, storage_from_args(args))
        stamps = store.stamps()
        if not stamps:
            return fail(f"no committed slide under {args.output}: nothing to compact")
        for table in args.tables:
            done = compact_table(store, table, stamps, int(args.target_mb * 2**20))
            if not done["slides"]:
                continue
            print(f"compact: {table}: {done['slides']:,} slides, {done['rows']:,} rows in "
                  f"{done['files']} file(s) ({done['kept']} kept, {done['written']} written, "
                  f"{done['removed']} removed) -> {store.uri('compact', table)}/", flush=True)
    except (HemeflowError, OSError) as err:
        return fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
