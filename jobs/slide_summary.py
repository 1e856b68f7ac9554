"""One row per slide of a process_slides output with its headline results: case, specimen, status
and reason, warnings, cell counts, blast %, M:E ratio, NRBC per 100 white cells, each lineage's
percentage, cellularity.

    python -m jobs.slide_summary --output <process_slides output: dir | s3://…> [--to <dir>]

Writes ``summary.parquet`` and ``summary.csv`` (for a spreadsheet) under ``--to`` (default: the
output itself) and prints the table. Run it after a run, or while one goes on: it reads the
committed slides only (`engine.report.summary`).
"""

from __future__ import annotations

import argparse
import collections
import io
import sys

from jobs.common import add_storage_args, fail, job_main, storage_from_args

TABLES = ("slide_status", "slides", "differentials", "cellularity")


def read_committed(store) -> dict:
    """Each of `TABLES` as a polars DataFrame of the committed slides' rows (None where the
    output has no such table)."""
    import polars as pl

    return {t: None if (got := store.read(t)) is None else pl.from_arrow(got) for t in TABLES}


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.slide_summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True,
                   help="the process_slides output folder or s3:// prefix")
    p.add_argument("--to", help="where to write summary.parquet and summary.csv (default: the "
                                "output)")
    add_storage_args(p)
    args = p.parse_args(argv)

    import polars as pl

    from engine.outputs import join_uri, write_bytes, write_parquet
    from engine.pipeline.commit import OutputStore, describe_run, runs_writing
    from engine.report.summary import slide_summary
    from engine.schema import STATUSES

    storage = storage_from_args(args)
    store = OutputStore(args.output, storage)
    tables = read_committed(store)
    if tables["slide_status"] is None:
        return fail(f"no committed slides under {args.output} (no slide_status rows)")
    summary = slide_summary(tables["slide_status"], tables["slides"], tables["differentials"],
                            tables["cellularity"])
    to = args.to or args.output
    write_parquet(summary.to_arrow(), join_uri(to, "summary.parquet"), storage)
    buf = io.BytesIO()
    summary.write_csv(buf)
    write_bytes(join_uri(to, "summary.csv"), buf.getvalue(), storage)
    with pl.Config(tbl_rows=40, tbl_cols=12, fmt_str_lengths=40, tbl_width_chars=220,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(summary.select("slide_id", *(["case"] if summary["case"].is_not_null().any()
                                           else []), "specimen", "status", "n_cells", "denominator",
                             "blast_percent", "me_ratio", "nrbc_per_100_wbc", "platelets_per_wbc",
                             "cellularity_image_analysis", "cellularity_abmil"))
    for o in runs_writing(store):
        print(f"a run is writing {store.root} now: {describe_run(o)}; these are the slides it "
              "has committed so far")
    counts = collections.Counter(summary["status"].to_list())
    print(f"{len(summary)} slides ("
          + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s] or s != "skipped")
          + f") -> {join_uri(to, 'summary.parquet')}, summary.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
