"""Where in a crop a classifier looked for its call: Grad-CAM and SmoothGrad, as DeepHeme showed
its cell classes.

- ``grad_cam`` (Selvaraju et al. 2017): a convolutional stage's activations weighted by the
  spatially averaged gradient of the class logit, the positive part, upsampled to the crop.
  Coarse (a 96 px crop is 6 x 6 at ResNeXt's third stage) and class-discriminative.
- ``smooth_grad`` (Smilkov et al. 2017): the gradient of the class logit with respect to the
  pixels, averaged over copies with Gaussian noise. Pixel-fine, less class-discriminative.

Both take ``uint8 (B, H, W, 3)`` crops as the pipeline and the jobs give them, run in float32
(gradients), and return ``float32 (B, H, W)`` maps in [0, 1] at the crops' size, for the class
each crop is explained as: ``target`` (one class index per crop) or, by default, the model's
own call. ``deletion_drop`` measures how much a map says: the fall in the class probability when
its most salient pixels are blanked.

>>> model = create_model("deepheme-resnext50")
>>> maps, called = grad_cam(model, crops)          # crops: (B, 96, 96, 3) uint8
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.models.factory import LoadedModel
from engine.models.inference import Predictor

METHODS = ("gradcam", "smoothgrad")


def cam_layer(model: LoadedModel, name: str | None = None, min_side: int = 6) -> str:
    """The stage Grad-CAM reads: ``name`` if given, else the deepest stage of the model's
    ``feature_info`` whose map is at least ``min_side`` pixels across at its input size (for
    ResNeXt-50 at 96 px: ``layer3``, 6 x 6; ``layer4`` would be 3 x 3)."""
    stages = [s for s in getattr(model.module, "feature_info", []) if s.get("module")]
    names = [s["module"] for s in stages]
    if name is not None:
        if name not in dict(model.module.named_modules()):
            raise ValueError(f"{model.spec.name} has no layer {name!r}; its stages: {names}")
        return name
    if not stages:
        raise ValueError(f"{model.spec.name} reports no convolutional stages (timm "
                         "feature_info); Grad-CAM needs one: use smoothgrad")
    fits = [s["module"] for s in stages
            if model.spec.input_px // int(s["reduction"]) >= min_side]
    return fits[-1] if fits else names[0]


def _setup(model: LoadedModel, device) -> Predictor:
    if model.spec.task != "classification" or not model.class_codes:
        raise ValueError(f"{model.spec.name} is not a classifier: saliency explains a class")
    # float32 and no padding: gradients, and one map per crop
    return Predictor(model, device="cpu" if model.int8 is not None and device is None
                     else device, amp=False, channels_last=False, bucket=0)


def _targets(logits: torch.Tensor, target) -> torch.Tensor:
    if target is None:
        return logits.argmax(1)
    t = torch.as_tensor(np.asarray(target, np.int64).reshape(-1), device=logits.device)
    if len(t) != len(logits):
        raise ValueError(f"{len(t)} targets for {len(logits)} crops")
    if t.min() < 0 or t.max() >= logits.shape[1]:
        raise ValueError(f"target class indices must lie in [0, {logits.shape[1]})")
    return t


def _finish(maps: torch.Tensor, size: tuple[int, int], pct: float = 100.0) -> np.ndarray:
    """``(b, h, w)`` non-negative maps -> resized to ``size``, each divided by its ``pct``
    percentile and clipped to [0, 1] (all zero stays zero)."""
    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    flat = maps.flatten(1)
    top = flat.max(1).values if pct >= 100 else torch.quantile(flat, pct / 100, dim=1)
    maps = maps / top.clamp_min(1e-12)[:, None, None]
    return maps.clamp(0, 1).float().cpu().numpy()


def grad_cam(model: LoadedModel, images: np.ndarray, target=None, layer: str | None = None,
             device=None, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps ``(B, H, W)`` and the class index each explains ``(B,)``.

    Args:
        model: a classifier from `create_model` (the float weights of an int8 checkpoint).
        images: ``uint8 (B, H, W, 3)`` crops of any size (resized to the model's input).
        target: class index per crop (into ``model.class_codes``); None: the model's call.
        layer: the module to read (`cam_layer` picks by default).
    """
    pred = _setup(model, device)
    name = cam_layer(model, layer)
    stage = dict(pred.module.named_modules())[name]
    seen: list[torch.Tensor] = []
    handle = stage.register_forward_hook(lambda _m, _i, out: seen.append(out))
    maps, called = [], []
    try:
        for lo in range(0, len(images), chunk):
            seen.clear()
            x = pred.preprocess(images[lo : lo + chunk])
            with torch.enable_grad():
                logits = pred.module(x)
                idx = _targets(logits, None if target is None
                               else np.asarray(target).reshape(-1)[lo : lo + chunk])
                acts = seen[-1]
                grads, = torch.autograd.grad(logits.gather(1, idx[:, None]).sum(), acts)
            weights = grads.mean((2, 3), keepdim=True)
            maps.append(_finish(F.relu((weights * acts).sum(1)).detach(), images.shape[1:3]))
            called.append(idx.cpu().numpy())
    finally:
        handle.remove()
    return _stack(maps, images), _stack_idx(called)


def smooth_grad(model: LoadedModel, images: np.ndarray, target=None, samples: int = 16,
                noise: float = 0.15, seed: int = 0, device=None, chunk: int = 32
                ) -> tuple[np.ndarray, np.ndarray]:
    """SmoothGrad maps ``(B, H, W)`` (the absolute mean gradient over ``samples`` noisy copies,
    noise sd ``noise`` x each crop's value range, summed over colours; each map scaled by its
    99th percentile) and the class index each explains ``(B,)``."""
    pred = _setup(model, device)
    gen = torch.Generator(device=pred.device).manual_seed(seed)
    maps, called = [], []
    for lo in range(0, len(images), chunk):
        x = pred.preprocess(images[lo : lo + chunk])
        with torch.no_grad():
            idx = _targets(pred.module(x), None if target is None
                           else np.asarray(target).reshape(-1)[lo : lo + chunk])
        sd = noise * (x.amax((1, 2, 3)) - x.amin((1, 2, 3))).view(-1, 1, 1, 1)
        total = torch.zeros_like(x)
        for _ in range(samples):
            noisy = (x + sd * torch.randn(x.shape, generator=gen, device=x.device)
                     ).requires_grad_(True)
            with torch.enable_grad():
                score = pred.module(noisy).gather(1, idx[:, None]).sum()
                grad, = torch.autograd.grad(score, noisy)
            total += grad
        maps.append(_finish((total / samples).abs().sum(1), images.shape[1:3], pct=99.0))
        called.append(idx.cpu().numpy())
    return _stack(maps, images), _stack_idx(called)


def saliency(method: str, model: LoadedModel, images: np.ndarray, target=None, **kwargs
             ) -> tuple[np.ndarray, np.ndarray]:
    """``grad_cam`` or ``smooth_grad`` by name (`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; choose from {METHODS}")
    return (grad_cam if method == "gradcam" else smooth_grad)(model, images, target, **kwargs)


def deletion_drop(model: LoadedModel, images: np.ndarray, maps: np.ndarray, target,
                  fraction: float = 0.2, device=None) -> np.ndarray:
    """Per crop, the class probability of ``target`` minus its probability once the
    ``fraction`` most salient pixels of ``maps`` are set to the crop's median colour (a map
    that points at what decided the call gives a large drop; a random one a small drop)."""
    images = np.asarray(images)
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(fraction * flat.shape[1])))
    top = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    blanked = images.copy().reshape(len(images), -1, 3)
    fill = np.median(images.reshape(len(images), -1, 3), axis=1).astype(np.uint8)
    rows = np.arange(len(images))
    blanked[rows[:, None], top] = fill[:, None, :]
    pred = _setup(model, device)
    target = np.asarray(target, np.int64).reshape(-1)
    before = _probs(pred, images)[rows, target]
    after = _probs(pred, blanked.reshape(images.shape))[rows, target]
    return (before - after).astype(np.float32)


def _probs(pred: Predictor, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Class probabilities of the float module (what the maps explain, int8 or not)."""
    out = []
    with torch.no_grad():
        for lo in range(0, len(images), chunk):
            out.append(pred.module(pred.preprocess(images[lo : lo + chunk])).softmax(1))
    return torch.cat(out).float().cpu().numpy()


def _stack(maps: list[np.ndarray], images: np.ndarray) -> np.ndarray:
    return np.concatenate(maps) if maps else np.zeros(images.shape[:3], np.float32)


def _stack_idx(called: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(called) if called else np.zeros(0, np.int64)
