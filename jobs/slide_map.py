"""Where on a slide its cells were out of focus (or unlike the training data): a map to review.

    python -m jobs.slide_map --output <process_slides output> --slide <slide_id or file name>
        [--measure focus | ood] [--square-um 256] [--png <file>]

Reads the slide's rows of the ``cells`` table, cuts the slide into squares of ``--square-um``
(256 µm, a cell tile, by default) and paints each square that holds nucleated cells by the
share of them flagged (the number in it: how many cells that share rests on): ``focus``, out
of focus (``out_of_focus``: edge blur above the run's ``cells.max_blur_um``); ``ood``, unlike
the classifier's training data (``out_of_distribution``). The PNG shows the slide's
thumbnail beside the painted one. A slide blurred all over wants a rescan; one blurred in a
region (a bubble, a thick area, a tilted edge) has those cells left out of its differential and
the rest counted. It prints how many squares
are mostly flagged and how many of the slide's flagged cells lie in them. The slide must still
be where the run read it (its ``uri``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from engine.schema import EXPORT_FORMAT
from jobs.common import (add_storage_args, committed_slide, fail, job_main, storage_from_args,
                         without_lobes)

THUMB_PX = 1024
MEASURES = {  # --measure: the cells column it maps, and what the colour bar says
    "focus": ("out_of_focus", "share of nucleated cells out of focus"),
    "ood": ("out_of_distribution", "share of nucleated cells unlike the training data"),
}


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.slide_map", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="a process_slides output folder or s3:// prefix")
    p.add_argument("--slide", required=True,
                   help="slide_id, or the slide's file name (a DICOM series' folder name)")
    p.add_argument("--measure", default="focus", choices=sorted(MEASURES))
    p.add_argument("--square-um", type=float, default=256.0,
                   help="side of the squares, µm (default 256: a cell tile)")
    p.add_argument("--png", help="where to write (default: <slide_id>-<measure>-map.png here)")
    add_storage_args(p)
    args = p.parse_args(argv)
    if args.square_um <= 0:
        return fail(f"--square-um must be positive, got {args.square_um}")

    import polars as pl

    from engine.errors import HemeflowError
    from engine.pipeline.commit import OutputStore
    from engine.report.maps import flagged_squares
    from engine.report.plots import plot_attention_map
    from engine.slides import open_slide

    storage = storage_from_args(args)
    store = OutputStore(args.output, storage)
    column, label = MEASURES[args.measure]
    try:
        slide = committed_slide(store, args.slide)
        sid = slide["slide_id"]
        if slide["format"] == EXPORT_FORMAT:
            return fail(f"slide {sid} is a single-cell export (classify_cells): its images have "
                        "no place on a slide to map; python -m jobs.cell_gallery shows them")
        read = store.read("cells", columns=["x", "y", "kind", column], slide_ids={sid},
                          optional=("lobe_of",))
    except (FileNotFoundError, ValueError) as err:
        return fail(str(err))
    if read is None:
        return fail(f"slide {sid} has no cells table in {args.output} (no cell stage ran: "
                    "the slide failed, or its specimen type has none)")
    cells = pl.from_arrow(read).filter(pl.col("kind") == "nucleated", pl.col(column).is_not_null())
    cells = without_lobes(cells)  # a counted cell's second lobe is that cell
    if cells.is_empty():
        return fail(f"slide {sid} has no nucleated cells with {column} in {args.output}")
    flagged = cells[column].to_numpy().astype(bool)
    side = args.square_um / slide["mpp_x"]  # level-0 px
    sq = flagged_squares(cells["x"].to_numpy(), cells["y"].to_numpy(), flagged, side)
    try:
        with open_slide(slide["uri"], storage, keep=False, sparse=True) as reader:
            thumb = reader.read_thumbnail((THUMB_PX, THUMB_PX))
    except (OSError, HemeflowError) as err:
        return fail(f"{sid}: {type(err).__name__}: {err}")
    scale = thumb.shape[1] / slide["width"]  # level-0 px -> thumbnail px
    boxes = np.rint(np.stack([sq["x0"], sq["y0"], sq["x0"] + side, sq["y0"] + side], 1)
                    * scale).astype(int)
    mostly = sq["share"] > 0.5
    png = args.png or f"{sid}-{args.measure}-map.png"
    title = (f"{sid}: {int(flagged.sum())} of {len(flagged)} nucleated cells {column} "
             f"({100 * flagged.mean():.1f} %); squares of {args.square_um:g} µm")
    plot_attention_map(thumb, boxes, sq["share"], png, title + " (number: its nucleated cells)",
                       label=label, counts=sq["n"])
    print(f"wrote {png}: {len(sq['n'])} squares with nucleated cells, {int(mostly.sum())} of "
          f"them more than half {column}, holding {int(sq['n_flagged'][mostly].sum())} of the "
          f"slide's {int(flagged.sum())} cells {column}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
