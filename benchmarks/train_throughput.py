"""Cell-classifier training: crops/s fed by albumentations in DataLoader processes, against the
same recipe on whole batches on the training device (`BatchAugment`), against the model alone.

    python benchmarks/train_throughput.py [--arch deepheme-resnext50] [--batch 128] [--steps 30]
        [--loader-workers 4] [--images 2048] [--compile MODE ...] [--tag T]

Each part runs the training job's own steps (`train_one_epoch`: forward, backward, Adam) with
the same model, batch and precision: ``alone`` on one fixed batch already on the
device (the ceiling), ``loader`` on PBC cells augmented by albumentations in ``--loader-workers``
processes (the ``--augment cpu`` path), ``device`` on the same cells held on the device and
augmented there (``--augment device``). Rates count the steps after the first three (loader
start-up and warm-up). Prints JSON with each rate, its ratio to ``alone`` and ``device`` over
``loader``, and writes ``benchmarks/results/train_throughput-<device>-<date>.json``. Each
``--compile MODE`` adds ``compiled[MODE]``: the same initial weights compiled in that mode, alone
and fed by ``device``, their ratios to the eager rates, and how long the warm-up steps (the
compile) took.

On a GPU node the loader processes may bound training (session 4's H100 trained ResNeXt-50 at
about 2.4k crops/s of 96 px with 15 of them; not measured apart); on a CPU the model does.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402
from engine.models.factory import build_module  # noqa: E402
from engine.models.registry import get_spec  # noqa: E402
from engine.train.loop import (COMPILE_MODES, TrainSettings, compile_in_place,  # noqa: E402
                               make_optimizer, normalize_batch, train_one_epoch, use_bf16)

WARMUP = 3


def rate(model, optimizer, batches, steps: int, batch: int, device, mean, std
         ) -> tuple[float, float]:
    """Crops/s of ``steps`` training steps of `train_one_epoch` (the training job's own step),
    after `WARMUP` steps, and the seconds those took (a compiled model compiles in them);
    ``batches()`` gives an endless iterable of full batches ``(x, y)`` as the job's loaders
    do."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    settings = TrainSettings(max_steps_per_epoch=WARMUP, label_smoothing=0.0)
    t0 = time.time()
    train_one_epoch(model, batches(), optimizer, device, mean, std, settings)
    sync()
    t1 = time.time()
    train_one_epoch(model, batches(), optimizer, device, mean, std,
                    dataclasses.replace(settings, max_steps_per_epoch=steps))
    sync()
    return steps * batch / (time.time() - t1), t1 - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="deepheme-resnext50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--images", type=int, default=2048, help="PBC cells to draw batches from")
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "pbc"))
    p.add_argument("--source-mpp", type=float, default=0.1)
    p.add_argument("--compile", action="append", default=[], choices=COMPILE_MODES,
                   metavar="MODE", help="also time the model compiled in this torch.compile "
                   "mode (repeatable), alone and fed by BatchAugment, as the training job's "
                   "--compile MODE runs it")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)

    from engine.train.augment import train_transform
    from engine.train.cell_classifier import AugmentedCells, DeviceBatches
    from engine.train.data import load_cell_images, read_labels
    from engine.train.splits import BalancedSampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_spec(args.arch)
    data = read_labels(args.data)
    pick = np.random.default_rng(0).permutation(len(data))[:args.images]
    codes = sorted(set(data.codes))
    labels = np.array([codes.index(data.codes[i]) for i in pick])
    t = time.time()
    images = load_cell_images([data.paths[i] for i in pick], args.source_mpp, spec.input_mpp,
                              int(round(spec.input_px * 1.5)))
    print(f"{len(images)} cells loaded in {time.time() - t:.1f} s", file=sys.stderr)

    bf16 = use_bf16(device)
    channels_last = device.type == "cuda" or bf16
    recipe = TrainSettings(lr=1e-4)

    def fresh(mode: str = ""):  # the same initial weights each time, and their optimizer
        torch.manual_seed(0)
        module = build_module(spec, len(codes))
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        model = compile_in_place(module.to(device), mode)
        return model, make_optimizer(model.parameters(), recipe, device)

    model, optimizer = fresh()
    from timm.data import resolve_model_data_config

    dcfg = resolve_model_data_config(model)
    mean, std = dcfg["mean"], dcfg["std"]
    idx = np.arange(len(images))
    sampler = BalancedSampler(labels, seed=0)
    rates = {}

    x0 = torch.from_numpy(images[:args.batch, :spec.input_px, :spec.input_px].copy())
    fixed = normalize_batch(x0, mean, std, device, channels_last)
    y0 = torch.as_tensor(labels[:args.batch], device=device)

    def endless(epoch_batches):  # epochs one after another, as many as the steps need
        def batches():
            e = 0
            while True:
                sampler.set_epoch(e)
                yield from epoch_batches()
                e += 1
        return batches

    on_device = torch.from_numpy(images).to(device)
    device_batches = DeviceBatches(on_device, torch.as_tensor(labels, device=device), idx,
                                   sampler, args.batch, spec.input_px, mean, std,
                                   channels_last, seed=0)
    loader = torch.utils.data.DataLoader(
        AugmentedCells(images, labels, idx, train_transform(spec.input_px)),
        batch_size=args.batch, sampler=sampler, num_workers=args.loader_workers,
        pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.loader_workers > 0)
    feeds = {"alone": endless(lambda: [(fixed, y0)]),
             "device": endless(lambda: iter(device_batches)),
             "loader": endless(lambda: iter(loader))}
    for name, batches in feeds.items():
        rates[name] = rate(model, optimizer, batches, args.steps, args.batch, device, mean,
                           std)[0]
    compiled = {}
    for mode in args.compile:
        try:  # a mode that fails here is reported, and the eager figures still written
            model, optimizer = fresh(mode)
            got = {name: rate(model, optimizer, feeds[name], args.steps, args.batch, device,
                              mean, std) for name in ("alone", "device")}
        except Exception as err:  # noqa: BLE001  (inductor and triton raise many kinds)
            compiled[mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            print(f"compile {mode} failed: {compiled[mode]['error']}", file=sys.stderr)
            continue
        compiled[mode] = {**{k: round(r, 1) for k, (r, _) in got.items()},
                          "vs_eager": {k: round(r / rates[k], 3) for k, (r, _) in got.items()},
                          "first_steps_s": round(got["alone"][1], 1)}
        print(f"compile {mode}: {compiled[mode]}", file=sys.stderr)

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    result = {
        "benchmark": "train_throughput", "arch": args.arch, "device": name,
        "precision": "bf16" if bf16 else "fp32", "batch": args.batch, "steps": args.steps,
        "loader_workers": args.loader_workers, "images": len(images),
        "crops_per_s": {k: round(v, 1) for k, v in rates.items()},
        "vs_alone": {k: round(rates[k] / rates["alone"], 3) for k in ("device", "loader")},
        "device_vs_loader": round(rates["device"] / rates["loader"], 2),
        **({"compiled": compiled} if compiled else {}),
        "date": dt.date.today().isoformat(),
    }
    write_result(result, f"train_throughput-{name.replace(' ', '_')}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
