"""Tiling on synthetic pyvips pyramids (JPEG tiles, MPP set) at several MPPs."""

import numpy as np
import pytest

from engine.config import TileConfig, TissueConfig
from engine.errors import ResolutionTooLow
from engine.slides import open_slide
from engine.tiling import choose_level, plan_tiles
from engine.tissue import compute_tissue_mask


@pytest.mark.parametrize("mpp, target, level, factor", [
    (0.25, 0.25, 0, 1.0),
    (0.25, 0.5, 1, 1.0),
    (0.25, 2.0, 3, 1.0),
    (0.25, 1.5, 2, 1.5),      # 1.0 µm/px level read, shrunk 1.5x
    (0.5, 2.0, 2, 1.0),
    (0.5, 0.25, 0, 0.5),      # finer than the scan: read level 0, upsample 2x
    (0.499, 2.0, 2, 2.0 / (0.499 * 4)),  # within 2 %: read the 1.996 µm/px level
])
def test_choose_level(mpp, target, level, factor):
    got_level, got_factor = choose_level(mpp, (1.0, 2.0, 4.0, 8.0, 16.0), target)
    assert got_level == level
    assert got_factor == pytest.approx(factor)


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_plan_on_real_pyramid_covers_slide_at_target(make_slide, mpp):
    path = make_slide(f"s{mpp}.tif", width=2400, height=1600, mpp=mpp)
    cfg = TileConfig(target_mpp=2.0, tile_px=64, min_tissue_fraction=0.0)
    with open_slide(str(path)) as slide:
        info = slide.info
        assert info.mpp_x == pytest.approx(mpp, rel=1e-3)
        plan = plan_tiles(info.dimensions, info.level_downsamples, info.mpp, cfg)
        assert info.mpp * info.level_downsamples[plan.level] <= 2.0 * 1.02
        assert plan.footprint == pytest.approx(64 * 2.0 / mpp)
        # every level-0 pixel is covered, and tiles start inside the slide
        assert plan.x.min() == 0 and plan.y.min() == 0
        assert plan.x.max() + plan.footprint >= info.width
        assert plan.y.max() + plan.footprint >= info.height
        assert plan.x.max() < info.width and plan.y.max() < info.height
        n_expected = int(np.ceil(info.width / plan.footprint)) * int(np.ceil(info.height /
                                                                               plan.footprint))
        assert len(plan) == n_expected
        # a tile read at plan.level and resized has the physical extent of the level-0 footprint
        i = len(plan) // 2
        tile = slide.read_region(plan.level, int(plan.x[i]), int(plan.y[i]), plan.read_px,
                                 plan.read_px)
        assert tile.shape == (plan.read_px, plan.read_px, 3)
        assert plan.read_px * info.level_downsamples[plan.level] == pytest.approx(
            plan.footprint, rel=0.02)


def test_overlap_and_tissue_filter(make_slide):
    path = make_slide("tissue.tif", width=3200, height=2400, mpp=0.5,
                      tissue=((0.0, 0.0, 0.5, 1.0),))
    with open_slide(str(path)) as slide:
        info = slide.info
        thumb_mpp = 8.0
        thumb = slide.read_thumbnail((int(info.width * info.mpp / thumb_mpp),) * 2)
        scale = (info.width / thumb.shape[1], info.height / thumb.shape[0])
        mask = compute_tissue_mask(thumb, info.mpp * scale[0], TissueConfig())
        cfg = TileConfig(target_mpp=2.0, tile_px=100, overlap_px=20, min_tissue_fraction=0.5)
        plan = plan_tiles(info.dimensions, info.level_downsamples, info.mpp, cfg, mask, scale)
    assert plan.stride == pytest.approx(80 * 2.0 / 0.5)
    assert len(plan) > 0
    # tiles are kept only over the stained left half
    assert (plan.x + plan.footprint / 2 <= info.width / 2 + plan.footprint).all()
    assert (plan.tissue_fraction >= 0.5).all()
    assert set(np.diff(np.unique(plan.x))) == {320}


def test_too_much_upsampling_is_refused():
    with pytest.raises(ResolutionTooLow, match="upsampling"):
        plan_tiles((1000, 1000), (1.0,), 1.0, TileConfig(target_mpp=0.25, max_upsample=2.0))
