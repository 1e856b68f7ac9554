"""Per-class logit offsets fitted on a validation split, folded into the classifier's bias.

A network trained on class-balanced (up-sampled) data and stopped early can sit on the wrong side
of the line between two adjacent classes (promyelocyte / myelocyte, band / segmented): one class
over-called, its neighbour under-called. Adding an offset per class to the logits moves those
lines; the offsets that maximise macro F1 on the validation split (never the test split) are
found by coordinate ascent, and added to the final layer's bias, so the checkpoint stays a plain
model and every consumer (evaluation, ``process_slides``) sees the same outputs.
They seldom carry over: on the reference's held-out PBC images, offsets fitted on some of them
lowered macro F1 on the others more often than they raised it (``benchmarks/offset_spread.py``),
so `jobs.calibrate_cell_classifier` fits them only with ``--offsets``.

A softmax temperature (`fit_temperature`) changes no call and fixes what the probabilities
mean: fitted on the same validation split by likelihood, it goes in the card
(``temperature.value``), and `engine.models.create_model` divides the final layer by it when it
loads the checkpoint, so every consumer sees the calibrated ``class_prob`` too.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.models.factory import LoadedModel
from engine.models.inference import Predictor
from engine.train.metrics import classification_metrics

GRID = np.round(np.arange(-1.0, 1.0001, 0.1), 2)
TEMPERATURE_BOUNDS = (0.05, 20.0)  # where `fit_temperature` looks
# the fewest validation images a temperature is fitted on: on fewer the fit is mostly noise. The
# reference's 1,337 PBC test images give 0.67; of 200 draws of 8 of them, 37 % hit the 0.05
# bound (every probability then near 1), of 32, 15 %; of 100, none (95 % of them 0.42-0.77):
# benchmarks/temperature_spread.py
MIN_TEMPERATURE_IMAGES = 100


def too_few_for_temperature(n: int) -> str | None:
    """Why ``n`` validation images are too few to fit a temperature on, or None."""
    if n >= MIN_TEMPERATURE_IMAGES:
        return None
    return (f"{n} validation images, fewer than the {MIN_TEMPERATURE_IMAGES} a temperature is "
            "fitted on (on 8 of PBC's the fit hit its 0.05 bound more than 1 time in 3, "
            "every probability then near 1)")


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
    """Macro F1 over the classes present in ``y``, as ``classification_metrics`` reports it
    (scikit-learn's ``f1_score(average="macro", zero_division=0)``), from the confusion counts:
    `fit_offsets` scores some 700 trials a fit, and scikit-learn's checks took 1 ms each."""
    y = np.asarray(y, np.int64)
    k = probs.shape[1]
    counts = np.bincount(y * k + probs.argmax(1), minlength=k * k).reshape(k, k)
    tp = np.diag(counts).astype(np.float64)
    wrong = counts.sum(0) + counts.sum(1) - 2 * tp  # false positives plus false negatives
    present = np.unique(y)
    return float(np.mean(2 * tp[present] / (2 * tp[present] + wrong[present])))


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


def fit_temperature(view_logits: np.ndarray, y: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The softmax temperature ``T`` that minimises the negative log-likelihood of ``y`` under
    the mean over views of softmax(logits / T), as ``Predictor.predict`` averages views
    (Guo et al. 2017). Dividing logits by a positive ``T`` changes no view's call; it makes the
    probabilities say how often calls like them are right (``T`` < 1: the model was
    underconfident, as label smoothing leaves it)."""
    from scipy.optimize import minimize_scalar

    logits = torch.from_numpy(np.ascontiguousarray(view_logits, np.float32)).double()
    target = torch.from_numpy(np.asarray(y, np.int64))

    def nll(log_t: float) -> float:
        p = torch.softmax(logits / np.exp(log_t), dim=2).mean(0)
        return float(-torch.log(p[torch.arange(len(target)), target].clamp_min(1e-12)).mean())

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    return float(np.exp(minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                                        options={"xatol": 1e-4}).x))


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


def fit_temperature_on(model: LoadedModel, images: np.ndarray, y: np.ndarray,
                       tta: bool = True, device=None) -> dict:
    """Fit a temperature on validation ``images`` (labels ``y``: indices into the model's
    codes) with the model as trained; returns it (``value``) and the validation metrics,
    with their calibration error, before and after."""
    logits = collect_view_logits(model, images, tta, device=device)
    t = round(fit_temperature(logits, y), 4)  # as the card records it
    codes = list(model.class_codes)
    zero = np.zeros(len(codes))
    before = classification_metrics(y, probabilities(logits, zero), codes)
    after = classification_metrics(y, probabilities(logits / t, zero), codes)
    keep = ("accuracy", "macro_f1", "n")
    return {"value": t, **{
        side: {k: m[k] for k in keep} | {k: m["calibration"][k]
                                         for k in ("ece", "nll", "mean_confidence")}
        for side, m in (("val_before", before), ("val_after", after))}}


def _summary(m: dict) -> dict:
    keep = ("accuracy", "macro_f1", "classes_precision_recall_above_0_8", "n")
    return {k: m[k] for k in keep} | {"per_class": {
        c: {k: round(v[k], 4) for k in ("precision", "recall")} for c, v in m["per_class"].items()}}
