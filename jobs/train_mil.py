"""Train attention-MIL (gated ABMIL) on slide tile embeddings or per-patient cell-image bags.

    python -m jobs.train_mil --task regression --labels labels.csv --embeddings <process_slides
        output or its tiles folder> [--instances tiles | cells] --output <dir> [--folds 5]
        [--epochs 60]
    python -m jobs.train_mil --task classification --labels patients.csv --bags <dir> --output <dir>

Labels CSV: ``slide_id`` (or ``patient_id`` with ``--bags``) and ``label``: a cellularity number
(percent or fraction), a range such as ``50-60%`` (its midpoint), or a class name for ``--task
classification``. ``--bags``: ``<dir>/<patient_id>/…/*.jpg`` single-cell images, each embedded by
``--encoder`` (default: the reference DeepHeme checkpoint's penultimate features; ``engine.bags``).
Bags are split by slide or patient into k folds; the report gives R² and a Bland-Altman plot
(regression) or AUC, F1 and a confusion matrix (classification); the model trained on all slides
is written as ``<output>/abmil.safetensors`` with its card, ready for
``pipeline.cellularity_checkpoint``. ``--output`` may be an ``s3://`` prefix (with the ``--s3-*``
flags): the report, plot and checkpoint go there, and Ray Train's checkpoints to
``<output>/runs/``, which every node of a cluster reaches.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import polars as pl

from engine.errors import MissingWeights
from engine.outputs import join_uri, write_bytes
from engine.slides.storage import get_filesystem, is_remote, normalize_uri, remove
from jobs.common import (InputError, add_storage_args, count_arg, job_main, mpp_arg, positive_arg,
                         read_csv_rows, resolve_source_mpp, storage_from_args)


def parse_label(text: str, task: str):
    """``"55"``/``"0.55"``/``"50-60%"`` -> fraction in [0, 1] (regression); else the text."""
    if task == "classification":
        return text.strip()
    nums = [float(v) for v in re.findall(r"\d+(?:\.\d+)?", text)]
    if not nums:
        raise ValueError(f"no number in cellularity label {text!r}")
    value = sum(nums[:2]) / len(nums[:2])
    return value / 100 if ("%" in text or value > 1) else value


def read_bag_labels(uri: str, key: str, task: str, have, storage
                    ) -> tuple[list[str], list, list[str]]:
    """A ``<key>,label`` sheet (`jobs.common.read_csv_rows`: a local file or ``s3://``) as
    ``(ids, labels, missing)``: each labelled id with instances in ``have`` once, its label
    parsed (`parse_label`), and the labelled ids without instances. A row with no label is not
    labelled.

    Raises:
        ValueError: no ``key`` or ``label`` column, labels that are no cellularity (with
            their lines), or one id labelled twice differently.
    """
    rows = read_csv_rows(uri, storage)
    if not rows or key not in rows[0] or "label" not in rows[0]:
        raise ValueError(f"{uri}: needs a {key} column and a label column; columns: "
                         f"{', '.join(rows[0]) if rows else 'none (no rows)'}")
    seen: dict[str, tuple[int, object]] = {}
    bad = []
    for line, r in enumerate(rows, 2):
        bag, text = (r[key] or "").strip(), (r["label"] or "").strip()
        if not bag or not text:
            continue
        try:
            value = parse_label(text, task)
        except ValueError:
            bad.append(f"line {line} {text!r}")
            continue
        if bag in seen and seen[bag][1] != value:
            raise ValueError(f"{uri}: {bag} is labelled twice, differently (lines "
                             f"{seen[bag][0]} and {line}): settle it on one")
        seen.setdefault(bag, (line, value))
    if bad:
        raise ValueError(f"{uri}: {len(bad)} label(s) with no number, which a cellularity "
                         f"needs (55, 0.55, 50-60%): {'; '.join(bad[:3])}"
                         f"{'; …' if len(bad) > 3 else ''}")
    ids = [b for b in seen if b in have]
    return ids, [seen[b][1] for b in ids], [b for b in seen if b not in have]


# the instances of a slide's bag: its tiles' embeddings or its cells' features (the table,
# and the column of vectors in it)
INSTANCES = {"tiles": ("tiles", "embedding"), "cells": ("cell_features", "features")}


def is_output(embeddings: str) -> bool:
    """Whether ``embeddings`` is a process_slides output: an ``s3://`` prefix (only an output
    is read from S3), or a folder with ``slide_status``."""
    return is_remote(embeddings) or os.path.isdir(os.path.join(embeddings, "slide_status"))


def load_instances(embeddings: str, instances: str = "tiles",
                   columns: tuple[str, ...] = (), storage=None) -> pl.DataFrame:
    """The instances (``tiles``: embedded tiles; ``cells``: cells with features) of a
    process_slides output folder or ``s3://`` prefix (its committed slides), or of a local
    folder of such tables (or one holding the table's folder), in file order: ``slide_id``,
    those of ``columns`` the tables have, and the vectors as ``embedding``. From a
    process_slides output, a slide's cells are those its differential counts: nucleated
    detections, less those out of focus (`engine.focus`), whose features are not the cell's.

    Raises:
        FileNotFoundError: no such table there (``cells``: the run had no
            ``pipeline.classifier.features``).
    """
    table, vectors = INSTANCES[instances]
    want = ["slide_id", *columns, vectors]
    if is_output(embeddings):
        from engine.pipeline.commit import read_table

        key = ["slide_id", "cell_id"]
        df = read_table(embeddings, table, columns=list(dict.fromkeys(
            want + (key if instances == "cells" else []))), storage=storage)
        if instances == "cells":  # the cells the differential counts
            cells = read_table(embeddings, "cells", columns=[*key, "kind", "out_of_focus"],
                               storage=storage, optional=("lobe_of",))
            left_out = cells.filter(pl.col("out_of_focus").fill_null(False)
                                    | (pl.col("kind") != "nucleated")
                                    | (pl.col("lobe_of").is_not_null() if "lobe_of" in
                                       cells.columns else False))
            df = df.join(left_out.select(key), on=key, how="anti", maintain_order="left")
            df = df.select([c for c in df.columns if c in want])
    else:
        folder = os.path.join(embeddings, table)
        folder = folder if os.path.isdir(folder) else embeddings
        # listed, not globbed: a folder named like "run [2]" is no glob's character class
        files = sorted(os.path.join(folder, name) for name in (
            os.listdir(folder) if os.path.isdir(folder) else ()) if name.endswith(".parquet"))
        try:
            if not files:
                raise FileNotFoundError(f"no .parquet file in {folder}")
            scan = pl.scan_parquet(files, glob=False)
            have = scan.collect_schema().names()
        except (FileNotFoundError, pl.exceptions.ComputeError) as err:
            raise FileNotFoundError(f"no {table} tables under {embeddings} ({err})") from err
        df = scan.select([c for c in want if c in have]).collect()
    return df.rename({vectors: "embedding"}).filter(pl.col("embedding").is_not_null())


def load_bags(embeddings: str, instances: str = "tiles", storage=None
              ) -> dict[str, np.ndarray]:
    """slide_id -> ``(n_instances, D)``, from what `load_instances` reads."""
    df = load_instances(embeddings, instances, storage=storage)
    return {sid: np.asarray(g["embedding"].to_list(), np.float32)
            for (sid,), g in df.group_by("slide_id", maintain_order=True)}


def add_instances_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instances", choices=sorted(INSTANCES), default="tiles",
                   help="with --embeddings, a slide's bag: its tiles' embeddings, or its "
                        "cells' features (a run with pipeline.classifier.features)")


def add_bag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default="deepheme-resnext50",
                   help="cell encoder for --bags (its penultimate features)")
    p.add_argument("--encoder-checkpoint", help="weights of --encoder (default: its reference)")
    p.add_argument("--source-mpp", type=mpp_arg, default=0.1,
                   help="µm/px of the --bags images (CellaVision: about 0.1), or auto: measured "
                        "on their red cells")
    p.add_argument("--allow-untrained", action="store_true",
                   help="random encoder weights (tests and benchmarks only)")


def load_inputs(args) -> dict[str, np.ndarray]:
    """Bag id -> instances, from ``--embeddings`` (slides) or ``--bags`` (patients)."""
    if not args.bags:
        return load_bags(args.embeddings, args.instances, storage_from_args(args))
    from engine.bags import embed_patient_bags, find_patient_images

    images = find_patient_images(args.bags)
    # the figure the model card records (predict_mil resamples new bags with it)
    args.source_mpp = resolve_source_mpp(args.source_mpp, [p for ps in images.values() for p in ps])
    return embed_patient_bags(images, args.encoder,
                              args.encoder_checkpoint, args.source_mpp,
                              allow_untrained=args.allow_untrained)


@job_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train_mil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("regression", "classification"), required=True)
    p.add_argument("--labels", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", help="process_slides output (folder or s3:// prefix) or "
                                          "a local folder of its tiles tables")
    src.add_argument("--bags", help="folder of <patient_id>/…/<image> single-cell images")
    add_instances_arg(p)
    add_bag_args(p)
    p.add_argument("--output", required=True, help="folder or s3:// prefix")
    p.add_argument("--folds", type=count_arg(), default=5)
    p.add_argument("--epochs", type=count_arg(), default=60)
    p.add_argument("--lr", type=positive_arg, default=2e-4)
    p.add_argument("--bag-size", type=count_arg(), default=256)
    p.add_argument("--n-bags", type=count_arg(), default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per fit")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    add_storage_args(p)
    args = p.parse_args(argv)
    from engine.models.mil import predict_bags, save_mil  # torch: not for --help

    storage = storage_from_args(args)
    args.output = normalize_uri(args.output) if is_remote(args.output) else \
        os.path.abspath(args.output)
    try:
        bags = load_inputs(args)
    except (FileNotFoundError, MissingWeights, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    key = "patient_id" if args.bags else "slide_id"
    try:
        ids, raw, missing = read_bag_labels(args.labels, key, args.task, bags, storage)
    except (InputError, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    where = args.bags or args.embeddings
    if missing:
        print(f"hemeflow: {len(missing)} labelled {key}(s) have no instances in {where}, left "
              f"out: {', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}",
              file=sys.stderr)
    if len(ids) < 2:
        print(f"hemeflow: error: fewer than 2 labelled {key}s have instances in {where}",
              file=sys.stderr)
        return 2
    classes = sorted(set(raw)) if args.task == "classification" else []
    if args.task == "classification" and len(classes) < 2:
        print(f"hemeflow: error: every labelled {key} with instances is {classes[0]!r}: a "
              f"classifier needs two classes or more", file=sys.stderr)
        return 2
    y = np.array([classes.index(v) for v in raw] if classes else raw, float)
    X = [bags[i] for i in ids]
    kw = dict(task=args.task, n_classes=max(len(classes), 1), epochs=args.epochs, lr=args.lr,
              bag_size=args.bag_size, seed=args.seed)
    fit = _fitter(args, kw, storage)
    from sklearn.model_selection import KFold, StratifiedKFold

    k = min(args.folds, len(ids))
    split = (StratifiedKFold(k, shuffle=True, random_state=args.seed).split(ids, y)
             if classes else KFold(k, shuffle=True, random_state=args.seed).split(ids))
    oof = np.zeros((len(ids), max(len(classes), 1)))
    for k_fold, (tr, te) in enumerate(split):
        model = fit([X[i] for i in tr], y[tr], f"fold-{k_fold}")
        for i in te:
            oof[i] = predict_bags(model, X[i], args.n_bags, args.bag_size).mean
    report = {"task": args.task, "n_bags": len(ids), "bag_key": key, "folds": k}
    if classes:
        from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

        pred = oof.argmax(1)
        report.update(classes=classes, macro_f1=float(f1_score(y, pred, average="macro")),
                      auc=float(roc_auc_score(y, oof[:, 1]) if len(classes) == 2 else
                                roc_auc_score(y, oof, multi_class="ovr")),
                      confusion_matrix=confusion_matrix(y, pred).tolist())
    else:
        from sklearn.metrics import r2_score

        report.update(r2=float(r2_score(y, oof[:, 0])),
                      mean_abs_error_points=float(np.abs(oof[:, 0] - y).mean() * 100))
        from engine.report.plots import plot_bland_altman

        png = io.BytesIO()
        plot_bland_altman({"cellularity": (y * 100, oof[:, 0] * 100)}, png,
                          suptitle="out-of-fold prediction against the label")
        write_bytes(join_uri(args.output, "bland_altman.png"), png.getvalue(), storage)
    model = fit(X, y, "final")
    save_mil(model, join_uri(args.output, "abmil.safetensors"),
             {"name": "abmil", "classes": classes,
              "labels": normalize_uri(args.labels) if is_remote(args.labels)
              else os.path.abspath(args.labels),
              "input": "bags" if args.bags else "embeddings",
              "instances": None if args.bags else args.instances,
              "embeddings": (normalize_uri(args.embeddings) if args.embeddings else None),
              "bags": os.path.abspath(args.bags) if args.bags else None,
              "encoder": {"model": args.encoder, "checkpoint": args.encoder_checkpoint,
                          "source_mpp": args.source_mpp} if args.bags else None,
              "cross_validation": report, "n_bags": args.n_bags, "bag_size": args.bag_size},
             storage)
    write_bytes(join_uri(args.output, "report.json"), json.dumps(report, indent=2).encode(),
                storage)
    print(json.dumps(report))
    return 0


def _fitter(args, kw: dict, storage):
    """``fit(bags, targets, name) -> model``: in this process (``--local``) or on Ray Train,
    checkpointing to ``<output>/runs`` (an ``s3://`` output: where every node writes)."""
    if args.local:
        from engine.train.mil import train_mil

        return lambda bags, targets, name: train_mil(bags, targets, **kw)[0]
    import ray

    from engine.pipeline.train import run_ray_training, start_ray
    from engine.train.mil import load_trained, mil_train_loop

    runs = join_uri(args.output, "runs")
    if is_remote(runs):  # a new job: never resume a fit on other data
        fs, path = get_filesystem(runs, storage)
        if fs.exists(path):
            remove(fs, path, recursive=True)
    else:
        shutil.rmtree(runs, ignore_errors=True)

    def fit(bags, targets, name):
        start_ray(log_to_driver=False)
        config = {**kw, "bags": ray.put(bags), "targets": np.asarray(targets)}
        ckpt, _ = run_ray_training(mil_train_loop, config, num_workers=args.workers,
                                   use_gpu=False, storage_path=runs, name=name,
                                   storage=storage)
        try:
            return load_trained({**config, "bags": bags}, ckpt)
        finally:
            if is_remote(runs):  # a local copy of the last checkpoint (run_ray_training)
                shutil.rmtree(ckpt, ignore_errors=True)

    return fit


if __name__ == "__main__":
    sys.exit(main())
