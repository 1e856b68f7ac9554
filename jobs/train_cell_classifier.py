"""Train the DeepHeme cell classifier on labelled single-cell images (Ray Train, or --local).

    python -m jobs.train_cell_classifier --data <dir | s3:// prefix with labels.csv: path,code>
        [--data <another: trained on as one>] --output <dir | s3://bucket/prefix>
        [--s3-endpoint URL] [--folds K] [--epochs N] [--arch deepheme-resnext50] [--workers 2]
        [--source-mpp 0.1]

Steps: hold out a stratified test split (written to <output>/test/labels.csv), bring images to the
model's µm/px, train K fold models (K=1: one model with a validation split) with class balancing by
up-sampling, augmentation, Adam + step decay and early stopping, then evaluate each fold and their
average on the test split. Every model is written as fp16 safetensors with a JSON card;
<output>/model.safetensors is the ensemble's first member when K=1, and <output>/fold-*/ hold all.
A killed worker is replaced and resumes from its last epoch. Rerunning the same command resumes:
folds already written under the same settings and data are kept (`reusable_fold`), and an
interrupted fold goes on from its last epoch. The data is identified by `LabelledImages.digest`
(each row's image source, size and modification time, code and group): a rerun into the same
output after relabelling, or with other images, prepares the split again and trains every fold
again, in run folders of their own (`fold_key`).
With an ``s3://`` output the job works in a local folder (``--work``; by default one named after
the output, so a rerun on the same machine resumes) and uploads the checkpoints, cards, the test
list and ``evaluation.json`` when it ends; Ray Train's workers write their epoch checkpoints to
``<output>/runs/`` (on a cluster a worker on another node cannot reach the driver's disk), and
read the prepared images through Ray's object store. ``--teacher`` may also name an ``s3://``
checkpoint.
An ``s3://`` ``--data`` is mirrored into a local cache first (only what changed is fetched on a
rerun; `engine.train.data.fetch_labelled`), and the test list names its images by their URIs.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime as dt
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

from typing import TYPE_CHECKING

import numpy as np

import engine
from engine.classes import covers, get_class, ordered_codes
from engine.models import get_spec, list_models  # the registry: torch is imported in main
from engine.outputs import join_uri, write_bytes
from engine.slides.storage import is_remote, normalize_uri
from engine.train import COMPILE_MODES
from engine.train.data import fetch_labelled, read_labels, source_of
from jobs.common import (add_data_arg, add_storage_args, count_arg, job_main, labelled_data,
                         mpp_arg, pack_or_given_mpp, positive_arg, read_data, read_pack,
                         storage_from_args)

if TYPE_CHECKING:
    from engine.models.factory import LoadedModel


DEFAULT_BATCH = 128  # --batch-size where the data holds enough


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.train_cell_classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arg(p, "folder or s3:// prefix with labels.csv (path,code)")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix")
    p.add_argument("--work", help="local working folder for an s3:// output (default: "
                                  "<temp dir>/hemeflow-train-<hash of the output>)")
    p.add_argument("--arch", default="deepheme-resnext50", choices=list_models())
    p.add_argument("--folds", type=count_arg(), default=1)
    p.add_argument("--epochs", type=count_arg(), default=40)
    p.add_argument("--batch-size", type=count_arg(),
                   help=f"images a step (default {DEFAULT_BATCH}, or the largest power of two "
                        "a fold's epoch holds where it holds fewer)")
    p.add_argument("--lr", type=positive_arg, default=1e-3)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--optimizer", choices=("adam", "adamw"), default="adam",
                   help="adam (DeepHeme) or adamw (decoupled weight decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (0: off)")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.998)")
    p.add_argument("--teacher", action="append", default=[],
                   help="distil from this checkpoint (repeat for an ensemble teacher); needs the "
                        "same architecture and class codes")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help="weight of the distillation term when --teacher is given")
    p.add_argument("--distill-temperature", type=float, default=4.0)
    p.add_argument("--lr-step-epochs", type=count_arg(), default=10,
                   help="step decay period (x0.3)")
    p.add_argument("--init", help="fine-tune from this checkpoint (same architecture) instead of "
                                  "random weights; where its codes differ, the backbone and the "
                                  "classifier rows of shared codes are kept")
    p.add_argument("--swa-start", type=int,
                   help="stochastic weight averaging: from this epoch the learning rate stays "
                        "constant and the end-of-epoch weights are averaged; the average is "
                        "scored and shipped")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast: auto = on CUDA and on CPUs with native bf16")
    p.add_argument("--augment", choices=("cpu", "device"), default="cpu",
                   help="cpu: albumentations in --loader-workers processes; device: the same "
                        "recipe on whole batches on the training device (a GPU's images stay "
                        "on it; no loader processes)")
    p.add_argument("--colour", choices=("standard", "strong"), default="standard",
                   help="the augmentation's colour ranges: standard (DeepHeme's) or strong "
                        "(hue, saturation and stain jitter drawn wider, for calls that hold "
                        "across labs' stains and scanners)")
    p.add_argument("--compile", nargs="?", const="default", default="", choices=COMPILE_MODES,
                   metavar="MODE", help="torch.compile the model's forward (MODE: "
                   f"{', '.join(COMPILE_MODES)}; default when given alone): on a GPU, "
                   "fewer kernel launches per step; the first steps pay the compile. Not part "
                   "of the recipe: a fold resumes with or without it")
    p.add_argument("--max-minutes", type=float, help="stop each fold after this wall time")
    p.add_argument("--source-mpp", type=mpp_arg,
                   help="µm/px of the input images (default 0.1, about PBC / CellaVision's; a "
                        "pack from jobs.pack_cell_images: its own), or auto: measured on their "
                        "red cells")
    p.add_argument("--exclude-codes", default="IG,NEU",
                   help="codes not trained on (group-only labels); kept in the test split and "
                        "scored at group level")
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--workers", type=count_arg(), default=2, help="Ray Train workers")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (default: if CUDA)")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--loader-workers", type=count_arg(0), default=None,
                   help="DataLoader processes per worker (default: its CPUs, at most 4)")
    p.add_argument("--local", action="store_true", help="train in this process, without Ray")
    p.add_argument("--max-steps", type=int, help="cap steps per epoch (smoke tests)")
    p.add_argument("--limit-per-class", type=count_arg(),
                   help="use at most this many images per class")
    p.add_argument("--no-ood", action="store_true",
                   help="do not give the checkpoints a feature density (engine.models.ood)")
    p.add_argument("--no-temperature", action="store_true",
                   help="do not fit a softmax temperature on each fold's validation split "
                        "(class_prob as trained, uncalibrated)")
    p.add_argument("--seed", type=int, default=0)
    add_storage_args(p)
    args = p.parse_args(argv)
    local = [d for d in args.data if not is_remote(d)]  # a remote pack.json: once fetched
    if local:
        try:
            args.source_mpp = pack_or_given_mpp(args.source_mpp, local)
        except ValueError as err:
            p.error(str(err))
    return args


def work_folder(args) -> str:
    """Where the job writes: the output itself, or a local folder for an ``s3://`` output."""
    if not is_remote(args.output):
        return os.path.abspath(args.output)
    if args.work:
        return os.path.abspath(args.work)
    digest = hashlib.sha256(normalize_uri(args.output).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"hemeflow-train-{digest}")


def publish(work: str, output: str, storage, fold: str | None = None) -> list[str]:
    """Upload the job's deliverables from ``work`` to ``output`` (the prepared arrays stay
    local; Ray Train wrote its run folders to ``<output>/runs`` itself), or only ``fold``'s
    checkpoint and card (``fold-K``; weights first: a card there means a complete fold);
    returns their URIs."""
    if fold:
        paths = [os.path.join(work, fold, n) for n in ("model.safetensors", "model.json")]
    else:
        paths = glob.glob(os.path.join(glob.escape(work), "fold-*", "*")) + [
            os.path.join(work, n) for n in ("model.safetensors", "model.json", "evaluation.json",
                                            "test/labels.csv", "test/pack.json")]
    names = [os.path.relpath(p, work) for p in paths if os.path.isfile(p)]
    if not fold:
        names.sort()
    uris = []
    for name in names:
        with open(os.path.join(work, name), "rb") as fh:
            uris.append(join_uri(output, *name.split(os.sep)))
            write_bytes(uris[-1], fh.read(), storage)
    return uris


MIN_PER_CLASS = 4  # a stratified test split, a validation split and images to train on


def split_for_training(data, excluded: set[str], test_fraction: float, seed: int,
                       limit_per_class: int | None = None):
    """The image-level hold-out every reference checkpoint is scored on.

    Rows with ``excluded`` codes are left out of training (and go to the test list, scored at
    group level); the rest are split stratified, by group where the labels have one.

    Returns:
        ``(trainable, codes, y, groups, dev_idx, test_rows)``; ``test_rows`` are ``(path, code)``.

    Raises:
        ValueError: fewer than two codes to train on, or one with fewer than
            `MIN_PER_CLASS` images.
    """
    from engine.train.splits import holdout_split

    rng = np.random.default_rng(seed)
    keep = [i for i, c in enumerate(data.codes) if c not in excluded]
    counts = collections.Counter(data.codes[i] for i in keep)
    if len(counts) < 2:
        raise ValueError(
            f"{len(counts)} code{'' if len(counts) == 1 else 's'} to train on "
            f"({', '.join(sorted(counts)) or 'every code is in --exclude-codes'}): a classifier "
            "learns to tell two classes or more apart; label cells of the others too")
    rare = sorted(c for c, n in counts.items() if n < MIN_PER_CLASS)
    if rare:
        raise ValueError(
            "too few labelled images of " + ", ".join(f"{c} ({counts[c]})" for c in rare)
            + f": each code trained on needs {MIN_PER_CLASS} at least (a test image, a "
            f"validation image and some to train on); label more of them, or leave them out "
            f"with --exclude-codes {','.join(sorted(excluded | set(rare)))}")
    if limit_per_class:
        by_code: dict[str, list[int]] = {}
        for i in keep:
            by_code.setdefault(data.codes[i], []).append(i)
        keep = sorted(j for idx in by_code.values()
                      for j in rng.permutation(idx)[:limit_per_class])
    trainable = data.subset(keep)
    codes = ordered_codes(trainable.codes)
    y = np.array([codes.index(c) for c in trainable.codes])
    groups = np.array(trainable.groups) if trainable.groups else None
    dev_idx, test_idx = holdout_split(y, test_fraction, seed, groups)
    test_rows = [(trainable.paths[i], trainable.codes[i]) for i in test_idx]
    test_rows += [(p, c) for p, c in zip(data.paths, data.codes) if c in excluded]
    return trainable, codes, y, groups, dev_idx, test_rows


def prepare(args, out: str, data=None):
    """Split ``data`` (default: read from ``args.data``), write the test list, and write the
    prepared arrays for the workers."""
    from engine.train.data import UnreadableImages, load_cell_images, unreadable
    from engine.train.splits import kfold_splits

    data = data or read_data(args)
    excluded = {c.strip() for c in args.exclude_codes.split(",") if c.strip()}
    for code in set(data.codes):
        get_class(code)  # unknown codes fail here, naming the valid ones
    trainable, codes, y, groups, dev_idx, test_rows = split_for_training(
        data, excluded, args.test_fraction, args.seed, args.limit_per_class)
    os.makedirs(os.path.join(out, "test"), exist_ok=True)
    with open(os.path.join(out, "test", "labels.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "code"])
        w.writerows((source_of(p), c) for p, c in test_rows)  # a mirrored image: its URI
    with open(os.path.join(out, "test", "pack.json"), "w") as fh:  # so jobs scoring it take
        json.dump({"mpp": args.source_mpp,  # the images as trained
                   "rows": "the test split of jobs.train_cell_classifier (labels.csv): images "
                           "read where it names them, at this µm/px"}, fh, indent=2)
    dev = trainable.subset(dev_idx)
    spec = get_spec(args.arch)
    margin_px = int(round(spec.input_px * 1.5))  # room for rotation before the centre crop
    prepared = os.path.join(out, "prepared")
    made_from = flag_values(args, SPLIT_FLAGS)
    if os.path.exists(os.path.join(prepared, "split.json")):
        with open(os.path.join(prepared, "split.json")) as fh:
            before = json.load(fh).get("made_from", {})
        if before != made_from:  # a rerun with other data or split settings
            print("the prepared split was made from other data or settings ("
                  + ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in made_from.items()
                              if before.get(k) != v) + "): prepared again", flush=True)
            shutil.rmtree(prepared)
    os.makedirs(prepared, exist_ok=True)
    if not os.path.exists(os.path.join(prepared, "split.json")):
        t0 = time.time()
        # every image is tried now, the test split's too (scored only when training ends)
        bad = unreadable([p for p, _ in test_rows])
        try:
            images = load_cell_images(dev.paths, args.source_mpp, spec.input_mpp, margin_px)
        except UnreadableImages as err:
            bad = err.failed + bad
        if bad:
            raise UnreadableImages(bad, len(dev) + len(test_rows))
        np.save(os.path.join(prepared, "images.npy"), images)
        np.save(os.path.join(prepared, "labels.npy"), y[dev_idx])
        folds = kfold_splits(y[dev_idx], args.folds, args.seed,
                             groups[dev_idx] if groups is not None else None)
        with open(os.path.join(prepared, "split.json"), "w") as fh:
            json.dump({"codes": codes, "made_from": made_from,
                       "folds": [{"train": tr.tolist(), "val": va.tolist()}
                                 for tr, va in folds]}, fh)
        print(f"prepared {len(images)} images at {spec.input_mpp} µm/px in "
              f"{time.time() - t0:.0f}s; {len(test_rows)} test rows", flush=True)
    return codes, prepared, len(dev_idx), len(test_rows)


def fit_fold_density(model: LoadedModel, prepared: str, args, fold: int):
    """The fold model's feature density (`engine.models.ood`) from the prepared training-split
    crops (at most 4,000): fitted on all of them, its threshold at the 99th percentile of their
    cross-fitted distances (`engine.models.ood.cross_fitted`); none on fewer than
    `engine.models.ood.MIN_DENSITY_IMAGES`. Returns ``(density or None, the card's ood
    section)``."""
    from engine.models.ood import fit_on_crops

    images = np.load(os.path.join(prepared, "images.npy"), mmap_mode="r")
    labels = np.load(os.path.join(prepared, "labels.npy"))
    try:
        density, fitted = fit_on_crops(model, images, labels, fit_images=4000,
                                       held_out_images=0, seed=args.seed)
    except ValueError as err:
        print(f"fold {fold}: no feature density: {err}", file=sys.stderr, flush=True)
        return None, {"skipped": str(err)}
    return density, {**fitted, "rows": "training split (this run's prepared images)"}


def fit_fold_temperature(model: LoadedModel, prepared: str, fold: int) -> dict:
    """The card's ``temperature`` section: the softmax temperature fitted by likelihood on the
    fold's validation crops (centre crops, 8-view TTA, the fold's weights as trained;
    `engine.train.calibration.fit_temperature_on`), which loading the checkpoint applies; on
    too few (`engine.train.calibration.too_few_for_temperature`), why there is none."""
    from engine.train.calibration import fit_temperature_on, too_few_for_temperature
    from engine.train.cell_classifier import load_prepared

    images, labels, _, val_idx = load_prepared(prepared, fold)
    if why := too_few_for_temperature(len(val_idx)):  # probabilities as trained: temperature 1
        return {"n_val": int(len(val_idx)), "skipped": why}
    val, c = np.sort(val_idx), model.spec.input_px
    top, left = (images.shape[1] - c) // 2, (images.shape[2] - c) // 2
    crops = np.ascontiguousarray(images[val, top:top + c, left:left + c])  # read as cropped
    return {"method": "softmax temperature fitted by likelihood on the fold's validation split "
                      "(8-view TTA); the final layer is divided by it when the checkpoint is "
                      "loaded", "n_val": int(len(val)), **fit_temperature_on(model, crops,
                                                                             labels[val])}


def training_stain(prepared: str, spec, codes, most: int = 3000) -> dict:
    """The card's ``stain`` section: how the training split's nuclei are stained (the
    prepared images' nucleated cells, at most ``most`` evenly spread; `engine.stain`), which
    runs hold each slide's nuclei against (the ``stain`` flag)."""
    from engine.classes import get_class
    from engine.stain import nuclear_colour, stain_summary

    images = np.load(os.path.join(prepared, "images.npy"), mmap_mode="r")
    labels = np.load(os.path.join(prepared, "labels.npy"))
    nucleated = np.flatnonzero([get_class(codes[k]).nucleated for k in labels])
    rows = nucleated[::max(1, -(-len(nucleated) // most))]
    c = spec.input_px
    top, left = (images.shape[1] - c) // 2, (images.shape[2] - c) // 2
    colour = nuclear_colour(np.ascontiguousarray(images[rows, top:top + c, left:left + c]),
                            spec.input_mpp)
    return {**stain_summary(colour),
            "hue_deg_p5_p95": np.percentile(colour[:, 0], [5, 95]).round(1).tolist()
            if len(colour) else None,
            "saturation_p5_p95": np.percentile(colour[:, 1], [5, 95]).round(3).tolist()
            if len(colour) else None,
            "rows": "training split (the prepared images), nucleated cells"}


def best_weights(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "best.safetensors"))


def fit_batch_size(prepared: str, args, log=print) -> None:
    """Set ``args.batch_size`` where it was not given: `DEFAULT_BATCH`, or the largest power
    of two an epoch of every fold holds where one holds fewer (a lab's first labelled cells),
    saying so. Raise ValueError where the given size (or 2) leaves a fold's epoch without a
    full batch: the loaders keep full batches only (BatchNorm, and one shape a step), so not
    one training step would run. Until release 0.8.13 such a job wrote the weights it began
    with as its model, its card's metrics those of an untrained network (the default
    smear's 59 exported cells at a batch of 128)."""
    from engine.train.cell_classifier import read_prepared
    from engine.train.splits import BalancedSampler

    data = read_prepared(prepared)
    workers = 1 if args.local else args.workers
    epochs = [(len(BalancedSampler(data["labels"][np.asarray(split["train"], np.int64)],
                                   workers)), fold, len(split["train"]))
              for fold, split in enumerate(data["split"]["folds"])]
    per_worker, fold, n = min(epochs)
    fits = 1 << (per_worker.bit_length() - 1) if per_worker >= 2 else 0
    wanted = args.batch_size or DEFAULT_BATCH
    if per_worker >= wanted:
        args.batch_size = wanted
        return
    said = (f"fold {fold}'s training images give {'each worker ' if workers > 1 else ''}"
            f"{per_worker} images an epoch ({n}, each class up-sampled to the largest's count"
            f"{f', over {workers} workers' if workers > 1 else ''}), fewer than ")
    if args.batch_size is None and fits:
        args.batch_size = fits
        log(f"--batch-size {fits}: {said}the default {DEFAULT_BATCH} (training keeps full "
            "batches only)")
        return
    raise ValueError(f"{said}--batch-size {wanted}: training keeps full batches only, so not "
                     "one step would run. " + (f"Give --batch-size {fits} or less, or label "
                                               "more cells" if fits else "Label more cells"))


@job_main
def main(argv=None) -> int:
    args = parse_args(argv)
    storage = storage_from_args(args)
    try:
        # args.data: the local folders; the µm/px a pack's own, or measured on every image for
        # auto: the pixel size is the scanner's
        labels = labelled_data(args)
        # what the data is, for a rerun into this output: a fold or split of other data is
        # made again (cards record it with the settings)
        args.data_digest = labels.digest()
    except (FileNotFoundError, ValueError) as err:
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    out = work_folder(args)
    os.makedirs(out, exist_ok=True)
    try:
        codes, prepared, n_dev, n_test = prepare(args, out, labels)
        fit_batch_size(prepared, args, log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, ValueError) as err:  # no labels, an unknown or too rare code
        print(f"hemeflow: error: {err}", file=sys.stderr)
        return 2
    import torch  # not for --help and the data's errors: 5-9 s of torch, timm and sklearn

    from engine.models import build_module, write_checkpoint
    from engine.models.factory import LoadedModel
    from engine.train.evaluation import evaluate_classifier
    from engine.train.loop import LocalSession, TrainSettings, settings_dict

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             patience=args.patience, num_workers=args.loader_workers,
                             lr_step_epochs=args.lr_step_epochs, max_minutes=args.max_minutes,
                             label_smoothing=args.label_smoothing, ema_decay=args.ema_decay,
                             max_steps_per_epoch=args.max_steps, seed=args.seed,
                             optimizer=args.optimizer, weight_decay=args.weight_decay,
                             mixup_alpha=args.mixup,
                             distill_alpha=args.distill_alpha if args.teacher else 0.0,
                             distill_temperature=args.distill_temperature,
                             swa_start=args.swa_start, precision=args.precision,
                             augment=args.augment, compile=args.compile,
                             colour=args.colour)
    use_gpu = args.gpus or torch.cuda.is_available()
    if not (args.local or use_gpu):  # a CPU head starts the GPU nodes only if GPUs are asked
        print("training on CPU workers: give --gpus for one GPU per worker (on a cluster whose "
              "head has no GPU, an autoscaler adds GPU nodes only when they are asked for)",
              file=sys.stderr, flush=True)
    spec = get_spec(args.arch)
    from engine.train.cell_classifier import train_fold

    members: list[LoadedModel] = []
    data, runs = prepared, os.path.join(out, "runs")
    if not args.local:
        data, runs = ray_inputs(args, prepared, runs)
    for fold in range(args.folds):
        if reusable_fold(out, fold, args, storage):
            # a rerun after a crash in a later fold does not train it again (Ray Train resumes
            # an interrupted run, but starts a finished one over)
            members.append(reload(out, fold, args))
            print(f"fold {fold}: complete in an earlier run ({out}/fold-{fold})", flush=True)
            continue
        config = {"arch": args.arch, "class_codes": codes, "data": data, "fold": fold,
                  "settings": settings_dict(settings), "teachers": list(args.teacher),
                  "init": args.init,
                  "storage": dataclasses.asdict(storage)}
        t0 = time.time()
        # an interrupted run resumes only under the same data and settings
        run_name = f"fold-{fold}-{fold_key(args)}"
        if args.local:
            session = LocalSession(os.path.join(out, "runs", run_name))
            train_fold(config, session)
            ckpt_dir, history = session.restore_dir(), session.history
        else:
            from engine.pipeline.train import run_ray_training

            ckpt_dir, history = run_ray_training(
                train_fold, config, num_workers=args.workers, use_gpu=use_gpu,
                storage_path=runs, name=run_name, cpus_per_worker=args.cpus_per_worker,
                storage=storage)
        module = build_module(spec, len(codes))
        module.load_state_dict(best_weights(ckpt_dir))
        if is_remote(runs):  # a local copy of the run's last checkpoint (run_ray_training)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        model = LoadedModel(module.eval(), spec, tuple(codes), weights=f"fold-{fold}")
        members.append(model)
        card = make_card(args, spec, codes, model, n_dev, fold, history, time.time() - t0,
                         use_gpu)
        state = dict(module.state_dict())
        if not args.no_ood:
            density, card["ood"] = fit_fold_density(model, prepared, args, fold)
            state.update(density.state_dict() if density is not None else {})
        if not args.no_temperature:
            card["temperature"] = fit_fold_temperature(model, prepared, fold)
            if "skipped" in card["temperature"]:
                print(f"fold {fold}: no softmax temperature: {card['temperature']['skipped']}",
                      file=sys.stderr, flush=True)
        card["stain"] = training_stain(prepared, spec, codes)
        write_checkpoint(state, card, os.path.join(out, f"fold-{fold}", "model.safetensors"),
                         dtype=torch.float16)
        if is_remote(args.output):  # now, not at the end: a rerun on a new cluster keeps it
            publish(out, normalize_uri(args.output), storage, f"fold-{fold}")
        print(f"fold {fold}: best val macro F1 {card['training']['best_val_macro_f1']} "
              f"({len(history)} epochs run here)", flush=True)

    test = read_labels(fetch_labelled(os.path.join(out, "test"), storage))  # mirrored: no reads
    reports, calls = {}, {}
    amp = args.precision != "fp32"
    for fold, _m in enumerate(members):
        reports[f"fold-{fold}"], arrays = evaluate_classifier([reload(out, fold, args)], test,
                                                              args.source_mpp, amp=amp)
        calls[f"fold-{fold}"] = arrays["probs"].argmax(1)
    if len(members) > 1:
        reports["ensemble"], arrays = evaluate_classifier(
            [reload(out, f, args) for f in range(len(members))], test, args.source_mpp, amp=amp)
        reports["ensemble"]["against_folds"] = against_folds(arrays, calls, codes)
    for fold in range(len(members)):
        path = os.path.join(out, f"fold-{fold}", "model.json")
        with open(path) as fh:
            card = json.load(fh)
        card["metrics"] = {"test": slim(reports[f"fold-{fold}"])}
        if "ensemble" in reports:
            card["metrics"]["test_ensemble"] = slim(reports["ensemble"])
        with open(path, "w") as fh:
            json.dump(card, fh, indent=2, sort_keys=True)
    if args.folds == 1:
        for ext in ("safetensors", "json"):
            shutil.copy(os.path.join(out, "fold-0", f"model.{ext}"),
                        os.path.join(out, f"model.{ext}"))
    with open(os.path.join(out, "evaluation.json"), "w") as fh:
        json.dump(reports, fh, indent=2)
    for name, rep in reports.items():
        print(json.dumps({"model": name, "accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"],
                          "mean_auc": rep["mean_auc"],
                          "classes_p_r_above_0_8": rep["classes_precision_recall_above_0_8"],
                          "n_classes": rep["n_classes"], "n": rep["n"]}))
    where = normalize_uri(args.output)
    if is_remote(args.output):
        print(f"uploaded {len(publish(out, where, storage))} files from {out}", flush=True)
    print(f"checkpoints: {where}/fold-*/model.safetensors; test split: "
          f"{where}/test/labels.csv")
    if args.init:  # a fine-tune: what it changed, paired on the same test cells
        import shlex

        models = ["model.safetensors"] if args.folds == 1 else [
            f"fold-{k}/model.safetensors" for k in range(args.folds)]  # the ensemble
        print("against the model it started from, on its test split: python -m "
              "jobs.evaluate_cell_classifier " + "".join(
                  f"--checkpoint {shlex.quote(join_uri(where, m))} " for m in models)
              + f"--data {shlex.quote(join_uri(where, 'test'))} --compare-to "
              f"{shlex.quote(args.init)}")
    if args.folds > 1:
        print("to classify slides with the fold ensemble, in the process_slides config:\n"
              "  pipeline:\n    classifier:\n"
              f"      model: {args.arch}\n"
              f"      checkpoint: {where}/fold-0/model.safetensors\n"
              f"      ensemble: [{', '.join(f'{where}/fold-{k}/model.safetensors' for k in range(1, args.folds))}]")
    return 0


def ray_inputs(args, prepared: str, local_runs: str):
    """What Ray Train workers read, wherever they run: the prepared arrays through the object
    store (a worker on another node cannot read the driver's disk), and where their
    checkpoints go: ``<output>/runs`` for an ``s3://`` output, else ``local_runs`` (one machine,
    or a folder every node mounts: `run_ray_training`)."""
    import ray

    from engine.pipeline.train import start_ray
    from engine.train.cell_classifier import read_prepared

    start_ray()
    runs = join_uri(normalize_uri(args.output), "runs") if is_remote(args.output) else local_runs
    return ray.put(read_prepared(prepared)), runs


# what makes the prepared split (the images at the model's µm/px, the test rows and the folds):
# a split made from others is made again
SPLIT_FLAGS = ("data_digest", "arch", "folds", "source_mpp", "exclude_codes", "test_fraction",
               "limit_per_class", "seed")
# what makes a fold's model: a fold written under others is trained again
FOLD_FLAGS = SPLIT_FLAGS + (
    "epochs", "batch_size", "lr", "patience", "label_smoothing", "optimizer", "weight_decay",
    "mixup", "ema_decay", "teacher", "distill_alpha", "distill_temperature", "lr_step_epochs",
    "init", "swa_start", "precision", "augment", "max_minutes", "max_steps", "colour")


# flags added after folds were trained without them: left out of a fold's key and settings at
# the value those folds had, so that they are still resumed and reused
ADDED_FLAGS = {"colour": "standard"}


def flag_values(args, names: tuple[str, ...]) -> dict:
    """The values ``args`` holds for ``names`` (those it has; an `ADDED_FLAGS` flag only
    where it is not the value a missing one stands for)."""
    return {k: v for k, v in vars(args).items()
            if k in names and not (k in ADDED_FLAGS and v == ADDED_FLAGS[k])}


def fold_key(args) -> str:
    """A short hash of ``args``' `FOLD_FLAGS`, which names a fold's training run: Ray Train and
    `LocalSession` resume an interrupted run of the same name, so one of other data or
    settings is never resumed."""
    return hashlib.sha256(json.dumps(flag_values(args, FOLD_FLAGS), sort_keys=True,
                                     default=str).encode()).hexdigest()[:8]


def reusable_fold(work: str, fold: int, args, storage) -> bool:
    """Whether ``fold`` is complete from an earlier run of the same command, and so not
    trained again: its checkpoint and card in ``work`` (the card is written after the weights,
    so a whole card means both), or else under an ``s3://`` output (an earlier run on another
    machine published them; downloaded into ``work``), with the card's settings those of
    ``args`` (`FOLD_FLAGS`; a fold trained under others is said and trained again)."""
    folder = os.path.join(work, f"fold-{fold}")
    card, remote = None, None
    try:
        with open(os.path.join(folder, "model.json")) as fh:
            card = json.load(fh)
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            card = None
    except (OSError, ValueError):
        pass
    if card is None and is_remote(args.output):
        from engine.slides.storage import get_filesystem

        fs, remote = get_filesystem(join_uri(normalize_uri(args.output), f"fold-{fold}"),
                                    storage)
        try:
            card = json.loads(fs.cat_file(f"{remote}/model.json"))
        except (FileNotFoundError, ValueError):
            return False
    if card is None:
        return False
    before = card.get("training", {}).get("settings", {})
    now = {k: v for k, v in vars(args).items() if k in FOLD_FLAGS}
    changed = {k: (before.get(k, ADDED_FLAGS.get(k)), v) for k, v in now.items()
               if before.get(k, ADDED_FLAGS.get(k)) != v}
    if changed:
        print(f"fold {fold}: written under other settings ("
              + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
              + "): trained again", flush=True)
        return False
    if remote is not None:
        try:
            os.makedirs(folder, exist_ok=True)
            fs.get_file(f"{remote}/model.safetensors",  # a name, not a glob: 'run [2]'
                        os.path.join(folder, "model.safetensors"))
        except FileNotFoundError:
            return False
        with open(os.path.join(folder, "model.json"), "w") as fh:
            json.dump(card, fh, indent=2, sort_keys=True)
    return True


def reload(out, fold, args) -> LoadedModel:
    from engine.models import create_model

    return create_model(args.arch, os.path.join(out, f"fold-{fold}", "model.safetensors"))


def against_folds(ensemble: dict, calls: dict, codes) -> dict:
    """What averaging the folds gains over each fold model alone on the test rows: the paired
    differences (ensemble minus fold) in accuracy and macro F1 with their 95 % intervals
    (`engine.train.metrics.paired_bootstrap`). ``ensemble``: its `evaluate_classifier` arrays;
    ``calls``: each fold's class indices on the same rows."""
    from engine.train.metrics import paired_bootstrap

    y = ensemble["y"]
    scored = y >= 0
    if not scored.any():
        return {}
    ours = ensemble["probs"].argmax(1)[scored]
    return {name: {k: v for k, v in paired_bootstrap(y[scored], ours, fold[scored], codes).items()
                   if k in ("accuracy", "macro_f1")} for name, fold in calls.items()}


def slim(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("confusion_matrix",)}


def make_card(args, spec, codes, model, n_dev, fold, history, seconds, use_gpu) -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if use_gpu and torch.cuda.is_available() else "cpu"
    best = max((h.get("val_macro_f1", -1) for h in history), default=None)
    return {
        "name": spec.name, "architecture": spec.architecture, "task": spec.task,
        **({"timm_kwargs": dict(spec.timm_kwargs)} if spec.timm_kwargs else {}),
        "class_codes": list(codes),
        "class_names": {c: get_class(c).name for c in codes},
        "input_px": spec.input_px, "input_mpp": spec.input_mpp,
        "preprocessing": {"mean": list(model.mean), "std": list(model.std),
                          "input": "RGB uint8 crop centred on the cell, resampled to input_mpp"},
        "training": {
            "data": args.data_source, "source_mpp": args.source_mpp,
            "excluded_codes": args.exclude_codes, "n_dev_images": n_dev, "fold": fold,
            **({"data_pack": pack} if len(args.data) == 1 and (pack := read_pack(args.data[0]))
               else {}),
            "folds": args.folds, "device": device,
            "settings": {**{k: v for k, v in vars(args).items() if k != "data_source"},
                         "data": args.data_source},
            "seconds": round(seconds, 1), "best_val_macro_f1": best,
            "history": [{k: v for k, v in h.items() if isinstance(v, (int, float, str))}
                        for h in history],
        },
        "covers_groups": [g for g in ("ER", "IG", "NEU") if covers(codes, g)],
        "hemeflow_version": engine.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    sys.exit(main())
