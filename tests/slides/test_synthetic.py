"""The synthetic slide content draws each disc in a window around it: the same pixels as the
whole-frame formulas it replaced (which took 28 s for one 2048 px smear block)."""

import numpy as np

from engine.slides.synthetic import _discs, smear_block


def _smear_whole_frame(seed: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((side, side, 3), (236, 232, 240), np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for _ in range(side * side // 6000):
        cy, cx = rng.integers(0, side, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2] = (215, 150, 160)
    for _ in range(side * side // 120000):
        cy, cx = rng.integers(20, side - 20, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 18 ** 2] = (95, 60, 175)
    return img


def test_smear_block_equals_whole_frame_drawing():
    for seed, side in ((0, 384), (5, 517)):  # discs cut by every edge
        assert np.array_equal(smear_block(seed, side), _smear_whole_frame(seed, side))


def test_discs_equal_whole_frame_union():
    rng = np.random.default_rng(1)
    side = 97
    cy, cx = rng.uniform(-3, side + 3, 60), rng.uniform(-3, side + 3, 60)
    r = rng.uniform(0.4, 6.0, 60)
    yy, xx = np.mgrid[:side, :side]
    ref = np.zeros((side, side), bool)
    for y, x, rr in zip(cy, cx, r):
        ref |= (yy - y) ** 2 + (xx - x) ** 2 <= rr * rr
    assert ref.any() and np.array_equal(_discs(side, cy, cx, r), ref)
    assert not _discs(side, cy[:0], cx[:0], r[:0]).any()


def test_aspirate_cells_stay_inside_the_block_at_its_density():
    """Blocks are tiled into larger slides: a cell cut by a block's edge would be two half-cells
    there. The density is what the benchmarks claim (45 per megapixel)."""
    from engine.slides.synthetic import aspirate_block

    img, centres = aspirate_block(3, side=1536)
    assert img.shape == (1536, 1536, 3) and img.dtype == np.uint8
    assert len(centres) == round(45 * 1536 * 1536 / 1e6)
    assert (centres >= 5 * 4).all() and (centres <= 1536 - 5 * 4).all()  # 5 µm at 0.25 µm/px
    edge = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)]).astype(int)
    assert (edge[:, 2] - edge[:, 0] < 25).all()  # no nucleus-stained pixel on the edge
