"""One differential per case: the cells of a case's slides counted together.

    python -m jobs.case_differentials --output <process_slides or classify_cells output>
        [--cases <cases.csv>] [--to <dir>]

A case (a patient's accession) often has several slides: two or three aspirate smears, or a
smear scanned twice. The report gives one differential for the case, over all the cells
counted on its slides, as a technologist's 500-cell count spans them. The cases are those the
output's slides table records (the ``case`` column of the input list ``process_slides`` or
``inventory`` was given), or, with ``--cases``, those of a sheet in their place: a row per
slide, a ``slide`` column (its slide_id, path, file name, or file name without extension; or
``slide_id``, ``uri``, ``path``, ``file``) and a ``case`` column.

For each case the job pools its committed ``ok`` slides' cells (``cells``, or an export's
``image_cells``) and counts them as the run counted each slide (`engine.differential`, with
the run's settings from its ``config.json``: cells out of focus left out unless the run counted
them, the same review thresholds), so its intervals narrow with the cells counted. A slide whose
red cells put its pixel size in doubt (its ``pixel_size`` flag) flags its case, naming it: its
cells, detected and classified at the wrong scale, are among the case's. It refuses
to pool a blood film with marrow (they are counted over different denominators) or slides
classified by models of different classes. A case's biopsy or clot sections give it their
cellularity (per method, the mean of the sections' estimates) beside the smears' differential,
as a marrow report gives both. Slides the sheet names that are not ``ok``, have neither, or are
not in the output are listed, not silently dropped.

Writes ``case_differentials.parquet`` (the ``differentials`` table's columns, ``case`` in place
of ``slide_id``, plus ``n_slides`` and ``slide_ids``) and ``case_summary.csv`` (a row per case:
its slides, cells counted, blast %, M:E ratio, NRBC, the review flags, its sections'
cellularity, the slides left out) under ``<output>/cases`` (or ``--to``), and prints the
summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NamedTuple

from engine.schema import EXPORT_FORMAT
from engine.specimen import SECTIONS
from jobs.common import (add_storage_args, fail, job_main, put_in_case, read_csv_rows,
                         storage_from_args, without_lobes)

WHOLE_CASE = "the whole case"  # a left_out entry that refuses a case, not one slide


def run_settings(doc: dict) -> dict:
    """The differential settings a run used, from its ``config.json`` (process_slides writes
    its whole config, classify_cells its settings)."""
    s = doc.get("settings") or doc["config"]["pipeline"]
    out = {k: s[k] for k in ("min_nucleated", "max_ood_percent", "max_out_of_focus_percent",
                             "count_out_of_focus")}
    limits = s.get("red_cell_diameter_um")  # the pixel-size check's range (null: off)
    out["red_cell_diameter_um"] = tuple(limits) if limits else None
    return out


def red_cells_of(diff, sids: list[str], limits) -> tuple[tuple[int, None] | None, list[str]]:
    """A case's red cells from its slides' differentials rows (``diff``, a polars frame):
    ``(n, None)``, the free-lying red cells measured on them (None where none was measured;
    their median is each slide's own, at its own pixel size, so the case has none), and the
    slides whose pixel size their red cells put in doubt, each as ``"<slide_id>: <why>"``."""
    import polars as pl

    from engine.differential import pixel_size_warning

    per_slide = diff.filter(pl.col("slide_id").is_in(sids)).group_by(
        "slide_id", maintain_order=True).agg(pl.col("n_red_cells", "red_cell_diameter_um")
                                             .first())
    measured = per_slide["n_red_cells"].drop_nulls()
    doubts = [f"{r['slide_id']}: {why}" for r in per_slide.iter_rows(named=True)
              if (why := pixel_size_warning(r["red_cell_diameter_um"], r["n_red_cells"],
                                            limits))]
    return ((int(measured.sum()), None) if len(measured) else None), doubts


def pooled_differential(cells, model_codes: list[str], blood: bool, settings: dict,
                        red_cells: tuple[int, None] | None = None):
    """The differential of the pooled ``cells`` (a polars frame with ``class_code``,
    ``out_of_focus`` and ``out_of_distribution``, nulls where not measured, and a slide's cells'
    ``kind`` and ``lobe_of``), as `engine.pipeline.aggregate` counts one slide's: nucleated
    detections, a lobed cell's second lobe left out, with the platelet-sized ones beside
    them; ``red_cells`` as `red_cells_of` gives them."""
    import polars as pl

    from engine.cells import KIND_CELL, KIND_PLATELET
    from engine.differential import compute_differential

    platelets = None  # an export's images: no detector, no platelet count
    if "kind" in cells.columns:
        platelets = cells.filter(pl.col("kind") == KIND_PLATELET)["out_of_focus"] \
            .fill_null(False).to_list()
        cells = without_lobes(cells.filter(pl.col("kind") == KIND_CELL))
    focus = cells["out_of_focus"]
    return compute_differential(
        cells["class_code"].to_list(), model_codes, settings["min_nucleated"],
        cells["out_of_distribution"].to_list(), settings["max_ood_percent"], blood=blood,
        # not measured at all (cells.max_blur_um: null): no list, as the run had none
        out_of_focus=None if focus.is_null().all() else focus.fill_null(False).to_list(),
        max_out_of_focus_percent=settings["max_out_of_focus_percent"],
        count_out_of_focus=settings["count_out_of_focus"], platelets=platelets,
        red_cells=red_cells)


def read_case_sheet(uri: str, storage) -> tuple[list[dict], str]:
    """A ``slide,case`` sheet's rows and the name of its slide column.

    Raises:
        ValueError: no slide column or no case column.
    """
    from jobs.compare_differentials import KEY_COLUMNS

    sheet = read_csv_rows(uri, storage)
    if not sheet:
        raise ValueError(f"{uri}: no rows (a header, then a row per slide: slide,case)")
    key = next((c for c in KEY_COLUMNS if c in sheet[0]), None)
    if key is None or "case" not in sheet[0]:
        raise ValueError(f"{uri}: needs a slide column (one of {', '.join(KEY_COLUMNS)}) and a "
                         f"case column; columns: {', '.join(sheet[0])}")
    return sheet, key


def case_sheet(uri: str | None, slides, storage) -> tuple[list[dict], str]:
    """``(rows, slide column)`` of the sheet at ``uri`` (`read_case_sheet`), or with no ``uri``
    the cases an output's ``slides`` frame records (its ``case`` column, by slide_id).

    Raises:
        ValueError: the sheet has no slide or case column, or no slide has a case.
    """
    if uri:
        return read_case_sheet(uri, storage)
    rows = [{"slide_id": sid, "case": case} for sid, case in
            slides.select("slide_id", "case").iter_rows() if case]
    if not rows:
        raise ValueError("no slide of the output has a case: give the input list a case column "
                         "(the case, or accession, each slide belongs to) or pass --cases "
                         "<slide,case CSV>")
    return rows, "slide_id"


class CaseMembers(NamedTuple):
    """A case's slides: ``pooled`` (case -> the slide_ids whose cells are counted together),
    ``left_out`` (case -> "name: why" of each slide not used) and ``sections`` (case -> its ok
    biopsy and clot sections, which have a cellularity and no cells)."""

    pooled: dict[str, list[str]]
    left_out: dict[str, list[str]]
    sections: dict[str, list[str]]


def case_members(sheet: list[dict], key: str, status, codes: dict[str, list[str]],
                 specimen: dict[str, str]) -> CaseMembers:
    """Each case's slides (`CaseMembers`) from a sheet's rows (``key``: its slide column;
    ``case``), an output's ``slide_status`` frame, the class codes of each slide with a
    differential and each slide's specimen type. A case whose slides cannot be counted as one
    (`pooling_problem`) is left out whole.

    Raises:
        ValueError: a slide is named in two cases.
    """
    import polars as pl

    from jobs.compare_differentials import slide_keys

    keys, ok = slide_keys(status), set(status.filter(pl.col("status") == "ok")["slide_id"])
    cases: dict[str, list[str]] = {}
    left_out: dict[str, list[str]] = {}
    sections: dict[str, list[str]] = {}
    case_of: dict[str, str] = {}  # a slide belongs to one case
    for r in sheet:
        name, case = (r.get(key) or "").strip(), (r.get("case") or "").strip()
        if not name or not case:
            continue
        sids = keys.get(name, set())
        why = ("not in the output" if not sids else
               f"names {len(sids)} slides: give the slide_id" if len(sids) > 1 else None)
        sid = next(iter(sids)) if len(sids) == 1 else None
        if sid and sid not in ok:
            why = "status " + status.filter(pl.col("slide_id") == sid)["status"][0]
        elif sid and sid not in codes and specimen.get(sid) in SECTIONS:
            if sid not in sections.setdefault(case, []):
                sections[case].append(sid)
            continue
        elif sid and sid not in codes:
            why = "no differential (no cell stage)"
        if why:
            left_out.setdefault(case, []).append(f"{name}: {why}")
            continue
        put_in_case(case_of, sid, case, f"slide {sid} ({name})")
        if sid not in cases.setdefault(case, []):
            cases[case].append(sid)
    for case, sids in list(cases.items()):
        why = pooling_problem(sids, specimen, codes)
        if why:
            left_out.setdefault(case, []).append(f"{WHOLE_CASE}: {why}")
            del cases[case]
    return CaseMembers(cases, left_out, sections)


def pooling_problem(sids: list[str], specimen: dict[str, str], codes: dict[str, list[str]]
                    ) -> str | None:
    """Why these slides' cells cannot be counted as one, or None."""
    if len({specimen[s] == "blood" for s in sids}) > 1:
        return "a blood film with marrow slides (counted over different denominators)"
    if len({tuple(codes[s]) for s in sids}) > 1:
        return "slides classified by models of different classes"
    return None


CELLULARITY_COLUMNS = ("cellularity_image_analysis", "cellularity_abmil")


def section_cellularity(store, sections: dict[str, list[str]]) -> dict[str, dict]:
    """Per case, its sections' cellularity (`CELLULARITY_COLUMNS`: the mean, over the sections
    that have one, of each method's slide estimate, in %) and ``section_slides``."""
    import polars as pl

    got = store.read("cellularity", slide_ids={s for v in sections.values() for s in v}) \
        if sections else None
    cel = pl.from_arrow(got) if got is not None else None
    out = {}
    for case, sids in sections.items():
        out[case] = {"section_slides": ";".join(sids)}
        for column in CELLULARITY_COLUMNS:
            values = [] if cel is None else cel.filter(
                pl.col("slide_id").is_in(sids),
                pl.col("method") == column.removeprefix("cellularity_"))["cellularity_mean"]
            out[case][column] = float(sum(values) / len(values)) if len(values) else None
    return out


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.case_differentials", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True,
                   help="a process_slides or classify_cells output folder or s3:// prefix")
    p.add_argument("--cases", help="CSV: a slide column and a case column (default: the case "
                                   "the output's slides table records for each slide)")
    p.add_argument("--to", help="where to write (default: <output>/cases)")
    add_storage_args(p)
    args = p.parse_args(argv)

    import polars as pl

    from engine.differential import differential_rows, review_warnings
    from engine.outputs import join_uri, write_bytes, write_parquet
    from engine.pipeline.commit import OutputStore
    from engine.slides.storage import InputError

    storage = storage_from_args(args)
    store = OutputStore(args.output, storage)
    status, slides, diff = (store.read(t) for t in ("slide_status", "slides", "differentials"))
    if status is None or slides is None:
        return fail(f"no committed slides under {args.output}")
    from engine.schema import SCHEMA_VERSION

    with store.fs.open(f"{store.path.rstrip('/')}/config.json") as fh:
        doc = json.load(fh)
    if doc.get("schema_version", 1) != SCHEMA_VERSION:  # its cells lack columns counted here
        return fail(f"{args.output} was written by another hemeflow (table schema "
                    f"{doc.get('schema_version', 1)}, this one reads {SCHEMA_VERSION}): "
                    "process its slides again into a new --output")
    settings = run_settings(doc)
    status = pl.from_arrow(status)
    slides = pl.from_arrow(slides)
    try:
        sheet, key = case_sheet(args.cases, slides, storage)
    except (FileNotFoundError, InputError, ValueError) as err:
        return fail(str(err) if args.cases else f"{args.output}: {err}")
    specimen = dict(zip(*slides.select("slide_id", "specimen")))
    diff = None if diff is None else pl.from_arrow(diff)
    codes = {} if diff is None else {
        sid: sorted(g["class_code"]) for (sid,), g in
        diff.filter(pl.col("level") == "class").group_by("slide_id")}
    try:
        cases, left_out, sections = case_members(sheet, key, status, codes, specimen)
    except ValueError as err:
        return fail(f"{args.cases or args.output}: {err}")
    if not cases and not sections:
        return fail("no case has a committed slide with a differential or a cellularity: "
                    + "; ".join(f"{c}: {', '.join(w)}" for c, w in left_out.items()))
    cellularity = section_cellularity(store, sections)
    # an export's cells are its images (classify_cells); one output holds one kind of slide
    table = "image_cells" if (slides["format"] == EXPORT_FORMAT).any() else "cells"
    columns = ["class_code", "out_of_focus", "out_of_distribution"]
    rows, summary = [], []
    for case in dict.fromkeys([*cases, *sections, *left_out]):  # the sheet's order, mostly
        sids = cases.get(case, [])
        line = {"case": case, "n_slides": len(sids), "slide_ids": ";".join(sids),
                **cellularity.get(case, {}),
                "left_out": "; ".join(left_out.get(case, [])) or None}
        summary.append(line)
        if not sids:  # sections only, or none of its slides could be used
            continue
        read = store.read(table, columns=columns + (["kind", "lobe_of"] if table == "cells"
                                                     else []),
                          slide_ids=set(sids))
        cells = pl.from_arrow(read) if read is not None else pl.DataFrame(
            schema={"class_code": pl.String, "out_of_focus": pl.Boolean,
                    "out_of_distribution": pl.Boolean})
        red, doubts = red_cells_of(diff, sids, settings["red_cell_diameter_um"])
        d = pooled_differential(cells, codes[sids[0]], specimen[sids[0]] == "blood", settings,
                                red)
        warnings = review_warnings(d, settings["min_nucleated"])
        if doubts:  # a slide scanned or recorded at another scale: its cells are pooled here
            warnings = {"pixel_size": "; ".join(doubts), **warnings}
        for row in differential_rows(case, d):
            row["case"] = row.pop("slide_id")
            rows.append({**row, "n_slides": len(sids), "slide_ids": sids})
        line.update({"counted": d.n_wbc if d.denominator == "wbc" else d.n_nucleated,
                     "denominator": d.denominator, "blast_percent": d.blast_percent,
                     "me_ratio": d.me_ratio, "nrbc_per_100_wbc": d.nrbc_per_100_wbc,
                     "platelets_per_wbc": d.platelets_per_wbc,
                     "warnings": "; ".join(f"{k}: {v}" for k, v in warnings.items())})
    to = args.to or join_uri(args.output, "cases")
    written = ["case_summary.csv"]
    if rows:
        frame = pl.DataFrame(rows).select("case", pl.exclude("case"))
        write_parquet(frame.to_arrow(), join_uri(to, "case_differentials.parquet"), storage)
        written.insert(0, "case_differentials.parquet")
    order = ["case", "n_slides", "slide_ids", "counted", "denominator", "blast_percent",
             "me_ratio", "nrbc_per_100_wbc", "platelets_per_wbc", "warnings", *CELLULARITY_COLUMNS,
             "section_slides", "left_out"]
    table_out = pl.DataFrame([{k: r.get(k) for k in order} for r in summary],
                             infer_schema_length=None)
    table_out = table_out.drop([c for c in (*CELLULARITY_COLUMNS, "section_slides")
                                if table_out[c].is_null().all()])
    write_bytes(join_uri(to, "case_summary.csv"), table_out.write_csv().encode(), storage)
    with pl.Config(tbl_rows=len(table_out), tbl_cols=-1, tbl_width_chars=160,
                   fmt_str_lengths=60):
        print(table_out.drop("slide_ids"))
    print(f"{len(cases)} case(s) from {sum(len(s) for s in cases.values())} slide(s)"
          + (f", {len(sections)} with the cellularity of "
             f"{sum(len(s) for s in sections.values())} section(s)" if sections else "")
          + f"; wrote {' and '.join(join_uri(to, f) for f in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
