"""Classification metrics as plain JSON-able dicts."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_codes) -> dict:
    """Accuracy, macro F1, mean one-vs-rest AUC, and per-class precision/recall/F1/AUC/support.

    Args:
        y_true: ``(N,) int`` indices into ``class_codes``.
        probs: ``(N, C) float`` probabilities.
        class_codes: the C codes.
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
    return {
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
