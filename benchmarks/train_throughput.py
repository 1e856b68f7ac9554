"""Cell-classifier training: crops/s fed by albumentations in DataLoader processes, against the
same recipe on whole batches on the training device (`BatchAugment`), against the model alone.

    python benchmarks/train_throughput.py [--arch deepheme-resnext50] [--batch 128] [--steps 30]
        [--loader-workers 4] [--images 2048] [--tag T]

Each part runs training steps (forward, backward, Adam) of the same model, batch and precision
as `engine.train.cell_classifier.train_fold` does: ``alone`` on one fixed batch already on the
device (the ceiling), ``loader`` on PBC cells augmented by albumentations in ``--loader-workers``
processes (the ``--augment cpu`` path), ``device`` on the same cells held on the device and
augmented there (``--augment device``). Rates count the steps after the first three (process
start-up and warm-up). Prints JSON with each rate, its ratio to ``alone`` and ``device`` over
``loader``, and writes ``benchmarks/results/train_throughput-<device>-<date>.json``.

On a GPU node the loader processes may bound training (session 4's H100 trained ResNeXt-50 at
about 2.4k crops/s of 96 px with 15 of them; not measured apart); on a CPU the model does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402
from engine.models.factory import build_module  # noqa: E402
from engine.models.registry import get_spec  # noqa: E402
from engine.train.loop import normalize_batch, use_bf16  # noqa: E402

WARMUP = 3


def run_steps(model, optimizer, batches, steps: int, device, mean, std, bf16: bool,
              channels_last: bool) -> float:
    """Crops/s over ``steps`` training steps after `WARMUP` (batches of ``(x, y)`` as the
    training loop takes them)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    n, t0 = 0, None
    for i, (x, y) in enumerate(batches):
        if i == WARMUP:
            sync()
            t0, n = time.time(), 0
        if i == WARMUP + steps:
            break
        if x.dtype == torch.uint8:
            x = normalize_batch(x, mean, std, device, channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += len(y)
    sync()
    return n / (time.time() - t0)


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

    torch.manual_seed(0)
    module = build_module(spec, len(codes))
    bf16 = use_bf16(device)
    channels_last = device.type == "cuda" or bf16
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    model = module.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    from timm.data import resolve_model_data_config

    dcfg = resolve_model_data_config(model)
    mean, std = dcfg["mean"], dcfg["std"]
    idx = np.arange(len(images))
    sampler = BalancedSampler(labels, seed=0)
    total = WARMUP + args.steps
    rates = {}

    x0 = torch.from_numpy(images[:args.batch, :spec.input_px, :spec.input_px].copy())
    fixed = normalize_batch(x0, mean, std, device, channels_last)
    y0 = torch.as_tensor(labels[:args.batch], device=device)
    rates["alone"] = run_steps(model, optimizer, ((fixed, y0) for _ in range(total)),
                               args.steps, device, mean, std, bf16, channels_last)

    def epochs(batches_of_epoch):
        e = 0
        while True:
            sampler.set_epoch(e)
            yield from batches_of_epoch()
            e += 1

    on_device = torch.from_numpy(images).to(device)
    device_batches = DeviceBatches(on_device, torch.as_tensor(labels, device=device), idx,
                                   sampler, args.batch, spec.input_px, mean, std,
                                   channels_last, seed=0)
    rates["device"] = run_steps(model, optimizer, epochs(lambda: iter(device_batches)),
                                args.steps, device, mean, std, bf16, channels_last)

    loader = torch.utils.data.DataLoader(
        AugmentedCells(images, labels, idx, train_transform(spec.input_px)),
        batch_size=args.batch, sampler=sampler, num_workers=args.loader_workers,
        pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.loader_workers > 0)
    rates["loader"] = run_steps(model, optimizer, epochs(lambda: iter(loader)), args.steps,
                                device, mean, std, bf16, channels_last)

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    result = {
        "benchmark": "train_throughput", "arch": args.arch, "device": name,
        "precision": "bf16" if bf16 else "fp32", "batch": args.batch, "steps": args.steps,
        "loader_workers": args.loader_workers, "images": len(images),
        "crops_per_s": {k: round(v, 1) for k, v in rates.items()},
        "vs_alone": {k: round(rates[k] / rates["alone"], 3) for k in ("device", "loader")},
        "device_vs_loader": round(rates["device"] / rates["loader"], 2),
        "date": dt.date.today().isoformat(),
    }
    write_result(result, f"train_throughput-{name.replace(' ', '_')}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
