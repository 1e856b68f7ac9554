"""Class balancing by up-sampling, and k-fold / hold-out splits grouped by patient where known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split


def balanced_indices(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every class up-sampled to the largest class's count (all originals kept, extras drawn with
    replacement), shuffled. ``labels``: ``(N,) int``."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    target = counts.max()
    out = []
    for c, n in zip(classes, counts):
        idx = np.flatnonzero(labels == c)
        out.append(idx)
        if target > n:
            out.append(rng.choice(idx, target - n, replace=True))
    out = np.concatenate(out)
    rng.shuffle(out)
    return out


class BalancedSampler(torch.utils.data.Sampler):
    """Up-sampled class-balanced epochs, sharded across ``num_replicas`` data-parallel ranks."""

    def __init__(self, labels, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.labels = np.asarray(labels)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0
        _, counts = np.unique(self.labels, return_counts=True)
        self.total = int(counts.max()) * len(counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        idx = balanced_indices(self.labels, rng)
        return iter(idx[self.rank : len(idx) - len(idx) % self.num_replicas : self.num_replicas]
                    .tolist())

    def __len__(self) -> int:
        return self.total // self.num_replicas


def enough_groups(groups, n_splits: int):
    """``groups`` where there are at least ``n_splits`` of them, else None with a warning: the
    split is then by image (a lab's first labelled cells may come from one or two slides)."""
    if groups is None:
        return None
    n = len(set(groups))
    if n >= n_splits:
        return groups
    warnings.warn(f"the labels name {n} group(s) (patient or slide), fewer than the "
                  f"{n_splits} this split needs: split by image instead, so cells of one "
                  f"slide may lie on both sides", stacklevel=3)
    return None


def holdout_split(labels, fraction: float, seed: int, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(keep, held_out)`` index arrays, ``fraction`` of the images held out and one
    of each class at least; whole groups go to one side when given (and enough:
    `enough_groups`)."""
    idx = np.arange(len(labels))
    n_splits = max(2, round(1 / fraction))
    groups = enough_groups(groups, n_splits)
    if groups is not None:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        keep, held = next(cv.split(idx, labels, groups))
        return keep, held
    # one image of each class at least (sklearn refuses fewer: 4 images of each of 11 codes
    # hold 44 * 0.15 -> 7); otherwise its own count, so splits made before stay as they were
    held_n = max(math.ceil(fraction * len(idx)), len(np.unique(labels)))
    keep, held = train_test_split(idx, test_size=held_n, stratify=labels, random_state=seed)
    return np.sort(keep), np.sort(held)


def kfold_splits(labels, k: int, seed: int, groups=None, val_fraction: float = 0.15):
    """``k`` (train, val) index pairs. ``k == 1`` gives one stratified hold-out validation split.

    Grouped by patient or slide when ``groups`` is given (and there are ``k`` of them at least:
    `enough_groups`), by image otherwise.
    """
    labels = np.asarray(labels)
    if k == 1:
        return [holdout_split(labels, val_fraction, seed, groups)]
    idx = np.arange(len(labels))
    groups = enough_groups(groups, k)
    if groups is not None:
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(cv.split(idx, labels, groups))
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, labels))
