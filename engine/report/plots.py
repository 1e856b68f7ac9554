"""PNG figures with matplotlib (Agg backend, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(matrix, codes, path: str, title: str = "") -> None:
    """Row-normalised confusion matrix with counts, saved as PNG."""
    m = np.asarray(matrix, float)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(codes), 0.8 + 0.5 * len(codes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(codes)), codes, rotation=90)
    ax.set_yticks(range(len(codes)), codes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(codes)):
        for j in range(len(codes)):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(calibration: dict, path: str, title: str = "") -> None:
    """A reliability diagram of `engine.train.metrics.calibration_report`: per bin of top
    probability its accuracy against its mean probability (the diagonal: calibrated), with
    the share of images in each bin below, saved as PNG."""
    table = calibration["reliability"]
    conf = [b["confidence"] for b in table]
    width = 1.0 / calibration["bins"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.2, 5.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    top.bar([b["upper"] - width / 2 for b in table], [b["accuracy"] for b in table], width * 0.9,
            color="#4c72b0", alpha=0.8, label="accuracy")
    top.plot(conf, [b["accuracy"] for b in table], "o", color="#c44e52", ms=3,
             label="at the bin's mean probability")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    fig.suptitle(f"{title}  ECE {calibration['ece']:.3f}".strip(), fontsize=9)
    n = sum(b["n"] for b in table)
    bottom.bar([b["upper"] - width / 2 for b in table], [b["n"] / n for b in table], width * 0.9,
               color="grey")
    bottom.set_xlabel("top probability (class_prob)")
    bottom.set_ylabel("share")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bland_altman(ax, reference, measured, unit: str = "%", title: str = "") -> None:
    """A Bland-Altman plot on ``ax``: the difference ``measured - reference`` against their mean,
    with the bias and the 95 % limits of agreement (bias ± 1.96 sd) as lines."""
    reference, measured = np.asarray(reference, float), np.asarray(measured, float)
    mean, diff = (reference + measured) / 2, measured - reference
    md, sd = diff.mean(), diff.std(ddof=1) if len(diff) > 1 else 0.0
    ax.scatter(mean, diff, s=10)
    for v, style in ((md, "-"), (md + 1.96 * sd, "--"), (md - 1.96 * sd, "--")):
        ax.axhline(v, color="grey", linestyle=style)
    ax.set_xlabel(f"mean of the two ({unit})")
    ax.set_ylabel("difference (points)")
    ax.set_title(f"{title + ': ' if title else ''}bias {md:+.1f}, limits ±{1.96 * sd:.1f}",
                 fontsize=9)


def plot_bland_altman(panels: dict[str, tuple], path, unit: str = "%",
                      suptitle: str = "") -> None:
    """One Bland-Altman panel per entry of ``panels`` (name -> (reference, measured)), in a
    grid, saved as PNG to ``path`` (a file name or a binary file object)."""
    n = max(len(panels), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, (ref, got)) in zip(axes.flat, panels.items()):
        bland_altman(ax, ref, got, unit, name)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


EXACT_KNN_MAX = 20_000  # points up to which plot_umap finds neighbours exactly


def exact_knn(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, distances)``, ``(N, k)`` each: every point's ``k`` nearest (itself first),
    as UMAP's ``precomputed_knn`` takes them."""
    from sklearn.neighbors import NearestNeighbors

    dist, idx = NearestNeighbors(n_neighbors=k).fit(features).kneighbors(features)
    return idx, dist.astype(np.float32)


def umap_2d(features: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """``(N, 2)`` UMAP embedding of ``(N, D)`` features.

    Up to `EXACT_KNN_MAX` points the neighbour graph is exact (`exact_knn`, brute force in
    BLAS) and handed to UMAP, whose own search (pynndescent) first compiles for about a minute
    on a 2-core machine: evaluation sets are a few thousand cells. Larger sets use UMAP's
    approximate search.
    """
    import warnings

    import umap

    features = np.asarray(features, np.float32)
    k = max(2, min(n_neighbors, len(features) - 1))
    kw = {}
    if len(features) <= EXACT_KNN_MAX:
        kw["precomputed_knn"] = (*exact_knn(features, k), None)
    with warnings.catch_warnings():  # no search index is kept: we never transform new points
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden")
        return umap.UMAP(n_neighbors=k, min_dist=0.1, random_state=seed,
                         **kw).fit_transform(features)


def plot_umap(features: np.ndarray, labels: list[str], path: str, seed: int = 0,
              title: str = "") -> None:
    """2-D UMAP of ``(N, D)`` features coloured by label, saved as PNG."""
    xy = umap_2d(features, seed)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for i, lab in enumerate(sorted(set(labels))):
        sel = np.array([lab == x for x in labels])
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(i % 20), label=lab)
    ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cell_gallery(rows: list[tuple[str, np.ndarray, np.ndarray]], path: str,
                      title: str = "") -> None:
    """Cell crops in rows, one row per class, each crop captioned with its class probability.

    Args:
        rows: ``(label, crops (N, S, S, 3) uint8, captions)`` per row: captions are
            probabilities ``(N,)`` (written to 2 places), strings, or None (none, as under a row
            of saliency overlays); rows may hold different numbers of crops.
        path: the PNG to write.
    """
    cols = max((len(c) for _, c, _ in rows), default=1) or 1
    fig, axes = plt.subplots(max(len(rows), 1), cols + 1, squeeze=False,
                             figsize=(1.1 * (cols + 1) + 1.2, 1.25 * max(len(rows), 1) + 0.4),
                             gridspec_kw={"width_ratios": [2.2] + [1] * cols})
    for ax in axes.ravel():
        ax.axis("off")
    for r, (label, crops, probs) in enumerate(rows):
        axes[r, 0].text(0.98, 0.5, label, ha="right", va="center", fontsize=8,
                        transform=axes[r, 0].transAxes)
        for c, crop in enumerate(crops):
            axes[r, c + 1].imshow(crop)
            if probs is not None:
                text = probs[c] if isinstance(probs[c], str) else f"{probs[c]:.2f}"
                axes[r, c + 1].set_title(text, fontsize=7, pad=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap_overlay(images: np.ndarray, maps: np.ndarray, alpha: float = 0.45,
                    cmap: str = "jet") -> np.ndarray:
    """``uint8 (N, H, W, 3)``: each image blended with its ``[0, 1]`` map in ``cmap`` colours,
    the map's weight ``alpha`` times its value (where a map is 0 the crop shows through)."""
    colours = plt.get_cmap(cmap)(np.clip(maps, 0, 1))[..., :3]
    weight = alpha * np.clip(maps, 0, 1)[..., None] ** 0.5
    out = images.astype(np.float32) * (1 - weight) + 255 * colours * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def plot_attention_map(thumbnail: np.ndarray, boxes: np.ndarray, values: np.ndarray, path: str,
                       title: str = "", alpha: float = 0.5, cmap: str = "jet",
                       label: str = "attention (percentile within the slide)",
                       counts: np.ndarray | None = None) -> None:
    """A slide's thumbnail beside itself with each tile's value in [0, 1] painted over its box
    (``boxes``: ``(N, 4)`` x0, y0, x1, y1 in thumbnail pixels; where boxes overlap, the higher
    value), with a colour bar of ``label``; ``counts`` (``(N,)``, say the cells a value rests
    on) are written in boxes large enough to hold them."""
    h, w = thumbnail.shape[:2]
    boxes = np.clip(boxes, 0, [w, h, w, h])  # a square past the slide's edge: its part on it
    grid = np.full((h, w), -1.0, np.float32)
    for (x0, y0, x1, y1), v in zip(boxes, values):
        grid[y0:y1, x0:x1] = np.maximum(grid[y0:y1, x0:x1], v)
    painted = grid >= 0
    colours = plt.get_cmap(cmap)(np.clip(grid, 0, 1))[..., :3] * 255
    shown = np.where(painted[..., None], (1 - alpha) * thumbnail + alpha * colours, thumbnail)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6 * h / max(w, 1) + 0.9))
    axes[0].imshow(thumbnail)
    axes[1].imshow(np.clip(np.rint(shown), 0, 255).astype(np.uint8))
    for ax in axes:
        ax.axis("off")
    for (x0, y0, x1, y1), n in zip(boxes, counts if counts is not None else []):
        if min(x1 - x0, y1 - y0) >= 24:  # thumbnail px: room for a number
            axes[1].text((x0 + x1) / 2, (y0 + y1) / 2, str(n), ha="center", va="center",
                         fontsize=7, color="black")
    scale = plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap)
    fig.colorbar(scale, ax=axes[1], fraction=0.046, pad=0.02, label=label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
