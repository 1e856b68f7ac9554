"""Training loop pieces in plain torch: settings, one epoch, evaluation, resumable state.

Distribution is behind a small `Session` (rank, device, model wrapping, reporting, restoring):
`LocalSession` here runs in-process; ``engine.pipeline.train`` provides one on Ray Train.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from engine.models.inference import native_bf16
from engine.train import COMPILE_MODES
from engine.train.metrics import classification_metrics


@dataclass(frozen=True)
class TrainSettings:
    """Adam with step decay and early stopping, as DeepHeme trained."""

    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    lr_step_epochs: int = 10
    lr_gamma: float = 0.3
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # "adam" (DeepHeme: L2 in the gradient) or "adamw" (decoupled)
    mixup_alpha: float = 0.0  # > 0: mixup with Beta(alpha, alpha) on every batch
    label_smoothing: float = 0.05
    # Weight EMA. Off by default: with Adam at 1e-3 and BatchNorm, the averaged weights lag far
    # behind and score worse (measured on PBC: val macro F1 0.89 vs 0.91 without).
    ema_decay: float | None = None
    # Knowledge distillation from teacher checkpoints (their softmax averaged): the loss is
    # (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T). 0: off.
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    # Stochastic weight averaging (Izmailov et al. 2018): from this epoch on the learning rate
    # stops decaying and the weights at each epoch's end are averaged with equal weight; the
    # average is what gets scored and shipped. None: off.
    swa_start: int | None = None
    # bf16 autocast: "auto" on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX: about 2.6x
    # faster ResNeXt-50 training on 2 cores here), "bf16" or "fp32" to force.
    precision: str = "auto"
    # Where augmentation runs: "cpu" (albumentations in DataLoader processes) or "device" (the
    # same recipe on whole batches in torch, on the training device: `BatchAugment`). On a GPU
    # the DataLoader processes can bound training; "device" keeps the images on the GPU.
    augment: str = "cpu"
    # the augmentation's colour ranges: "standard" (DeepHeme's: `RECIPE`) or "strong"
    # (`STRONG_COLOUR`, wider stain and colour jitter); the shape ranges are the same
    colour: str = "standard"
    # torch.compile the model's forward in place ("" off, else a mode: `COMPILE_MODES`). On a
    # GPU, training a small model on 96 px crops is bound by kernel launches (the H200 trained
    # ResNeXt-50 at 3.7k crops/s where it infers at 51k); compiling fuses them. It does not
    # change the recipe, so a run resumes with or without it. The first steps pay the compile.
    compile: str = ""
    patience: int = 10
    # DataLoader processes (albumentations); None: this process's CPUs, at most 4
    # (`loader_processes`), where a fixed 4 drew torch's warning on a 2-core machine
    num_workers: int | None = None
    max_steps_per_epoch: int | None = None  # tests and smoke runs
    max_minutes: float | None = None  # wall-time budget; the best model so far is kept
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        return cls(**d)


def loader_processes(asked: int | None) -> int:
    """The DataLoader processes a training process runs: ``asked``, or where None the CPUs it
    may use (its affinity, the count torch's DataLoader checks against), at most 4."""
    if asked is not None:
        return asked
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cpus or 1)


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def restore_dir(self) -> str | None: ...


class LocalSession:
    """One process, checkpoints kept in ``<root>/checkpoint`` (replaced atomically each epoch)."""

    rank = 0
    world_size = 1

    def __init__(self, root: str, device: torch.device | None = None, log=print):
        self.root = root
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.log = log
        self.history: list[dict] = []
        os.makedirs(root, exist_ok=True)

    def prepare_model(self, module):
        return module.to(self.device)

    def report(self, metrics, checkpoint_dir):
        self.history.append(metrics)
        self.log(json.dumps(metrics))
        if checkpoint_dir:
            final = os.path.join(self.root, "checkpoint")
            old = final + ".old"
            if os.path.exists(final):
                os.replace(final, old)
            shutil.copytree(checkpoint_dir, final)
            shutil.rmtree(old, ignore_errors=True)

    def restore_dir(self):
        path = os.path.join(self.root, "checkpoint")
        return path if os.path.exists(os.path.join(path, "state.json")) else None


def compile_in_place(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``module`` with its forward compiled by ``torch.compile(mode=mode)`` (``""``: as it is).

    In place (`torch.nn.Module.compile`): its ``state_dict`` keys stay those of the plain
    module, so checkpoints, resumption and DDP wrapping are unchanged, and a deep copy (EMA,
    SWA) is a plain module again."""
    if not mode:
        return module
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    module.compile(mode=mode)
    return module


def make_optimizer(params, settings: TrainSettings, device: torch.device):
    """The recipe's Adam (or AdamW): one fused kernel per step on CUDA instead of a few per
    parameter group."""
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings.optimizer]
    return opt_cls(params, lr=settings.lr, weight_decay=settings.weight_decay,
                   **({"fused": True} if device.type == "cuda" else {}))


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether to train and score under bf16 autocast on ``device``."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision != "auto":
        return precision == "bf16"
    return native_bf16(device)


class EpochAverage:
    """Equal-weight running mean of a model's weights and BatchNorm buffers, taken once per
    epoch from ``start`` on (SWA). ``module`` is the average; ``n`` how many epochs it holds."""

    def __init__(self, model: torch.nn.Module, start: int):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.start, self.n = start, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, epoch: int) -> None:
        if epoch < self.start:
            return
        self.n += 1
        src = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = src[name].detach().to(avg.device)
            if avg.is_floating_point() and self.n > 1:
                avg.lerp_(new.to(avg.dtype), 1.0 / self.n)
            else:
                avg.copy_(new)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module


def normalize_batch(x: torch.Tensor, mean, std, device, channels_last: bool) -> torch.Tensor:
    """``(B, H, W, 3) uint8`` -> ``(B, 3, H, W) float`` normalised on ``device``."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return normalize_chw(x, mean, std, channels_last)


def normalize_chw(x: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    """``(B, 3, H, W) float`` on 0-255 -> normalised by the model's mean and std (on 0-1)."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def distill_loss(student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """``T^2 * KL(teacher || student)`` at temperature ``T`` (Hinton et al. 2015); the teacher's
    probabilities are already softened at ``T``."""
    log_p = F.log_softmax(student / temperature, dim=1)
    return F.kl_div(log_p, teacher_probs, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def teacher_probs(teachers, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softened class probabilities averaged over the teacher modules (an ensemble)."""
    return torch.stack([torch.softmax(t(x).float() / temperature, dim=1)
                        for t in teachers]).mean(0)


def train_one_epoch(model, loader, optimizer, device, mean, std, settings: TrainSettings,
                    ema=None, teachers=()) -> float:
    model.train()
    cuda = device.type == "cuda"
    bf16 = use_bf16(device, settings.precision)
    total, n = 0.0, 0
    for step, (x, y) in enumerate(loader):
        if settings.max_steps_per_epoch and step >= settings.max_steps_per_epoch:
            break
        if x.dtype == torch.uint8:  # (B, H, W, 3) from a DataLoader; device batches come ready
            x = normalize_batch(x, mean, std, device, channels_last=cuda or bf16)
        y = y.to(device, non_blocking=True)
        lam, perm = 1.0, None
        if settings.mixup_alpha > 0:
            lam = float(np.random.beta(settings.mixup_alpha, settings.mixup_alpha))
            perm = torch.randperm(len(y), device=device)
            x = lam * x + (1 - lam) * x[perm]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
            if perm is not None:
                loss = lam * loss + (1 - lam) * F.cross_entropy(
                    logits, y[perm], label_smoothing=settings.label_smoothing)
            if teachers and settings.distill_alpha > 0:
                t = settings.distill_temperature
                soft = teacher_probs(teachers, x, t)
                loss = (1 - settings.distill_alpha) * loss + settings.distill_alpha * \
                    distill_loss(logits, soft, t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(unwrap(model))
        total = total + loss.detach() * len(y)  # on the device: no sync per step
        n += len(y)
    return float(total) / max(n, 1)


@torch.inference_mode()
def predict_loader(model, loader, device, mean, std, precision: str = "auto"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(probs (N, C), labels (N,))`` over a loader of ``(uint8 images, int labels)``."""
    model.eval()
    cuda = device.type == "cuda"
    bf16 = use_bf16(device, precision)
    probs, labels = [], []
    for x, y in loader:
        x = normalize_batch(x, mean, std, device, channels_last=cuda or bf16)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            probs.append(torch.softmax(model(x).float(), 1).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def evaluate(model, loader, device, mean, std, class_codes, precision: str = "auto") -> dict:
    probs, labels = predict_loader(model, loader, device, mean, std, precision)
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-8, 1)).mean())
    m = classification_metrics(labels, probs, class_codes)
    return {"loss": nll, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "mean_auc": m["mean_auc"]}


# ---- resumable state: safetensors for tensors, JSON for the rest (no pickle anywhere) ----

def save_train_state(folder: str, model, optimizer, scheduler, extra: dict,
                     best_state: dict[str, torch.Tensor], ema=None, swa=None) -> None:
    os.makedirs(folder, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in unwrap(model).state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous()
                        for k, v in ema.module.state_dict().items()})
    if swa is not None and swa.n:
        tensors.update({f"swa.{k}": v.detach().cpu().contiguous()
                        for k, v in swa.module.state_dict().items()})
        extra = {**extra, "swa_n": swa.n}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{pid}.{name}"] = t.detach().cpu().contiguous()
    save_file(tensors, os.path.join(folder, "state.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in best_state.items()},
              os.path.join(folder, "best.safetensors"))
    doc = {"param_groups": opt["param_groups"], "scheduler": scheduler.state_dict(), **extra}
    with open(os.path.join(folder, "state.json"), "w") as fh:
        json.dump(doc, fh, default=str)


def load_train_state(folder: str, model, optimizer, scheduler, ema=None, swa=None
                     ) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = load_file(os.path.join(folder, "state.safetensors"))
    with open(os.path.join(folder, "state.json")) as fh:
        doc = json.load(fh)
    unwrap(model).load_state_dict({k[6:]: v for k, v in tensors.items()
                                   if k.startswith("model.")})
    if ema is not None and any(k.startswith("ema.") for k in tensors):
        ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if swa is not None and doc.get("swa_n"):
        swa.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("swa.")})
        swa.n = int(doc["swa_n"])
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    scheduler.load_state_dict(doc["scheduler"])
    return doc, load_file(os.path.join(folder, "best.safetensors"))


def settings_dict(s: TrainSettings) -> dict:
    return asdict(s)
