"""Predict with a trained ABMIL checkpoint: K resampled bags per slide or patient, mean and sd,
and where its attention went.

    python -m jobs.predict_mil --checkpoint <abmil.safetensors> (--embeddings <…>
        [--instances tiles | cells] | --bags <dir> [--source-mpp X]) --output <dir> [--figures]
        [--top 12]

``--bags`` embeds the patients' images with the encoder recorded in the checkpoint's card,
resampled from their own µm/px: ``--source-mpp`` (a figure, or ``auto``: measured on their red
cells), by default the training bags' (the card's ``encoder.source_mpp``), so another lab's
images at another pixel size reach the encoder at its scale. Writes
``<output>/mil_predictions/predictions.parquet`` and prints one JSON line per slide or patient.

``<output>/mil_predictions/attention.parquet`` has a row per tile (its ``x``, ``y``), cell (its
``cell_id``) or image (its ``path``): the attention logit and the relative attention (1: an
average instance of its slide or patient; 3: one weighing three times as much). ``--figures``
draws one PNG per slide (tiles: its thumbnail, and the tiles coloured by their attention's
percentile in the slide; cells: its ``--top`` most and least attended cells, read back from
the slide; both need a process_slides output, whose slides table says where each slide is) or
per patient (its ``--top`` most and least attended images) under ``mil_predictions/figures/``:
what a pathologist checks before trusting the number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import HemeflowError
from engine.errors import MissingWeights
from jobs.common import (add_storage_args, count_arg, fail, job_main, mpp_arg,
                         resolve_source_mpp, storage_from_args)
from jobs.train_mil import add_instances_arg, is_output, load_instances

THUMB_PX = 1024


def _slides(embeddings: str, storage) -> dict[str, dict]:
    """slide_id -> its slides row (uri, width, height, mpp), where ``embeddings`` is a
    process_slides output."""
    if not is_output(embeddings):
        return {}
    from engine.pipeline.commit import read_table

    rows = read_table(embeddings, "slides", columns=["slide_id", "uri", "width", "height",
                                                     "mpp_x"], storage=storage)
    return {r["slide_id"]: r for r in rows.iter_rows(named=True)}


def slide_figure(slide: dict, where: dict, scores: np.ndarray, path: str, title: str,
                 storage) -> None:
    """The slide's thumbnail and its tiles coloured by their attention's percentile."""
    from engine.report.plots import plot_attention_map
    from engine.slides import open_slide

    with open_slide(slide["uri"], storage, keep=False, sparse=True) as reader:
        thumb = reader.read_thumbnail((THUMB_PX, THUMB_PX))
    scale = thumb.shape[1] / slide["width"]
    side = where["tile_px"] * where["mpp"] / slide["mpp_x"] * scale  # level-0 px -> thumbnail
    x0, y0 = where["x"] * scale, where["y"] * scale
    boxes = np.stack([x0, y0, x0 + side, y0 + side], 1).round().astype(int)
    rank = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
    plot_attention_map(thumb, boxes, rank / max(len(scores) - 1, 1), path, title)


def _extremes(scores: np.ndarray, top: int) -> list[tuple[str, np.ndarray]]:
    """The ``top`` most attended instances, and as many least attended of the others."""
    order = np.argsort(-scores, kind="stable")
    return [(label, picked) for label, picked in
            (("most attended", order[:top]),
             ("least attended", order[::-1][:max(0, min(top, len(order) - top))]))
            if len(picked)]


def patient_figure(paths: list[str], scores: np.ndarray, relative: np.ndarray, top: int,
                   encoder: dict, path: str, title: str) -> None:
    """The ``top`` most and least attended images of a patient, as the encoder saw them."""
    from engine.models import get_spec
    from engine.report.plots import plot_cell_gallery
    from engine.train.data import load_cell_images

    spec = get_spec(encoder["model"])
    rows = [(f"{label}\n(relative attention)",
             load_cell_images([paths[i] for i in picked], encoder["source_mpp"],
                              spec.input_mpp, spec.input_px), relative[picked])
            for label, picked in _extremes(scores, top)]
    plot_cell_gallery(rows, path, title=title)


def cell_figure(slide: dict, cells, scores: np.ndarray, relative: np.ndarray, top: int,
                path: str, title: str, storage) -> None:
    """The ``top`` most and least attended cells of a slide, read back from it as the
    classifier saw them, captioned with their call and relative attention. ``cells``: the
    slide's ``cells`` rows in the order of its instances."""
    from engine.report.plots import plot_cell_gallery
    from engine.slides import open_slide
    from jobs.cell_gallery import read_crops

    with open_slide(slide["uri"], storage, keep=False, sparse=True) as reader:
        rows = [(f"{label}\n(call, relative attention)",
                 read_crops(reader, cells[picked], slide["mpp_x"],
                            (slide["width"], slide["height"])),
                 [f"{c} {r:.2f}" for c, r in zip(cells["class_code"].to_numpy()[picked],
                                                 relative[picked])])
                for label, picked in _extremes(scores, top)]
    plot_cell_gallery(rows, path, title=title)


def _cells_in_order(embeddings: str, slide_id: str, cell_ids, storage):
    """A slide's ``cells`` rows (read from its own file) in the order of ``cell_ids``."""
    import polars as pl

    from engine.pipeline.commit import OutputStore

    mine = pl.from_arrow(OutputStore(embeddings, storage).read(
        "cells", ["cell_id", "x", "y", "class_code"], {slide_id}))
    return pl.DataFrame({"cell_id": cell_ids}).join(mine, on="cell_id", how="left",
                                                    maintain_order="left")


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.predict_mil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="process_slides output (folder or s3:// prefix) or "
                                          "a local folder of its tiles tables")
    src.add_argument("--bags", help="folder of <patient_id>/…/<image> single-cell images")
    add_instances_arg(p)
    p.add_argument("--source-mpp", type=mpp_arg,
                   help="µm/px of the --bags images, or auto: measured on their red cells "
                        "(default: the training bags', from the checkpoint's card)")
    p.add_argument("--output", required=True)
    p.add_argument("--n-bags", type=count_arg())
    p.add_argument("--bag-size", type=count_arg())
    p.add_argument("--figures", action="store_true",
                   help="a PNG per slide (attention over its thumbnail) or patient (its most "
                        "and least attended images)")
    p.add_argument("--top", type=count_arg(), default=12,
                   help="images per row of a patient's figure")
    add_storage_args(p)
    args = p.parse_args(argv)
    if args.source_mpp is not None and not args.bags:
        p.error("--source-mpp is the µm/px of --bags images; a run's embeddings were made at "
                "its slides' own")
    from engine.models.mil import attention_scores, load_mil, predict_bags  # torch: not --help

    storage = storage_from_args(args)
    try:
        model, card = load_mil(args.checkpoint, storage)
    except HemeflowError as err:  # missing, pickled or not an ABMIL checkpoint
        return fail(str(err))
    n_bags, bag_size = args.n_bags or card.get("n_bags", 10), args.bag_size or card.get(
        "bag_size", 256)
    slides: dict[str, dict] = {}
    if args.bags:
        enc = card.get("encoder")
        if not enc:
            return fail(f"{args.checkpoint} was trained on slide embeddings, not --bags")
        from engine.bags import embed_patient_bags, find_patient_images

        try:
            images = find_patient_images(args.bags)
            given = enc["source_mpp"] if args.source_mpp is None else args.source_mpp
            enc = {**enc, "source_mpp": resolve_source_mpp(
                given, [p for ps in images.values() for p in ps])}
            if enc["source_mpp"] != card["encoder"]["source_mpp"]:
                print(f"bags at {enc['source_mpp']} µm/px, the training bags' at "
                      f"{card['encoder']['source_mpp']}: each image resampled to the "
                      "encoder's scale from its own", file=sys.stderr)
            bags = embed_patient_bags(images, enc["model"], enc["checkpoint"],
                                      enc["source_mpp"])
        except (FileNotFoundError, MissingWeights, ValueError) as err:
            return fail(str(err))
        where = {pid: {"path": paths} for pid, paths in images.items()}
    else:
        trained_on = card.get("instances") or "tiles"
        if trained_on != args.instances:
            return fail(f"{args.checkpoint} was trained on a slide's {trained_on}; give "
                        f"--instances {trained_on}")
        try:
            found = load_instances(args.embeddings, args.instances,
                                   ("x", "y", "mpp", "tile_px") if args.instances == "tiles"
                                   else ("cell_id",), storage)
        except FileNotFoundError as err:
            return fail(str(err))
        bags, where = {}, {}
        for (sid,), g in found.group_by("slide_id", maintain_order=True):
            bags[sid] = np.asarray(g["embedding"].to_list(), np.float32)
            where[sid] = {c: g[c].to_numpy() for c in g.columns if c not in ("slide_id",
                                                                               "embedding")}
        if args.figures:
            slides = _slides(args.embeddings, storage)
            if not slides:
                return fail("--figures draws on each slide: give the "
                            "process_slides output (its slides table says where each slide "
                            f"is), not a tiles folder ({args.embeddings})")
    key = "patient_id" if args.bags else "slide_id"
    out = os.path.join(args.output, "mil_predictions")
    os.makedirs(os.path.join(out, "figures") if args.figures else out, exist_ok=True)
    rows, attention = [], []
    for sid, bag in sorted(bags.items()):
        pred = predict_bags(model, bag, n_bags, bag_size)
        row = {key: sid, "task": card["task"], "n_bags": pred.n_bags,
               "bag_size": pred.bag_size, "n_instances": len(bag),
               "mean": pred.mean.tolist(), "sd": pred.sd.tolist(),
               "classes": card.get("classes") or None}
        if args.bags:
            row["source_mpp"] = enc["source_mpp"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        scores, relative = attention_scores(model, bag)
        attention.append(pa.table({key: [sid] * len(bag), "instance": np.arange(len(bag)),
                                   **where[sid], "attention_logit": scores,
                                   "relative_attention": relative}))
        if args.figures:
            said = ", ".join(f"{c} {m:.2f}" for c, m in zip(row["classes"] or ["mean"],
                                                             pred.mean))
            png = os.path.join(out, "figures", f"{sid}.png")
            try:
                if args.bags:
                    patient_figure(where[sid]["path"], scores, relative, args.top, enc, png,
                                   f"{sid}: {said}")
                elif sid in slides and args.instances == "cells":
                    cells = _cells_in_order(args.embeddings, sid, where[sid]["cell_id"],
                                            storage)
                    cell_figure(slides[sid], cells, scores, relative, args.top, png,
                                f"{sid}: {said}", storage)
                elif sid in slides:
                    slide_figure(slides[sid], where[sid], scores, png, f"{sid}: {said}",
                                 storage)
            except (OSError, ValueError, HemeflowError) as err:  # a slide moved since the run
                # (or a bad image): said, and the predictions are written all the same
                print(f"{sid}: no figure ({type(err).__name__}: {err})", file=sys.stderr)
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, "predictions.parquet"))
    if attention:
        pq.write_table(pa.concat_tables(attention), os.path.join(out, "attention.parquet"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
