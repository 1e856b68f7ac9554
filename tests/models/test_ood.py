"""Distance to the training data: the density, its checkpoint round trip, the job, and on real
cells: PBC's own test cells pass, BCCD's (another lab's stain and camera) are flagged."""

import json

import numpy as np
import pytest
import torch

from engine.models import (CheckpointError, EnsemblePredictor, Predictor, create_model,
                           read_checkpoint, write_checkpoint)
from engine.models.inference import Stacked
from engine.models.ood import FeatureDensity, fit_density
from engine.slides.smear import bccd_white_cells
from engine.train.data import load_cell_images, read_labels
from jobs import fit_cell_ood
from tests.conftest import SHARED_DATA

PBC, BCCD = SHARED_DATA / "pbc", SHARED_DATA / "bccd"
needs_pbc = pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")
CODES = ("L2", "MO2", "M6")


def _clusters(rng, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three Gaussian classes in 40-d with correlated noise; ``shift`` moves every point."""
    centres = rng.normal(0, 4, (3, 40))
    mix = rng.normal(0, 1, (40, 40)) / 6
    y = rng.integers(0, 3, n)
    return centres[y] + rng.normal(0, 1, (n, 40)) @ mix + shift, y


def test_density_flags_its_quantile_in_distribution_and_shifted_points():
    rng = np.random.default_rng(0)
    x, y = _clusters(np.random.default_rng(1), 3000)
    density = fit_density(x[:2000], y[:2000], 3, dims=40)
    density = density.with_threshold(torch.tensor(x[2000:2500]), 0.95)
    inside = density.distance(torch.tensor(x[2500:])) > density.threshold
    assert 0.01 <= inside.float().mean() <= 0.12  # ~5 % by construction
    shifted, _ = _clusters(np.random.default_rng(1), 500, shift=rng.normal(0, 1.5, 40))
    assert (density.distance(torch.tensor(shifted)) > density.threshold).float().mean() > 0.9
    # stored in fp16 as the reference checkpoint is, the distances barely move
    half = FeatureDensity.from_state({k: v.half() for k, v in density.state_dict().items()})
    np.testing.assert_allclose(half.distance(torch.tensor(x[:50])),
                               density.distance(torch.tensor(x[:50])), rtol=2e-3)
    assert abs(half.threshold - density.threshold) < 1e-2 * density.threshold
    assert FeatureDensity.from_state({"fc.weight": torch.zeros(1)}) is None
    with pytest.raises(ValueError, match="incomplete"):
        FeatureDensity.from_state({"ood.mean": torch.zeros(3)})
    with pytest.raises(ValueError, match="no fitting images"):
        fit_density(x[:10], np.zeros(10, int), 3)


def test_cross_fitted_threshold_flags_about_its_share_of_new_points_where_few_are_fitted():
    from engine.models.ood import cross_fitted, usable_dims

    cross, quarter = [], []
    for seed in range(5):  # 60 points, as a lab's first labels; 2,000 new ones to score
        x, y = _clusters(np.random.default_rng(seed), 2060)
        new = torch.tensor(x[60:])
        density = cross_fitted(x[:60], y[:60], 3, quantile=0.99, seed=seed)
        assert density.centres.shape == (3, 15)  # a quarter of 60, not the 40 asked
        cross.append((density.distance(new) > density.threshold).float().mean().item())
        # the threshold from a held-out quarter instead: the 99th percentile of 15 points
        held = fit_density(x[:45], y[:45], 3, dims=usable_dims(45, 128)).with_threshold(
            torch.tensor(x[45:60]), 0.99)
        quarter.append((held.distance(new) > held.threshold).float().mean().item())
    assert max(cross) <= 0.04 and np.mean(cross) <= 0.02, cross
    assert np.mean(quarter) >= 3 * np.mean(cross), (quarter, cross)
    # a class of one image is absent from one fold's fit: its centre left out there, not refused
    y[0], y[1:60] = 2, np.where(y[1:60] == 2, 0, y[1:60])
    lone = cross_fitted(x[:60], y[:60], 3)
    assert lone.centres.shape[0] == 3 and np.isfinite(lone.threshold)
    with pytest.raises(ValueError, match="no fitting images"):
        cross_fitted(x[:60], y[:60], 4)


def _tiny(tmp_path, density: bool):
    torch.manual_seed(0)
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES)
    card = {"name": "deepheme-tiny", "architecture": model.spec.architecture,
            "class_codes": list(CODES)}
    state = dict(model.module.state_dict())
    if density:
        feats = np.random.default_rng(0).normal(0, 1, (60, model.num_features))
        state.update(fit_density(feats, np.arange(60) % 3, 3, dims=8)
                     .with_threshold(torch.tensor(feats), 0.9).state_dict())
    path = str(tmp_path / f"tiny-{density}.safetensors")
    write_checkpoint(state, card, path)
    return path


def test_checkpoint_carries_the_density_and_the_predictor_returns_distances(tmp_path):
    with_d, without = _tiny(tmp_path, True), _tiny(tmp_path, False)
    model = create_model("deepheme-tiny", with_d)
    assert model.ood is not None and create_model("deepheme-tiny", without).ood is None
    images = np.random.default_rng(0).integers(0, 255, (5, 96, 96, 3), dtype=np.uint8)
    pred = Predictor(model, "cpu", amp=False)
    for tta in (False, True):
        probs, dist = pred.predict_with_distance(images, tta)
        np.testing.assert_allclose(probs, pred.predict(images, tta), atol=1e-6)
        assert dist.shape == (5,) and np.isfinite(dist).all()
    feats = torch.tensor(pred.embed(images))
    np.testing.assert_allclose(dist, model.ood.distance(feats).numpy(), rtol=1e-5)
    assert Predictor(create_model("deepheme-tiny", without)).predict_with_distance(
        images)[1] is None
    # an ensemble takes the distance of its first member that has a density
    ens = EnsemblePredictor([create_model("deepheme-tiny", without), model], "cpu", amp=False)
    probs, d2 = ens.predict_with_distance(images)
    np.testing.assert_allclose(d2, dist, rtol=1e-5)
    np.testing.assert_allclose(probs, ens.predict(images), atol=1e-6)
    state, card = read_checkpoint(with_d)
    write_checkpoint({k: v for k, v in state.items() if k != "ood.centres"}, card,
                     str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete out-of-distribution"):
        create_model("deepheme-tiny", str(tmp_path / "bad.safetensors"))


def test_chunks_and_picked_rows_give_the_one_pass_outputs(tmp_path):
    """A call of many rows runs ``chunk`` rows at a time (pipelined on CUDA); ``rows`` picks
    rows in its own order: the outputs equal one pass over the picked crops."""
    model = create_model("deepheme-tiny", _tiny(tmp_path, True))
    images = np.random.default_rng(1).integers(0, 255, (23, 96, 96, 3), dtype=np.uint8)
    rows = np.array([20, 3, 4, 0, 17, 9, 22])
    whole = Predictor(model, "cpu", amp=False)
    for tta in (False, True):
        probs, dist = whole.predict_with_distance(images[rows], tta)
        for chunk in (1, 3, 7, 64):
            small = Predictor(model, "cpu", amp=False, chunk=chunk)
            p, d = small.predict_with_distance(images, tta, rows=rows)
            np.testing.assert_allclose(p, probs, atol=1e-6)
            np.testing.assert_allclose(d, dist, rtol=1e-5)
            np.testing.assert_allclose(small.predict(images, tta, rows=rows), probs, atol=1e-6)
            # the cells' features come from the same pass: the crop's own view's
            p, d, f = small.score(images, tta, rows=rows, features=True)
            np.testing.assert_allclose(p, probs, atol=1e-6)
            np.testing.assert_allclose(f, whole.embed(images[rows]), atol=1e-5)
    # a Ray Data block's chunks, read in place as one array: the same outputs
    stacked = Stacked([images[:5], images[5:6], images[6:6], images[6:]])
    np.testing.assert_array_equal(stacked[3:9], images[3:9])
    np.testing.assert_array_equal(stacked[rows], images[rows])
    np.testing.assert_array_equal(stacked[np.sort(rows)], images[np.sort(rows)])
    for chunk in (1, 3, 64):
        small = Predictor(model, "cpu", amp=False, chunk=chunk)
        np.testing.assert_allclose(small.predict(stacked, rows=rows), whole.predict(images[rows]),
                                   atol=1e-6)
        np.testing.assert_allclose(small.embed(stacked), whole.embed(images), atol=1e-5)
    small = Predictor(model, "cpu", amp=False, chunk=4)
    np.testing.assert_allclose(small.embed(images), whole.embed(images), atol=1e-5)
    np.testing.assert_allclose(small.embed(images, rows=rows), whole.embed(images)[rows],
                               atol=1e-5)
    p, d = small.predict_with_distance(images, rows=rows[:0])  # no rows: empty outputs
    assert p.shape == (0, len(CODES)) and d.shape == (0,)
    ens = EnsemblePredictor([model, model], "cpu", amp=False, chunk=2)
    np.testing.assert_allclose(ens.predict_with_distance(images, rows=rows)[0],
                               whole.predict(images[rows]), atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        Predictor(model, "cpu", chunk=0)
    with pytest.raises(ValueError, match="uint8"):
        small.predict(images.astype(np.float32))


def test_classify_step_scores_real_rows_in_place_across_passes(tmp_path):
    """Markers among the crops stay unscored; the real rows' scores do not depend on how the
    call is split into forward passes."""
    from engine.pipeline.steps import ClassifyCells

    rng = np.random.default_rng(2)
    kinds = np.array(["nucleated", "none", "platelet", "nucleated", "error", "nucleated",
                      "nucleated", "none", "platelet"])
    batch = {"kind": kinds, "task": np.arange(9),
             "crop": rng.integers(0, 255, (9, 96, 96, 3), dtype=np.uint8)}
    path = _tiny(tmp_path, True)
    real = np.isin(kinds, ["nucleated", "platelet"])
    probs, dist = Predictor(create_model("deepheme-tiny", path), "cpu").predict_with_distance(
        batch["crop"][real])
    for batch_size in (2, 256):
        out = ClassifyCells("deepheme-tiny", path, batch_size=batch_size)(dict(batch))
        np.testing.assert_allclose(out["probabilities"][real], probs, atol=1e-5)
        np.testing.assert_allclose(out["ood_distance"][real], dist, rtol=1e-4)
        assert (out["probabilities"][~real] == 0).all() and (out["class_code"][~real] == "").all()
        assert np.isnan(out["ood_distance"][~real]).all()
    every = dict(batch, kind=np.full(9, "nucleated"))  # all real: no rows picked
    out = ClassifyCells("deepheme-tiny", path, batch_size=4)(every)
    assert np.isfinite(out["ood_distance"]).all() and "features" not in out
    # with features (pipeline.classifier.features), from a checkpoint with or without a density
    for ckpt in (path, _tiny(tmp_path, False)):
        model = create_model("deepheme-tiny", ckpt)
        out = ClassifyCells("deepheme-tiny", ckpt, batch_size=2, features=True)(dict(batch))
        assert out["features"].shape == (9, model.num_features)
        np.testing.assert_allclose(out["features"][real],
                                   Predictor(model, "cpu").embed(batch["crop"][real]), atol=1e-4)
        assert (out["features"][~real] == 0).all()
        np.testing.assert_allclose(out["probabilities"][real], Predictor(model, "cpu").predict(
            batch["crop"][real]), atol=1e-5)


@needs_pbc
def test_job_fits_on_training_rows_and_reports_the_test_split(tmp_path, capsys):
    data = read_labels(str(PBC))
    rows = [r for c in CODES for r in [x for x in zip(data.paths, data.codes) if x[1] == c][:30]]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "labels.csv").write_text(
        "path,code\n" + "".join(f"{p},{c}\n" for p, c in rows))
    path, out = _tiny(tmp_path, False), str(tmp_path / "ood.safetensors")
    args = ["--checkpoint", path, "--data", str(tmp_path / "d"), "--output", out,
            "--fit-images", "48", "--dims", "8", "--quantile", "0.9"]
    assert fit_cell_ood.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fit_images"] == 48 and report["held_out_images"] == 90 - 14 - 48
    assert report["test_split"]["n"] == 14 and report["dims"] == 8
    model = create_model("deepheme-tiny", out)
    assert model.ood is not None and model.ood.threshold == pytest.approx(report["threshold"],
                                                                           rel=1e-3)
    assert model.card["ood"]["test_split"] == report["test_split"]
    state, _ = read_checkpoint(out)
    before, _ = read_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in before.items())  # the weights unchanged
    assert fit_cell_ood.main([*args[:5], str(tmp_path / "x.safetensors"),
                              "--fit-images", "90"]) == 2
    err = capsys.readouterr().err
    assert "leave none to set the threshold" in err and "or give --held-out-images 0" in err
    # --held-out-images 0: every training-split image fits it and, cross-fitted, sets the cut
    assert fit_cell_ood.main([*args[:5], out, "--held-out-images", "0", "--quantile", "0.9"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fit_images"] == 90 - 14 and report["held_out_images"] == 0
    assert "cross-fitting" in report["threshold_from"] and report["dims"] == (90 - 14) // 4
    assert create_model("deepheme-tiny", out).ood.threshold == pytest.approx(
        report["threshold"], rel=1e-3)
    assert fit_cell_ood.main([*args[:5], out, "--held-out-images", "0", "--fit-images",
                              "40"]) == 2
    assert "40 images, fewer than the 50 a feature density is fitted on" in \
        capsys.readouterr().err


@needs_pbc
@pytest.mark.skipif(not (BCCD / "Annotations").exists(), reason="BCCD data not present")
def test_shipped_classifier_flags_another_labs_cells_not_its_own():
    model = create_model("deepheme-resnext50")
    if model.ood is None:
        pytest.skip("the shipped checkpoint carries no feature density")
    pred = Predictor(model, "cpu", amp=False)
    from jobs.train_cell_classifier import split_for_training

    # the reference's held-out test rows (the density was fitted on training rows only)
    *_, test_rows = split_for_training(read_labels(str(PBC)), {"IG", "NEU"}, 0.15, 0)
    paths = [p for p, c in test_rows if c in model.class_codes][::8]
    own = load_cell_images(paths, 0.1, 0.25, 96)
    _, d_own = pred.predict_with_distance(own)
    _, d_bccd = pred.predict_with_distance(bccd_white_cells(str(BCCD), mpp=0.082, limit=120))
    assert (d_own > model.ood.threshold).mean() <= 0.1
    assert (d_bccd > model.ood.threshold).mean() >= 0.6


def test_classify_step_writes_distances_and_flags(tmp_path):
    from engine.pipeline.steps import ClassifyCells

    rng = np.random.default_rng(0)
    batch = {"kind": np.array(["nucleated", "platelet", "none"]), "task": np.arange(3),
             "crop": rng.integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)}
    out = ClassifyCells("deepheme-tiny", _tiny(tmp_path, True))(dict(batch))
    d = out["ood_distance"]
    assert np.isfinite(d[:2]).all() and np.isnan(d[2])  # marker rows are not scored
    model = create_model("deepheme-tiny", _tiny(tmp_path, True))
    assert (out["out_of_distribution"][:2] == (d[:2] > model.ood.threshold)).all()
    assert not out["out_of_distribution"][2]
    plain = ClassifyCells("deepheme-tiny", _tiny(tmp_path, False))(dict(batch))
    assert np.isnan(plain["ood_distance"]).all() and not plain["out_of_distribution"].any()


def test_an_int8_checkpoint_keeps_the_density(tmp_path):
    from engine.models.quantize import calibrate, observer_state, prepare_int8

    path = _tiny(tmp_path, True)
    model = create_model("deepheme-tiny", path)
    images = np.random.default_rng(0).integers(0, 255, (8, 96, 96, 3), dtype=np.uint8)
    prepared = prepare_int8(model.module, 96)
    calibrate(prepared, [Predictor(model, "cpu", amp=False).preprocess(images)])
    state, card = read_checkpoint(path)
    out = str(tmp_path / "int8.safetensors")
    write_checkpoint({**state, **observer_state(prepared)},
                     {**card, "quantization": {"scheme": "int8-static-x86-fx"}}, out)
    int8 = create_model("deepheme-tiny", out)
    assert int8.int8 is not None and int8.ood.threshold == model.ood.threshold
    _, d8 = Predictor(int8).predict_with_distance(images)
    _, d = Predictor(model, "cpu", amp=False).predict_with_distance(images)
    assert np.abs(d8 - d).max() < 0.1 * d.mean()  # int8 features, close to float's


def test_threshold_carried_to_int8_like_distances_flags_about_the_same_share():
    from engine.models.ood import match_threshold

    rng = np.random.default_rng(3)
    ref = rng.gamma(4.0, 3.0, 20000)
    other = ref * 1.15 * np.exp(rng.normal(0, 0.01, 20000))  # a little farther, a little noisy
    thr = float(np.quantile(ref, 0.99))
    cut = match_threshold(ref, thr, other)
    assert abs(cut / thr - 1.15) < 0.01
    assert abs((other > cut).mean() - 0.01) < 0.002
    assert (other > thr).mean() > 2 * (ref > thr).mean()  # the float cut would flag too many
    assert match_threshold(ref, thr, ref) == thr
