"""Where on a slide its cells were flagged: the slide cut into squares, each with its share.

A slide flagged ``out_of_focus`` (or ``out_of_distribution``) may be blurred all over, which
calls for a rescan, or in one region (a bubble, a thick area, a tilted edge), whose cells are
simply left out. The squares say which.
"""

from __future__ import annotations

import numpy as np


def flagged_squares(x: np.ndarray, y: np.ndarray, flagged: np.ndarray, side: float
                    ) -> dict[str, np.ndarray]:
    """Cells binned into squares of ``side`` (level-0 px) from the slide's origin.

    Args:
        x, y: ``(N,)`` cell centres, level-0 px.
        flagged: ``(N,) bool``, e.g. ``out_of_focus``.
        side: the squares' side, level-0 px.

    Returns:
        Per square that holds a cell, in raster order: ``x0``, ``y0`` (its top-left, level-0
        px), ``n`` (cells), ``n_flagged`` and ``share`` (``n_flagged / n``).
    """
    if side <= 0:
        raise ValueError(f"the squares' side must be positive, got {side}")
    col = np.floor(np.asarray(x, np.float64) / side).astype(np.int64)
    row = np.floor(np.asarray(y, np.float64) / side).astype(np.int64)
    keys, inverse = np.unique(np.stack([row, col], 1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = np.bincount(inverse, minlength=len(keys))
    hit = np.bincount(inverse, weights=np.asarray(flagged, bool), minlength=len(keys))
    return {"x0": keys[:, 1] * side, "y0": keys[:, 0] * side, "n": n,
            "n_flagged": hit.astype(np.int64), "share": hit / np.maximum(n, 1)}
