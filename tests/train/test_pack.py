"""Packing labelled cells for training elsewhere (jobs.pack_cell_images)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from engine.train.data import load_cell_image, read_labels
from tests.conftest import SHARED_DATA

PBC = SHARED_DATA / "pbc"
pytestmark = pytest.mark.skipif(not (PBC / "labels.csv").exists(), reason="PBC data not present")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """Six PBC images per code (absolute paths), in a labels.csv of their own."""
    folder = tmp_path_factory.mktemp("mini")
    with open(PBC / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen: dict[str, int] = {}
    keep = []
    for r in rows:
        if seen.get(r["code"], 0) < 6:
            seen[r["code"]] = seen.get(r["code"], 0) + 1
            keep.append({**r, "path": str(PBC / r["path"])})
    with open(folder / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep)
    return folder


def test_pack_keeps_rows_codes_and_split_and_the_train_job_takes_its_mpp(mini, tmp_path):
    from jobs.pack_cell_images import main as pack
    from jobs.train_cell_classifier import main as train
    from jobs.train_cell_classifier import pack_or_given_mpp, split_for_training

    out = tmp_path / "pack"
    assert pack(["--data", str(mini), "--output", str(out), "--source-mpp", "0.1",
                 "--format", "png"]) == 0
    info = json.loads((out / "pack.json").read_text())
    assert info["mpp"] == 0.25 and info["source_mpp"] == 0.1 and info["px"] == 144
    original, packed = read_labels(str(mini)), read_labels(str(out))
    assert packed.codes == original.codes and len(packed) == info["images"]
    with open(out / "labels.csv", newline="") as fh:
        assert [r["source_path"] for r in csv.DictReader(fh)] == list(original.paths)
    # lossless here: each packed image is the original resampled to 0.25 µm/px, 144 px
    for i in (0, len(packed) - 1):
        assert np.array_equal(np.asarray(Image.open(packed.paths[i])),
                              load_cell_image(original.paths[i], 0.1, 0.25, 144))
    # the same test split, row for row
    a = split_for_training(original, {"IG", "NEU"}, 0.2, 0)
    b = split_for_training(packed, {"IG", "NEU"}, 0.2, 0)
    assert np.array_equal(a[4], b[4]) and [c for _, c in a[5]] == [c for _, c in b[5]]
    assert pack(["--data", str(mini), "--output", str(out)]) == 2  # not empty: refused
    # a pack's own µm/px, or a refusal naming it
    assert pack_or_given_mpp(None, str(out)) == pack_or_given_mpp(0.25, str(out)) == 0.25
    assert pack_or_given_mpp(None, str(mini)) == 0.1
    assert pack_or_given_mpp("auto", str(mini)) == "auto"
    with pytest.raises(ValueError, match="pack at 0.25"):
        pack_or_given_mpp("auto", str(out))
    with pytest.raises(SystemExit) as refused:
        train(["--data", str(out), "--output", str(tmp_path / "t"), "--source-mpp", "0.1"])
    assert refused.value.code == 2


def test_a_packs_source_paths_say_where_each_image_was_read(tmp_path, capsys):
    """Paths relative to the labels' folder are recorded as the files they name."""
    from jobs.pack_cell_images import main as pack

    rel = tmp_path / "rel"
    (rel / "images").mkdir(parents=True)
    names = sorted((PBC / "images" / "basophil").iterdir())[:2]
    for p in names:
        (rel / "images" / p.name).write_bytes(p.read_bytes())
    (rel / "labels.csv").write_text("path,code\n" + "".join(f"images/{p.name},B2\n"
                                                            for p in names))
    assert pack(["--data", str(rel), "--output", str(tmp_path / "p"), "--format", "png"]) == 0
    packed = list(csv.DictReader(open(tmp_path / "p" / "labels.csv", newline="")))
    assert [r["source_path"] for r in packed] == [str(rel / "images" / p.name) for p in names]
    assert json.loads(capsys.readouterr().out)["source"] == str(rel)


def test_unreadable_images_are_named_and_nothing_half_made_is_left(mini, tmp_path, capsys):
    """A labels table naming a truncated image, one past the size Pillow decodes and a missing
    one: every job says which, after trying them all, and what to do; none ends in a
    traceback, and the pack job leaves no half-made folder."""
    from jobs import evaluate_cell_classifier, pack_cell_images, train_cell_classifier
    from tests.slides.test_bad_inputs import _png

    rows = list(csv.DictReader(open(mini / "labels.csv", newline="")))
    broken, huge = tmp_path / "broken.jpg", tmp_path / "huge.png"
    broken.write_bytes(open(rows[3]["path"], "rb").read()[:600])  # a copy cut short
    huge.write_bytes(_png(20_000, 20_000))  # Pillow refuses it as a decompression bomb
    rows[3]["path"], rows[5]["path"] = str(broken), str(huge)
    rows[7]["path"] = str(tmp_path / "gone.jpg")
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    expected = f"3 of {len(rows)} image(s) cannot be read: {broken} (OSError"
    assert pack_cell_images.main(["--data", str(bad), "--output", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "gone.jpg (FileNotFoundError" in err
    assert "huge.png (DecompressionBombError: Image size (400000000 pixels)" in err
    assert "take their rows out of labels.csv" in err and not (tmp_path / "p").exists()
    from engine.models import get_spec

    ckpt = get_spec("deepheme-resnext50").checkpoint_uri()  # the images fail before it runs
    assert evaluate_cell_classifier.main(["--checkpoint", str(ckpt), "--data", str(bad),
                                          "--plots", str(tmp_path / "plots"), "--no-umap"]) == 2
    assert expected in capsys.readouterr().err
    assert train_cell_classifier.main(["--data", str(bad), "--output", str(tmp_path / "t"),
                                       "--arch", "deepheme-tiny", "--local",
                                       "--test-fraction", "0.3"]) == 2
    err = capsys.readouterr().err
    # before any training: the test split's images too, which are read only when it ends
    assert f"3 of {len(rows)} image(s) cannot be read" in err and "gone.jpg (FileNotF" in err
    assert not (tmp_path / "t" / "prepared" / "split.json").exists()


def test_a_row_without_a_group_is_a_group_of_its_own(tmp_path):
    """A list mixing an export's cells (by slide) with PBC-like images (no slide): the latter
    are not pooled into one empty-named group, which a grouped split would put on one side."""
    (tmp_path / "labels.csv").write_text("path,code,slide_id\na.png,L2,s1\nb.png,L2,s1\n"
                                         "c.png,L2,\nd.png,L2, \n")
    groups = read_labels(str(tmp_path)).groups
    assert groups[0] == groups[1] == "s1" and len(set(groups)) == 3


def test_jobs_on_a_pack_or_a_train_jobs_test_split_take_its_mpp(mini, tmp_path, capsys):
    """The lab's flow: cells exported or packed at 0.25 µm/px, a fine-tune on them, then its
    test split scored and its checkpoint refitted, none given --source-mpp. Each takes the
    images' own pixel size, where evaluation, calibration, quantization and the density took
    PBC's 0.1 (cells 2.5x too large: a model that scored 0.78 on its test cells scored 0.19)."""
    from jobs import evaluate_cell_classifier, fit_cell_ood
    from jobs.pack_cell_images import main as pack
    from jobs.train_cell_classifier import main as train

    packed, out = tmp_path / "pack", tmp_path / "t"
    assert pack(["--data", str(mini), "--output", str(packed), "--source-mpp", "0.1"]) == 0
    assert train(["--data", str(packed), "--output", str(out), "--arch", "deepheme-tiny",
                  "--epochs", "1", "--local", "--loader-workers", "0", "--no-ood",
                  "--no-temperature"]) == 0
    assert json.loads((out / "test" / "pack.json").read_text())["mpp"] == 0.25
    capsys.readouterr()
    assert evaluate_cell_classifier.main(["--checkpoint", str(out / "model.safetensors"),
                                          "--data", str(out / "test"), "--no-umap", "--no-tta",
                                          "--plots", str(tmp_path / "plots")]) == 0
    assert json.loads(capsys.readouterr().out)["source_mpp"] == 0.25
    assert fit_cell_ood.main(["--checkpoint", str(out / "model.safetensors"), "--data",
                              str(packed), "--output", str(tmp_path / "ood.safetensors"),
                              "--held-out-images", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["source_mpp"] == 0.25
    # a fine-tune of it says how to score it against where it started, and that command runs
    assert train(["--data", str(packed), "--output", str(tmp_path / "ft"), "--arch",
                  "deepheme-tiny", "--epochs", "1", "--local", "--loader-workers", "0",
                  "--no-ood", "--no-temperature", "--init", str(out / "model.safetensors")]) == 0
    said = capsys.readouterr().out.split("against the model it started from, on its test "
                                         "split: python -m jobs.evaluate_cell_classifier ")[1]
    import shlex

    command = shlex.split(said.splitlines()[0])
    assert command[command.index("--compare-to") + 1] == str(out / "model.safetensors")
    assert evaluate_cell_classifier.main(command + ["--no-umap", "--no-tta", "--plots",
                                                    str(tmp_path / "plots")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["source_mpp"] == 0.25 and scored["comparison"]["n"] == scored["n"]
    # given, another figure is refused, naming the pack's
    assert evaluate_cell_classifier.main(["--checkpoint", str(out / "model.safetensors"),
                                          "--data", str(out / "test"), "--source-mpp",
                                          "0.1"]) == 2
    assert "is a pack at 0.25 µm/px (pack.json): leave --source-mpp out" in \
        capsys.readouterr().err
    # the embedding probe too, where it resamples (--target-mpp): at 0.25, not PBC's 0.1
    from jobs import evaluate_embeddings

    probe = ["--model", "deepheme-tiny", "--allow-untrained", "--data", str(packed)]
    assert evaluate_embeddings.main(probe + ["--target-mpp", "0.25"]) == 0
    images = json.loads(capsys.readouterr().out)["images"]
    assert images == {"n": len(read_labels(str(packed))), "source_mpp": 0.25,
                      "target_mpp": 0.25, "input_px": 96, "resized_whole": False}
    assert evaluate_embeddings.main(probe + ["--target-mpp", "0.25", "--source-mpp",
                                             "0.1"]) == 2
    assert "is a pack at 0.25 µm/px" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # where it would be read by nothing
        evaluate_embeddings.main(probe + ["--source-mpp", "0.25"])
    assert refused.value.code == 2
    assert "--source-mpp is used only with --target-mpp" in capsys.readouterr().err


def test_the_train_job_takes_several_labels_tables_as_one(mini, tmp_path, capsys):
    """Two rounds of labelling given as two --data: trained on as one table. An image both
    list with one code is taken once; with two codes, or with the tables at two pixel sizes,
    the job refuses, naming both."""
    from jobs.pack_cell_images import main as pack
    from jobs.train_cell_classifier import main as train

    rows = list(csv.DictReader(open(mini / "labels.csv", newline="")))

    def table(name: str, picked: list[dict]) -> str:
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "labels.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(picked)
        return str(tmp_path / name)

    first, second = rows[0::2], rows[1::2]  # 3 of each code's 6 in each round
    one, two = table("round1", first), table("round2", second + first[:1])
    common = ["--output", str(tmp_path / "t"), "--arch", "deepheme-tiny", "--epochs", "1",
              "--local", "--loader-workers", "0", "--no-ood", "--no-temperature"]
    assert train(["--data", one, "--data", two, *common]) == 0
    assert "1 image(s) listed in two --data tables with one code" in capsys.readouterr().err
    card = json.loads((tmp_path / "t" / "model.json").read_text())
    assert card["training"]["data"] == [one, two] == card["training"]["settings"]["data"]
    test = list(csv.DictReader(open(tmp_path / "t" / "test" / "labels.csv", newline="")))
    assert card["training"]["n_dev_images"] + len(test) == len(rows)  # each image once
    # the jobs that refit the checkpoint rebuild its split from the same tables
    from jobs import fit_cell_ood

    assert fit_cell_ood.main(["--checkpoint", str(tmp_path / "t" / "model.safetensors"),
                              "--data", one, "--data", two, "--output",
                              str(tmp_path / "ood.safetensors"), "--held-out-images", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"] == [one, two] and report["fit_images"] == card["training"][
        "n_dev_images"]
    assert report["test_split"]["n"] == sum(r["code"] in card["class_codes"] for r in test)
    # and evaluation and the embedding probe read both as one (the image in both once)
    from jobs import evaluate_cell_classifier, evaluate_embeddings

    assert evaluate_cell_classifier.main([
        "--checkpoint", str(tmp_path / "t" / "model.safetensors"), "--data", one, "--data", two,
        "--no-umap", "--no-tta", "--bootstrap", "0", "--plots", str(tmp_path / "plots")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["n"] == sum(r["code"] in card["class_codes"] for r in rows)
    assert scored["source_mpp"] == 0.1 and scored["data"] == [one, two]
    assert evaluate_embeddings.main(["--model", "deepheme-tiny", "--allow-untrained", "--data",
                                     one, "--data", two]) == 0
    probed = json.loads(capsys.readouterr().out)
    assert probed["images"]["n"] == len(rows) and probed["data"] == [one, two]
    clash = table("clash", [{**first[0], "code": "L2" if first[0]["code"] != "L2" else "B2"}])
    assert train(["--data", one, "--data", clash, *common]) == 2
    assert "1 image(s) labelled with two codes in two --data tables" in capsys.readouterr().err
    assert pack(["--data", one, "--output", str(tmp_path / "p"), "--source-mpp", "0.1"]) == 0
    with pytest.raises(SystemExit) as refused:
        train(["--data", str(tmp_path / "p"), "--data", two, *common])
    assert refused.value.code == 2
    assert "different µm/px" in capsys.readouterr().err
