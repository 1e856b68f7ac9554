"""Per-class logit offsets: recovered on synthetic logits, and the job fits them on the
training split's validation rows only and folds them into the checkpoint's final bias."""

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
            "--test-fraction", "0.2", "--no-tta"]
    assert job.main(args) == 0
    paths, y, codes, test_paths = job.validation_rows(job.parse_args(args))
    assert len(paths) >= 3 and not set(paths) & test_paths and codes == ["B2", "E4", "L2"]
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
