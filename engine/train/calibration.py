"""Per-class logit offsets fitted on a validation split, folded into the classifier's bias.

A network trained on class-balanced (up-sampled) data and stopped early can sit on the wrong side
of the line between two adjacent classes (promyelocyte / myelocyte, band / segmented): one class
over-called, its neighbour under-called. Adding an offset per class to the logits moves those
lines; the offsets that maximise macro F1 on the validation split (never the test split) are
found by coordinate ascent, and added to the final layer's bias, so the checkpoint stays a plain
model and every consumer (evaluation, ``process_slides``) sees the same outputs.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import f1_score

from engine.models.factory import LoadedModel
from engine.models.inference import Predictor
from engine.train.metrics import classification_metrics

GRID = np.round(np.arange(-1.0, 1.0001, 0.1), 2)


def collect_view_logits(model: LoadedModel, images: np.ndarray, tta: bool = True,
                        batch_size: int = 128, device=None) -> np.ndarray:
    """``(V, N, C) float32`` logits of every view (8 with ``tta``) of every image."""
    predictor = Predictor(model, device)
    parts = [predictor.view_logits(images[i : i + batch_size], tta).cpu().numpy()
             for i in range(0, len(images), batch_size)]
    views = 8 if tta else 1
    c = len(model.class_codes)
    return np.concatenate(parts, axis=1) if parts else np.zeros((views, 0, c), np.float32)


def probabilities(view_logits: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mean over views of softmax(logits + offsets), as ``Predictor.predict`` computes it."""
    z = torch.from_numpy(view_logits + offsets.astype(np.float32))
    return torch.softmax(z, dim=2).mean(0).numpy()


def macro_f1(y: np.ndarray, probs: np.ndarray) -> float:
    """Macro F1 over the classes present in ``y``, as ``classification_metrics`` reports it."""
    return float(f1_score(y, probs.argmax(1), labels=np.unique(y), average="macro",
                          zero_division=0))


def fit_offsets(view_logits: np.ndarray, y: np.ndarray, rounds: int = 3,
                grid: np.ndarray = GRID, min_gain: float | None = None) -> np.ndarray:
    """Offsets ``(C,)`` maximising macro F1 of ``y`` by coordinate ascent over ``grid``.

    A change is kept only where it raises macro F1 by more than ``min_gain`` (default
    ``2 / len(y)``, about two images put right where classes are balanced; the smallest offset
    wins ties), so classes that are already well placed keep 0 rather than chasing one image."""
    n = view_logits.shape[2]
    min_gain = 2.0 / max(len(y), 1) if min_gain is None else min_gain
    offsets = np.zeros(n)
    best = macro_f1(y, probabilities(view_logits, offsets))
    for _ in range(rounds):
        changed = False
        for c in range(n):
            for value in sorted(grid, key=abs):
                trial = offsets.copy()
                trial[c] = value
                score = macro_f1(y, probabilities(view_logits, trial))
                if score > best + min_gain:
                    best, offsets, changed = score, trial, True
        if not changed:
            break
    return offsets


def classifier_bias_key(model: LoadedModel) -> str:
    """The state-dict key of the final layer's bias (``fc.bias`` for ResNeXt)."""
    head = model.module.get_classifier()
    name = next(n for n, m in model.module.named_modules() if m is head)
    return f"{name}.bias"


def calibrate(model: LoadedModel, images: np.ndarray, y: np.ndarray, tta: bool = True,
              device=None) -> dict:
    """Fit offsets on validation ``images`` with labels ``y`` (indices into the model's class
    codes); returns the offsets by code and the validation metrics before and after."""
    logits = collect_view_logits(model, images, tta, device=device)
    offsets = fit_offsets(logits, y)
    codes = list(model.class_codes)
    before = classification_metrics(y, probabilities(logits, np.zeros(len(codes))), codes)
    after = classification_metrics(y, probabilities(logits, offsets), codes)
    return {"offsets": {c: round(float(o), 2) for c, o in zip(codes, offsets)},
            "val_before": _summary(before), "val_after": _summary(after)}


def _summary(m: dict) -> dict:
    keep = ("accuracy", "macro_f1", "classes_precision_recall_above_0_8", "n")
    return {k: m[k] for k in keep} | {"per_class": {
        c: {k: round(v[k], 4) for k in ("precision", "recall")} for c, v in m["per_class"].items()}}
