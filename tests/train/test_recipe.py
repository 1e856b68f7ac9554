"""The training recipe on real PBC images with tiny models (no Ray)."""

import json

import numpy as np
import pytest
import torch

from engine.train.augment import HEDJitter, train_transform
from engine.train.loop import LocalSession, TrainSettings, compile_in_place
from engine.train.splits import BalancedSampler, balanced_indices, kfold_splits
from tests.conftest import SHARED_DATA, compiled_without_codegen

PBC = SHARED_DATA / "pbc"
needs_pbc = pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")


def test_balanced_upsampling_keeps_all_and_equalises():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1)
    idx = balanced_indices(labels, np.random.default_rng(0))
    assert np.bincount(labels[idx]).tolist() == [10, 10, 10]
    assert set(range(14)) <= set(idx.tolist())
    shards = [list(BalancedSampler(labels, 2, r, seed=1)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) or len(shards[0]) == 15


def test_kfold_is_stratified_and_grouped():
    labels = np.repeat([0, 1, 2], 20)
    groups = np.repeat(np.arange(12), 5)
    for train, val in kfold_splits(labels, 4, seed=0, groups=groups):
        assert not set(groups[train]) & set(groups[val])
        assert set(labels[val]) == {0, 1, 2}


def test_a_holdout_keeps_one_image_of_each_class_where_its_fraction_holds_fewer():
    from engine.train.splits import holdout_split

    labels = np.repeat(np.arange(11), 6)  # 66 images: 15 % is 10, one short of 11 classes
    keep, held = holdout_split(labels, 0.15, seed=0)
    assert len(held) == 11 and sorted(labels[held]) == list(range(11))
    assert not set(keep) & set(held) and len(keep) + len(held) == 66
    labels = np.repeat(np.arange(11), 40)  # where the fraction holds more: its own count
    assert len(holdout_split(labels, 0.15, seed=0)[1]) == 66


def test_too_few_groups_split_by_image_and_say_so():
    """A lab's first labelled cells may come from one or two slides: fewer slides than splits
    cannot be split by slide, so the split is by image, with a warning."""
    labels = np.repeat([0, 1, 2], 20)
    for k, groups in ((4, np.repeat([0, 1], 30)), (1, np.zeros(60, int))):
        with pytest.warns(UserWarning, match="split by image instead"):
            splits = kfold_splits(labels, k, seed=0, groups=groups)
        assert len(splits) == k
        for train, val in splits:
            assert not set(train) & set(val) and set(labels[val]) == {0, 1, 2}


@needs_pbc
def test_train_job_refuses_labels_it_cannot_split_with_what_to_do(tmp_path, capsys):
    """A lab's own labels (jobs.export_cells) may hold a code with one or two cells, an
    unknown code, or no code filled in yet: each is said, not a traceback."""
    import csv as csv_

    from jobs import train_cell_classifier

    with open(PBC / "labels.csv") as fh:
        rows = list(csv_.DictReader(fh))
    picks = [r for c in ("L2", "M6") for r in [r for r in rows if r["code"] == c][:6]]
    picks += [r for r in rows if r["code"] == "B2"][:1]  # one basophil
    data = tmp_path / "data"
    data.mkdir()

    def write(rows_, **code):
        with open(data / "labels.csv", "w", newline="") as fh:
            w = csv_.DictWriter(fh, fieldnames=["path", "code"])
            w.writeheader()
            w.writerows({"path": str(PBC / r["path"]), "code": code.get("code", r["code"])}
                        for r in rows_)

    def train(*extra):
        code = train_cell_classifier.main(["--data", str(data), "--output", str(tmp_path / "o"),
                                           "--arch", "deepheme-tiny", "--epochs", "1", "--local",
                                           "--loader-workers", "0", *extra])
        return code, capsys.readouterr().err

    write(picks)
    code, err = train()
    assert code == 2 and "too few labelled images of B2 (1)" in err
    assert "--exclude-codes B2,IG,NEU" in err
    write(picks[1:-1] + [{**picks[0], "code": "XX"}])
    code, err = train()
    assert code == 2 and "1 row(s) with a code that is no DeepHeme code: line 13 'XX'" in err
    write(picks[1:-1] + [{**picks[0], "code": "lymphocyte"}])  # a PBC folder's name
    code, err = train()
    assert code == 2 and "line 13 'lymphocyte' (a name for L2)" in err
    write(picks[1:-1] + [{**picks[0], "code": "Segs"}])  # a counting sheet's
    code, err = train()
    assert code == 2 and "line 13 'Segs' (a name for M6)" in err
    write(picks[:-1] + [{**picks[0], "code": "M6"}])  # an image given a second code
    code, err = train()
    assert code == 2 and "1 image(s) labelled with two codes" in err
    write(picks, code="")
    code, err = train()
    assert code == 2 and "no row with a code: fill in the code column" in err
    write(picks[:6])  # lymphocytes only: it trained, and scored 1.0 on its one test image
    code, err = train()
    assert code == 2 and "1 code to train on (L2): a classifier learns to tell two" in err
    code, err = train("--exclude-codes", "L2")
    assert code == 2 and "0 codes to train on (every code is in --exclude-codes)" in err
    # 6 lymphocytes and 6 neutrophils: not one full batch of 128 an epoch, where the job
    # wrote its random weights as a trained model. Given, the size is refused, saying which
    # fits; by default, the job takes that one
    write(picks[:-1])
    code, err = train("--batch-size", "128")
    assert code == 2 and "fewer than --batch-size 128: training keeps full batches" in err, err
    assert "Give --batch-size 8 or less" in err
    assert not (tmp_path / "o" / "runs").exists()  # refused before training
    code, err = train()
    assert code == 0 and "--batch-size 8: fold 0's training images give " in err, err
    assert "fewer than the default 128" in err
    card = json.loads((tmp_path / "o" / "model.json").read_text())
    assert card["training"]["settings"]["batch_size"] == 8
    # nor is a softmax temperature fitted on its 2 validation images: mostly noise
    assert "fold 0: no softmax temperature: 2 validation images, fewer than the 100" in err
    assert card["temperature"] == {"n_val": 2, "skipped": card["temperature"]["skipped"]}
    # nor a feature density on its 10 training images: another lab's cells would pass it
    assert "fold 0: no feature density: 10 images, fewer than the 50" in err
    assert card["ood"] == {"skipped": card["ood"]["skipped"]}
    from engine.models import create_model

    small = create_model("deepheme-tiny", str(tmp_path / "o" / "model.safetensors"))
    assert small.temperature == 1.0 and small.ood is None


def test_hed_jitter_is_identity_at_zero_and_changes_colour():
    img = np.random.default_rng(0).integers(30, 230, (32, 32, 3), dtype=np.uint8)
    same = HEDJitter(sigma=0.0, p=1.0)(image=img)["image"]
    assert np.abs(same.astype(int) - img).max() <= 1
    moved = HEDJitter(sigma=0.2, p=1.0)(image=img)["image"]
    assert np.abs(moved.astype(int) - img).mean() > 1
    out = train_transform(96)(image=np.zeros((144, 144, 3), np.uint8))["image"]
    assert out.shape == (96, 96, 3)


def test_a_shift_turns_hue_and_saturation_and_blurs_at_the_images_own_pixels():
    import cv2

    from engine.train.data import Shift, cell_crop

    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, :20] = (200, 40, 40)  # red
    rgb[:, 20:] = (60, 60, 160)  # blue
    assert not Shift() and Shift(hue_deg=10)
    assert np.array_equal(Shift().apply(rgb, 0.1), rgb)
    greened = Shift(hue_deg=120).apply(rgb, 0.1).astype(int)
    assert np.abs(greened[0, 0] - (40, 200, 40)).max() <= 1  # red -> green, same lightness
    assert np.abs(greened[0, -1] - (160, 60, 60)).max() <= 1  # blue -> red
    around = Shift(hue_deg=180).apply(Shift(hue_deg=-180).apply(rgb, 0.1), 0.1).astype(int)
    assert np.abs(around - rgb).max() <= 1
    grey = Shift(saturation=0).apply(rgb, 0.1)
    assert (grey.max(-1) - grey.min(-1)).max() <= 1
    paler = Shift(saturation=0.5).apply(rgb, 0.1).astype(int)
    assert (paler.max(-1) - paler.min(-1))[0, 0] == pytest.approx(80, abs=1)  # 160 halved
    # a blur is a Gaussian of sigma_um at the source's pixels, before the resampling
    blurred = Shift(blur_um=0.2).apply(rgb, 0.1)
    assert np.array_equal(blurred, cv2.GaussianBlur(rgb, (0, 0), 2.0))
    assert np.array_equal(cell_crop(rgb, 0.1, 0.1, 40, Shift(blur_um=0.2)), blurred)


def _prepare(tmp_path, per_class=12):
    from jobs.train_cell_classifier import parse_args, prepare

    args = parse_args(["--data", str(PBC), "--output", str(tmp_path), "--arch", "deepheme-tiny",
                       "--limit-per-class", str(per_class), "--test-fraction", "0.2"])
    codes, prepared, _, _ = prepare(args, str(tmp_path))
    return codes, prepared


def _random_checkpoint(path, codes, seed: int):
    """An untrained deepheme-tiny scoring ``codes``, written to ``path``; returns it and its card."""
    from engine.models import create_model, write_checkpoint

    torch.manual_seed(seed)
    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=tuple(codes))
    card = {"name": "deepheme-tiny", "architecture": model.spec.architecture,
            "class_codes": list(codes)}
    write_checkpoint(model.module.state_dict(), card, str(path))
    return model, card


@needs_pbc
@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_a_fold_without_a_full_batch_is_refused_not_left_untrained(tmp_path, augment):
    """Full batches only: an epoch smaller than a batch would train nothing, and the fold's
    checkpoint would hold its random weights."""
    from engine.train.cell_classifier import train_fold

    codes, prepared = _prepare(tmp_path)
    settings = TrainSettings(epochs=1, batch_size=512, num_workers=0, augment=augment)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__}
    session = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    with pytest.raises(ValueError, match="holds no full batch of 512"):
        train_fold(config, session)
    assert session.restore_dir() is None  # no checkpoint


def test_loader_processes_follow_the_cpus_unless_asked(monkeypatch):
    from engine.train.loop import loader_processes

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert loader_processes(None) == 2 and loader_processes(0) == 0 and loader_processes(6) == 6
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert loader_processes(None) == 4


@needs_pbc
def test_default_loader_processes_draw_no_warning(tmp_path):
    """The job's default: as many loader processes as the CPUs allow (at most 4), where a fixed
    4 drew torch's warning of more workers than the machine suggests on 2 cores."""
    import warnings

    from engine.train.cell_classifier import train_fold

    codes, prepared = _prepare(tmp_path, per_class=8)
    settings = TrainSettings(epochs=1, batch_size=16, max_steps_per_epoch=1)
    assert settings.num_workers is None
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__}
    session = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        train_fold(config, session)
    assert len(session.history) == 1
    assert not [w for w in said if "worker processes in total" in str(w.message)]


@needs_pbc
@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_loss_falls_and_training_resumes(tmp_path, augment):
    """Both augmentation paths: albumentations in the DataLoader, and `BatchAugment` on the
    training device (here the CPU)."""
    from engine.train.cell_classifier import train_fold

    codes, prepared = _prepare(tmp_path)
    settings = TrainSettings(epochs=4, batch_size=16, num_workers=0, lr=3e-3, lr_step_epochs=100,
                             patience=100, label_smoothing=0.0, augment=augment)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__}
    torch.manual_seed(0)
    session = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    train_fold(config, session)
    losses = [h["train_loss"] for h in session.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # a rerun with more epochs resumes after the last finished one
    resumed = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    train_fold({**config, "settings": {**settings.__dict__, "epochs": 6}}, resumed)
    assert [h["epoch"] for h in resumed.history] == [4, 5]


@needs_pbc
def test_a_compiled_run_resumes_a_plain_one_and_keeps_plain_checkpoints(tmp_path):
    """``--compile`` is not part of the recipe: a run compiled in place resumes a plain one,
    and what it saves loads into a plain module with the compiled model's outputs."""
    from safetensors.torch import load_file

    from engine.models.factory import build_module
    from engine.models.registry import get_spec
    from engine.train.cell_classifier import train_fold
    from jobs.train_cell_classifier import parse_args

    assert parse_args(["--data", "d", "--output", "o", "--compile"]).compile == "default"
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_in_place(torch.nn.Linear(1, 1), "fastest")
    codes, prepared = _prepare(tmp_path, per_class=8)
    settings = TrainSettings(epochs=1, batch_size=16, num_workers=0, lr=3e-3, patience=100,
                             label_smoothing=0.0, augment="device", max_steps_per_epoch=3)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__}
    torch.manual_seed(0)
    train_fold(config, LocalSession(str(tmp_path / "run"), torch.device("cpu"),
                                    log=lambda s: None))
    resumed = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    with compiled_without_codegen():  # the training graphs captured; Inductor's below
        train_fold({**config, "settings": {**settings.__dict__, "epochs": 2,
                                           "compile": "default"}}, resumed)
    assert [h["epoch"] for h in resumed.history] == [1]
    assert np.isfinite(resumed.history[0]["train_loss"])
    plain = build_module(get_spec("deepheme-tiny"), len(codes)).eval()
    state = load_file(str(tmp_path / "run" / "checkpoint" / "state.safetensors"))
    saved = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    assert set(saved) == set(plain.state_dict())  # no torch.compile prefix
    plain.load_state_dict(saved)
    compiled = compile_in_place(build_module(get_spec("deepheme-tiny"), len(codes)),
                                "default").eval()
    compiled.load_state_dict(saved)
    x = torch.rand(4, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), plain(x), rtol=1e-4, atol=1e-4)


def test_adamw_with_mixup_trains(tmp_path):
    from engine.train.cell_classifier import train_fold

    codes, prepared = _prepare(tmp_path)
    settings = TrainSettings(epochs=4, batch_size=16, num_workers=0, lr=3e-3, lr_step_epochs=100,
                             patience=100, label_smoothing=0.0, optimizer="adamw",
                             weight_decay=0.05, mixup_alpha=0.4)
    torch.manual_seed(0)
    session = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    train_fold({"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
                "settings": settings.__dict__}, session)
    losses = [h["train_loss"] for h in session.history]
    assert len(losses) == 4 and losses[-1] < losses[0]


# The jobs run in this process (their ``main``), as `python -m` would run them: a fresh
# interpreter per job would import torch and timm again, seconds each on this machine.


@needs_pbc
def test_train_and_evaluate_jobs_end_to_end(tmp_path, capsys, monkeypatch):
    from engine.train import calibration
    from jobs import evaluate_cell_classifier, train_cell_classifier

    # a temperature is fitted on this fold's few validation images (too few for a real one:
    # `test_train_job_refuses_labels_it_cannot_split_with_what_to_do`)
    monkeypatch.setattr(calibration, "MIN_TEMPERATURE_IMAGES", 1)

    out = tmp_path / "out"
    assert train_cell_classifier.main(
        ["--data", str(PBC), "--output", str(out), "--arch", "deepheme-tiny", "--epochs", "1",
         "--limit-per-class", "8", "--local", "--loader-workers", "0", "--batch-size", "16"]) == 0
    capsys.readouterr()
    card = json.loads((out / "model.json").read_text())
    assert card["architecture"] == "test_resnet" and card["metrics"]["test"]["n"] > 0
    lo, hi = card["metrics"]["test"]["ci95"]["macro_f1"]  # the card's figures with intervals
    assert lo <= card["metrics"]["test"]["macro_f1"] <= hi
    # the same command again (a rerun after a crash): a complete fold is not trained again,
    # nor one whose card predates a setting added since (--colour), at that setting's default
    weights = (out / "fold-0" / "model.safetensors").read_bytes()
    assert card["training"]["settings"]["colour"] == "standard"
    fold_card = json.loads((out / "fold-0" / "model.json").read_text())
    del fold_card["training"]["settings"]["colour"]
    (out / "fold-0" / "model.json").write_text(json.dumps(fold_card))
    assert train_cell_classifier.main(
        ["--data", str(PBC), "--output", str(out), "--arch", "deepheme-tiny", "--epochs", "1",
         "--limit-per-class", "8", "--local", "--loader-workers", "0", "--batch-size", "16"]) == 0
    assert "fold 0: complete in an earlier run" in capsys.readouterr().out
    assert (out / "fold-0" / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "model.json").read_text())["training"] == fold_card["training"]
    # with other settings (a second epoch, the strong colour recipe), the fold is trained
    # again, and says why
    assert train_cell_classifier.main(
        ["--data", str(PBC), "--output", str(out), "--arch", "deepheme-tiny", "--epochs", "2",
         "--limit-per-class", "8", "--local", "--loader-workers", "0", "--batch-size", "16",
         "--colour", "strong"]) == 0
    assert "fold 0: written under other settings (epochs 1 -> 2, colour standard -> strong): " \
        "trained again" in capsys.readouterr().out
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["settings"]["epochs"] == 2
    assert card["training"]["settings"]["colour"] == "strong"
    # every checkpoint the job writes carries its feature density (engine.models.ood)
    # fitted on every training image, each image's cross-fitted distance setting its threshold
    assert card["ood"]["fit_images"] == card["training"]["n_dev_images"] >= 50
    assert card["ood"]["held_out_images"] == 0 and "cross-fitting" in card["ood"][
        "threshold_from"]
    from engine.models import create_model

    loaded = create_model("deepheme-tiny", str(out / "model.safetensors"))
    density = loaded.ood
    assert density is not None and density.threshold == pytest.approx(card["ood"]["threshold"],
                                                                      rel=1e-2)
    # and its training split's nuclear stain, which runs hold each slide's against
    from engine.stain import StainCheck

    assert card["stain"]["n"] > 50 and 240 < card["stain"]["nuclear_hue_deg"] < 300
    assert StainCheck.of(loaded.card, 10.0, 0.75).hue_deg == card["stain"]["nuclear_hue_deg"]
    # and a softmax temperature fitted on the fold's validation rows, which loading applies
    fitted = card["temperature"]
    assert fitted["n_val"] == fitted["val_before"]["n"] > 0 and loaded.temperature == \
        fitted["value"] > 0
    assert fitted["val_after"]["nll"] <= fitted["val_before"]["nll"] + 1e-6
    assert evaluate_cell_classifier.main(
        ["--checkpoint", str(out / "model.safetensors"), "--data", str(out / "test"), "--plots",
         str(tmp_path / "plots"), "--saliency", "2"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the report and nothing else
    assert 0 <= report["macro_f1"] <= 1 and 0 <= report["accuracy"] <= 1
    assert report["precision"] in ("bf16", "fp32") and report["tta"] is True
    assert set(report["per_class"]) == set(card["class_codes"])
    assert set(report["per_class"]["L2"]) == {"precision", "recall", "f1", "auc", "support"}
    # the checkpoint's density says how much of the evaluated data lies outside its training data
    assert 0 <= report["ood"]["flagged_fraction"] <= 1 and {"IG", "NEU", "L2"} <= set(
        report["ood"]["per_code"])
    # IG and NEU rows were not trained on: scored at group level, not dropped
    assert report["group_level"]["IG"]["n"] == 120 and report["group_level"]["NEU"]["n"] == 14
    assert (tmp_path / "plots" / "confusion.png").stat().st_size > 1000
    assert report["reliability_png"] == str(tmp_path / "plots" / "reliability.png")
    assert (tmp_path / "plots" / "reliability.png").stat().st_size > 1000
    cal = report["calibration"]  # every scored image falls in one bin of top probability
    assert sum(b["n"] for b in cal["reliability"]) == report["n"] and 0 <= cal["ece"] <= 1
    assert (tmp_path / "plots" / "umap.png").stat().st_size > 1000
    # a one-epoch model errs: its most confident wrong calls, with where it looked
    assert report["errors_png"] == str(tmp_path / "plots" / "errors.png")
    assert (tmp_path / "plots" / "errors.png").stat().st_size > 10_000
    # each figure with its 95 % interval over bootstrap resamples of the test images
    lo, hi = report["ci95"]["macro_f1"]
    assert lo <= report["macro_f1"] <= hi and report["ci95"]["resamples"] == 2000

    # against the reference checkpoint on the same images: the one-epoch model is worse, and
    # the paired interval of the difference says so
    from engine.models.registry import get_spec

    reference = get_spec("deepheme-resnext50").checkpoint_uri()
    assert evaluate_cell_classifier.main(
        ["--checkpoint", str(out / "model.safetensors"), "--data", str(out / "test"), "--plots",
         str(tmp_path / "plots"), "--no-umap", "--no-tta", "--compare-to", reference,
         "--bootstrap", "500"]) == 0
    compared = json.loads(capsys.readouterr().out)["comparison"]
    assert compared["baseline"]["weights"] == [reference] and compared["n"] == report["n"]
    assert compared["baseline"]["macro_f1"] > 0.6 and compared["resamples"] == 500
    d = compared["macro_f1"]
    assert d["difference"] < 0 and d["difference_ci"][1] < 0 and d["share_higher"] < 0.05
    # 14 images of 11 classes: a resample's macro F1 is over the classes it drew, so the
    # interval still holds the measured difference
    assert d["difference_ci"][0] <= d["difference"] <= d["difference_ci"][1]
    assert set(compared["per_class_f1"]) == set(card["class_codes"])
    assert compared["baseline"]["source_mpp"] == 0.1
    # the baseline given the images at another pixel size: its own figures change, the
    # model's and the rows scored do not
    assert evaluate_cell_classifier.main(
        ["--checkpoint", str(out / "model.safetensors"), "--data", str(out / "test"), "--plots",
         str(tmp_path / "plots"), "--no-umap", "--no-tta", "--compare-to", reference,
         "--compare-source-mpp", "0.2", "--bootstrap", "200"]) == 0
    rescaled = json.loads(capsys.readouterr().out)["comparison"]
    assert rescaled["baseline"]["source_mpp"] == 0.2 and rescaled["n"] == compared["n"]
    assert rescaled["baseline"]["macro_f1"] < compared["baseline"]["macro_f1"]
    # another lab's stain: both models get the images with their colours turned, and the
    # reference, trained on one lab's stain, loses calls
    assert evaluate_cell_classifier.main(
        ["--checkpoint", str(out / "model.safetensors"), "--data", str(out / "test"), "--plots",
         str(tmp_path / "plots"), "--no-umap", "--no-tta", "--compare-to", reference,
         "--hue-shift", "120", "--saturation", "0.5", "--bootstrap", "200"]) == 0
    shifted = json.loads(capsys.readouterr().out)
    assert shifted["shift"] == {"blur_um": 0.0, "hue_deg": 120.0, "saturation": 0.5}
    # and the nuclei's colour, as the models got them, says so (platelets left out)
    from engine.train.data import read_labels

    stain, moved = report["stain"], shifted["stain"]
    assert stain["n"] == moved["n"] == sum(c != "PLT" for c in read_labels(
        str(out / "test")).codes)
    assert 255 < stain["nuclear_hue_deg"] < 280 and stain["nuclear_saturation"] > 0.6
    assert (moved["nuclear_hue_deg"] - stain["nuclear_hue_deg"]) % 360 == pytest.approx(120,
                                                                                     abs=5)
    assert moved["nuclear_saturation"] < 0.7 * stain["nuclear_saturation"]
    assert shifted["comparison"]["n"] == compared["n"]
    assert shifted["comparison"]["baseline"]["macro_f1"] < compared["baseline"]["macro_f1"]
    with pytest.raises(SystemExit):  # a hue is turned by at most half a turn
        evaluate_cell_classifier.main(["--checkpoint", reference, "--data", str(out / "test"),
                                       "--hue-shift", "200"])
    assert "expected degrees from -180 to 180, got '200'" in capsys.readouterr().err
    # a baseline of other classes (a fine-tune on a lab's first few codes against the
    # reference, or the other way round) is scored on the model's codes: its calls of codes
    # the model lacks are wrong calls, and the codes it lacks it never calls
    from engine.models import write_checkpoint

    def baseline_of(codes: list[str]) -> str:
        other = create_model("deepheme-tiny", allow_untrained=True, class_codes=codes)
        path = str(tmp_path / f"{'-'.join(codes)}.safetensors")
        write_checkpoint(other.module.state_dict(), {"name": "deepheme-tiny", "architecture":
                         other.spec.architecture, "class_codes": codes}, path)
        return path

    assert evaluate_cell_classifier.main(
        ["--checkpoint", str(out / "model.safetensors"), "--data", str(out / "test"),
         "--compare-to", baseline_of(["L2", "MO2", "M1"]), "--no-umap", "--bootstrap",
         "200"]) == 0  # with TTA, as the report above
    few = json.loads(capsys.readouterr().out)["comparison"]
    assert few["codes"]["baseline_only"] == ["M1"]
    assert few["codes"]["model_only"] == [c for c in card["class_codes"] if c not in ("L2", "MO2")]
    assert few["n"] == compared["n"] and set(few["per_class_f1"]) == set(card["class_codes"])
    for code in few["codes"]["model_only"]:  # never called by the baseline: the model's F1 less 0
        assert few["per_class_f1"][code]["difference"] == pytest.approx(
            report["per_class"][code]["f1"], abs=1e-4)
    # a baseline that shares no code with the model is refused, naming both
    assert evaluate_cell_classifier.main(
        ["--checkpoint", str(out / "model.safetensors"), "--data", str(out / "test"),
         "--compare-to", baseline_of(["M1", "B1"]), "--no-umap"]) == 2
    assert "deepheme-tiny: 2 classes" in capsys.readouterr().err


@needs_pbc
def test_fold_ensemble_is_scored_against_each_fold_paired(tmp_path, capsys):
    """With k folds the job scores their average and says, paired on the same test rows, what
    averaging gained over each fold model alone."""
    from jobs import train_cell_classifier

    out = tmp_path / "out"
    assert train_cell_classifier.main(
        ["--data", str(PBC), "--output", str(out), "--arch", "deepheme-tiny", "--epochs", "1",
         "--folds", "2", "--limit-per-class", "8", "--local", "--loader-workers", "0",
         "--batch-size", "16", "--no-ood"]) == 0
    capsys.readouterr()
    reports = json.loads((out / "evaluation.json").read_text())
    ensemble = reports["ensemble"]
    assert set(ensemble["against_folds"]) == {"fold-0", "fold-1"}
    for fold, d in ensemble["against_folds"].items():
        gain = d["macro_f1"]
        assert gain["difference"] == pytest.approx(
            ensemble["macro_f1"] - reports[fold]["macro_f1"], abs=2e-4)
        lo, hi = gain["difference_ci"]
        assert lo <= gain["difference"] <= hi and 0 <= gain["share_higher"] <= 1
    card = json.loads((out / "fold-1" / "model.json").read_text())
    assert card["metrics"]["test_ensemble"]["against_folds"] == ensemble["against_folds"]


def test_against_folds_scores_the_average_paired_on_scored_rows():
    from jobs.train_cell_classifier import against_folds

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    y[:30] = -1  # rows labelled only with a group: not scored at class level
    fold = np.where(rng.random(400) < 0.7, y, (y + 1) % 4)  # 70 % right
    better = fold.copy()
    fixed = np.flatnonzero((fold != y) & (y >= 0))[::2]
    better[fixed] = y[fixed]  # the average puts half the fold's errors right
    probs = np.eye(4)[np.clip(better, 0, 3)]
    d = against_folds({"y": y, "probs": probs}, {"fold-0": fold}, list("ABCD"))["fold-0"]
    assert d["accuracy"]["difference"] == pytest.approx(len(fixed) / 370, abs=1e-4)
    assert d["macro_f1"]["difference_ci"][0] > 0 and d["macro_f1"]["share_higher"] > 0.99
    assert against_folds({"y": np.full(5, -1), "probs": np.eye(4)[[0] * 5]}, {"fold-0": fold[:5]},
                         list("ABCD")) == {}


def _pbc_subset(folder, per_code: int, drop: int = 0):
    """A labels.csv in ``folder`` naming the first ``per_code`` PBC images of each code (by
    absolute path), less the first ``drop`` rows."""
    import csv

    with open(PBC / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen, kept = {}, []
    for r in rows:
        if seen.get(r["code"], 0) < per_code:
            seen[r["code"]] = seen.get(r["code"], 0) + 1
            kept.append({"path": str(PBC / r["path"]), "code": r["code"]})
    folder.mkdir(exist_ok=True)
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "code"])
        w.writeheader()
        w.writerows(kept[drop:])
    return folder


def test_the_data_digest_follows_rows_codes_and_files(tmp_path):
    import os
    import shutil

    from engine.train.data import read_labels

    data = _pbc_subset(tmp_path / "d", 2)
    first = read_labels(str(data)).digest()
    assert read_labels(str(data)).digest() == first  # read again: the same
    rows = (data / "labels.csv").read_text().splitlines()
    path, code = rows[1].rsplit(",", 1)
    (data / "labels.csv").write_text("\n".join([rows[0], f"{path},L4", *rows[2:]]) + "\n")
    assert read_labels(str(data)).digest() != first  # one row relabelled
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    assert read_labels(str(data)).digest() == first
    copy = tmp_path / "img.jpg"  # the same row's image replaced by a file of other contents
    shutil.copy(rows[2].rsplit(",", 1)[0], copy)
    (data / "labels.csv").write_text("\n".join([rows[0], f"{copy},{code}", *rows[2:]]) + "\n")
    replaced = read_labels(str(data)).digest()
    assert replaced != first
    os.utime(copy, (1e9, 1e9))  # the same path, modified at another time
    assert read_labels(str(data)).digest() != replaced


def test_an_image_labelled_twice_is_taken_once_or_refused_when_the_codes_differ(tmp_path,
                                                                                capsys):
    """Two sheets merged list some images twice: a repeat with the same code is taken once
    (it could fall on both sides of a train/test split), two codes for one image are
    refused with both lines, for the lab to settle. Paths are compared as written out
    (``images/a.jpg`` and ``./images/a.jpg`` are one image)."""
    from engine.train.data import read_labels

    (tmp_path / "labels.csv").write_text(
        "path,code\nimages/a.jpg,M6\nimages/b.jpg,L2\n./images/a.jpg,M6\nimages/c.jpg,\n")
    got = read_labels(str(tmp_path))
    assert got.codes == ("M6", "L2") and got.paths == (str(tmp_path / "images/a.jpg"),
                                                       str(tmp_path / "images/b.jpg"))
    assert "1 row(s) repeat an earlier row's image and code; each image taken once" \
        in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text(
        "path,code\nimages/a.jpg,M6\nimages/c.jpg,\nimages/b.jpg,L2\nimages/a.jpg,M5\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) labelled with two codes; settle each on "
                                         r"one: images/a.jpg is M6 on line 2 and M5 on line 5"):
        read_labels(str(tmp_path))


def test_labels_as_a_lab_writes_them(tmp_path):
    """A sheet saved by Excel as 'CSV UTF-8' (a byte-order mark before ``path``) and codes in
    lower case read as the scheme spells them."""
    from engine.train.data import read_labels

    (tmp_path / "labels.csv").write_bytes("\ufeffpath,code\na.jpg,mo2\nb.jpg, L2 \n".encode())
    assert read_labels(str(tmp_path)).codes == ("MO2", "L2")


@needs_pbc
def test_a_rerun_on_other_data_prepares_and_trains_again(tmp_path, capsys):
    from jobs import train_cell_classifier

    out = tmp_path / "out"
    flags = ["--output", str(out), "--arch", "deepheme-tiny", "--epochs", "1", "--local",
             "--loader-workers", "0", "--batch-size", "16", "--no-ood"]
    data = _pbc_subset(tmp_path / "round1", 8)
    assert train_cell_classifier.main(["--data", str(data), *flags]) == 0
    digest = json.loads((out / "model.json").read_text())["training"]["settings"]["data_digest"]
    runs = {p.name for p in (out / "runs").iterdir()}
    assert len(runs) == 1 and runs.pop().startswith("fold-0-")
    capsys.readouterr()
    # the labels changed where they are (a row removed): a new split and a new fold
    _pbc_subset(data, 8, drop=1)
    assert train_cell_classifier.main(["--data", str(data), *flags]) == 0
    said = capsys.readouterr().out
    assert "the prepared split was made from other data or settings (data_digest " \
        f"{digest} -> " in said
    assert f"fold 0: written under other settings (data_digest {digest} -> " in said
    card = json.loads((out / "model.json").read_text())
    assert card["training"]["settings"]["data_digest"] != digest
    # the 11 trained codes' rows, less the removed one (IG and NEU are scored apart)
    assert card["training"]["n_dev_images"] + card["metrics"]["test"]["n"] == 8 * 11 - 1
    # each run trained in a folder of its own: an interrupted run of the first data is never
    # resumed with the second
    assert len(list((out / "runs").iterdir())) == 2


def test_umap_neighbours_are_the_exact_ones():
    from engine.report.plots import exact_knn

    x = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)
    idx, dist = exact_knn(x, 15)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    assert (idx[:, 0] == np.arange(300)).all() and np.allclose(dist[:, 0], 0, atol=1e-3)
    assert np.array_equal(idx, np.argsort(d, axis=1, kind="stable")[:, :15])
    assert np.allclose(dist, np.sort(d, axis=1)[:, :15], atol=1e-4)


@needs_pbc
@pytest.mark.s3
def test_train_job_writes_to_s3_and_distils_from_an_s3_teacher(tmp_path, s3_server, s3_client,
                                                                capsys):
    from engine.config import StorageConfig
    from engine.models import create_model
    from jobs import train_cell_classifier

    s3_client.create_bucket(Bucket="models")
    common = ["--data", str(PBC), "--arch", "deepheme-tiny", "--epochs", "1",
              "--limit-per-class", "8", "--local", "--loader-workers", "0", "--batch-size", "16",
              "--s3-endpoint", s3_server]
    for run, extra in (("run1", []), ("run2", ["--teacher", "s3://models/run1/model.safetensors",
                                               "--distill-alpha", "0.5"])):
        assert train_cell_classifier.main(["--output", f"s3://models/{run}", "--work",
                                           str(tmp_path / run), *common, *extra]) == 0
        printed = capsys.readouterr()
        assert "testing-secret-value" not in printed.out + printed.err
    # run1 again from a machine without its work folder (a new cluster's head): the fold
    # published when it was complete is taken from S3, not trained again
    before = s3_client.get_object(Bucket="models", Key="run1/fold-0/model.safetensors")
    assert train_cell_classifier.main(["--output", "s3://models/run1", "--work",
                                       str(tmp_path / "new-head"), *common]) == 0
    assert "fold 0: complete in an earlier run" in capsys.readouterr().out
    assert (tmp_path / "new-head" / "fold-0" / "model.safetensors").read_bytes() == before[
        "Body"].read()
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="models")["Contents"]}
    for run in ("run1", "run2"):
        assert {f"{run}/{n}" for n in ("model.safetensors", "model.json", "evaluation.json",
                                       "fold-0/model.safetensors", "fold-0/model.json",
                                       "test/labels.csv", "test/pack.json")} <= keys
    # moto keeps its buckets for the whole test process: other modules' objects may be here
    ours = [k for k in keys if k.startswith(("run1/", "run2/"))]
    assert not any("/runs/" in k or "/prepared/" in k for k in ours)  # work files stay local
    model = create_model("deepheme-tiny", "s3://models/run2/model.safetensors",
                         storage=StorageConfig(endpoint_url=s3_server))
    card = s3_client.get_object(Bucket="models", Key="run2/model.json")["Body"].read().decode()
    assert json.loads(card)["training"]["settings"]["teacher"] == [
        "s3://models/run1/model.safetensors"]
    assert "testing-secret-value" not in card and len(model.class_codes) == 11


@needs_pbc
def test_evaluate_reports_uncovered_codes(tmp_path):
    from engine.models import create_model
    from engine.train.data import LabelledImages
    from engine.train.evaluation import evaluate_classifier

    model = create_model("deepheme-tiny", allow_untrained=True, class_codes=("L2", "MO2"))
    rows = [("images/lymphocyte", "L2"), ("images/basophil", "B2")]
    paths, codes = [], []
    for folder, code in rows:
        for p in sorted((PBC / folder).iterdir())[:3]:
            paths.append(str(p))
            codes.append(code)
    report, _ = evaluate_classifier([model], LabelledImages(tuple(paths), tuple(codes)), 0.1,
                                    tta=False)
    assert report["not_covered"] == {"B2": 3} and report["n"] == 3


@needs_pbc
def test_evaluate_embeddings_prints_probe_scores(capsys):
    from jobs import evaluate_embeddings

    assert evaluate_embeddings.main(
        ["--model", "deepheme-resnext50", "--data", str(PBC), "--source-mpp", "0.1",
         "--target-mpp", "0.25", "--limit-per-class", "12"]) == 0
    report = json.loads(capsys.readouterr().out)
    for probe in ("linear_probe", "knn_1", "knn_20"):
        assert set(report[probe]) == {"weighted_f1", "balanced_accuracy"}
    # the trained reference separates the easy classes even on 12 images per class
    assert report["linear_probe"]["balanced_accuracy"] > 0.5
    assert evaluate_embeddings.main(["--model", "dinov2-vits14", "--data", str(PBC)]) == 2
    assert "no trained weights" in capsys.readouterr().err


def test_distill_loss_is_zero_only_when_the_student_matches_the_teacher():
    from engine.train.loop import distill_loss

    logits = torch.randn(8, 5)
    soft = torch.softmax(logits / 4, dim=1)
    assert distill_loss(logits, soft, 4.0).abs() < 1e-5
    assert distill_loss(torch.randn(8, 5), soft, 4.0) > 0.01


@needs_pbc
def test_student_distils_from_a_teacher_checkpoint(tmp_path):
    from engine.models import write_checkpoint
    from engine.train.cell_classifier import train_fold

    codes, prepared = _prepare(tmp_path)
    teacher, card = _random_checkpoint(tmp_path / "teacher.safetensors", codes, seed=1)
    # distillation alone (alpha 1): the student learns the teacher's soft outputs
    settings = TrainSettings(epochs=4, batch_size=16, num_workers=0, lr=3e-3, lr_step_epochs=100,
                             patience=100, label_smoothing=0.0, distill_alpha=1.0,
                             distill_temperature=2.0)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": settings.__dict__, "teachers": [str(tmp_path / "teacher.safetensors")]}
    session = LocalSession(str(tmp_path / "run"), torch.device("cpu"), log=lambda s: None)
    train_fold(config, session)
    losses = [h["train_loss"] for h in session.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # a teacher that scores other codes is refused before training
    write_checkpoint(teacher.module.state_dict(), {**card, "class_codes": list(reversed(codes))},
                     str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="same codes"):
        train_fold({**config, "teachers": [str(tmp_path / "other.safetensors")]},
                   LocalSession(str(tmp_path / "run2"), torch.device("cpu"), log=lambda s: None))


def test_epoch_average_is_the_equal_weight_mean_from_its_start_epoch():
    from engine.train.loop import EpochAverage, use_bf16

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = EpochAverage(model, start=1)
    seen = []
    for epoch in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))  # moves the BatchNorm running stats
        avg.update(model, epoch)
        if epoch >= 1:
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
    assert avg.n == 3
    for name, value in avg.module.state_dict().items():
        if value.is_floating_point():
            expect = torch.stack([s[name] for s in seen]).mean(0)
            assert torch.allclose(value, expect, atol=1e-6), name
    assert avg.module.state_dict()["1.num_batches_tracked"] == 4
    assert use_bf16(torch.device("cpu"), "fp32") is False
    assert use_bf16(torch.device("cpu"), "bf16") is True
    with pytest.raises(ValueError, match="precision"):
        use_bf16(torch.device("cpu"), "fp8")


@needs_pbc
def test_fine_tunes_from_an_init_checkpoint_remaps_its_codes_and_resumes_swa(tmp_path):
    from safetensors.torch import load_file

    from engine.models import create_model, write_checkpoint
    from engine.train.cell_classifier import train_fold

    codes, prepared = _prepare(tmp_path)
    init = str(tmp_path / "init.safetensors")
    start, card = _random_checkpoint(init, codes, seed=2)
    quiet = lambda s: None  # noqa: E731
    # at lr 0 the parameters stay the init checkpoint's, so the run must have started from it
    frozen = TrainSettings(epochs=1, batch_size=16, num_workers=0, lr=0.0, patience=100,
                           weight_decay=0.0)
    config = {"arch": "deepheme-tiny", "class_codes": codes, "data": prepared, "fold": 0,
              "settings": frozen.__dict__, "init": init}
    session = LocalSession(str(tmp_path / "frozen"), torch.device("cpu"), log=quiet)
    train_fold(config, session)
    best = load_file(str(tmp_path / "frozen" / "checkpoint" / "best.safetensors"))
    reference = create_model("deepheme-tiny", init).module.state_dict()
    for name, _ in start.module.named_parameters():
        assert torch.equal(best[name], reference[name].float()), name
    # SWA from epoch 1: the average holds one more epoch each epoch, across a resume
    swa = TrainSettings(epochs=3, batch_size=16, num_workers=0, lr=1e-3, patience=100,
                        swa_start=1, lr_step_epochs=1)
    config = {**config, "settings": swa.__dict__}
    session = LocalSession(str(tmp_path / "swa"), torch.device("cpu"), log=quiet)
    train_fold(config, session)
    assert [h["swa_epochs"] for h in session.history] == [0, 1, 2]
    # the step decay runs until swa_start, then the rate stays put
    assert [round(h["lr"], 6) for h in session.history] == [3e-4, 3e-4, 3e-4]
    resumed = LocalSession(str(tmp_path / "swa"), torch.device("cpu"), log=quiet)
    train_fold({**config, "settings": {**swa.__dict__, "epochs": 5}}, resumed)
    assert [h["swa_epochs"] for h in resumed.history] == [3, 4]
    # an init checkpoint scoring other codes: the backbone is kept, the classifier rows of the
    # shared codes move to their new places, a code it lacks starts fresh
    from engine.train.cell_classifier import load_init

    other = list(reversed(codes[1:])) + ["M1"]
    write_checkpoint(start.module.state_dict(), {**card, "class_codes": other},
                     str(tmp_path / "other.safetensors"))
    module = create_model("deepheme-tiny", allow_untrained=True,
                          class_codes=tuple(codes)).module
    fresh_row = module.fc.weight[0].detach().clone()
    said = []
    load_init(module, str(tmp_path / "other.safetensors"), "deepheme-tiny", codes,
              log=said.append)
    src = create_model("deepheme-tiny", str(tmp_path / "other.safetensors")).module
    for i, code in enumerate(codes[1:], start=1):
        assert torch.equal(module.fc.weight[i], src.fc.weight[other.index(code)].float())
    assert torch.equal(module.fc.weight[0], fresh_row)  # codes[0] is new to the checkpoint
    name = next(n for n, _ in module.named_parameters() if not n.startswith("fc."))
    assert torch.equal(module.state_dict()[name], src.state_dict()[name].float())
    assert f"new codes ['{codes[0]}']" in said[0] and "dropped ['M1']" in said[0]


@needs_pbc
def test_the_labelled_image_cache_evicts_the_lists_fetched_longest_ago(tmp_path, monkeypatch):
    """Over its budget, the cache drops the copies of the lists fetched longest ago (and copies
    no list names), but keeps the list just fetched, lists fetched within the grace period,
    and copies a kept list shares with an evicted one."""
    import os
    import time

    from engine.train.data import cache_budget, evict_cache, mirror_path

    cache = tmp_path / "cache"

    def put_list(folder, uris, age_s, size=1000):
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["path,code"]
        for uri in uris:
            copy = mirror_path(uri, str(cache))
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            with open(copy, "wb") as fh:
                fh.write(b"x" * size)
            rows.append(f"{copy},L2")
        rows.append("s3://cells/lab/not-labelled.png,")  # a row without a copy
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        (folder / "pack.json").write_text("{}")
        when = time.time() - age_s
        os.utime(folder / "labels.csv", (when, when))
        return folder

    old = put_list(cache / "s3" / "cells" / "old", ["s3://cells/old/a.png",
                                                    "s3://cells/shared/s.png"], 3 * 86400)
    mid = put_list(cache / "lists" / "0123", ["s3://cells/mid/b.png"], 2 * 86400)
    recent = put_list(cache / "lists" / "4567", ["s3://cells/recent/c.png"], 60)
    new = put_list(cache / "s3" / "cells" / "new", ["s3://cells/new/d.png",
                                                    "s3://cells/shared/s.png"], 0)
    orphan = mirror_path("s3://cells/gone/e.png", str(cache))
    os.makedirs(os.path.dirname(orphan))
    open(orphan, "wb").write(b"x" * 1000)
    (cache / ".lock").write_text("")

    assert evict_cache(str(cache), str(new), budget=10**6) == (0, 0)  # under budget: nothing
    sizes = {str(p.relative_to(cache)): p.stat().st_size for p in cache.rglob("*")
             if p.is_file()}
    # room for the new list, the recent one (in its grace period) and the middle one
    budget = sum(v for k, v in sizes.items() if "old" not in k and "gone" not in k)
    n, size = evict_cache(str(cache), str(new), budget=budget)
    left = {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}
    assert left == {".lock", "s3/cells/new/labels.csv", "s3/cells/new/pack.json",
                    "s3/cells/new/d.png", "s3/cells/shared/s.png",
                    "lists/4567/labels.csv", "lists/4567/pack.json", "s3/cells/recent/c.png",
                    "lists/0123/labels.csv", "lists/0123/pack.json", "s3/cells/mid/b.png"}
    # the old list and its own copy, and the copy no list names
    assert (n, size) == (4, sum(v for k, v in sizes.items() if "old" in k or "gone" in k))
    evict_cache(str(cache), str(new), budget=budget - 1)  # the middle list no longer fits
    assert not mid.exists() and not (cache / "s3" / "cells" / "mid").exists()
    assert not (cache / "s3" / "cells" / "gone").exists() and not old.exists()
    # with no budget, only the list just fetched and the one in its grace period stay
    evict_cache(str(cache), str(new), budget=0)
    assert (recent / "labels.csv").exists() and (cache / "s3" / "cells" / "recent").exists()
    assert (new / "d.png").exists() and (cache / "s3" / "cells" / "shared" / "s.png").exists()

    monkeypatch.setenv("HEMEFLOW_DATA_CACHE_GB", "0.5")
    assert cache_budget() == 500_000_000
    monkeypatch.setenv("HEMEFLOW_DATA_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="HEMEFLOW_DATA_CACHE_GB must be a number"):
        cache_budget()
    monkeypatch.delenv("HEMEFLOW_DATA_CACHE_GB")
    assert cache_budget() == 50 * 10**9


@pytest.mark.s3
def test_labelled_images_on_s3_train_evaluate_and_fetch_only_what_changed(
        tmp_path, s3_server, s3_client, monkeypatch, capsys):
    """A lab's labelled cells kept in S3 (export_cells' folder, uploaded): the jobs mirror the
    images a list names into a local cache, once, and name them by their URIs in what they
    write; a rerun lists, and downloads only an object that changed."""
    import csv
    import io

    from engine.train.data import fetch_labelled, source_of
    from jobs import evaluate_cell_classifier, train_cell_classifier
    from tests.conftest import s3_requests

    monkeypatch.setenv("HEMEFLOW_DATA_CACHE", str(tmp_path / "cache"))
    s3_client.create_bucket(Bucket="cells")
    s3_client.create_bucket(Bucket="models")
    rows = [["path", "code", "slide_id"]]
    for i, (folder, code) in enumerate((("lymphocyte", "L2"), ("basophil", "B2"),
                                        ("monocyte", "MO2"), ("ig", "IG"))):
        for j, p in enumerate(sorted((PBC / "images" / folder).iterdir())[:6]):
            if code == "MO2":  # kept under another prefix, named by its URI
                key, path = f"shared/{p.name}", f"s3://cells/shared/{p.name}"
            else:
                key = path = f"images/{folder}/{p.name}"
                key = f"lab1/{key}"
            s3_client.upload_file(str(p), "cells", key)
            rows.append([path, code, f"slide-{j % 3}"])
    rows.append(["images/not-uploaded.png", "", "slide-0"])  # not labelled yet: not fetched
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    s3_client.put_object(Bucket="cells", Key="lab1/labels.csv", Body=text.getvalue().encode())

    work = tmp_path / "work"
    assert train_cell_classifier.main(
        ["--data", "s3://cells/lab1", "--output", "s3://models/remote", "--work", str(work),
         "--arch", "deepheme-tiny", "--epochs", "1", "--local", "--loader-workers", "0",
         "--batch-size", "8", "--exclude-codes", "IG", "--no-ood", "--s3-endpoint",
         s3_server]) == 0
    printed = capsys.readouterr()
    assert "24 image(s) of s3://cells/lab1" in printed.err and "(24 fetched)" in printed.err
    assert "testing-secret-value" not in printed.out + printed.err
    card = json.loads((work / "model.json").read_text())
    assert card["training"]["data"] == card["training"]["settings"]["data"] == "s3://cells/lab1"
    assert card["metrics"]["test"]["n"] > 0 and "testing-secret-value" not in json.dumps(card)
    # the published test list names the images where they are, not the local copies
    test = s3_client.get_object(Bucket="models", Key="remote/test/labels.csv")["Body"].read()
    test_paths = [r["path"] for r in csv.DictReader(io.StringIO(test.decode()))]
    assert len(test_paths) > 6 and all(p.startswith("s3://cells/") for p in test_paths)
    assert any(p.startswith("s3://cells/shared/") for p in test_paths) or all(
        "MO2" != c for c in card["class_codes"])

    # evaluating the published checkpoint on the published list (both read through the
    # endpoint given): every image is in the cache already, none is read
    with s3_requests() as requests:
        assert evaluate_cell_classifier.main(
            ["--checkpoint", "s3://models/remote/model.safetensors", "--data",
             "s3://models/remote/test",
             "--plots", str(tmp_path / "plots"), "--no-umap", "--no-tta", "--s3-endpoint",
             s3_server]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == len(test_paths) - 6 and report["not_covered"] == {"IG": 6}
    assert not [r for r in requests if r.startswith("GET /cells/") and "?" not in r], requests

    # one object replaced by another image: only it is downloaded again, and the copy is it
    changed = sorted((PBC / "images" / "basophil").iterdir())[0]
    other = sorted((PBC / "images" / "eosinophil").iterdir())[0]
    assert other.stat().st_size != changed.stat().st_size
    s3_client.upload_file(str(other), "cells", f"lab1/images/basophil/{changed.name}")
    from engine.config import StorageConfig

    storage = StorageConfig(endpoint_url=s3_server)
    with s3_requests() as requests:
        folder = fetch_labelled("s3://cells/lab1", storage)
    got = [r for r in requests if r.startswith("GET /cells/") and "?" not in r]
    assert got == ["GET /cells/lab1/labels.csv",  # read each time: experts edit it
                   f"GET /cells/lab1/images/basophil/{changed.name}"], got
    local = {source_of(r["path"]): r["path"]
             for r in csv.DictReader(open(f"{folder}/labels.csv"))}
    copy = local[f"s3://cells/lab1/images/basophil/{changed.name}"]
    assert open(copy, "rb").read() == other.read_bytes()
    assert "s3://cells/lab1/images/not-uploaded.png" in local  # kept, for read_labels to skip

    # a pack made from the S3 folder records where its images came from, not the cache
    from jobs import pack_cell_images

    assert pack_cell_images.main(["--data", "s3://cells/lab1", "--output", str(tmp_path / "pack"),
                                  "--s3-endpoint", s3_server]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "s3://cells/lab1"
    packed = list(csv.DictReader(open(tmp_path / "pack" / "labels.csv")))
    assert len(packed) == 24 and {r["source_path"].rsplit("/", 2)[0] for r in packed} == {
        "s3://cells/lab1/images", "s3://cells"}

    # an image the list names that is not there is named in the error
    s3_client.delete_object(Bucket="cells", Key=f"lab1/images/basophil/{changed.name}")
    with pytest.raises(FileNotFoundError, match=f"1 image.*not there.*basophil/{changed.name}"):
        fetch_labelled("s3://cells/lab1", storage)
    with pytest.raises(FileNotFoundError, match="no labels.csv in s3://cells/nothing"):
        fetch_labelled("s3://cells/nothing", storage)


def test_publish_uploads_every_folds_files_from_any_work_folder(tmp_path):
    """The fold checkpoints are found by a glob under the work folder (``--work``): a folder
    whose name glob reads as a pattern (``run [2]``) published none of them."""
    from jobs.train_cell_classifier import publish

    work = tmp_path / "run [2]"
    for name in ("fold-0/model.safetensors", "fold-0/model.json", "fold-1/model.safetensors",
                 "model.json"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(name.encode())
    out = tmp_path / "out"
    uris = publish(str(work), str(out), None)
    assert [u[len(str(out)) + 1:] for u in uris] == [
        "fold-0/model.json", "fold-0/model.safetensors", "fold-1/model.safetensors",
        "model.json"]
    assert (out / "fold-1" / "model.safetensors").read_bytes() == b"fold-1/model.safetensors"
