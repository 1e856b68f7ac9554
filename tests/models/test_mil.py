"""ABMIL on synthetic bags whose target depends on their composition."""

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import r2_score, roc_auc_score

from engine.config import StorageConfig
from engine.models.mil import GatedABMIL, attention_scores, load_mil, predict_bags, save_mil
from engine.train.mil import train_mil

D = 16


def _bags(n, rng, frac):
    """Bags of 'cellular' (mean +1) and 'fat' (mean -1) instances in random proportions."""
    bags = []
    for f in frac:
        size = rng.integers(150, 400)
        k = int(round(f * size))
        cellular = rng.normal(1.0, 1.0, (k, D))
        fat = rng.normal(-1.0, 1.0, (size - k, D))
        bags.append(np.concatenate([cellular, fat]).astype(np.float32))
    return bags


def test_attention_is_a_distribution_and_masks_padding():
    m = GatedABMIL(D, 3, task="classification")
    x = torch.randn(2, 10, D)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    out, a = m(x, mask)
    assert out.shape == (2, 3) and torch.allclose(a.sum(1), torch.ones(2))
    assert (a[1, 7:] == 0).all()
    # every instance's score on its own: a bag of them all gets the same weights
    scores, relative = attention_scores(m, x[0].numpy(), chunk=3)  # (in eval mode: no dropout)
    assert scores.shape == relative.shape == (10,)
    with torch.no_grad():
        _, a = m(x[:1])
    np.testing.assert_allclose(relative, 10 * a[0].numpy(), rtol=1e-4)
    np.testing.assert_allclose(np.mean(relative), 1.0, rtol=1e-5)


def test_regression_reaches_r2_on_held_out_bags(tmp_path):
    rng = np.random.default_rng(0)
    frac = rng.uniform(0.1, 0.9, 80)
    bags = _bags(80, rng, frac)
    model, history = train_mil(bags[:60], frac[:60], "regression", epochs=25, lr=1e-3)
    assert history[-1] < history[0]
    preds = [predict_bags(model, b, n_bags=10, bag_size=256) for b in bags[60:]]
    r2 = r2_score(frac[60:], [p.mean[0] for p in preds])
    assert r2 >= 0.9, r2
    assert all(p.sd[0] >= 0 and p.attention.shape == (len(b),) for p, b in zip(preds, bags[60:]))
    # save -> load gives the same predictions (safetensors + card)
    save_mil(model, str(tmp_path / "abmil.safetensors"), {"name": "cellularity-test"})
    loaded, card = load_mil(str(tmp_path / "abmil.safetensors"))
    again = predict_bags(loaded, bags[60], n_bags=10, bag_size=256)
    assert card["task"] == "regression" and np.allclose(again.mean, preds[0].mean, atol=1e-6)


def test_classification_by_composition_reaches_auc():
    rng = np.random.default_rng(1)
    frac = rng.uniform(0.0, 0.4, 120)
    labels = (frac > 0.2).astype(int)  # e.g. "immature granulocytes above 20 %"
    bags = _bags(120, rng, frac)
    model, _ = train_mil(bags[:80], labels[:80], "classification", n_classes=2, epochs=25,
                         lr=1e-3)
    probs = [predict_bags(model, b, n_bags=5).mean[1] for b in bags[80:]]
    assert roc_auc_score(labels[80:], probs) >= 0.95


@pytest.mark.ray
def test_job_fits_on_ray_train_with_ddp(tmp_path, ray_local):
    """The job's Ray Train path: one fit on 2 CPU workers (DDP, gloo), bags as object refs."""
    import argparse

    from jobs.train_mil import _fitter

    rng = np.random.default_rng(3)
    frac = rng.uniform(0.1, 0.9, 40)
    bags = _bags(40, rng, frac)
    args = argparse.Namespace(local=False, workers=2, output=str(tmp_path))
    fit = _fitter(args, dict(task="regression", n_classes=1, epochs=25, lr=1e-3, bag_size=256,
                             seed=0, checkpoint_every=25), StorageConfig())
    model = fit(bags[:30], frac[:30], "fit")
    assert (tmp_path / "runs" / "fit").is_dir()
    preds = [predict_bags(model, b, n_bags=10, bag_size=256).mean[0] for b in bags[30:]]
    assert r2_score(frac[30:], preds) >= 0.9


@pytest.mark.ray
@pytest.mark.s3
def test_job_checkpoints_to_an_s3_output(ray_local, s3_server, s3_client):
    """With an s3:// output, Ray Train's checkpoints go to <output>/runs (every node reaches
    it), an earlier job's runs there are removed first, and no local copy is left behind."""
    import argparse
    import glob
    import tempfile

    from jobs.train_mil import _fitter

    s3_client.create_bucket(Bucket="mil-runs")
    s3_client.put_object(Bucket="mil-runs", Key="marrow/runs/fit/stale.txt", Body=b"old job")
    rng = np.random.default_rng(4)
    frac = rng.uniform(0.1, 0.9, 12)
    # one worker: DDP is the test above's (each worker is a process importing torch)
    args = argparse.Namespace(local=False, workers=1, output="s3://mil-runs/marrow")
    copies = f"{tempfile.gettempdir()}/hemeflow-fit-*"  # run_ray_training's local copies
    before = set(glob.glob(copies))
    fit = _fitter(args, dict(task="regression", n_classes=1, epochs=2, lr=1e-3, bag_size=256,
                             seed=0, checkpoint_every=1), StorageConfig(endpoint_url=s3_server))
    model = fit(_bags(12, rng, frac), frac, "fit")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket="mil-runs")["Contents"]]
    assert "marrow/runs/fit/stale.txt" not in keys
    assert any(k.startswith("marrow/runs/fit/checkpoint_") for k in keys), keys
    assert predict_bags(model, _bags(1, rng, frac[:1])[0], n_bags=2, bag_size=256).mean.shape \
        == (1,)
    assert set(glob.glob(copies)) <= before  # its copy of the last checkpoint was removed


def test_train_and_predict_mil_jobs_on_a_tiles_table(tmp_path, capsys):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import predict_mil, train_mil

    rng = np.random.default_rng(2)
    frac = rng.uniform(0.1, 0.9, 24)
    root = tmp_path / "embeddings [2]"  # a folder name no glob reads as itself
    (root / "tiles").mkdir(parents=True)
    labels = ["slide_id,label"]
    for i, (f, bag) in enumerate(zip(frac, _bags(24, rng, frac))):
        sid = f"s{i:02d}"
        pq.write_table(pa.table({"slide_id": [sid] * len(bag), "x": np.arange(len(bag)),
                                 "embedding": [list(map(float, v)) for v in bag]}),
                       root / "tiles" / f"{sid}.parquet")
        lo = int(f * 100) // 10 * 10
        labels.append(f"{sid},{lo}-{lo + 10}%")  # ranges, taken as their midpoints
    (tmp_path / "labels.csv").write_text("\n".join(labels))
    assert train_mil.main(["--task", "regression", "--labels", str(tmp_path / "labels.csv"),
                           "--embeddings", str(root), "--output", str(tmp_path / "m"),
                           "--folds", "3", "--epochs", "15", "--lr", "1e-3",
                           "--local"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["r2"] > 0.8 and (tmp_path / "m" / "bland_altman.png").exists()
    assert predict_mil.main(["--checkpoint", str(tmp_path / "m" / "abmil.safetensors"),
                             "--embeddings", str(root), "--output", str(tmp_path / "p")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 24 and all(0 <= r["mean"][0] <= 1 for r in lines)
    assert pq.read_table(tmp_path / "p" / "mil_predictions" / "predictions.parquet").num_rows == 24
    attention = pl.read_parquet(tmp_path / "p" / "mil_predictions" / "attention.parquet")
    assert attention.columns == ["slide_id", "instance", "x", "attention_logit",
                                 "relative_attention"]  # the tiles' coordinates it has
    per_slide = attention.group_by("slide_id").agg(pl.len(), pl.col("relative_attention").mean())
    assert len(per_slide) == 24 and (per_slide["relative_attention"] - 1).abs().max() < 1e-4
    assert attention["x"].to_list() == pl.from_arrow(pq.read_table(root / "tiles"))["x"].to_list()
    # figures draw on each slide's thumbnail: a bare tiles folder does not say where they are
    assert predict_mil.main(["--checkpoint", str(tmp_path / "m" / "abmil.safetensors"),
                             "--embeddings", str(root), "--output", str(tmp_path / "p"),
                             "--figures"]) == 2
    assert "give the process_slides output" in capsys.readouterr().err


def test_a_labels_sheet_is_read_as_a_lab_writes_it_and_its_faults_named(tmp_path, capsys):
    """Labels from a spreadsheet: a byte-order mark, ';', rows without a label, a slide
    repeated with its label, slides without instances (said, left out); a label with no
    number or a slide labelled twice differently is refused naming its lines, not a
    traceback."""
    from jobs.train_mil import main, read_bag_labels

    sheet = tmp_path / "labels.csv"
    sheet.write_bytes("\ufeffslide_id;label\na;55\nb;\nc;40-50%\na;55\nz;0,3\n".encode())
    ids, labels, missing = read_bag_labels(str(sheet), "slide_id", "regression",
                                           {"a": 1, "c": 1}, StorageConfig())
    assert ids == ["a", "c"] and labels == pytest.approx([0.55, 0.45]) and missing == ["z"]
    assert read_bag_labels(str(sheet), "slide_id", "regression", {"z": 1},
                           StorageConfig())[1] == [pytest.approx(0.3)]  # 0,3 is 0.3
    sheet.write_text("slide_id,label\na,55\nc,high\nd,n/a\n")
    with pytest.raises(ValueError, match=r"2 label\(s\) with no number, which a cellularity "
                                         r"needs \(55, 0.55, 50-60%\): line 3 'high'; line 4"):
        read_bag_labels(str(sheet), "slide_id", "regression", {}, StorageConfig())
    sheet.write_text("slide_id,label\na,55\na,60\n")
    with pytest.raises(ValueError, match="a is labelled twice, differently .lines 2 and 3"):
        read_bag_labels(str(sheet), "slide_id", "regression", {}, StorageConfig())
    sheet.write_text("slide,cellularity\na,55\n")
    with pytest.raises(ValueError, match="needs a slide_id column and a label column; "
                                         "columns: slide, cellularity"):
        read_bag_labels(str(sheet), "slide_id", "regression", {}, StorageConfig())
    # through the job: said on stderr, exit 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "tiles").mkdir()
    for sid in ("a", "c"):
        pq.write_table(pa.table({"slide_id": [sid] * 3, "embedding": [[1.0, 2.0]] * 3}),
                       tmp_path / "tiles" / f"{sid}.parquet")
    sheet.write_text("slide_id,label\na,55\nc,high\n")
    argv = ["--task", "regression", "--labels", str(sheet), "--embeddings", str(tmp_path),
            "--output", str(tmp_path / "m"), "--local"]
    assert main(argv) == 2
    assert "line 3 'high'" in capsys.readouterr().err
    sheet.write_text("slide_id,label\na,x\nc,x\nq,y\n")
    assert main([*argv[:1], "classification", *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert "1 labelled slide_id(s) have no instances" in err and "left out: q" in err
    assert "every labelled slide_id with instances is 'x': a classifier needs two" in err


def test_bags_from_an_output_folder_hold_its_committed_slides_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.train_mil import load_bags

    for sub in ("tiles", "slide_status"):
        (tmp_path / sub).mkdir()
    for sid in ("a", "b"):  # b's tiles were written, then the job died before its commit
        pq.write_table(pa.table({"slide_id": [sid] * 3, "embedding": [[1.0, 2.0]] * 3}),
                       tmp_path / "tiles" / f"{sid}.parquet")
    pq.write_table(pa.table({"slide_id": ["a"]}), tmp_path / "slide_status" / "a.parquet")
    bags = load_bags(str(tmp_path))
    assert list(bags) == ["a"] and bags["a"].shape == (3, 2)
    assert sorted(load_bags(str(tmp_path / "tiles"))) == ["a", "b"]  # a bare tiles folder


def test_predict_refuses_a_checkpoint_missing_or_of_another_model_in_a_sentence(tmp_path,
                                                                                capsys):
    from jobs import predict_mil

    for ckpt, says in ((tmp_path / "nope.safetensors", "checkpoint not found"),
                       ("engine/models/checkpoints/deepheme-resnext50.safetensors",
                        "is not an ABMIL checkpoint")):
        assert predict_mil.main(["--checkpoint", str(ckpt), "--embeddings", str(tmp_path),
                                 "--output", str(tmp_path / "p")]) == 2
        assert says in capsys.readouterr().err
