"""Cells of a run for a lab's experts to label: each cell's crop read back from its slide and
written as an image, with a ``labels.csv`` to fill in, which `jobs.train_cell_classifier` then
trains on (fine-tuning the reference on the lab's own stain and scanner).

    python -m jobs.export_cells --output <process_slides output> --to <new folder | s3://…>
        [--slide <slide_id or file name> ...] [--per-class 50] [--per-slide N]
        [--order random | uncertain | far] [--kind nucleated | platelet | all] [--px 144]
        [--skip-exported <an earlier export> ...] [--seed 0]

Up to ``--per-class`` cells of each class the run called, over the chosen slides (all its ok
slides by default): ``random`` shows what the counts are made of, ``uncertain`` the least
confident calls first and ``far`` the cells least like the classifier's training data first
(``ood_distance``), which a new lab's slides flagged ``out_of_distribution`` need most. Cells
whose image would cross the slide's border and cells out of focus (left out of the
differential too) are not exported. ``--per-slide`` takes at most that many of each class from
any one slide (by the same order), so that one slide does not fill a class: the train job splits
by slide, and a model learns a lab's stain from many slides, not one.

The folder holds ``images/<slide_id>/<cell_id>.png`` (``--px`` square at the classifier's 0.25
µm/px, centred on the cell: its 96 px crop with the augmentation margin, as
`jobs.pack_cell_images` writes), ``pack.json`` (their µm/px, so the train job needs no
``--source-mpp``) and ``labels.csv``: ``path``, ``code`` (empty: the expert's DeepHeme code, such
as ``M6``; a row left empty is not trained on), ``predicted`` and ``class_prob`` (the run's
call), ``ood_distance``, ``slide_id`` (so training splits by slide), ``cell_id``, ``x``, ``y``
(level-0 pixels, to find the cell on the slide). Then::

    python -m jobs.train_cell_classifier --data <folder> --init <the run's checkpoint> ...

``--skip-exported`` names earlier exports (folders or ``s3://`` prefixes with their
``labels.csv``) whose cells are not exported again: the next round of an active-learning loop
(export the cells the model is least sure of, label, fine-tune, export again) shows the experts
new cells only.

``--to`` may be an ``s3://`` prefix (one with nothing under it): the experts fill in a copy of
its ``labels.csv``, it is put back, and the train job takes ``--data`` the same prefix.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor

from engine.outputs import join_uri, write_bytes
from engine.slides.storage import InputError, get_filesystem, is_remote, normalize_uri
from jobs.cell_gallery import CROP_MPP, choose, read_crops
from jobs.common import (add_storage_args, committed_slide, fail, job_main, read_csv_rows,
                         storage_from_args, without_lobes)

ORDERS = ("random", "uncertain", "far")
COLUMNS = ("path", "code", "predicted", "class_prob", "ood_distance", "slide_id", "cell_id",
           "x", "y")


def exportable(cells, slides, kind: str, px: int):
    """The cells worth a label: of ``kind`` (or all), classified by the run, in focus, no
    counted cell's second lobe (``lobe_of``, where the output has it), and with their ``px``
    image at 0.25 µm/px inside the slide (``slides``: its size and µm/px)."""
    import polars as pl

    half = pl.lit(px * CROP_MPP / 2) / ((pl.col("mpp_x") + pl.col("mpp_y")) / 2)  # level-0 px
    keep = pl.col("class_code").is_not_null() & ~pl.col("out_of_focus").fill_null(False) \
        & (pl.col("x") >= half) & (pl.col("y") >= half) \
        & (pl.col("x") + half <= pl.col("width")) & (pl.col("y") + half <= pl.col("height"))
    if kind != "all":
        keep &= pl.col("kind") == kind
    sizes = slides.select("slide_id", "mpp_x", "mpp_y", "width", "height")
    return without_lobes(cells).join(sizes, on="slide_id").filter(keep).drop(
        "mpp_x", "mpp_y", "width", "height", "lobe_of", strict=False)


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.export_cells", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="a process_slides output folder or s3:// "
                                                    "prefix")
    p.add_argument("--to", required=True,
                   help="a new local folder or s3:// prefix for the images and labels")
    p.add_argument("--slide", action="append", default=[],
                   help="slide_id or file name (a DICOM series' folder name; repeat it; "
                        "default: every ok slide)")
    p.add_argument("--per-class", type=int, default=50,
                   help="cells per class called, over the chosen slides")
    p.add_argument("--per-slide", type=int,
                   help="at most this many cells of each class from any one slide")
    p.add_argument("--order", default="random", choices=ORDERS)
    p.add_argument("--kind", default="nucleated", choices=("nucleated", "platelet", "all"))
    p.add_argument("--px", type=int, default=144,
                   help="side of each image at 0.25 µm/px (the 96 px crop and the augmentation "
                        "margin)")
    p.add_argument("--skip-exported", action="append", default=[], metavar="EXPORT",
                   help="an earlier export (folder or s3:// prefix with labels.csv) whose cells "
                        "are left out (repeat it)")
    p.add_argument("--seed", type=int, default=0)
    add_storage_args(p)
    args = p.parse_args(argv)

    import polars as pl
    from PIL import Image

    from engine.errors import HemeflowError
    from engine.pipeline.commit import OutputStore
    from engine.schema import EXPORT_FORMAT
    from engine.slides import open_slide

    if args.per_class < 1 or (args.per_slide is not None and args.per_slide < 1) \
            or args.px < 96:
        return fail("--per-class and --per-slide take 1 or more, --px 96 (the classifier's "
                    "crop) or more")
    storage = storage_from_args(args)
    if not is_empty(args.to, storage):
        return fail(f"{args.to} is not empty: export into a new folder or prefix")
    store = OutputStore(args.output, storage)
    try:
        status = store.read("slide_status", columns=["slide_id", "status"])
        if status is None:
            raise FileNotFoundError(f"no committed slides under {args.output}")
        ok = set(pl.from_arrow(status).filter(pl.col("status") == "ok")["slide_id"])
        sids = {committed_slide(store, name)["slide_id"] for name in args.slide} or ok
        slides = pl.from_arrow(store.read("slides", slide_ids=sids))
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    if (slides["format"] == EXPORT_FORMAT).any():
        return fail("an export's cells are image files already (classify_cells): label them "
                    "where they are")
    read = store.read("cells", columns=["slide_id", "cell_id", "x", "y", "kind", "out_of_focus",
                                        "class_code", "class_prob", "ood_distance"],
                      slide_ids=sids & ok, optional=("lobe_of",))
    cells = exportable(pl.from_arrow(read), slides, args.kind, args.px) if read is not None \
        else None
    if cells is not None and args.skip_exported:
        try:
            done = exported_before(args.skip_exported, storage)
        except (InputError, ValueError) as err:
            return fail(f"--skip-exported: {err}")
        n = len(cells)
        cells = cells.join(done, on=["slide_id", "cell_id"], how="anti", maintain_order="left")
        print(f"--skip-exported: {n - len(cells)} cell(s) exported before left out")
    if cells is None or cells.is_empty():
        return fail(f"no classified {'' if args.kind == 'all' else args.kind + ' '}cells in "
                    f"the ok slides chosen under {args.output}"
                    + (" that earlier exports do not hold" if args.skip_exported else ""))
    if args.order == "far" and cells["ood_distance"].is_null().all():
        return fail("the run's cells have no distance to the training data: its checkpoint "
                    "carries no feature density (python -m jobs.fit_cell_ood)")
    if args.per_slide:  # each slide's first per_slide of each class, then the class's first
        cells = pl.concat([rows for i, (_, part) in enumerate(cells.group_by(
                               "slide_id", maintain_order=True))  # a seed a slide: its own draw
                           for rows in choose(part, args.per_slide, args.order,
                                              args.seed + i).values()])
    picked = pl.concat(list(choose(cells, args.per_class, args.order, args.seed).values()))
    rows = []

    def put(path: str, crop) -> None:
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, "PNG")
        write_bytes(join_uri(args.to, path), buf.getvalue(), storage)

    try:
        for (sid,), chosen in picked.sort("slide_id", "cell_id").group_by("slide_id",
                                                                           maintain_order=True):
            slide = slides.filter(pl.col("slide_id") == sid).row(0, named=True)
            with open_slide(slide["uri"], storage, keep=False, sparse=True) as reader:
                crops = read_crops(reader, chosen, (slide["mpp_x"] + slide["mpp_y"]) / 2,
                                   (slide["width"], slide["height"]), args.px)
            paths = [f"images/{sid}/{cid}.png" for cid in chosen["cell_id"]]
            with ThreadPoolExecutor(8) as pool:  # on S3 a request each: several at once
                list(pool.map(put, paths, crops))
            for path, r in zip(paths, chosen.iter_rows(named=True)):
                rows.append({"path": path, "code": "", "predicted": r["class_code"],
                             "class_prob": round(r["class_prob"], 4),
                             "ood_distance": r["ood_distance"], "slide_id": sid,
                             "cell_id": r["cell_id"], "x": round(r["x"], 1),
                             "y": round(r["y"], 1)})
    except (OSError, HemeflowError) as err:
        return fail(f"{type(err).__name__}: {err} (the slides must be where the run read them)")
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_bytes(join_uri(args.to, "labels.csv"), table.getvalue().encode(), storage)
    info = {"source": args.output, "mpp": CROP_MPP, "px": args.px, "format": "png",
            "images": len(rows), "order": args.order, "kind": args.kind,
            "slides": sorted(picked["slide_id"].unique().to_list()),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_bytes(join_uri(args.to, "pack.json"), json.dumps(info, indent=2).encode(), storage)
    counts = picked["class_code"].value_counts(sort=True)
    print(f"{len(rows)} cells of {len(info['slides'])} slide(s) ({args.order}; "
          + ", ".join(f"{c} {n}" for c, n in counts.iter_rows()) + f") -> {args.to}")
    where = join_uri(args.to, "labels.csv")
    print(f"label them: fill the code column of {where} (a DeepHeme code; rows left empty are "
          f"not trained on{'; a copy, put back when filled' if is_remote(args.to) else ''}), "
          "then: python -m jobs.train_cell_classifier --data "
          f"{shlex.quote(normalize_uri(args.to))} --init "
          "<the run's checkpoint> ...")
    return 0


def exported_before(exports: list[str], storage):
    """``slide_id``, ``cell_id`` of the cells in earlier exports' ``labels.csv``.

    Raises:
        InputError: an export without ``labels.csv``; ValueError: one without those columns.
    """
    import polars as pl

    rows = []
    for export in exports:
        for r in read_csv_rows(join_uri(export, "labels.csv"), storage):
            if "slide_id" not in r or "cell_id" not in r:
                raise ValueError(f"{export}/labels.csv has no slide_id and cell_id columns "
                               "(not an export_cells export)")
            rows.append((r["slide_id"], int(r["cell_id"])))
    return pl.DataFrame(rows, schema={"slide_id": pl.String, "cell_id": pl.Int64},
                        orient="row").unique()


def is_empty(uri: str, storage) -> bool:
    """Whether nothing is under a local folder or an S3 prefix (or it does not exist)."""
    if not is_remote(uri):
        return not (os.path.isdir(uri) and os.listdir(uri))
    fs, path = get_filesystem(normalize_uri(uri), storage)
    try:
        return not fs.find(path, maxdepth=1, withdirs=True)
    except FileNotFoundError:
        return True


if __name__ == "__main__":
    sys.exit(main())
