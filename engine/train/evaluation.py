"""Evaluate one classifier or an ensemble (probabilities averaged) on labelled cell images."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from engine.classes import covers, get_class, to_group
from engine.config import CellDetectionConfig
from engine.focus import edge_blur_um
from engine.models.factory import LoadedModel
from engine.models.inference import EnsemblePredictor, default_device, native_bf16
from engine.stain import nuclear_colour, stain_summary
from engine.train.data import LabelledImages, Shift, load_cell_images
from engine.train.metrics import BOOTSTRAP_RESAMPLES, classification_metrics, paired_bootstrap


def predict_images(models: list[LoadedModel], images: np.ndarray, batch_size: int = 256,
                   device=None, with_features: bool = False, tta: bool = False,
                   amp: bool = True):
    """Mean probabilities over ``models`` (same class codes) and, optionally, the first model's
    penultimate features. ``images``: ``(N, S, S, 3) uint8`` at the models' input µm/px.
    ``amp``: bf16 autocast where the device runs it natively (else float32)."""
    codes = models[0].class_codes
    ensemble = EnsemblePredictor(models, device, amp=amp)
    probs, feats = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        probs.append(ensemble.predict(batch, tta))
        if with_features:
            feats.append(ensemble.members[0].embed(batch))
    probs = np.concatenate(probs) if probs else np.zeros((0, len(codes)), np.float32)
    return probs, (np.concatenate(feats) if feats else None)


def ood_report(model: LoadedModel, features: np.ndarray | None, codes) -> dict | None:
    """How many of the evaluated images lie outside the first model's training data
    (`engine.models.ood`), over all rows and per labelled code; None without a density. On a
    new lab's labelled cells this says how far they are from what the model has seen."""
    if model.ood is None or features is None or not len(features):
        return None
    import torch

    far = (model.ood.distance(torch.from_numpy(np.asarray(features))).numpy()
           > model.ood.threshold)
    per_code = collections.defaultdict(list)
    for code, f in zip(codes, far):
        per_code[code].append(bool(f))
    return {"threshold": round(model.ood.threshold, 4),
            "flagged_fraction": round(float(far.mean()), 4),
            "per_code": {c: round(sum(v) / len(v), 4) for c, v in sorted(per_code.items())}}


def focus_report(crops: np.ndarray, mpp: float, added_um: float) -> dict:
    """How blurred the evaluated crops are: the blur added, the median measured and the share
    that the pipeline's default ``cells.max_blur_um`` calls out of focus."""
    blur = edge_blur_um(crops, mpp)
    limit = CellDetectionConfig().max_blur_um
    known = blur[~np.isnan(blur)]
    return {"added_blur_um": added_um,
            "median_blur_um": float(np.median(known)) if len(known) else None,
            "max_blur_um": limit,
            "out_of_focus_share": float((known > limit).mean()) if len(known) else None}


def evaluate_classifier(models: list[LoadedModel], data: LabelledImages, source_mpp: float,
                        batch_size: int = 256, device=None, tta: bool = True,
                        amp: bool = True, shift: Shift = Shift(),
                        bootstrap: int = BOOTSTRAP_RESAMPLES,
                        baseline: list[LoadedModel] | None = None,
                        baseline_mpp: float | None = None) -> tuple[dict, dict]:
    """Metrics on the rows whose code the model predicts; group-level accuracy on rows labelled
    only with a group (``IG`` when the model predicts M2–M4); other rows reported, not dropped.
    ``focus``: how blurred the images are as the model gets them (`engine.focus`), after the
    ``shift`` (`engine.train.data.Shift`: blur, hue and saturation changed at the images' own
    pixels, as another scanner or stain would; none: as they are), which ``shift`` reports.
    ``bootstrap``: resamples for the 95 % intervals (``ci95``; 0: none). ``baseline``: another
    model (or ensemble) of the same input scored on the same images, on the model's class codes
    (`compare_to_baseline`); ``comparison`` holds its figures and the paired differences
    (`engine.train.metrics.paired_bootstrap`).
    ``baseline_mpp``: the images' µm/px as the baseline was trained to take them (a model
    trained at a measured 0.107 against one trained at the quoted 0.1); default ``source_mpp``.

    Returns:
        ``(report, arrays)`` where arrays holds ``probs``, ``features``, ``y`` (-1 for rows not
        scored at class level) for plots.
    """
    spec = models[0].spec
    codes = list(models[0].class_codes)
    if baseline:
        check_comparable(models[0], baseline[0])
    crop = load_cell_images(data.paths, source_mpp, spec.input_mpp, spec.input_px,
                            shift=shift)
    probs, feats = predict_images(models, crop, batch_size, device, with_features=True,
                                  tta=tta, amp=amp)
    index = {c: i for i, c in enumerate(codes)}
    y = np.array([index.get(c, -1) for c in data.codes])
    scored = y >= 0
    report = classification_metrics(y[scored], probs[scored], codes,
                                    bootstrap) if scored.any() else {}
    pred_codes = [codes[i] for i in probs.argmax(1)] if len(probs) else []
    group_rows = collections.defaultdict(lambda: [0, 0])
    uncovered = collections.Counter()
    for code, pred, ok in zip(data.codes, pred_codes, scored):
        if ok:
            continue
        if get_class(code).members and covers(codes, code):
            group_rows[code][0] += 1
            group_rows[code][1] += int(to_group(pred) == code)
        else:
            uncovered[code] += 1
    report.update({
        "model": spec.name,
        "weights": [m.weights for m in models],
        "ensemble_size": len(models),
        "tta": tta,
        "precision": "bf16" if amp and native_bf16(device or default_device()) else "fp32",
        "group_level": {c: {"n": n, "accuracy": k / n} for c, (n, k) in sorted(group_rows.items())},
        "not_covered": dict(sorted(uncovered.items())),
        "model_class_codes": codes,
        "source_mpp": source_mpp,
        "ood": ood_report(models[0], feats, data.codes),
        "focus": focus_report(crop, spec.input_mpp, shift.blur_um),
        "shift": dataclasses.asdict(shift),
        # the nuclei's colour as the model gets them, platelets (no nucleus) left out
        "stain": stain_summary(nuclear_colour(
            crop[np.asarray([get_class(c).nucleated for c in data.codes], bool)],
            spec.input_mpp)),
    })
    if baseline and scored.any():
        baseline_mpp = baseline_mpp or source_mpp
        theirs = crop[scored] if baseline_mpp == source_mpp else load_cell_images(
            [p for p, ok in zip(data.paths, scored) if ok], baseline_mpp, spec.input_mpp,
            spec.input_px, shift=shift)
        report["comparison"] = compare_to_baseline(baseline, theirs, y[scored], probs[scored],
                                                   codes, batch_size, device, tta, amp,
                                                   bootstrap)
        report["comparison"]["baseline"]["source_mpp"] = baseline_mpp
    return report, {"probs": probs, "features": feats, "y": y}


def check_comparable(model: LoadedModel, baseline: LoadedModel) -> None:
    """Raises ValueError, naming both, where ``baseline`` does not take the images as ``model``
    does (another input size or µm/px) or calls none of its codes: no paired comparison then.
    Other class codes are compared on the model's (`compare_to_baseline`)."""
    a, b = model.spec, baseline.spec
    if (b.input_px, b.input_mpp) != (a.input_px, a.input_mpp) or \
            not set(baseline.class_codes) & set(model.class_codes):
        raise ValueError(
            f"the baseline ({b.name}: {len(baseline.class_codes)} classes, {b.input_px} px at "
            f"{b.input_mpp} µm/px) is not scored as the model is ({a.name}: "
            f"{len(model.class_codes)} classes, {a.input_px} px at {a.input_mpp} µm/px): "
            f"compare models of the same input that share class codes")


def in_codes(probs: np.ndarray, codes, columns) -> np.ndarray:
    """``(N, len(codes))`` probabilities as ``(N, len(columns))``: each code's in its column,
    0 in the columns of codes it lacks."""
    out = np.zeros((len(probs), len(columns)), np.float32)
    out[:, [list(columns).index(c) for c in codes]] = probs
    return out


def compare_to_baseline(baseline: list[LoadedModel], crops: np.ndarray, y: np.ndarray,
                        probs: np.ndarray, codes, batch_size: int, device, tta: bool, amp: bool,
                        bootstrap: int) -> dict:
    """The baseline's figures on ``crops`` (the scored images, as it takes them) and the
    model's paired differences from them (``probs``: the model's, on the same images).

    A baseline of other codes (the reference against a fine-tune on a lab's first few
    classes, or on classes it lacks) is scored on the model's: its call of a code the model
    lacks is a wrong call, and a model code it lacks is one it never calls; ``codes`` says
    which differ."""
    theirs, _ = predict_images(baseline, crops, batch_size, device, tta=tta, amp=amp)
    codes, their_codes = list(codes), list(baseline[0].class_codes)
    columns = codes + [c for c in their_codes if c not in codes]
    out = {}
    if their_codes != codes:
        theirs, probs = in_codes(theirs, their_codes, columns), in_codes(probs, codes, columns)
        out["codes"] = {
            "baseline_only": [c for c in their_codes if c not in codes],
            "model_only": [c for c in codes if c not in their_codes],
            "rule": "scored on the model's codes: a baseline call of a code the model lacks is "
                    "a wrong call; a model code the baseline lacks is never called by it"}
    m = classification_metrics(y, theirs, columns)
    return {"baseline": {"weights": [b.weights for b in baseline],
                         "ensemble_size": len(baseline),
                         **{k: m[k] for k in ("accuracy", "macro_f1",
                                              "classes_precision_recall_above_0_8")},
                         **{k: m["calibration"][k] for k in ("ece", "nll", "mean_confidence")}},
            **out, **paired_bootstrap(y, probs.argmax(1), theirs.argmax(1), columns,
                                      bootstrap or BOOTSTRAP_RESAMPLES)}


def probe_embeddings(features: np.ndarray, codes, seed: int = 0, test_fraction: float = 0.2
                     ) -> dict:
    """The DinoBloom protocol on frozen embeddings: a logistic-regression linear probe, 1-NN and
    20-NN (cosine), each scored by weighted F1 and balanced accuracy on a stratified hold-out."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(codes)
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                              random_state=seed)
    probes = {
        "linear_probe": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "knn_1": KNeighborsClassifier(1, metric="cosine"),
        "knn_20": KNeighborsClassifier(min(20, len(tr)), metric="cosine"),
    }
    out = {"n_train": int(len(tr)), "n_test": int(len(te)), "dim": int(features.shape[1])}
    for name, clf in probes.items():
        pred = clf.fit(features[tr], y[tr]).predict(features[te])
        out[name] = {"weighted_f1": float(f1_score(y[te], pred, average="weighted")),
                     "balanced_accuracy": float(balanced_accuracy_score(y[te], pred))}
    return out
