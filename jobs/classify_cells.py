"""Classify single-cell image exports (CellaVision style) with the DeepHeme classifier: a cell
table and a differential per exported slide, committed slide by slide as process_slides does.

    python -m jobs.classify_cells --images <dir | s3://…>/<slide>/…/<image> --output <dir | s3://…>
        [--specimen blood|aspirate] [--source-mpp 0.1 | auto] [--checkpoint …] [--tta]
        [--cases <slide,case CSV>]

Each sub-folder of ``--images`` is one exported slide (or patient). The images anywhere below
it are its cells; the folder an image lies in, where deeper than the slide's, is kept as its
``source_label`` (the analyser's own pre-classification, to set beside the model's call).
Images are resampled from ``--source-mpp`` to the model's µm/px, as in training.

Per slide, under ``--output``: ``slides/`` (the export), ``image_cells/`` (one row per image:
class, probabilities, distance to the training data), ``differentials/`` (as process_slides
writes them: a blood film over white cells with NRBC per 100, an aspirate over all nucleated
cells; images out of focus, `engine.focus`, left out of the counts and reported) and, last,
``slide_status/`` (the commit). A rerun skips committed slides and removes a crash's leftovers.
An export whose images changed as it was read (still being exported or copied) is not
committed, so the next run classifies it whole.
An unreadable image is left out and named in the slide's warnings; a slide with no readable
image is a ``failed`` status row with the reason. ``jobs.slide_summary`` reads the output as it
reads process_slides'. ``--cases`` records the case (accession) of each export it names (by
folder name, path or slide_id) in the slides table, and ``jobs.case_differentials`` pools them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import shlex
import sys
import time

import numpy as np

from engine import results_release
from engine.models import list_models
from engine.pixel_size import RedCellSize, red_cell_diameters, red_cell_size
from engine.schema import EXPORT_FORMAT
from engine.specimen import SMEARS, UNKNOWN
from jobs.common import (add_storage_args, count_arg, fail, find_exports, image_source, job_main,
                         limits_arg, mpp_arg, or_none, percent_arg, positive_arg, put_in_case,
                         refuse_another_jobs_output, resolve_source_mpp, storage_from_args)


def source_label(path: str, folder: str) -> str | None:
    """The folder ``path`` lies in, where that is below the slide's ``folder`` (None directly in
    it). Both absolute paths or URIs of one storage."""
    parent = path.rsplit("/", 1)[0]
    return None if parent == folder.rstrip("/") else parent.rsplit("/", 1)[-1]


READ_TIMEOUT_S = 600.0  # an image whose read has gone on this long hangs (`read_images`)


class _Hung(str):
    """`read_images`' reason for an image whose read was given up on."""


def read_images(paths: list[str], source_mpp: float, spec, threads: int | None = None,
                storage=None) -> tuple[list[int], np.ndarray, list[str], RedCellSize]:
    """``(indices of the readable paths, their crops (N, px, px, 3) uint8, reasons of the
    others as 'name: error', the red cells around the cells)``; decoded in ``threads`` (PIL
    releases the GIL to decode). The red cells are measured on each whole image at
    ``source_mpp`` (`engine.pixel_size`), which checks that pixel size. An image whose read
    has not ended after ``READ_TIMEOUT_S`` is given up on as unreadable, where it held the
    job for ever (`engine.watchdog.in_time`); ``HUNG_IN_A_ROW`` in a row stop the job: the
    storage has stopped answering (`engine.errors.StorageStalled`)."""
    from PIL import Image

    from engine.errors import hung_in_a_row
    from engine.pipeline.progress import duration
    from engine.train.data import cell_crop
    from engine.watchdog import in_time

    def one(path):
        try:
            with Image.open(image_source(path, storage)) as im:
                rgb = np.asarray(im.convert("RGB"))
        # PIL: unreadable or truncated file; or past the size it decodes (a bomb, it says)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return f"{os.path.basename(path)}: {err}"
        return cell_crop(rgb, source_mpp, spec.input_mpp, spec.input_px), \
            red_cell_diameters(rgb)

    def hung(path, seconds: float) -> str:
        return _Hung(f"{os.path.basename(path)}: its read had not ended after "
                     f"{duration(seconds)}")

    results, in_a_row = [], []
    for path, r in zip(paths, in_time(one, paths, threads or min(8, os.cpu_count() or 1),
                                      READ_TIMEOUT_S, hung, "images")):
        results.append(r)
        # a mount that stopped answering, not the images
        in_a_row = hung_in_a_row(in_a_row, path, isinstance(r, _Hung),
                                 what="images' reads hung in a row", left="image")
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    crops = [results[i][0] for i in ok]
    bad = [r for r in results if isinstance(r, str)]
    px = spec.input_px
    return ok, np.stack(crops) if crops else np.zeros((0, px, px, 3), np.uint8), bad, \
        red_cell_size((results[i][1] for i in ok), source_mpp)


def export_cases(uri: str, storage, folders: dict[str, str], ids: dict[str, str]
                 ) -> tuple[dict[str, str], list[str]]:
    """``(export name -> case, names the sheet gives that are no export)`` from a ``slide,case``
    sheet (`jobs.case_differentials.read_case_sheet`) naming exports by folder name, path or
    slide_id.

    Raises:
        ValueError: the sheet lacks a slide or case column, or puts an export in two cases.
    """
    from jobs.case_differentials import read_case_sheet

    sheet, key = read_case_sheet(uri, storage)
    names = {k: name for name, folder in folders.items() for k in (name, folder, ids[name])}
    cases: dict[str, str] = {}
    unknown = []
    for r in sheet:
        given, case = (r.get(key) or "").strip(), (r.get("case") or "").strip()
        if not given or not case:
            continue
        if given not in names:
            unknown.append(given)
        else:
            try:
                put_in_case(cases, names[given], case, given)
            except ValueError as err:
                raise ValueError(f"{uri}: {err}") from None
    return cases, unknown


def export_files(folder: str, storage) -> dict[str, tuple]:
    """The images below an export's ``folder`` now (hidden files and folders left out, as
    `jobs.common.find_exports` lists them), each with its size and its modification time, or
    on S3 its ETag: what tells an export still being written (`export_changed`)."""
    from engine.bags import images_below, is_image_path
    from engine.slides.storage import get_filesystem, is_remote, object_etag

    if not is_remote(folder):
        found = {}
        for path in images_below(folder):
            with contextlib.suppress(OSError):  # gone meanwhile: not there now
                st = os.stat(path)
                found[path] = (st.st_size, st.st_mtime_ns)
        return found
    fs, base = get_filesystem(folder, storage)
    base, protocol = base.rstrip("/"), folder.split("://", 1)[0]
    fs.invalidate_cache(base)
    return {f"{protocol}://{key}": (info.get("size"), object_etag(info))
            for key, info in fs.find(base, detail=True).items()
            if is_image_path(key[len(base) + 1:].split("/"))}


def export_changed(before: dict[str, tuple], after: dict[str, tuple]) -> str | None:
    """How an export's images changed between two `export_files`, in words, or None."""
    added, gone = after.keys() - before.keys(), before.keys() - after.keys()
    changed = sum(1 for p in before.keys() & after.keys() if before[p] != after[p])
    said = [f"{n} image(s) {what}" for n, what in ((len(added), "added"), (len(gone), "removed"),
                                                   (changed, "rewritten")) if n]
    return ", ".join(said) or None


def classify_slide(sid: str, folder: str, paths: list[str], predictor, args,
                   case: str | None = None) -> tuple[dict, dict]:
    """One export's tables (``slides``, ``image_cells``, ``differentials``) and its status row;
    ``case``: the case it belongs to."""
    import engine
    from engine.classes import get_class
    from engine.differential import compute_differential, differential_rows, review_warnings
    from engine.focus import edge_blur_um
    from engine.stain import StainCheck, nuclear_colour, stain_summary

    t0, started = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    model = predictor.model
    ok, crops, bad, red = read_images(paths, args.source_mpp, model.spec, storage=args.storage)
    status = {"slide_id": sid, "uri": folder, "status": "ok", "n_tiles": None,
              "n_cells": len(ok), "stages": [f"cell_classification:{model.spec.name}",
                                             "differential"],
              "skipped_stages": [], "started_at": started, "engine_version": engine.__version__,
              "config_hash": args.config_hash, "warnings": []}
    slide = {"slide_id": sid, "uri": folder, "specimen": args.specimen, "case": case,
             "format": EXPORT_FORMAT,
             "status": "ok", "notes": f"{len(paths)} images, {len(bad)} unreadable",
             "mpp_x": args.source_mpp, "mpp_y": args.source_mpp, "mpp_source": args.mpp_source,
             "inventoried_at": started}
    tables = {"slides": [slide]}  # a failed slide has no cell or differential rows
    if bad:
        status["warnings"].append(f"unreadable_images: {len(bad)} of {len(paths)} left out "
                                  f"({'; '.join(bad[:3])}{'; …' if len(bad) > 3 else ''})")
    if not ok:
        status.update(status="failed", error_type="NoReadableImages", n_cells=0,
                      error_message=f"none of the {len(paths)} images could be read "
                                    f"({'; '.join(bad[:3])})")
        slide.update(status="failed", error_type="NoReadableImages",
                     error_message=status["error_message"])
    else:
        probs, distance = predictor.predict_with_distance(crops, tta=args.tta)
        codes = np.asarray(model.class_codes)[probs.argmax(1)]
        density = predictor.ood
        far = (distance > density.threshold) if distance is not None else None
        blur = edge_blur_um(crops, model.spec.input_mpp)  # NaN: no edge to measure
        blurred = blur > args.max_blur_um
        tables["image_cells"] = [
            {"slide_id": sid, "cell_id": j, "path": paths[i][len(folder.rstrip("/")) + 1:],
             "source_label": source_label(paths[i], folder),
             "blur_um": None if np.isnan(blur[j]) else float(blur[j]),
             "out_of_focus": None if np.isnan(blur[j]) else bool(blurred[j]),
             "class_code": str(codes[j]),
             "class_prob": float(probs[j].max()), "probabilities": probs[j].tolist(),
             "model_codes": list(model.class_codes),
             "ood_distance": None if distance is None else float(distance[j]),
             "out_of_distribution": None if far is None else bool(far[j])}
            for j, i in enumerate(ok)]
        counted = np.array([get_class(c).nucleated and (args.count_out_of_focus or not f)
                            for c, f in zip(codes, blurred)], bool)  # what the differential counts
        d = compute_differential(codes.tolist(), model.class_codes, args.min_nucleated,
                                 None if far is None else far.tolist(), args.max_ood_percent,
                                 blood=args.specimen == "blood", out_of_focus=blurred.tolist(),
                                 max_out_of_focus_percent=args.max_out_of_focus_percent,
                                 count_out_of_focus=args.count_out_of_focus,
                                 red_cells=(red.n_cells, red.diameter_um),
                                 stain=stain_summary(nuclear_colour(crops[counted],
                                                                    model.spec.input_mpp)))
        tables["differentials"] = differential_rows(sid, d)
        check = StainCheck.of(model.card, args.max_stain_hue_deg,
                              args.min_stain_saturation_ratio)
        status["warnings"] += [f"{k}: {v}" for k, v in review_warnings(
            d, args.min_nucleated, args.red_cell_diameter_um, check).items()]
    status.update(finished_at=dt.datetime.now(dt.timezone.utc),
                  seconds=round(time.perf_counter() - t0, 3))
    return tables, status


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.classify_cells", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True,
                   help="local folder or s3:// prefix with one sub-folder per exported slide: "
                        "<slide>/…/<image>")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--specimen", choices=sorted(SMEARS | {UNKNOWN}), default=UNKNOWN,
                   help="blood: counted over white cells, NRBC per 100 of them; aspirate or "
                        "unknown: over all nucleated cells, with the M:E ratio")
    p.add_argument("--source-mpp", type=mpp_arg, default=0.1,
                   help="µm/px of the images, or auto: measured on their red cells")
    p.add_argument("--model", default="deepheme-resnext50", choices=list_models())
    p.add_argument("--checkpoint", help="default: the model's shipped checkpoint")
    p.add_argument("--tta", action="store_true", help="average over 8 flips and rotations")
    p.add_argument("--batch-size", type=count_arg(), default=128)
    p.add_argument("--min-nucleated", type=count_arg(0), default=200,
                   help="fewer counted cells than this flags the differential low_count")
    p.add_argument("--max-ood-percent", type=percent_arg, default=20.0,
                   help="more nucleated cells than this %% outside the training data flags it")
    p.add_argument("--max-blur-um", type=positive_arg, default=0.3,
                   help="an image blurred more than this (edge Gaussian sigma, µm, at the "
                        "model's µm/px) is out_of_focus and left out of the differential")
    p.add_argument("--count-out-of-focus", action="store_true",
                   help="count the images out of focus in the differential too")
    p.add_argument("--max-out-of-focus-percent", type=percent_arg, default=20.0,
                   help="more nucleated cells than this %% out of focus flags the slide")
    p.add_argument("--red-cell-diameter-um", type=limits_arg, default=(5.0, 10.5),
                   metavar="LOW,HIGH", help="the images' red cells, measured at --source-mpp, "
                   "with a median diameter outside this range (µm) flag the export pixel_size: "
                   "its pixel size is likely wrong (default 5,10.5; none: no check)")
    p.add_argument("--max-stain-hue-deg", type=or_none(positive_arg), default=10.0,
                   metavar="DEG", help="nucleated cells' nuclei (their median) further in hue "
                   "from the model's training stain flag the export stain (none: no check)")
    p.add_argument("--min-stain-saturation-ratio", type=or_none(positive_arg), default=0.75,
                   metavar="X", help="as do nuclei paler than this share of its saturation "
                   "(none: no check)")
    p.add_argument("--cases", help="CSV: a slide column (an export's folder name, path or "
                                   "slide_id) and a case column, recorded in the slides table")
    p.add_argument("--allow-untrained", action="store_true", help="random weights (tests only)")
    add_storage_args(p)
    args = p.parse_args(argv)

    from engine.classes import DEEPHEME_CODES
    from engine.models import UNTRAINED_SEED, CheckpointError, MissingWeights, create_model
    from engine.pipeline.commit import OutputStore, RunLease

    storage = args.storage = storage_from_args(args)
    try:
        exports = find_exports(args.images, storage)
        args.mpp_source = "red cells (--source-mpp auto)" if args.source_mpp == "auto" else \
            "--source-mpp"
        args.source_mpp = resolve_source_mpp(args.source_mpp,
                                             [x for ps in exports.values() for x in ps], storage)
        model = create_model(args.model, args.checkpoint, allow_untrained=args.allow_untrained,
                             class_codes=DEEPHEME_CODES, storage=storage,
                             seed=UNTRAINED_SEED)
    except (FileNotFoundError, ValueError, MissingWeights, CheckpointError) as err:
        return fail(err)
    settings = {"model": args.model, "weights": model.weights, "source_mpp": args.source_mpp,
                "specimen": args.specimen, "tta": args.tta, "min_nucleated": args.min_nucleated,
                "max_ood_percent": args.max_ood_percent, "max_blur_um": args.max_blur_um,
                "count_out_of_focus": args.count_out_of_focus,
                "max_out_of_focus_percent": args.max_out_of_focus_percent,
                # a list, as the output's JSON gives it back to a rerun's comparison
                "red_cell_diameter_um": args.red_cell_diameter_um and
                list(args.red_cell_diameter_um),
                "max_stain_hue_deg": args.max_stain_hue_deg,
                "min_stain_saturation_ratio": args.min_stain_saturation_ratio,
                # outputs before 0.2.0 lack it: their reruns are refused, as another release's
                "engine_release": results_release()}
    args.config_hash = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    store = OutputStore(args.output, storage)
    with RunLease(store, "classify_cells"):  # refused while another run writes there
        return classify_into(store, args, settings, exports, model)


def classify_into(store, args, settings: dict, exports: dict[str, list[str]], model) -> int:
    """Classify the exports not yet committed in ``store`` and commit them slide by slide;
    refuses an output classified with other ``settings``."""
    from engine.models import EnsemblePredictor
    from engine.outputs import join_uri, write_bytes
    from engine.pipeline.progress import Progress
    from engine.schema import SCHEMA_VERSION, slide_id_for
    from engine.slides.storage import InputError, normalize_uri

    storage = args.storage
    refuse_another_jobs_output(store.root, storage, "classify_cells")
    config_path = f"{store.path.rstrip('/')}/config.json"
    if store.fs.exists(config_path):
        with store.fs.open(config_path) as fh:
            earlier = json.load(fh)
        if earlier.get("config_hash") != args.config_hash:
            changed = {k: (earlier.get("settings", {}).get(k), v) for k, v in settings.items()
                       if earlier.get("settings", {}).get(k) != v}
            return fail(f"{store.root} was classified with other settings ("
                        + ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                        + "): its slides would mix the two; give another --output")
    removed = store.clean_partial()
    if note := store.foreign_note():
        print(note, file=sys.stderr, flush=True)
    done = store.committed()
    root = normalize_uri(args.images)
    folders = {name: f"{root}/{name}" for name in exports}
    ids = {name: slide_id_for(folder) for name, folder in folders.items()}
    pending = [name for name in exports if ids[name] not in done]
    try:
        cases, unknown = export_cases(args.cases, storage, folders, ids) if args.cases else \
            ({}, [])
    except (FileNotFoundError, InputError, ValueError) as err:
        return fail(err)
    if unknown:
        print(f"{args.cases}: {len(unknown)} slide(s) are no export under {root}: "
              f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}", file=sys.stderr)
    print(f"{len(exports)} exported slide(s) under {root}: {len(exports) - len(pending)} already "
          f"committed, {len(pending)} to classify"
          + (f"; removed the partial tables of {len(removed)} uncommitted" if removed else ""),
          flush=True)
    if args.specimen == UNKNOWN:
        print("specimen unknown: counted over all nucleated cells, with an M:E ratio; a blood "
              "film's export wants --specimen blood (over white cells, NRBC per 100 of them)",
              flush=True)
    write_bytes(join_uri(store.root, "config.json"), json.dumps(
        {"job": "classify_cells", "settings": settings, "config_hash": args.config_hash,
         "schema_version": SCHEMA_VERSION}, indent=2, default=str).encode(), storage)
    predictor = EnsemblePredictor([model], chunk=args.batch_size)
    progress = Progress(len(pending))
    counts = {"ok": 0, "failed": 0, "being written": 0}
    for k, name in enumerate(pending, 1):
        listed = export_files(folders[name], storage)
        tables, status = classify_slide(ids[name], folders[name], sorted(listed) or exports[name],
                                        predictor, args, cases.get(name))
        why = export_changed(listed, export_files(folders[name], storage))
        if why:  # an export copied as it was read: its differential would lack the rest
            print(f"warning: {name}: {why} as it was read: still being written (an export or "
                  "a copy under way?); not committed, so the next run classifies it",
                  flush=True)
            counts["being written"] += 1
            continue
        store.commit(ids[name], tables, status)
        counts[status["status"]] += 1
        diff = tables.get("differentials", [{}])[0]
        blast = diff.get("blast_percent")
        print(f"{name}: {status['status']}, {status['n_cells']} cells"
              + (f", blast {blast:.1f} %" if blast is not None else "")
              + (f" ({status['error_message']})" if status.get("error_message") else "")
              + "".join(f"; {w.split(':')[0]}" for w in status["warnings"])
              + f" [{k}/{len(pending)}]", flush=True)
        if line := progress.tick():
            print(line, flush=True)
    print(f"{counts['ok']} ok, {counts['failed']} failed"
          + (f", {counts['being written']} being written (not committed)"
             if counts["being written"] else "")
          + f" of {len(pending)} classified; tables "
          f"under {store.root}/<slides|image_cells|differentials|slide_status>/; a row per "
          f"slide: python -m jobs.slide_summary --output {shlex.quote(store.root)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
