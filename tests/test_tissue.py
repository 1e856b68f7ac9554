import numpy as np

from engine.config import TissueConfig
from engine.tissue import (compute_tissue_mask, fill_small_holes, otsu_threshold,
                           remove_small_regions, tile_fractions)
from tests.conftest import smear_like


def test_otsu_separates_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.05, 0.01, 5000), rng.normal(0.4, 0.05, 5000)])
    thr = otsu_threshold(np.clip(values, 0, 1))
    assert 0.1 < thr < 0.3


def test_mask_finds_stained_region_and_ignores_glass():
    img = smear_like(400, 600, tissue=((0.25, 0.25, 0.75, 0.75),))
    mask = compute_tissue_mask(img, mpp=8.0, cfg=TissueConfig())
    truth = np.zeros(mask.shape, bool)
    truth[100:300, 150:450] = True
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_blank_slide_has_no_tissue():
    img = np.full((300, 300, 3), 245, np.uint8)
    img += np.random.default_rng(1).integers(0, 6, img.shape, dtype=np.uint8)
    assert not compute_tissue_mask(img, mpp=8.0, cfg=TissueConfig()).any()


def test_small_specks_removed_and_small_holes_filled_by_um_size():
    mask = np.zeros((100, 100), bool)
    mask[10:60, 10:60] = True
    mask[30:33, 30:33] = False           # 9 px hole
    mask[80:82, 80:82] = True            # 4 px speck
    cleaned = fill_small_holes(remove_small_regions(mask, 10), 20)
    assert cleaned[31, 31] and not cleaned[81, 81]
    big_hole = mask.copy()
    big_hole[20:40, 20:40] = False       # 400 px hole (e.g. a fat vacuole) stays
    assert not fill_small_holes(big_hole, 20)[30, 30]


def test_tile_fractions_match_brute_force():
    rng = np.random.default_rng(2)
    mask = rng.random((50, 70)) > 0.5
    x = np.array([0, 80, 400, 650])
    y = np.array([0, 40, 200, 450])
    got = tile_fractions(mask, (10.0, 10.0), x, y, (50.0, 50.0))
    for i in range(len(x)):
        x0, y0 = x[i] // 10, y[i] // 10
        x1, y1 = min(-(-(x[i] + 50) // 10), 70), min(-(-(y[i] + 50) // 10), 50)
        assert got[i] == np.float32(mask[y0:y1, x0:x1].mean())


def test_fill_small_holes_without_limit_equals_scipy_fill_holes():
    from scipy import ndimage as ndi

    from engine.tissue import fill_small_holes

    rng = np.random.default_rng(0)
    for _ in range(50):
        m = ndi.binary_opening(rng.random((120, 90)) > rng.uniform(0.3, 0.8))
        assert (fill_small_holes(m) == ndi.binary_fill_holes(m)).all()


def test_opencv_morphology_and_saturation_equal_scipy_and_float_numpy():
    from scipy import ndimage as ndi

    from engine.tissue import _disk, binary_close, binary_open, rgb_to_saturation_value

    rng = np.random.default_rng(3)
    for _ in range(8):
        h, w = rng.integers(40, 260, 2)
        m = ndi.gaussian_filter(rng.random((h, w)), 2) > 0.5
        m[:, 0] |= rng.random(h) > 0.5  # objects on the border
        for r in (1, 2, 4, 7):
            assert (binary_close(m, _disk(r)) ==
                    ndi.binary_closing(m, structure=_disk(r), border_value=0)).all()
            assert (binary_open(m, _disk(r)) == ndi.binary_opening(m, structure=_disk(r))).all()
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    img = rgb.astype(np.float32) / 255.0
    vmax, vmin = img.max(-1), img.min(-1)
    sat, val = rgb_to_saturation_value(rgb)
    assert np.array_equal(val, vmax)
    assert np.array_equal(sat, np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
                          .astype(np.float32))


def test_opencv_components_equal_scipy_label():
    """`components` partitions a mask as ``ndi.label`` does (4- and 8-connected), and the size
    filters built on it keep and fill exactly what scipy's labels would."""
    from scipy import ndimage as ndi

    from engine.cells import _raster_order
    from engine.tissue import components

    rng = np.random.default_rng(1)
    for _ in range(40):
        m = ndi.binary_opening(rng.random(tuple(rng.integers(20, 160, 2))) > rng.uniform(0.3, 0.7))
        for conn, structure in ((4, None), (8, np.ones((3, 3), bool))):
            ref, n = ndi.label(m, structure=structure)
            count, labels, stats, centroids = components(m, conn)
            assert count == n + 1
            order = _raster_order(labels, stats) if conn == 8 else np.arange(1, count)
            for want, i in enumerate(order, start=1):  # same pixels, in scipy's numbering
                assert ((labels == i) == (ref == want)).all()
                ys, xs = np.nonzero(ref == want)
                assert stats[i, 4] == len(xs) and np.allclose(centroids[i], (xs.mean(), ys.mean()))
        sizes = np.bincount(ndi.label(m, structure=np.ones((3, 3), bool))[0].ravel())
        labels8 = ndi.label(m, structure=np.ones((3, 3), bool))[0]
        assert (remove_small_regions(m, 12) == (m & (sizes >= 12)[labels8])).all()
        holes, _ = ndi.label(~m)
        hole_sizes = np.bincount(holes.ravel())
        border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = hole_sizes < 6
        fill[0], fill[border] = False, False
        assert (fill_small_holes(m, 6) == (m | fill[holes])).all()


def test_sparse_components_equal_opencvs_statistics():
    """On sparse masks (a cell tile's nuclei) `components` computes the statistics from the
    foreground pixels: the same labels, boxes, areas and centroids as OpenCV's own pass, the
    background's row included; and hole filling by flood equals scipy's."""
    import cv2
    from scipy import ndimage as ndi

    from engine.tissue import components

    rng = np.random.default_rng(7)
    for i in range(120):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        m = rng.random((h, w)) < rng.choice([0.002, 0.02, 0.08])
        if i % 2:  # blobs with holes, like closed nuclei
            m = ndi.binary_dilation(m, iterations=int(rng.integers(1, 4))) & \
                ~(rng.random((h, w)) < 0.05)
        if i % 7 == 0:
            m[int(rng.integers(0, h))] = True  # a whole foreground row
        if i % 11 == 0:
            m[:, int(rng.integers(0, w))] = True
        if i == 3:
            m[:] = False
        for conn in (4, 8):
            got = components(m, conn)
            want = cv2.connectedComponentsWithStats(m.view(np.uint8), connectivity=conn,
                                                    ltype=cv2.CV_32S)
            assert got[0] == want[0]
            for a, b in zip(got[1:], want[1:]):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
        assert (fill_small_holes(m) == ndi.binary_fill_holes(m)).all()
