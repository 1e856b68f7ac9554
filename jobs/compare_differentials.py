"""Agreement of an output's differentials (process_slides or classify_cells) with a lab's manual
differentials, per cell category over the slides: bias, limits of agreement, mean absolute
difference, correlation, and how often the automated percentage lies within the manual count's
own 95 % interval (`engine.report.agreement`).

    python -m jobs.compare_differentials --output <hemeflow output: dir | s3://…>
        (--manual <counts.csv> | --source-labels | --against <another output>)
        [--to <dir | s3://…>]

The manual sheet has a row per slide: a ``slide`` column (or ``slide_id``, ``uri``, ``path``,
``file``) naming it by its slide_id, its path, its file name or its file name without the
extension (an export's folder name for classify_cells), and a column of cell counts per category:
DeepHeme codes (``M6``), groups (``IG``, ``NEU``, ``ER``), lineages (``lymphoid``) or PBC /
CellaVision labels (``neutrophil``). Other columns (a comment, platelets, smudge cells) are listed
as not compared. Blank counts are 0.

Counts, or percentages with the number of cells counted: the manual interval comes from that
number (10 % of 100 cells is far less certain than 10 % of 500). A sheet of percentages says how
many cells each slide's count covered in a ``counted`` column (or ``cells_counted``,
``n_counted``), or ``--counted N`` gives one number for every row (a lab's 200-cell
differential); each percentage then stands for that share of the counted cells. Without either,
values must be whole counts: a sheet of percentages is refused, not read as a count of 100.

With ``--source-labels`` (a classify_cells output of an export in class folders, the folders
being the analyser's or the technologist's classes) each export's own labels are its manual
differential, and the JSON adds the image-by-image agreement: accuracy, Cohen's kappa, each
category's sensitivity and positive predictive value, and the confusion.

With ``--against`` another hemeflow output of the same slides takes the manual sheet's place:
the reference run (the model a lab has validated, say) against this one (a new checkpoint, a
fine-tune, a calibrated or quantized model). Each slide both committed ``ok`` is compared on the
reference's classes, and the JSON adds the cell-by-cell agreement: the cells both runs found
(the same image of an export; on a slide, detections whose centres lie within ``--match-um``,
1 µm, of each other, each matched once), each the reference's call against this run's. Where
the runs' detection settings are the same, every cell is matched. ``runs`` says which engine
versions and config hashes made the compared slides on each side (a new release against the one
a lab validated: README "Versions"). With ``--cases`` each case's counts are its slides' summed
on both sides (a case with a slide the reference run has not committed ``ok`` is listed, not
compared).

Prints JSON to stdout; writes ``agreement.parquet`` (per category), ``agreement_slides.parquet``
(per slide and category) and ``bland_altman.png`` under ``--to`` (default: ``<output>/agreement``).
With ``--cases`` the sheet has a row per case (a ``case`` column), compared with the summed counts
of the case's ok slides (`jobs.case_differentials`): the cases the output's slides table
records, or those of ``--cases <slide,case CSV>``.

With the analyser's ``wbc_count`` and ``platelet_count`` columns (any one unit for both, 10^9/L by
default) beside the differential, a blood film's platelet estimate is compared too: its
platelets per white cell times the white count against the platelet count, slide by slide
(bias, limits of agreement, the median ratio, r, and how often both grade the slide decreased,
adequate or increased: ``--platelet-limits``, 150,450 by default); ``agreement_platelets.parquet``
holds the slides. Slides without a ratio (not blood films, no white cell counted, an export) or
without both counts are listed.

Only committed slides are read; a slide that failed, or one the sheet names that the output does
not hold, is listed with the reason, never dropped unsaid.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import (add_storage_args, fail, job_main, limits_arg, read_csv_rows,
                         storage_from_args, without_lobes)

KEY_COLUMNS = ("slide", "slide_id", "uri", "path", "file")
COUNTED_COLUMNS = ("counted", "cells_counted", "n_counted")
FROM_OUTPUT = "the output's cases"  # --cases without a sheet: the slides table's case column
CBC_COLUMNS = ("wbc_count", "platelet_count")  # the analyser's counts, for the platelet estimate


def _number(text: str | None, slide: str, column: str, what: str) -> float:
    text = (text or "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # NaN fails this too
        raise ValueError(f"slide {slide!r}, column {column!r}: {text!r} is not {what}")
    return value


def manual_counts(row: dict, slide: str, categories, counted_column: str | None,
                  counted: int | None) -> dict[str, float]:
    """The manual count per category of one sheet row: its counts, or its percentages of the cells
    counted (the row's ``counted_column``, else ``counted``) turned into counts."""
    n = _number(row.get(counted_column), slide, counted_column, "a number of cells") \
        if counted_column else 0.0
    n = n or counted or 0
    if not n:
        counts = {c: _number(row.get(c), slide, c, "a count") for c in categories}
        for c, v in counts.items():
            if v != int(v):
                raise ValueError(
                    f"slide {slide!r}, column {c!r}: {row[c].strip()!r} is not a whole count; a "
                    f"sheet of percentages needs the number of cells counted: a "
                    f"{COUNTED_COLUMNS[0]!r} column, or --counted N")
        return counts
    if n != int(n):
        raise ValueError(f"slide {slide!r}: {n:g} cells counted is not a whole number")
    pct = {c: _number(row.get(c), slide, c, "a percentage") for c in categories}
    if sum(pct.values()) > 100.5:  # rounding of each column may add up past 100 a little
        raise ValueError(f"slide {slide!r}: the compared columns add up to "
                         f"{sum(pct.values()):.1f} %, more than 100: not percentages of the "
                         f"cells counted")
    return {c: v * n / 100 for c, v in pct.items()}


def slide_keys(status) -> dict[str, set[str]]:
    """Each name a manual sheet may give a slide by (slide_id, uri, file name, file name without
    its extension) -> the slide_ids it names."""
    keys: dict[str, set[str]] = {}
    for sid, uri in zip(status["slide_id"], status["uri"]):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        for key in {sid, uri, name, name.rsplit(".", 1)[0] if "." in name else name}:
            keys.setdefault(key, set()).add(sid)
    return keys


def _sheet_from_source_labels(store):
    """``(rows, key, cells)``: per committed slide of a classify_cells output, its images'
    count per source label, as a manual sheet's rows keyed by ``slide_id``; and the labelled
    cells (slide_id, source_label, class_code, probabilities, model_codes)."""
    import polars as pl

    got = store.read("image_cells", columns=["slide_id", "source_label", "class_code",
                                             "probabilities", "model_codes"])
    if got is None:
        return [], "slide_id", None
    cells = pl.from_arrow(got).filter(pl.col("source_label").is_not_null())
    rows = {}
    for sid, label, n in cells.group_by("slide_id", "source_label").len().iter_rows():
        rows.setdefault(sid, {"slide_id": sid})[label] = str(n)
    return [rows[s] for s in sorted(rows)], "slide_id", cells


def category_calibration(cells, categories: dict[str, frozenset[str]]) -> dict | None:
    """How far the model's probabilities hold on these labelled cells: each cell whose label
    is a compared category, with the probability its call's category got (the sum over the
    category's codes: a group such as ``IG`` sums M2-M4) and whether that category is its
    label (`engine.train.metrics.reliability`). The reference's temperature was fitted on PBC:
    on another lab's cells this says whether ``class_prob`` still reads as a chance. None
    where the rows carry no probabilities."""
    import numpy as np

    from engine.train.metrics import reliability

    of_code = {code: c for c, codes in categories.items() for code in codes}
    conf, right = [], []
    for label, call, probs, codes in cells.select(
            "source_label", "class_code", "probabilities", "model_codes").iter_rows():
        if label not in categories or probs is None or codes is None:
            continue
        called = of_code.get(call, "other")
        conf.append(sum(p for p, c in zip(probs, codes) if of_code.get(c, "other") == called))
        right.append(called == label)
    return reliability(np.asarray(conf), np.asarray(right)) if conf else None


def _sheet_from_output(reference):
    """``(rows, key)``: per committed ``ok`` slide of another output (``reference``, an
    `OutputStore`) with a differential, its count per class code, as a manual sheet's rows keyed
    by ``slide_id`` (a slide's id is its URI's, the same in every output)."""
    import polars as pl

    status, diff = reference.read("slide_status"), reference.read("differentials")
    if status is None or diff is None:
        return [], "slide_id"
    ok = set(pl.from_arrow(status).filter(pl.col("status") == "ok")["slide_id"])
    rows = {}
    for sid, code, n in pl.from_arrow(diff).filter(
            pl.col("level") == "class", pl.col("slide_id").is_in(list(ok))).select(
            "slide_id", "class_code", "count").iter_rows():
        rows.setdefault(sid, {"slide_id": sid})[code] = str(n)
    return [rows[s] for s in sorted(rows)], "slide_id"


def made_by(store, slide_ids: list[str]) -> dict:
    """The engine versions and config hashes that made ``slide_ids`` in ``store`` (their status
    rows'), so a comparison of two runs says what each was: a new release against the one a lab
    validated reads ``{"engine_version": ["0.2.0"], ...}`` against ``["0.1.0"]``."""
    import polars as pl

    status = store.read("slide_status", ["engine_version", "config_hash"], set(slide_ids))
    if status is None:
        return {"engine_version": [], "config_hash": []}
    frame = pl.from_arrow(status)
    return {k: sorted(v for v in frame[k].unique().to_list() if v) for k in frame.columns}


def matched_cells(store, reference, slide_ids: list[str], match_um: float):
    """The cells two outputs of the same slides both found, as a polars frame ``slide_id``,
    ``reference`` (its call) and ``class_code`` (this output's): an export's images by their
    path; a slide's classified nucleated detections (no second lobe) by position, each paired
    with the other run's nearest within ``match_um`` where each is the other's nearest. Also
    returns how many such cells each output has on those slides (this one's, the reference's):
    the cells one run found and the other did not are their difference."""
    import numpy as np
    import polars as pl
    from scipy.spatial import cKDTree

    columns = ["slide_id", "path", "class_code"]
    exported = store.read("image_cells", columns, set(slide_ids))
    if exported is not None:  # an export's images: the same file in both runs
        got = reference.read("image_cells", columns, set(slide_ids))
        ours, theirs = (pl.DataFrame(schema=dict.fromkeys(columns, pl.String)) if t is None else
                        pl.from_arrow(t).filter(pl.col("class_code").is_not_null())
                        for t in (exported, got))
        pairs = ours.join(theirs.rename({"class_code": "reference"}), on=["slide_id", "path"])
        return pairs.select("slide_id", "reference", "class_code"), len(ours), len(theirs)

    def read(s):
        got = s.read("cells", ["slide_id", "x", "y", "kind", "class_code"], set(slide_ids),
                     optional=("lobe_of",))
        if got is None:
            return pl.DataFrame(schema={"slide_id": pl.String, "x": pl.Float64,
                                        "y": pl.Float64, "class_code": pl.String})
        return without_lobes(pl.from_arrow(got).filter(pl.col("kind") == "nucleated",
                                                        pl.col("class_code").is_not_null()))
    ours, theirs = read(store), read(reference)
    slides = store.read("slides", ["slide_id", "mpp_x"], set(slide_ids))
    mpp = {} if slides is None else \
        dict(zip(*(slides[c].to_pylist() for c in ("slide_id", "mpp_x"))))
    parts = []
    for (sid,), a in ours.group_by("slide_id"):
        b = theirs.filter(pl.col("slide_id") == sid)
        if not len(b) or not mpp.get(sid):
            continue
        xa, xb = a.select("x", "y").to_numpy(), b.select("x", "y").to_numpy()
        reach = match_um / mpp[sid]
        da, ia = cKDTree(xb).query(xa)  # each of ours: the reference's nearest
        _, ib = cKDTree(xa).query(xb)
        keep = np.flatnonzero((da <= reach) & (ib[ia] == np.arange(len(xa))))
        parts.append(pl.DataFrame({"slide_id": [sid] * len(keep),
                                   "reference": b["class_code"].gather(ia[keep]),
                                   "class_code": a["class_code"].gather(keep)}))
    empty = pl.DataFrame(schema={"slide_id": pl.String, "reference": pl.String,
                                 "class_code": pl.String})
    return (pl.concat(parts) if parts else empty), len(ours), len(theirs)


def _cases(uri: str, store, status, auto: dict, by_status: dict):
    """Cases in place of slides: ``(keys, by_status, auto, left_out, members)`` as `main`
    uses them: each case's counts the sum of its ok slides' (``members``, as
    `jobs.case_differentials.case_members` finds them), its review flags theirs; and per case
    the slides left out, with why."""
    import polars as pl

    from jobs.case_differentials import case_members, case_sheet

    slides = pl.from_arrow(store.read("slides"))
    sheet, key = case_sheet(None if uri == FROM_OUTPUT else uri, slides, store.storage)
    codes = {sid: sorted(c) for sid, c in auto.items()}
    specimen = dict(zip(*slides.select("slide_id", "specimen")))
    members, left_out, _ = case_members(sheet, key, status, codes, specimen)
    pooled, flags = {}, {}
    for case, sids in members.items():
        pooled[case] = {c: sum(auto[s].get(c, 0) for s in sids) for c in codes[sids[0]]}
        flags[case] = {"status": "ok", "warnings": sorted(
            {w for s in sids for w in (by_status[s].get("warnings") or [])})}
    missing = {c: {"status": "no slide", "error_message": "; ".join(w)}
               for c, w in left_out.items() if c not in pooled}
    return {c: {c} for c in (*pooled, *missing)}, {**flags, **missing}, pooled, left_out, \
        members


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.compare_differentials", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True,
                   help="a process_slides or classify_cells output folder or s3:// prefix")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manual", help="CSV of manual counts, a row per slide")
    src.add_argument("--source-labels", action="store_true",
                     help="a classify_cells output: count each export's own labels (the class "
                          "folders its images lay in) as the manual differential, and compare "
                          "image by image too")
    src.add_argument("--against", metavar="OUTPUT",
                     help="another hemeflow output of the same slides (a reference run: the "
                          "validated model, say) in place of a manual sheet, compared slide by "
                          "slide and cell by cell")
    p.add_argument("--match-um", type=float, default=1.0,
                   help="with --against: a slide's cells of the two runs are one cell when "
                        "their centres lie within this many µm (default 1)")
    p.add_argument("--counted", type=int, metavar="N",
                   help="the sheet gives percentages, each of N cells counted (a sheet's "
                        f"{COUNTED_COLUMNS[0]!r} column gives it per slide instead)")
    p.add_argument("--cases", nargs="?", const=FROM_OUTPUT, metavar="CSV",
                   help="the manual sheet has a row per case (a case column), compared with the "
                        "pooled counts of the case's slides: the cases the output records, or "
                        "those of a slide,case CSV (as jobs.case_differentials takes)")
    p.add_argument("--platelet-limits", type=limits_arg, default=(150.0, 450.0),
                   metavar="LOW,HIGH",
                   help="platelet counts below LOW are decreased, above HIGH increased, in the "
                        "sheet's units (default 150,450: 10^9/L)")
    p.add_argument("--to", help="where to write the tables and the plot (default: "
                                "<output>/agreement)")
    add_storage_args(p)
    args = p.parse_args(argv)

    import io

    import polars as pl

    from engine.outputs import join_uri, write_bytes, write_parquet
    from engine.pipeline.commit import OutputStore
    from engine.report.agreement import (agreement_table, compare_slide, platelet_agreement,
                                         platelet_rows, resolve_categories)
    from engine.slides.storage import InputError

    storage = storage_from_args(args)
    store = OutputStore(args.output, storage)
    if args.cases and args.source_labels:
        return fail("--cases compares a manual sheet of cases; --source-labels compares each "
                    "export with its own folders: give one")
    reference = OutputStore(args.against, storage) if args.against else None
    if reference is not None and reference.path.rstrip("/") == store.path.rstrip("/"):
        return fail(f"--against {args.against} is the output compared: give another run's")
    if reference is not None:
        sheet, key = _sheet_from_output(reference)
        if not sheet:
            return fail(f"{args.against}: no committed ok slide with a differential")
    elif args.source_labels:
        sheet, key, labelled = _sheet_from_source_labels(store)
        if not sheet:
            return fail(f"{args.output}: no image_cells rows with a source label (a "
                        f"classify_cells output whose images lay in class folders)")
    else:
        try:
            sheet = read_csv_rows(args.manual, storage)
        except InputError as err:
            return fail(str(err))
        if not sheet:
            return fail(f"{args.manual}: no rows")
        key = "case" if args.cases and "case" in sheet[0] else None if args.cases else \
            next((c for c in KEY_COLUMNS if c in sheet[0]), None)
        if key is None and args.cases:
            return fail(f"{args.manual}: no case column (with --cases, a row per case); "
                        f"columns: {', '.join(sheet[0])}")
        if key is None:
            return fail(f"{args.manual}: no slide column (one of {', '.join(KEY_COLUMNS)}); "
                        f"columns: {', '.join(sheet[0])}")
    if args.counted is not None and (args.source_labels or args.against or args.counted <= 0):
        return fail("--counted takes a positive number of cells, with --manual")
    if args.platelet_limits is None:
        return fail("--platelet-limits takes LOW,HIGH (a grade needs its limits)")
    limits = args.platelet_limits
    columns = list(dict.fromkeys(c for row in sheet for c in row))
    cbc = [c for c in CBC_COLUMNS if c in columns]
    if len(cbc) == 1:
        print(f"not compared: column {cbc[0]!r}: the platelet estimate needs both "
              f"{' and '.join(CBC_COLUMNS)}", file=sys.stderr)
    platelets_compared = len(cbc) == 2 and not args.cases
    counted_column = None if args.source_labels or args.against else \
        next((c for c in COUNTED_COLUMNS if c in columns), None)
    source = "the source labels" if args.source_labels else \
        f"--against {args.against}" if args.against else args.manual
    status, diff = store.read("slide_status"), store.read("differentials")
    if status is None or diff is None:
        return fail(f"no committed differentials under {args.output}")
    status, diff = pl.from_arrow(status), pl.from_arrow(diff)
    classes = diff.filter(pl.col("level") == "class")
    code_sets = {frozenset(g["class_code"]) for _, g in classes.group_by("slide_id")}
    if len(code_sets) > 1:
        return fail("the output's slides were classified by models of different classes "
                    f"({' / '.join(','.join(sorted(s)) for s in code_sets)}): compare them apart")
    model_codes = set(next(iter(code_sets)))
    try:
        categories, ignored = resolve_categories(
            [c for c in columns if c not in (key, counted_column, *CBC_COLUMNS)], model_codes)
    except ValueError as err:
        return fail(f"{source}: {err}")
    if not categories:
        return fail(f"{source}: no column can be compared: "
                    + "; ".join(f"{c}: {why}" for c, why in ignored.items()))
    for col, why in ignored.items():
        print(f"not compared: column {col!r}: {why}", file=sys.stderr)

    keys = slide_keys(status)
    by_status = {r["slide_id"]: r for r in status.iter_rows(named=True)}
    auto = {sid: dict(zip(g["class_code"], g["count"]))
            for (sid,), g in classes.group_by("slide_id")}
    per_wbc = dict(zip(*classes.group_by("slide_id").agg(
        pl.col("platelets_per_wbc").first()))) if "platelets_per_wbc" in classes.columns else {}
    members, not_in_reference = {}, {}
    if args.cases:  # the units compared are cases: their slides' counts summed
        try:
            keys, by_status, auto, left_out, members = _cases(args.cases, store, status, auto,
                                                              by_status)
        except (InputError, ValueError) as err:
            return fail(str(err))
        if reference is not None:  # the reference's counts summed over the same slides
            by_slide = {r["slide_id"]: r for r in sheet}
            sheet, key = [], "case"
            for case, sids in members.items():
                lacking = [s for s in sids if s not in by_slide]
                if lacking:
                    not_in_reference[case] = "not ok in the reference run: " + ", ".join(lacking)
                    continue
                sheet.append({"case": case, **{c: str(sum(int(by_slide[s].get(c) or 0)
                                                          for s in sids))
                                               for c in columns if c != "slide_id"}})
    rows, not_compared, unmatched, seen = [], dict(not_in_reference), [], {}
    by_platelets, platelets_not_compared = [], {}
    for r in sheet:
        name = (r.get(key) or "").strip()
        if not name:
            continue
        sids = keys.get(name, set())
        if len(sids) != 1:
            if sids:
                not_compared[name] = f"names {len(sids)} slides ({', '.join(sorted(sids))}): " \
                                     f"give the slide_id"
            else:
                unmatched.append(name)
            continue
        sid = next(iter(sids))
        if sid in seen:
            return fail(f"{source}: rows {seen[sid]!r} and {name!r} both name slide {sid}")
        seen[sid] = name
        st = by_status[sid]
        if st["status"] != "ok" or sid not in auto:
            not_compared[name] = (f"status {st['status']}: {st.get('error_type') or ''} "
                                  f"{st.get('error_message') or ''}".strip()
                                  if st["status"] != "ok" else "no differential (no cell stage)")
            continue
        try:
            manual = manual_counts(r, name, categories, counted_column, args.counted)
        except ValueError as err:
            return fail(f"{source}: {err}")
        got = compare_slide(manual, auto[sid], categories)
        if isinstance(got, str):
            not_compared[name] = got
            continue
        flags = [w.split(":")[0] for w in (st.get("warnings") or [])]
        rows += [{"slide_id": sid, "slide": name, **row, "review_flags": flags} for row in got]
        if not platelets_compared:
            continue
        if not all((r.get(c) or "").strip() for c in CBC_COLUMNS):
            platelets_not_compared[name] = "no analyser count"
        elif per_wbc.get(sid) is None:
            platelets_not_compared[name] = "no platelets per white cell (not a blood film, an " \
                                           "image export, or no white cell counted)"
        else:
            try:
                wbc, plt = (_number(r[c], name, c, "a count") for c in CBC_COLUMNS)
            except ValueError as err:
                return fail(f"{source}: {err}")
            by_platelets.append({"slide": name, **platelet_rows(sid, per_wbc[sid], wbc, plt,
                                                                limits)})
    if not rows:
        print(json.dumps({"slides_compared": 0, "unmatched": unmatched,
                          "not_compared": not_compared, "columns_not_compared": ignored}))
        return fail("no slide of the sheet could be compared (see the JSON above)")
    per_slide = pl.DataFrame(rows, schema_overrides={"review_flags": pl.List(pl.Utf8)})
    table = agreement_table(per_slide)

    to = args.to or join_uri(args.output, "agreement")
    write_parquet(table.to_arrow(), join_uri(to, "agreement.parquet"), storage)
    write_parquet(per_slide.to_arrow(), join_uri(to, "agreement_slides.parquet"), storage)
    from engine.report.plots import plot_bland_altman

    panels = {c: (g["manual_percent"].to_numpy(), g["auto_percent"].to_numpy())
              for (c,), g in per_slide.group_by("category", maintain_order=True)}
    buf = io.BytesIO()
    plot_bland_altman(panels, buf, suptitle=(
        "this run - the reference run" if args.against else "hemeflow - manual differential")
        + " (percent of the compared cells)")
    write_bytes(join_uri(to, "bland_altman.png"), buf.getvalue(), storage)

    written = ["agreement.parquet", "agreement_slides.parquet", "bland_altman.png"]
    platelets = None
    if by_platelets:
        frame = pl.DataFrame(by_platelets)
        write_parquet(frame.to_arrow(), join_uri(to, "agreement_platelets.parquet"), storage)
        written.append("agreement_platelets.parquet")
        platelets = {**platelet_agreement(frame), "limits": list(limits),
                     "not_compared": platelets_not_compared}
    elif len(cbc) == 2:  # asked for, and no slide could be compared
        platelets = {"slides_compared": 0, "not_compared": platelets_not_compared or (
            {"cases": "the estimate is compared slide by slide"} if args.cases else {})}

    n = per_slide["slide_id"].n_unique()
    report = {
        "slides_compared": n,
        "categories": {r["category"]: {**{k: v for k, v in r.items() if k != "category"},
                                       "codes": sorted(categories[r["category"]])}
                       for r in table.iter_rows(named=True)},
        "mean_abs_difference": float(per_slide["difference"].abs().mean()),
        "within_manual_ci": float(per_slide["within_manual_ci"].mean()),
        "slides_with_review_flags": sorted(set(per_slide.filter(
            pl.col("review_flags").list.len() > 0)["slide"])),
        "unmatched": unmatched, "not_compared": not_compared, "columns_not_compared": ignored,
        **({"compared": "cases", "case_slides_left_out": left_out} if args.cases else {}),
        **({"platelets": platelets} if platelets is not None else {}),
        "written": [join_uri(to, f) for f in written],
    }
    if args.source_labels:
        from engine.report.agreement import cell_agreement

        compared = labelled.filter(pl.col("slide_id").is_in(list(per_slide["slide_id"].unique())))
        report["cells"] = cell_agreement(compared["source_label"].to_list(),
                                         compared["class_code"].to_list(), categories)
        report["cells"]["calibration"] = category_calibration(compared, categories)
    if reference is not None:
        from engine.report.agreement import cell_agreement

        units = per_slide["slide_id"].unique().to_list()  # slides, or cases of slides
        compared = sorted(s for u in units for s in members.get(u, [u]))
        pairs, ours, theirs = matched_cells(store, reference, compared, args.match_um)
        report["against"] = reference.root
        report["runs"] = {"this": made_by(store, compared),
                          "reference": made_by(reference, compared)}
        report["cells"] = {**cell_agreement(pairs["reference"].to_list(),
                                            pairs["class_code"].to_list(), categories),
                           "matched_of_this_runs": [len(pairs), ours],
                           "reference_cells": theirs,
                           "match_um": args.match_um}
    print(json.dumps(report, indent=1))
    print(f"{n} slide(s) compared on {len(categories)} categories: mean |difference| "
          f"{report['mean_abs_difference']:.1f} points, {report['within_manual_ci']:.0%} within "
          f"the {'reference' if args.against else 'manual'} count's 95 % interval; "
          f"{len(unmatched)} sheet row(s) without a slide, "
          f"{len(not_compared)} not compared"
          + (f"; {'cell by cell' if args.against else 'image by image'}: accuracy "
             f"{report['cells']['accuracy']:.1%}, kappa "
             + ("n/a (one category)" if report["cells"]["kappa"] is None
                else f"{report['cells']['kappa']:.3f}")
             + f" over {report['cells']['n_cells']} cells"
             if report.get("cells", {}).get("n_cells") else "")
          + (f"; platelet estimate on {platelets['slides_compared']} slide(s): bias "
             f"{platelets['bias']:+.0f}, median ratio {platelets['median_ratio'] or 0:.2f}, "
             f"same grade on {platelets['grade_agreement']:.0%}"
             if platelets and platelets["slides_compared"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
