"""Tile grids at a physical resolution: level choice, resize factor, level-0 coordinates.

Pure numpy. A plan holds coordinates only; pixels are read later, inside workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.config import TileConfig
from engine.errors import ResolutionTooLow
from engine.tissue import tile_fractions

_LEVEL_TOLERANCE = 0.02  # a level 2 % coarser than asked still counts as "at" the target


def choose_level(mpp: float, downsamples: tuple[float, ...], target_mpp: float) -> tuple[int, float]:
    """Best pyramid level to read for ``target_mpp``, and the resize factor from it.

    The coarsest level whose pixels are not coarser than the target (within 2 %) is read, so tiles
    are only ever downsampled from it, never upsampled, unless level 0 itself is too coarse.

    Returns:
        ``(level, factor)`` where ``factor = target_mpp / level_mpp`` (> 1 means shrink on read).
    """
    best = 0
    for i, ds in enumerate(downsamples):
        if mpp * ds <= target_mpp * (1 + _LEVEL_TOLERANCE) and ds >= downsamples[best]:
            best = i
    return best, target_mpp / (mpp * downsamples[best])


@dataclass(frozen=True)
class TilePlan:
    """Where to read the tiles of one slide.

    Attributes:
        level: pyramid level to read.
        read_px: tile side in pixels at ``level`` (resized to ``tile_px`` after reading).
        tile_px: tile side handed to models, at ``target_mpp``.
        target_mpp: µm per pixel of the resized tile.
        footprint: tile side in level-0 pixels.
        stride: grid step in level-0 pixels (``footprint`` minus the overlap).
        x, y: ``(N,) int64`` tile origins in level-0 pixels.
        tissue_fraction: ``(N,) float32`` foreground fraction per tile.
        grid_shape: ``(columns, rows)`` of the full grid before tissue filtering (tile ownership
            of cells needs it).
    """

    level: int
    read_px: int
    tile_px: int
    target_mpp: float
    footprint: float
    stride: float
    x: np.ndarray
    y: np.ndarray
    tissue_fraction: np.ndarray
    grid_shape: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def plan_tiles(dimensions: tuple[int, int], downsamples: tuple[float, ...], mpp: float,
               cfg: TileConfig, mask: np.ndarray | None = None,
               mask_scale: tuple[float, float] | None = None, uri: str = "<slide>") -> TilePlan:
    """Tile grid covering a slide at ``cfg.target_mpp``, filtered by foreground fraction.

    Edge tiles that run past the slide are kept (readers return background there), so every
    level-0 pixel is covered.

    Args:
        dimensions: level-0 ``(width, height)``.
        downsamples: per-level downsample factors, level 0 first.
        mpp: µm per level-0 pixel (square pixels assumed; pass the mean of x and y).
        cfg: target µm/px, tile size, overlap, tissue threshold, allowed upsampling.
        mask: optional ``(H, W) bool`` foreground mask; without one every tile counts as tissue.
        mask_scale: level-0 pixels per mask pixel ``(sx, sy)``; required with ``mask``.
        uri: used in error messages.

    Raises:
        ResolutionTooLow: the target is finer than level 0 by more than ``cfg.max_upsample``.
    """
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if mpp / cfg.target_mpp > cfg.max_upsample * (1 + _LEVEL_TOLERANCE):
        raise ResolutionTooLow(uri, f"slide has {mpp:.3g} µm/px but {cfg.target_mpp:.3g} µm/px is "
                               f"asked; more than the allowed {cfg.max_upsample}x upsampling")
    level, factor = choose_level(mpp, downsamples, cfg.target_mpp)
    footprint = cfg.tile_px * cfg.target_mpp / mpp
    stride = (cfg.tile_px - cfg.overlap_px) * cfg.target_mpp / mpp
    width, height = dimensions
    nx = max(1, math.ceil((width - footprint) / stride - 1e-9) + 1)
    ny = max(1, math.ceil((height - footprint) / stride - 1e-9) + 1)
    gx = np.round(np.arange(nx) * stride).astype(np.int64)
    gy = np.round(np.arange(ny) * stride).astype(np.int64)
    x, y = (a.ravel() for a in np.meshgrid(gx, gy, indexing="xy"))
    if mask is not None:
        if mask_scale is None:
            raise ValueError("mask_scale is required with mask")
        frac = tile_fractions(mask, mask_scale, x, y, (footprint, footprint))
    else:
        frac = np.ones(x.shape, np.float32)
    keep = frac >= cfg.min_tissue_fraction
    return TilePlan(level=level, read_px=max(1, int(round(cfg.tile_px * factor))),
                    tile_px=cfg.tile_px, target_mpp=cfg.target_mpp, footprint=footprint,
                    stride=stride, x=x[keep], y=y[keep], tissue_fraction=frac[keep],
                    grid_shape=(nx, ny))
