"""Label-free cellularity: stain estimation, area rules, and the whole slide path (pyramidal
TIFF -> PlanSlide -> ReadTiles -> slide estimate) on synthetic marrow of known cellularity."""

import json

import numpy as np
import pytest

from engine.cellularity import (RUIFROK_HE, calibrate, macenko_stains, slide_cellularity,
                                tile_areas)
from engine.config import Config
from engine.pipeline.steps import PlanSlide, ReadTiles, tile_tasks
from engine.slides.synthetic import CYTOPLASM, NUCLEUS, marrow_block
from engine.slides.writer import write_pyramid_tiff


def _od(rgb):
    v = -np.log10(np.asarray(rgb, float) / 255)
    return v / np.linalg.norm(v)


def test_macenko_recovers_the_two_stains():
    rng = np.random.default_rng(0)
    h, e = _od(NUCLEUS), _od((226, 112, 168))
    conc = rng.uniform(0, 1.2, (64, 64, 2))
    od = conc[..., :1] * h + conc[..., 1:] * e
    tile = np.clip(255 * 10 ** -od, 0, 255).astype(np.uint8)
    got_h, got_e = macenko_stains([tile])
    assert np.dot(got_h, h) > 0.99 and np.dot(got_e, e) > 0.99


def test_too_few_stained_pixels_fall_back_to_ruifrok():
    blank = np.full((64, 64, 3), 245, np.uint8)
    assert macenko_stains([blank]) == RUIFROK_HE
    assert calibrate([blank]).stains == RUIFROK_HE


def test_areas_separate_bone_fat_and_cells():
    img, truth = marrow_block(50, side=1024, mpp=2.0, seed=3, bone_fraction=0.2)
    a = tile_areas(img, 2.0, calibrate([img]))
    assert a["bone"].sum() == pytest.approx(truth.bone_px, rel=0.15)
    assert a["fat"].sum() == pytest.approx(truth.fat_px, rel=0.2)
    assert not a["glass"].any()  # adipocytes, not glass, however fatty
    assert not (a["cellular"] & (a["bone"] | a["fat"])).any()
    # cytoplasm far from any nucleus is not cellular: a nucleus-free field has no cells
    plain = np.full((128, 128, 3), CYTOPLASM, np.uint8)
    assert not tile_areas(plain, 2.0)["cellular"].any()


@pytest.fixture(scope="module")
def marrow_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("marrow")
    slides = []
    for i, target in enumerate(range(10, 100, 10)):
        img, truth = marrow_block(target, side=1792, mpp=1.0, seed=100 + i)
        path = folder / f"marrow-{target}.tif"
        write_pyramid_tiff(img, str(path), 1.0)
        slides.append((path, truth.cellularity))
    return slides


def test_label_free_estimate_within_5_points_over_10_to_90(marrow_slides):
    cfg = Config.from_dict({"pipeline": {"stages": ["tiles"]}})  # a biopsy: no cell tiles
    errors = []
    for path, truth in marrow_slides:
        row = PlanSlide(cfg)({"uri": str(path), "size": path.stat().st_size, "etag": None})
        plan = json.loads(row["plan"])
        assert plan["status"] == "ok", plan
        tasks = tile_tasks(row["slide_id"], str(path), plan)
        assert len(tasks) >= 9
        batch = {k: np.asarray([t[k] for t in tasks]) for k in tasks[0]}
        out = ReadTiles(cfg, keep_pixels=False)(batch)
        estimate = slide_cellularity(out["cellular_px"], out["fat_px"])
        errors.append(estimate - truth)
    print("estimate - truth per slide (points):", np.round(errors, 2))
    assert max(abs(e) for e in errors) <= 5.0, np.round(errors, 1)


@pytest.fixture(scope="module")
def embedded_marrow(tmp_path_factory):
    """30 synthetic marrow slides of known cellularity, tiled and embedded through the pipeline
    steps (random-weight tiny DINOv2: these tests measure ABMIL, not the encoder)."""
    from engine.pipeline.steps import EncodeTiles

    folder = tmp_path_factory.mktemp("marrow-mil")
    cfg = Config.from_dict({"pipeline": {"stages": ["tiles"]}})
    plan_step, read, encode = PlanSlide(cfg), ReadTiles(cfg, keep_pixels=True), \
        EncodeTiles("dinov2-tiny", None, allow_untrained=True)
    rng = np.random.default_rng(7)
    bags, truths = [], []
    for i, target in enumerate(rng.uniform(10, 90, 30)):
        img, truth = marrow_block(target, side=1344, mpp=1.0, seed=200 + i)
        path = folder / f"m{i}.tif"
        write_pyramid_tiff(img, str(path), 1.0)
        row = plan_step({"uri": str(path), "size": path.stat().st_size, "etag": None})
        tasks = tile_tasks(row["slide_id"], str(path), json.loads(row["plan"]))
        out = encode(read({k: np.asarray([t[k] for t in tasks]) for k in tasks[0]}))
        bags.append(out["embedding"])
        truths.append(truth.cellularity / 100)
    return bags, np.asarray(truths)


def test_abmil_on_synthetic_slides_reaches_r2(embedded_marrow):
    from sklearn.metrics import r2_score

    from engine.models.mil import predict_bags
    from engine.train.mil import train_mil

    bags, truth = embedded_marrow
    model, _ = train_mil(bags[:20], truth[:20], "regression", epochs=60, lr=1e-3, bag_size=64)
    pred = [predict_bags(model, b, n_bags=10, bag_size=64).mean[0] for b in bags[20:]]
    r2 = r2_score(truth[20:], pred)
    print(f"ABMIL on 10 held-out synthetic slides: R2 {r2:.3f}")
    assert r2 >= 0.9, (r2, np.round(truth[20:], 2), np.round(pred, 2))


def test_opencv_masks_match_scipy():
    """Component sizes and the reach of nuclei, by OpenCV, give scipy.ndimage's masks."""
    import cv2
    from scipy import ndimage as ndi

    from engine.cellularity import _components_at_least

    rng = np.random.default_rng(0)
    for i in range(10):
        side = 512 if i < 2 else 224  # 32-bit labels above 2**17 pixels, 16-bit below
        m = ndi.gaussian_filter(rng.random((side, side)), 1.5) > 0.5
        for min_px in (1, 5, 50, 400, 10**6):
            labels, n = ndi.label(m)
            keep = np.bincount(labels.ravel(), minlength=n + 1) >= min_px
            keep[0] = False
            assert (_components_at_least(m, min_px) == keep[labels]).all()
        nuclei = rng.random((224, 224)) > 0.995
        for half in (1, 3, 5):
            ref = ndi.distance_transform_cdt(~nuclei, metric="chessboard") <= half
            got = cv2.dilate(nuclei.view(np.uint8), np.ones((2 * half + 1,) * 2, np.uint8),
                             borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
            assert (got == ref).all()


def test_deconvolution_gives_numpys_optical_densities():
    """OpenCV's look-up and 3x3 transform give the numpy gather-and-matmul's values."""
    from engine.cellularity import _OD, _unmix, deconvolve

    tile = marrow_block(50, 224, 2.0, 3)[0]
    stains = macenko_stains([tile])
    ref = _OD[tile].reshape(-1, 3).astype(np.float64) @ _unmix(stains)
    for got, want in zip(deconvolve(tile, stains), ref.T):
        assert got.dtype == np.float32 and got.shape == (224, 224)
        np.testing.assert_allclose(got.ravel(), want, atol=1e-6)
