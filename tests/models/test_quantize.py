"""int8 checkpoints for CPU nodes: calibration ranges in safetensors, the same predictions as
float on real cells, the job, and the pipeline's use of them."""

import json

import numpy as np
import pytest
import torch

from engine.models import (CheckpointError, Predictor, create_model, read_checkpoint,
                           write_checkpoint)
from engine.models.quantize import calibrate, observer_state, prepare_int8
from engine.train.data import load_cell_images, read_labels
from jobs import quantize_cell_classifier
from tests.conftest import SHARED_DATA

PBC = SHARED_DATA / "pbc"
needs_pbc = pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")
CODES = ("L2", "MO2", "M6")


def _tiny_float(tmp_path):
    torch.manual_seed(0)
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=CODES)
    card = {"name": "deepheme-tiny", "architecture": model.spec.architecture,
            "class_codes": list(CODES)}
    path = str(tmp_path / "float.safetensors")
    write_checkpoint(model.module.state_dict(), card, path)
    return create_model("deepheme-tiny", path), path, card


def _int8(model, path, card, images, tmp_path):
    prepared = prepare_int8(model.module, model.spec.input_px)
    calibrate(prepared, [Predictor(model, "cpu", amp=False).preprocess(images)])
    state, _ = read_checkpoint(path)
    out = str(tmp_path / "int8.safetensors")
    write_checkpoint({**state, **observer_state(prepared)},
                     {**card, "quantization": {"scheme": "int8-static-x86-fx"}}, out)
    return out


def _pbc_subset(folder, per_code: int = 20) -> list[tuple[str, str]]:
    """A labels.csv in ``folder`` with the first ``per_code`` PBC rows of each of ``CODES``."""
    data = read_labels(str(PBC))
    rows = [(p, c) for p, c in zip(data.paths, data.codes) if c in CODES]
    rows = [r for c in CODES for r in [x for x in rows if x[1] == c][:per_code]]
    folder.mkdir()
    (folder / "labels.csv").write_text("path,code\n" + "".join(f"{p},{c}\n" for p, c in rows))
    return rows


def _cells(n: int, offset: int = 0) -> np.ndarray:
    data = read_labels(str(PBC))
    return load_cell_images(data.paths[offset:offset + n], 0.1, 0.25, 96)


@needs_pbc
def test_int8_checkpoint_round_trips_and_runs_on_cpu_only(tmp_path):
    model, path, card = _tiny_float(tmp_path)
    images = _cells(16)
    int8_path = _int8(model, path, card, images, tmp_path)
    a, b = create_model("deepheme-tiny", int8_path), create_model("deepheme-tiny", int8_path)
    assert a.int8 is not None and model.int8 is None
    pa, pb = Predictor(a).predict(images), Predictor(b).predict(images)
    np.testing.assert_array_equal(pa, pb)  # ranges restored exactly, not recalibrated
    assert pa.shape == (16, 3) and np.allclose(pa.sum(1), 1, atol=1e-5)
    # and close to the float model it came from (same weights, int8 activations)
    assert np.abs(pa - Predictor(model, "cpu", amp=False).predict(images)).max() < 0.1
    assert Predictor(a).embed(images).shape == (16, a.num_features)
    with pytest.raises(ValueError, match="int8 checkpoint for CPUs"):
        Predictor(a, "cuda")
    state, card8 = read_checkpoint(int8_path)
    write_checkpoint({k: v for k, v in state.items() if "activation_post_process_0." not in k},
                     card8, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="int8 ranges do not fit"):
        create_model("deepheme-tiny", str(tmp_path / "bad.safetensors"))


@needs_pbc
@pytest.mark.slow
def test_shipped_classifier_in_int8_agrees_with_float_on_real_cells(tmp_path):
    model = create_model("deepheme-resnext50")
    prepared = prepare_int8(model.module, 96)
    float_cpu = Predictor(model, "cpu", amp=False)
    calibrate(prepared, [float_cpu.preprocess(_cells(64, offset=i * 700)) for i in range(2)])
    state, card = read_checkpoint(model.weights)
    out = str(tmp_path / "int8.safetensors")
    write_checkpoint({**state, **observer_state(prepared)},
                     {**card, "quantization": {"scheme": "int8-static-x86-fx"}}, out)
    test = _cells(96, offset=4000)  # other rows than the calibration's
    p_int8 = Predictor(create_model(card["name"], out)).predict(test)
    p_float = float_cpu.predict(test)
    assert (p_float.argmax(1) == p_int8.argmax(1)).mean() >= 0.95


@needs_pbc
def test_the_shipped_int8_classifier_is_the_reference_and_its_ranges(tmp_path):
    """``deepheme-resnext50-int8`` ships as a few KB beside the reference (its activation
    ranges and int8 distance threshold; the weights are the reference's, checked by SHA-256):
    a CPU-only node runs it with no calibration data of its own. Its calls on real PBC cells
    are the float model's."""
    import os

    from engine.models import get_spec

    uri = get_spec("deepheme-resnext50-int8").checkpoint_uri()
    reference = get_spec("deepheme-resnext50").checkpoint_uri()
    if not os.path.exists(reference):
        pytest.skip("the reference's weights are not in this tree (a device bundle)")
    assert os.path.getsize(uri) < 100_000
    int8, ref = create_model("deepheme-resnext50-int8"), create_model("deepheme-resnext50")
    assert int8.int8 is not None and int8.class_codes == ref.class_codes
    assert int8.temperature == ref.temperature and int8.ood is not None
    for (k, a), b in zip(ref.module.state_dict().items(), int8.module.state_dict().values()):
        assert torch.equal(a, b), k  # the reference's weights, its temperature applied
    test = _cells(96, offset=4000)
    calls = Predictor(int8).predict(test).argmax(1)
    assert (calls == Predictor(ref, "cpu", amp=False).predict(test).argmax(1)).mean() >= 0.95
    # the ranges were fitted to those weights: other weights beside them are refused
    state, card = read_checkpoint(uri)
    added = {k: v for k, v in state.items() if k.startswith(("int8.", "ood.threshold"))}
    write_checkpoint(added, card, str(tmp_path / "int8.safetensors"))
    write_checkpoint({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()
                      if k not in added}, {"name": "x"}, str(tmp_path / card["weights_from"]))
    with pytest.raises(CheckpointError, match="made for other weights"):
        read_checkpoint(str(tmp_path / "int8.safetensors"))
    os.remove(tmp_path / card["weights_from"])
    with pytest.raises(CheckpointError, match="which is not beside it"):
        read_checkpoint(str(tmp_path / "int8.safetensors"))
    for name in ("../deepheme-resnext50.safetensors", "/tmp/x.safetensors"):
        write_checkpoint(added, {**card, "weights_from": name}, str(tmp_path / "far.safetensors"))
        with pytest.raises(CheckpointError, match="must name a file beside it"):
            read_checkpoint(str(tmp_path / "far.safetensors"))


@needs_pbc
def test_job_calibrates_on_training_rows_and_scores_the_test_split(tmp_path, capsys):
    _pbc_subset(tmp_path / "d")
    _, path, _ = _tiny_float(tmp_path)
    out = str(tmp_path / "int8.safetensors")
    assert quantize_cell_classifier.main(["--checkpoint", path, "--data", str(tmp_path / "d"),
                                          "--output", out, "--calibration-images", "24"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["images"] == 24
    ev = report["evaluation"]
    assert ev["float"]["n"] == ev["int8"]["n"] == 9  # 15 % of 60, stratified
    assert ev["int8"]["precision"] == "int8" and ev["int8"]["crops_per_s"] > 0
    # int8's change paired on the same 9 images: the measured difference inside its interval
    d = ev["int8_minus_float"]["macro_f1"]
    assert d["difference"] == pytest.approx(ev["int8"]["macro_f1"] - ev["float"]["macro_f1"],
                                            abs=2e-4)
    assert d["difference_ci"][0] <= d["difference"] <= d["difference_ci"][1]
    _, card = read_checkpoint(out)
    assert card["quantization"]["evaluation"] == ev
    assert quantize_cell_classifier.main(["--checkpoint", out, "--data", str(tmp_path / "d"),
                                          "--output", str(tmp_path / "again.safetensors")]) == 2
    assert "already quantized" in capsys.readouterr().err


@needs_pbc
def test_job_sets_the_int8_distance_threshold_on_its_own_features(tmp_path, capsys):
    from engine.models.ood import fit_on_crops

    rows = _pbc_subset(tmp_path / "d")
    model, path, card = _tiny_float(tmp_path)
    crops = load_cell_images([p for p, _ in rows], 0.1, 0.25, 96)
    density, section = fit_on_crops(model, crops, np.array([CODES.index(c) for _, c in rows]),
                                    fit_images=40, held_out_images=20, dims=8, quantile=0.9)
    state, _ = read_checkpoint(path)
    write_checkpoint({**state, **density.state_dict()}, {**card, "ood": section}, path)
    out = str(tmp_path / "int8.safetensors")
    assert quantize_cell_classifier.main(["--checkpoint", path, "--data", str(tmp_path / "d"),
                                          "--output", out, "--calibration-images", "24",
                                          "--ood-images", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    matched = report["ood_threshold"]
    assert matched["images"] == 51 - 24  # the training split less the calibration images
    assert matched["float"] == round(density.threshold, 4)
    int8 = create_model("deepheme-tiny", out)
    assert int8.int8 is not None and round(int8.ood.threshold, 4) == matched["int8"]
    _, card8 = read_checkpoint(out)
    assert card8["ood"]["threshold"] == matched["int8"]
    for side in ("float", "int8"):
        assert 0 <= report["evaluation"][side]["ood_flagged_fraction"] <= 1
    # with the default 512 calibration images, more than the training split holds (a lab's
    # first labels): half of it is kept for the threshold, where none was left (a traceback)
    assert quantize_cell_classifier.main(["--checkpoint", path, "--data", str(tmp_path / "d"),
                                          "--output", out, "--no-eval"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["images"] == 51 - 25 and report["ood_threshold"]["images"] == 25


@needs_pbc
def test_pipeline_runs_an_int8_classifier_on_cpu(tmp_path):
    from engine.config import Config
    from engine.pipeline.run import resolve_stages
    from engine.pipeline.steps import ClassifyCells

    model, path, card = _tiny_float(tmp_path)
    int8_path = _int8(model, path, card, _cells(16), tmp_path)
    cfg = Config.from_dict({"pipeline": {"stages": ["cells"], "classifier": {
        "model": "deepheme-tiny", "checkpoint": int8_path}}})
    plan = resolve_stages(cfg, allow_untrained=False)
    assert "cell_classification:deepheme-tiny (int8, CPU)" in plan.run
    assert plan.cpu_models == {"cells"}
    batch = {"kind": np.array(["nucleated", "marker"]), "task": np.arange(2),
             "crop": _cells(2)}
    out = ClassifyCells("deepheme-tiny", int8_path, batch_size=64)(batch)
    assert out["class_code"][0] in CODES and out["class_code"][1] == ""
