"""The DeepHeme training recipe for one fold, written against a `Session` (local or Ray Train).

Prepared data is a folder of ``images.npy`` ``(N, H, W, 3) uint8`` at the model's µm/px with a
margin for augmentation, ``labels.npy`` ``(N,) int64``, and ``split.json`` with ``train``/``val``
index lists per fold.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time

import numpy as np
import torch

from engine.config import StorageConfig
from engine.models.factory import build_module
from engine.models.registry import get_spec
from engine.train.batch_augment import RECIPES, BatchAugment
from engine.train.loop import (EpochAverage, Session, TrainSettings, compile_in_place, evaluate,
                               load_train_state, loader_processes, make_optimizer,
                               normalize_chw, save_train_state, train_one_epoch, unwrap,
                               use_bf16)
from engine.train.splits import BalancedSampler


class AugmentedCells(torch.utils.data.Dataset):
    """Rows ``idx`` of a uint8 image array, augmented; yields ``(uint8 (H, W, 3), int)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, idx, transform):
        self.images, self.labels, self.idx, self.transform = images, labels, np.asarray(idx), \
            transform

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        j = int(self.idx[i])
        img = self.transform(image=np.ascontiguousarray(self.images[j]))["image"]
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[j])


class DeviceBatches:
    """Class-balanced training batches drawn from images held on the training device and
    augmented there (`BatchAugment`), normalised and ready for the model: ``(x, y)`` as
    `train_one_epoch` takes them. Each epoch's draws are seeded by ``(seed, epoch, rank)``, so a
    resumed run augments its remaining epochs as the uninterrupted one would have."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, idx, sampler, batch_size: int,
                 crop_px: int, mean, std, channels_last: bool, seed: int, rank: int = 0,
                 recipe=RECIPES["standard"]):
        self.images, self.labels = images, labels
        self.idx = torch.as_tensor(np.asarray(idx), device=images.device)
        self.sampler, self.batch_size = sampler, batch_size
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.generator = torch.Generator(device=images.device)
        self.augment = BatchAugment(crop_px, recipe, generator=self.generator)
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size  # full batches only, as drop_last

    def __iter__(self):
        self.generator.manual_seed((self.seed * 100_003 + self.sampler.epoch) * 1_009 + self.rank)
        order = torch.as_tensor(list(self.sampler), device=self.images.device)
        for b in range(len(self)):
            rows = self.idx[order[b * self.batch_size:(b + 1) * self.batch_size]]
            x = normalize_chw(self.augment(self.images[rows]), self.mean, self.std,
                              self.channels_last)
            yield x, self.labels[rows]


def centre_crops(images: torch.Tensor, labels: np.ndarray, idx, crop_px: int, batch_size: int):
    """Validation batches from images on the device: ``(uint8 (B, c, c, 3) centre crops, cpu
    labels)``, as the evaluation DataLoader gives them."""
    h, w = images.shape[1:3]
    top, left = (h - crop_px) // 2, (w - crop_px) // 2
    idx = np.asarray(idx)
    for b in range(0, len(idx), batch_size):
        rows = idx[b:b + batch_size]
        yield (images[torch.as_tensor(rows, device=images.device), top:top + crop_px,
                      left:left + crop_px], torch.as_tensor(labels[rows]))


def read_prepared(folder: str) -> dict:
    """The arrays `jobs.train_cell_classifier` prepares (``images`` memory-mapped, ``labels``,
    ``split``), as one dict: what a Ray job puts in the object store for its workers."""
    with open(os.path.join(folder, "split.json")) as fh:
        split = json.load(fh)
    return {"images": np.load(os.path.join(folder, "images.npy"), mmap_mode="r"),
            "labels": np.load(os.path.join(folder, "labels.npy")), "split": split}


def load_prepared(data: str | dict, fold: int):
    """A fold's ``(images, labels, train_idx, val_idx)`` from a prepared folder or
    `read_prepared`'s dict."""
    prepared = read_prepared(data) if isinstance(data, str) else data
    split = prepared["split"]["folds"][fold]
    return (prepared["images"], prepared["labels"], np.asarray(split["train"]),
            np.asarray(split["val"]))


def load_teachers(uris, arch: str, codes: list[str], device: torch.device,
                  storage: StorageConfig | None = None) -> list:
    """Frozen teacher modules on ``device``; each must score the student's codes in order.
    ``storage`` reaches ``s3://`` checkpoints (endpoint, region, profile)."""
    from engine.models.factory import create_model

    out = []
    for uri in uris:
        teacher = create_model(arch, uri, storage=storage)
        if list(teacher.class_codes) != list(codes):
            raise ValueError(f"teacher {uri} scores {list(teacher.class_codes)}, the student "
                             f"{list(codes)}: distillation needs the same codes in order")
        module = teacher.module.to(device).eval()
        if device.type == "cuda":
            module = module.to(memory_format=torch.channels_last)
        out.append(module.requires_grad_(False))
    return out


def load_init(module: torch.nn.Module, uri: str, arch: str, codes: list[str],
              storage: StorageConfig | None = None, log=print) -> None:
    """Load weights to fine-tune from into ``module``: a checkpoint of the same architecture.

    Where the checkpoint scores other codes (a lab adding blasts, or training on a subset), its
    backbone is kept and the classifier rows of the codes both share are copied to their new
    places; the rows of new codes keep their fresh initialisation.
    """
    from engine.models.factory import create_model

    # the weights as trained (another output stride allowed; no card temperature)
    start = create_model(arch, uri, storage=storage, any_build=True, calibrated=False)
    weights = {k: v.float() if v.is_floating_point() else v
               for k, v in start.module.state_dict().items()}
    old = list(start.class_codes)
    if old != list(codes):
        head = getattr(module, "pretrained_cfg", {}).get("classifier")
        own = module.state_dict()
        if not head or f"{head}.weight" not in own:
            raise ValueError(f"--init {uri} scores {old}, this run {list(codes)}, and the "
                             f"classifier layer of {arch} is not known to remap it")
        for name in (f"{head}.weight", f"{head}.bias"):
            if name in own:
                fresh = own[name].detach().clone()
                for i, code in enumerate(codes):
                    if code in old:
                        fresh[i] = weights[name][old.index(code)]
                weights[name] = fresh
        kept = [c for c in codes if c in old]
        log(f"init from {uri}: backbone kept; classifier rows of {len(kept)} of {len(codes)} "
            f"codes copied; new codes {[c for c in codes if c not in old]}, "
            f"dropped {[c for c in old if c not in codes]}")
    module.load_state_dict(weights)


def step_then_constant(settings: TrainSettings):
    """Step decay (x ``lr_gamma`` every ``lr_step_epochs``) that stops at ``swa_start``."""
    stop = settings.swa_start

    def factor(epoch: int) -> float:
        e = epoch if stop is None else min(epoch, stop)
        return settings.lr_gamma ** (e // settings.lr_step_epochs)

    return factor


def train_fold(config: dict, session: Session) -> None:
    """Train one fold; reports metrics every epoch with a checkpoint folder holding the resumable
    state (``state.safetensors`` + ``state.json``) and the best weights so far
    (``best.safetensors``).

    ``config`` keys: ``arch`` (registry name), ``class_codes``, ``data`` (prepared folder, or
    `read_prepared`'s dict: on Ray, an object ref to it),
    ``fold``, ``settings`` (`TrainSettings` fields), and optionally ``teachers`` (checkpoint
    URIs with the same class codes, distilled from when ``settings.distill_alpha`` > 0) and
    ``init`` (a checkpoint URI to fine-tune from instead of random weights; see `load_init`).
    """
    settings = TrainSettings.from_dict(config["settings"])
    torch.manual_seed(settings.seed + session.rank)
    spec = get_spec(config["arch"])
    codes = list(config["class_codes"])
    images, labels, train_idx, val_idx = load_prepared(config["data"], config["fold"])

    storage = StorageConfig(**config["storage"]) if config.get("storage") else None
    module = build_module(spec, len(codes))
    if config.get("init"):
        load_init(module, config["init"], spec.name, codes, storage,
                  log=print if session.rank == 0 else (lambda _: None))
    if session.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every training batch has the same shape
    if session.device.type == "cuda" or use_bf16(session.device, settings.precision):
        module = module.to(memory_format=torch.channels_last)  # NHWC: oneDNN / cuDNN bf16 paths
    model = session.prepare_model(compile_in_place(module, settings.compile))
    from timm.data import resolve_model_data_config

    dcfg = resolve_model_data_config(unwrap(model))
    mean, std = dcfg["mean"], dcfg["std"]
    optimizer = make_optimizer(model.parameters(), settings, session.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, step_then_constant(settings))
    teachers = load_teachers(config.get("teachers") or (), spec.name, codes, session.device,
                             storage)
    ema = None
    if settings.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(unwrap(model), decay=settings.ema_decay, use_warmup=True)
    swa = EpochAverage(unwrap(model), settings.swa_start) if settings.swa_start is not None \
        else None
    start, best_f1, bad, best_state = 0, -1.0, 0, None
    restore = session.restore_dir()
    if restore:
        doc, best_state = load_train_state(restore, model, optimizer, scheduler, ema, swa)
        start, best_f1, bad = doc["epoch"] + 1, doc["best_macro_f1"], doc["bad_epochs"]

    sampler = BalancedSampler(labels[train_idx], session.world_size, session.rank, settings.seed)
    if settings.augment == "device":
        on_device = torch.from_numpy(np.array(images)).to(session.device)  # off the mmap
        channels_last = session.device.type == "cuda" or use_bf16(session.device,
                                                                  settings.precision)
        train_loader = DeviceBatches(on_device, torch.as_tensor(labels, device=session.device),
                                     train_idx, sampler, settings.batch_size, spec.input_px,
                                     mean, std, channels_last, settings.seed, session.rank,
                                     RECIPES[settings.colour])

        def val_loader():
            return centre_crops(on_device, labels, val_idx, spec.input_px,
                                settings.batch_size * 2)
    elif settings.augment == "cpu":
        from engine.train.augment import eval_transform, train_transform  # albumentations

        pin = session.device.type == "cuda"
        processes = loader_processes(settings.num_workers)
        train_loader = torch.utils.data.DataLoader(
            AugmentedCells(images, labels, train_idx,
                           train_transform(spec.input_px, RECIPES[settings.colour])),
            batch_size=settings.batch_size, sampler=sampler, num_workers=processes,
            pin_memory=pin, drop_last=True, persistent_workers=processes > 0)
        val_batches = torch.utils.data.DataLoader(
            AugmentedCells(images, labels, val_idx, eval_transform(spec.input_px)),
            batch_size=settings.batch_size * 2, num_workers=processes, pin_memory=pin)

        def val_loader():
            return val_batches
    else:
        raise ValueError(f"augment must be 'cpu' or 'device', not {settings.augment!r}")
    if len(train_loader) == 0:  # full batches only: its epochs would train nothing
        raise ValueError(f"an epoch of {len(sampler)} images holds no full batch of "
                         f"{settings.batch_size} (jobs.train_cell_classifier fits it to the data)")

    started = time.time()
    for epoch in range(start, settings.epochs):
        if bad >= settings.patience:
            break
        if settings.max_minutes and (time.time() - started) / 60 > settings.max_minutes:
            break
        t0 = time.time()
        sampler.set_epoch(epoch)
        train_loss = train_one_epoch(model, train_loader, optimizer, session.device, mean, std,
                                     settings, ema, teachers)
        scheduler.step()
        if swa is not None:
            swa.update(unwrap(model), epoch)
        # the weights we would ship: the SWA average once it holds an epoch, else the EMA or model
        scored = swa.module if swa is not None and swa.n else \
            ema.module if ema is not None else unwrap(model)
        val = evaluate(scored, val_loader(), session.device, mean, std, codes, settings.precision)
        if val["macro_f1"] > best_f1:
            best_f1, bad = val["macro_f1"], 0
            best_state = copy.deepcopy({k: v.detach().cpu()
                                        for k, v in scored.state_dict().items()})
        else:
            bad += 1
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                   "best_val_macro_f1": best_f1, "lr": scheduler.get_last_lr()[0],
                   "seconds": round(time.time() - t0, 2), "fold": config["fold"],
                   **({"swa_epochs": swa.n} if swa is not None else {})}
        with tempfile.TemporaryDirectory() as tmp:
            if session.rank == 0:
                save_train_state(tmp, model, optimizer, scheduler,
                                 {"epoch": epoch, "best_macro_f1": best_f1, "bad_epochs": bad},
                                 best_state, ema, swa)
            session.report(metrics, tmp if session.rank == 0 else None)
