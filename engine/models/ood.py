"""Cells unlike the classifier's training data: class-conditional Mahalanobis distance on its
penultimate features (Lee et al., NeurIPS 2018), with a threshold set on held-out training-lab
images.

A classifier trained on one lab's stain and camera still answers, often confidently, on another
lab's cells: the shipped PBC model calls most of BCCD's neutrophils erythroblasts with a mean top
probability of 0.81 (0.86 on its own test split), so its softmax cannot warn. Its features can:
the distance of a cell's features to the nearest class centre, in the within-class covariance's
metric, separates BCCD's white cells from PBC's test split with an AUROC of 0.993 (softmax
confidence: 0.54). The features are projected on their leading principal components first (the
covariance of 2,048 features is not estimable from a few thousand cells) and whitened, so a
distance is a plain Euclidean one.

On a lab's first labels the images are few, and a threshold set on a held-out share of them is
little more than their largest distance: a density fitted on 3/4 of 50 PBC training images, its
threshold from the other 12, flagged a median 6.9 % of PBC's unseen test cells (14 % at the 95th
percentile of 30 draws) where 1 % was meant (``benchmarks/ood_spread.py``). Cross-fitting
(`cross_fitted`) gives every image a held-out distance, from a density fitted without its fold,
and fits the stored density on all of them: a median 0.8-1.2 % flagged from 50 to 400 images
(1.5 % from 800, as with a held-out share: a classifier's own training images sit closer than
new ones). It flags fewer of another lab's cells where the images are few (BCCD's, at 50: 29 %
against 78 %): those the held-out share's low threshold caught with the lab's own. Principal
components are kept to a quarter of the fitting images, a covariance estimable from them.

Stored in the checkpoint beside the weights (safetensors, keys under ``ood.``) by
``python -m jobs.fit_cell_ood``; ``Predictor.predict_with_distance`` returns the distances, and
the pipeline writes them to the cell table and flags slides with many distant cells.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

PREFIX = "ood."
# the fewest images the jobs fit a density on (`fit_on_crops`): below, classes of a few images
# each set the threshold, and another lab's cells pass it. BCCD's white cells, cross-fitted on n
# PBC images: n = 30, a median 7 % flagged; 50, 29 %; 100, 48 %; 1,600, 89 %
# (benchmarks/ood_spread.py)
MIN_DENSITY_IMAGES = 50
CROSS_FIT_FOLDS = 5
METHOD = ("class-conditional Mahalanobis distance on the penultimate features (shared "
          "within-class covariance, leading principal components)")


@dataclass(frozen=True)
class FeatureDensity:
    """Class centres in a whitened principal subspace of the features.

    Attributes:
        mean: ``(D,)`` feature mean of the fitting images.
        whiten: ``(D, d)``: centred features times this are whitened principal coordinates.
        centres: ``(C, d)`` class means in those coordinates.
        threshold: distances above it are out of distribution (a quantile of held-out
            in-distribution distances; NaN before `with_threshold`).
    """

    mean: torch.Tensor
    whiten: torch.Tensor
    centres: torch.Tensor
    threshold: float = float("nan")

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` features -> ``(N,) float32`` distance to the nearest class centre (on the
        features' device, in float32)."""
        f = features.float()
        z = (f - self.mean.to(f.device)) @ self.whiten.to(f.device)
        return torch.cdist(z, self.centres.to(f.device)).min(dim=1).values

    def to(self, device) -> FeatureDensity:
        """The same density with its tensors on ``device`` (once, not per batch)."""
        return FeatureDensity(self.mean.to(device), self.whiten.to(device),
                              self.centres.to(device), self.threshold)

    def with_threshold(self, held_out: torch.Tensor, quantile: float) -> FeatureDensity:
        """The same density with its threshold at ``quantile`` of ``held_out`` features'
        distances (in-distribution images not used to fit it)."""
        cut = torch.quantile(self.distance(held_out).double(), quantile).item()
        return dataclasses.replace(self, threshold=float(cut))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}mean": self.mean, f"{PREFIX}whiten": self.whiten,
                f"{PREFIX}centres": self.centres,
                f"{PREFIX}threshold": torch.tensor([self.threshold], dtype=torch.float32)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> FeatureDensity | None:
        """From a checkpoint's ``ood.`` tensors (None when it has none)."""
        keys = ("mean", "whiten", "centres", "threshold")
        if not any(k.startswith(PREFIX) for k in state):
            return None
        missing = [k for k in keys if PREFIX + k not in state]
        if missing:
            raise ValueError(f"incomplete out-of-distribution tensors: {missing} missing")
        return cls(*(state[PREFIX + k].float() for k in keys[:3]),
                   threshold=float(state[PREFIX + "threshold"].float()[0]))


def match_threshold(reference: np.ndarray, threshold: float, other: np.ndarray,
                    tail: float = 0.1) -> float:
    """``threshold`` carried over from ``reference`` distances to ``other`` distances of the same
    images (an int8 model's, whose features sit a little off the float model's): scaled by the
    median ratio ``other / reference`` among the ``tail`` share of images farthest by
    ``reference``, where the cut lies. Steadier than matching the flagged share itself, which
    rests on the few images beyond the cut (1 % by construction, fewer on training images)."""
    reference = np.asarray(reference, np.float64)
    other = np.asarray(other, np.float64)
    far = reference >= np.quantile(reference, 1 - tail)
    return float(threshold * np.median(other[far] / np.maximum(reference[far], 1e-12)))


def fit_density(features: np.ndarray, labels: np.ndarray, n_classes: int, dims: int = 128,
                shrinkage: float = 1e-3) -> FeatureDensity:
    """Fit class centres and a shared within-class covariance on ``dims`` principal components.

    Args:
        features: ``(N, D)`` penultimate features of in-distribution training images.
        labels: ``(N,)`` class indices (every class in ``range(n_classes)`` present).
        dims: principal components kept (at most ``min(N, D)``; `usable_dims`).
        shrinkage: ridge added to the covariance, relative to its mean eigenvalue.
    """
    x = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    absent = sorted(set(range(n_classes)) - set(labels.tolist()))
    if absent:
        raise ValueError(f"classes {absent} have no fitting images")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = vt[:min(dims, len(vt))].T
    z = (x - mean) @ proj
    centres = np.stack([z[labels == k].mean(0) for k in range(n_classes)])
    resid = z - centres[labels]
    cov = resid.T @ resid / len(resid)
    cov += np.eye(len(cov)) * shrinkage * np.trace(cov) / len(cov)
    # cov = L L^T; whitened coordinates are z L^-T, so the Mahalanobis distance is Euclidean
    inv_l = np.linalg.inv(np.linalg.cholesky(cov))
    whiten = proj @ inv_l.T
    return FeatureDensity(torch.tensor(mean, dtype=torch.float32),
                          torch.tensor(whiten, dtype=torch.float32),
                          torch.tensor(centres @ inv_l.T, dtype=torch.float32))


def usable_dims(n_images: int, dims: int) -> int:
    """``dims`` principal components, at most a quarter of ``n_images``: a within-class covariance
    in more dimensions than that is mostly the ridge."""
    return max(1, min(dims, n_images // 4))


def too_few_for_density(n: int) -> str | None:
    """Why ``n`` images are too few to fit a density on, or None."""
    if n >= MIN_DENSITY_IMAGES:
        return None
    return (f"{n} images, fewer than the {MIN_DENSITY_IMAGES} a feature density is fitted on "
            "(fitted on 30 of PBC's, it let 93 % of another lab's white cells pass)")


def cross_fitted(features: np.ndarray, labels: np.ndarray, n_classes: int, *, dims: int = 128,
                 quantile: float = 0.99, folds: int = CROSS_FIT_FOLDS,
                 seed: int = 0) -> FeatureDensity:
    """A density fitted on every image, its threshold at ``quantile`` of cross-fitted distances:
    each image's distance under a density fitted without its fold (folds drawn within each
    class, so a class of two images or more is in every fold's fit; one absent from a fit is
    left out of its centres).

    Raises:
        ValueError: a class without images (the job's minimum is `fit_on_crops`').
    """
    x, labels = np.asarray(features, np.float64), np.asarray(labels)
    dims = usable_dims(len(x), dims)  # the same in every fit, so distances compare
    density = fit_density(x, labels, n_classes, dims=dims)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(x), int)
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        fold[members] = (rng.integers(folds) + np.arange(len(members))) % folds
    held_out = np.empty(len(x))
    for j in range(folds):
        fit, out = fold != j, fold == j
        present, y = np.unique(labels[fit], return_inverse=True)
        held_out[out] = fit_density(x[fit], y, len(present), dims=dims).distance(
            torch.from_numpy(x[out])).double().numpy()
    return dataclasses.replace(density, threshold=float(np.quantile(held_out, quantile)))


def fit_on_crops(model, crops: np.ndarray, labels: np.ndarray, *, fit_images: int = 3000,
                 held_out_images: int = 1000, dims: int = 128, quantile: float = 0.99,
                 seed: int = 0, batch_size: int = 128) -> tuple[FeatureDensity, dict]:
    """A classifier's density from its own training-lab crops: a seeded draw of ``fit_images``
    fits it, up to ``held_out_images`` others set its threshold at ``quantile``; with
    ``held_out_images`` 0, the fitting images set it, cross-fitted (`cross_fitted`).

    Args:
        model: a `LoadedModel` classifier.
        crops: ``(N, S, S, 3) uint8`` centred cells at the model's µm/px; ``S`` larger than
            its input is centre-cropped (training packs keep a margin).
        labels: ``(N,)`` indices into ``model.class_codes``.
        dims: principal components kept, at most a quarter of the fitting images
            (`usable_dims`).

    Returns:
        ``(density, the checkpoint card's ood section)``: method, dims, quantile, threshold,
        images fitted on and held out, and what set the threshold.

    Raises:
        ValueError: no image left to set the threshold, fewer than `MIN_DENSITY_IMAGES` to
            cross-fit, or a class without fitting images.
    """
    from engine.models.inference import Predictor

    order = np.random.default_rng(seed).permutation(len(crops))
    fit_idx = np.sort(order[:fit_images])
    held_idx = np.sort(order[fit_images:fit_images + held_out_images])
    if held_out_images and not len(held_idx):
        raise ValueError(f"{len(crops)} images leave none to set the threshold after "
                         f"{fit_images} to fit on")
    px = model.spec.input_px
    off = (crops.shape[1] - px) // 2
    pred = Predictor(model)

    def embed(idx: np.ndarray) -> np.ndarray:
        return np.concatenate([pred.embed(np.ascontiguousarray(
            crops[idx[i:i + batch_size], off:off + px, off:off + px]))
            for i in range(0, len(idx), batch_size)])

    y, n_classes = np.asarray(labels)[fit_idx], len(model.class_codes)
    if not held_out_images:
        if why := too_few_for_density(len(fit_idx)):  # before embedding them
            raise ValueError(why)
        density = cross_fitted(embed(fit_idx), y, n_classes, dims=dims, quantile=quantile,
                               seed=seed)
        source = (f"each fitting image's distance under a density fitted without its fold "
                  f"({CROSS_FIT_FOLDS}-fold cross-fitting)")
    else:
        density = fit_density(embed(fit_idx), y, n_classes, dims=usable_dims(len(fit_idx), dims))
        density = density.with_threshold(torch.from_numpy(embed(held_idx)), quantile)
        source = "held-out images' distances"
    return density, {"method": METHOD, "dims": int(density.centres.shape[1]),
                     "quantile": quantile, "threshold": round(density.threshold, 4),
                     "threshold_from": source, "fit_images": len(fit_idx),
                     "held_out_images": len(held_idx)}
