"""Classification metrics as plain JSON-able dicts, with bootstrap intervals.

A held-out split is a sample: on PBC's 1,337 test images a macro F1 moves by about a point
between resamples, as much as most changes to a training recipe move it. `bootstrap_intervals`
says how far a figure can be trusted; `paired_bootstrap` says whether one model beats another on
the same images (resampling the images once for both, so that what the two get right together
cancels out), which unpaired intervals cannot tell.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

BOOTSTRAP_RESAMPLES = 2000
_CHUNK = 250  # resamples a pass: bounds the (resamples, images) weight matrix


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_codes,
                           bootstrap: int = 0, seed: int = 0) -> dict:
    """Accuracy, macro F1, mean one-vs-rest AUC, and per-class precision/recall/F1/AUC/support.

    Args:
        y_true: ``(N,) int`` indices into ``class_codes``.
        probs: ``(N, C) float`` probabilities.
        class_codes: the C codes.
        bootstrap: resamples for 95 % intervals (``ci95``: `bootstrap_intervals`); 0, none.
        seed: the resamples' seed.
    """
    codes = list(class_codes)
    labels = np.arange(len(codes))
    y_pred = probs.argmax(1)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class, aucs = {}, []
    for i, code in enumerate(codes):
        pos = y_true == i
        auc = float(roc_auc_score(pos, probs[:, i])) if 0 < pos.sum() < len(pos) else None
        if auc is not None:
            aucs.append(auc)
        per_class[code] = {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                           "auc": auc, "support": int(s[i])}
    present = [i for i in labels if s[i] > 0]
    out = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro",
                                   zero_division=0)),
        "mean_auc": float(np.mean(aucs)) if aucs else None,
        "classes_precision_recall_above_0_8": int(sum(1 for i in present
                                                      if p[i] > 0.8 and r[i] > 0.8)),
        "n_classes": len(present),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_codes": codes,
    }
    if len(y_true):
        out["calibration"] = calibration_report(y_true, probs)
    if bootstrap and len(y_true):
        out["ci95"] = bootstrap_intervals(y_true, y_pred, codes, bootstrap, seed)
    return out


def calibration_report(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict:
    """How far the top probability (``class_prob``) can be read as the chance the call is right.

    ``ece``: the expected calibration error, the mean over equal-width bins of top probability
    of |accuracy - mean probability|, weighted by the bin's share of images (Guo et al. 2017);
    ``nll``: the mean negative log-probability of the true class; ``mean_confidence`` against
    ``accuracy``: a model below its accuracy is underconfident (label smoothing makes one so);
    ``reliability``: per non-empty bin its upper edge, images, mean probability and accuracy.
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    true_p = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    out = reliability(probs.max(1), probs.argmax(1) == y_true, bins)
    out.pop("accuracy")
    return {"ece": out.pop("ece"), "nll": round(float(-np.log(true_p).mean()), 4), **out}


def reliability(confidence: np.ndarray, right: np.ndarray, bins: int = 15) -> dict:
    """The calibration of calls with these ``confidence`` values (the probability each call
    was given) and outcomes (``right``): ECE over equal-width bins, mean confidence against
    accuracy, and the per-bin table (`calibration_report`)."""
    conf, right = np.asarray(confidence, np.float64), np.asarray(right, bool)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
            table.append({"upper": round((b + 1) / bins, 4), "n": int(m.sum()),
                          "confidence": round(float(conf[m].mean()), 4),
                          "accuracy": round(float(right[m].mean()), 4)})
    return {"ece": round(float(ece), 4), "mean_confidence": round(float(conf.mean()), 4),
            "accuracy": round(float(right.mean()), 4), "bins": bins, "reliability": table}


def _resampled_confusions(y_true: np.ndarray, preds: list[np.ndarray], n_classes: int,
                          resamples: int, seed: int):
    """Per model in ``preds``, ``(resamples, C, C)`` confusion matrices (true x predicted) of
    the same image-level resamples with replacement: each resample's images weighted by how
    many times it drew them (multinomial counts), all models on the same draws."""
    rng = np.random.default_rng(seed)
    n, c = len(y_true), n_classes
    onehots = []
    for p in preds:  # an image's cell of the confusion matrix, one-hot
        onehot = np.zeros((n, c * c))
        onehot[np.arange(n), np.asarray(y_true) * c + np.asarray(p)] = 1.0
        onehots.append(onehot)
    out = [np.empty((resamples, c, c)) for _ in preds]
    for start in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float64)
        for onehot, conf in zip(onehots, out):
            conf[start:start + k] = (weights @ onehot).reshape(k, c, c)
    return out


def _scores(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro F1, and per-class precision, recall and F1 of each ``(R, C, C)``
    confusion matrix. Macro F1 is over the classes each matrix's images hold, as
    `classification_metrics` takes it: a class a resample did not draw is not a class it
    scored 0 on. A class's figure is NaN where a resample leaves it undefined (precision of a
    class never called, recall of one not drawn), so its interval rests on the resamples that
    define it."""
    tp = np.diagonal(conf, axis1=1, axis2=2)
    truth, called = conf.sum(2), conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(called > 0, tp / called, np.nan)
        recall = np.where(truth > 0, tp / truth, np.nan)
        f1 = np.where(truth + called > 0, 2 * tp / (truth + called), np.nan)
    drawn = truth > 0  # where F1 is defined, and 0 for a drawn class never called right
    return {"accuracy": tp.sum(1) / conf.sum((1, 2)),
            "macro_f1": np.where(drawn, f1, 0.0).sum(1) / np.maximum(drawn.sum(1), 1),
            "precision": precision, "recall": recall, "f1": f1}


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    """The percentile interval of the resamples' figures where defined (None: nowhere)."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, class_codes,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Percentile intervals of accuracy, macro F1 and each class's precision, recall and F1
    over image-level bootstrap resamples of the evaluated images (macro F1 over the classes
    the whole sample has, as `classification_metrics` takes it)."""
    codes = list(class_codes)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.flatnonzero(np.bincount(y_true, minlength=len(codes)) > 0)
    (conf,) = _resampled_confusions(y_true, [y_pred], len(codes), resamples, seed)
    s = _scores(conf)
    return {"resamples": resamples, "level": level, "seed": seed,
            "accuracy": _interval(s["accuracy"], level),
            "macro_f1": _interval(s["macro_f1"], level),
            "per_class": {codes[i]: {k: _interval(s[k][:, i], level)
                                     for k in ("precision", "recall", "f1")}
                          for i in present}}


def paired_bootstrap(y_true: np.ndarray, pred: np.ndarray, baseline: np.ndarray, class_codes,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> dict:
    """``pred`` against ``baseline`` on the same images: each difference (``pred`` minus
    ``baseline``) in accuracy, macro F1 and per-class F1, its percentile interval over paired
    image-level resamples, and the share of resamples in which ``pred`` scores higher. An
    interval that holds 0 is a difference this sample cannot tell from chance."""
    codes = list(class_codes)
    y_true = np.asarray(y_true)
    present = np.flatnonzero(np.bincount(y_true, minlength=len(codes)) > 0)
    preds = [np.asarray(pred), np.asarray(baseline)]
    ours, theirs = (_scores(c) for c in _resampled_confusions(
        y_true, preds, len(codes), resamples, seed))
    whole = [_scores(np.bincount(y_true * len(codes) + p, minlength=len(codes) ** 2)
                     .reshape(1, len(codes), len(codes)).astype(np.float64))
             for p in preds]

    def diff(key: str, i: int | None = None) -> dict:
        pick = (lambda v: v) if i is None else (lambda v: v[:, i])
        d = pick(ours[key]) - pick(theirs[key])
        d = d[~np.isnan(d)]
        return {"difference": round(float(pick(whole[0][key])[0] - pick(whole[1][key])[0]), 4),
                "difference_ci": _interval(d, level),
                "share_higher": round(float((d > 0).mean()), 4) if len(d) else None}

    return {"resamples": resamples, "level": level, "seed": seed, "n": int(len(y_true)),
            "accuracy": diff("accuracy"), "macro_f1": diff("macro_f1"),
            "per_class_f1": {codes[i]: diff("f1", i) for i in present}}
