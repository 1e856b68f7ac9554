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


def plot_umap(features: np.ndarray, labels: list[str], path: str, seed: int = 0,
              title: str = "") -> None:
    """2-D UMAP of ``(N, D)`` features coloured by label, saved as PNG."""
    import umap

    xy = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(features)
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
