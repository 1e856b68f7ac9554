"""Per-class logit offsets and the softmax temperature: recovered on synthetic logits; the job
fits them on the training split's validation rows only, folds offsets into the final bias and
records a temperature in the card, which loading applies."""

import csv
import json

import numpy as np
import pytest
import torch

from engine.train.calibration import fit_offsets, macro_f1, probabilities
from tests.conftest import SHARED_DATA

PBC = SHARED_DATA / "pbc"


def test_offsets_recover_a_shifted_class_boundary():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 900)
    logits = rng.normal(0, 1, (1, 900, 3)) + 2.5 * np.eye(3)[y][None]
    logits[..., 1] -= 1.5  # class 1 under-called, as a badly placed boundary would do
    before = macro_f1(y, probabilities(logits, np.zeros(3)))
    offsets = fit_offsets(logits, y)
    after = macro_f1(y, probabilities(logits, offsets))
    assert after > before + 0.05
    assert offsets[1] - max(offsets[0], offsets[2]) > 0.8  # class 1 raised against the others


def test_macro_f1_is_scikit_learns():
    """Counted from the confusion, as scikit-learn scores it: over the classes in ``y`` only, a
    class never called right scoring 0 (calls of a class absent from ``y`` still count)."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    for n, k in ((5, 4), (40, 6), (300, 11)):
        y = rng.integers(0, k - 1, n)  # the last class never in y, sometimes called
        probs = rng.random((n, k))
        assert macro_f1(y, probs) == pytest.approx(f1_score(
            y, probs.argmax(1), labels=np.unique(y), average="macro", zero_division=0))


def test_well_placed_classes_keep_zero_offsets():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(0, 0.3, (8, 400, 4)) + 4.0 * np.eye(4)[y][None]  # already perfect
    assert (fit_offsets(logits, y) == 0).all()


@pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")
def test_job_fits_on_validation_rows_and_folds_offsets_into_the_bias(tmp_path):
    from engine.models import create_model
    from engine.models.checkpoint import read_checkpoint, write_checkpoint
    from jobs import calibrate_cell_classifier as job

    # a small labelled set: 14 images of each of three classes
    with open(PBC / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for code in ("B2", "E4", "L2") for r in [x for x in rows if x["code"] == code][:14]]
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "code"])
        w.writerows((str(PBC / r["path"]), r["code"]) for r in picked)
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=("B2", "E4", "L2"))
    ckpt = tmp_path / "tiny.safetensors"
    write_checkpoint(model.module.state_dict(), {"name": "deepheme-tiny", "architecture":
                     model.spec.architecture, "class_codes": ["B2", "E4", "L2"]}, str(ckpt))
    out = tmp_path / "calibrated.safetensors"
    args = ["--checkpoint", str(ckpt), "--data", str(data), "--output", str(out),
            "--test-fraction", "0.2", "--no-tta", "--offsets"]
    assert job.main(args) == 0
    paths, y, codes, test_paths = job.validation_rows(job.parse_args(args))
    assert len(paths) >= 3 and not set(paths) & test_paths and codes == ["B2", "E4", "L2"]
    # auto: measured on all the labelled images, as the train job measures them (it was measured
    # on the validation rows alone: another figure from other images than training took)
    from engine.train.data import read_labels
    from jobs.common import data_mpp

    auto = job.parse_args(args + ["--source-mpp", "auto"])
    job.validation_rows(auto)
    assert auto.source_mpp == data_mpp("auto", str(data), read_labels(str(data)).paths)
    old, _ = read_checkpoint(str(ckpt))
    new, card = read_checkpoint(str(out))
    cal = card["calibration"]
    assert cal["n_val"] == len(paths) and cal["bias_key"] in new
    shift = (new[cal["bias_key"]] - old[cal["bias_key"]]).numpy()
    assert np.allclose(shift, [cal["offsets"][c] for c in codes], atol=1e-3)
    assert cal["val_after"]["macro_f1"] >= cal["val_before"]["macro_f1"]
    for k in new:
        if k != cal["bias_key"]:
            assert torch.equal(new[k], old[k]), k
    json.dumps(card)  # the card stays plain JSON


def _honest_logits(n: int, views: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the chance of each label (labels drawn from it): calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (1, n, 4)) + rng.normal(0, 0.3, (views, n, 4))
    p = probabilities(logits, np.zeros(4))
    y = np.array([rng.choice(4, p=row / row.sum()) for row in p])
    return logits.astype(np.float32), y


def test_temperature_undoes_an_overconfident_softmax_and_moves_no_call():
    from engine.train.calibration import fit_temperature
    from engine.train.metrics import calibration_report

    logits, y = _honest_logits(4000, 8, 2)
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.1)
    sharp = logits * 2.0  # twice as sure as it has reason to be
    t = fit_temperature(sharp, y)
    assert t == pytest.approx(2.0, rel=0.1)
    before = calibration_report(y, probabilities(sharp, np.zeros(4)))
    after = calibration_report(y, probabilities(sharp / t, np.zeros(4)))
    assert after["ece"] < before["ece"] / 2 and after["nll"] < before["nll"]
    assert before["mean_confidence"] > after["mean_confidence"]
    assert sum(b["n"] for b in after["reliability"]) == len(y)
    # one view: dividing by T moves no call
    assert (probabilities(sharp[:1], np.zeros(4)).argmax(1)
            == probabilities(sharp[:1] / t, np.zeros(4)).argmax(1)).all()


@pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")
def test_job_fits_a_temperature_that_loading_applies(tmp_path, capsys):
    from engine.models import CheckpointError, create_model
    from engine.models.checkpoint import read_checkpoint, write_checkpoint
    from jobs import calibrate_cell_classifier as job

    with open(PBC / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for code in ("B2", "L2") for r in [x for x in rows if x["code"] == code][:15]]
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "code")] + [(str(PBC / r["path"]), r["code"])
                                                       for r in picked])
    torch.manual_seed(0)
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=("B2", "L2"))
    ckpt, out = tmp_path / "tiny.safetensors", tmp_path / "tempered.safetensors"
    card = {"name": "deepheme-tiny", "architecture": model.spec.architecture,
            "class_codes": ["B2", "L2"], "metrics": {"test": {}}}
    write_checkpoint(model.module.state_dict(), card, str(ckpt))
    assert job.main(["--checkpoint", str(ckpt), "--data", str(data), "--output", str(out),
                     "--test-fraction", "0.2", "--no-tta"]) == 0  # a temperature: the default
    with pytest.raises(SystemExit):  # one or the other
        job.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o", "--temperature",
                        "--offsets"])
    # fitted as asked, on too few images to mean much, and it says so
    assert "validation images, fewer than the 100 a temperature is fitted on" in \
        capsys.readouterr().err
    old, _ = read_checkpoint(str(ckpt))
    new, card = read_checkpoint(str(out))
    assert all(torch.equal(new[k], old[k]) for k in old) and set(new) == set(old)
    fitted = card["temperature"]
    assert fitted["value"] > 0 and fitted["n_val"] >= 2 and "metrics" not in card
    assert fitted["val_after"]["nll"] <= fitted["val_before"]["nll"]
    assert fitted["val_after"]["accuracy"] == fitted["val_before"]["accuracy"]  # one view
    # loading divides the final layer by it; calibrated=False gives the weights as trained
    x = torch.rand(3, 3, 96, 96)
    tempered = create_model("deepheme-tiny", str(out))
    raw = create_model("deepheme-tiny", str(out), calibrated=False)
    assert tempered.temperature == fitted["value"] and raw.temperature == 1.0
    with torch.no_grad():
        torch.testing.assert_close(tempered.module(x), raw.module(x) / fitted["value"])
    write_checkpoint(new, {**card, "temperature": {"value": -1}}, str(tmp_path / "bad.st"))
    with pytest.raises(CheckpointError, match="temperature -1 is not a positive number"):
        create_model("deepheme-tiny", str(tmp_path / "bad.st"))
