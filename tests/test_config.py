import pytest

from engine.config import Config, TileConfig
from engine.errors import ConfigError


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"tiles": {"target_mpp": 1.0, "tile_size": 256}})
    msg = str(info.value)
    assert "tiles.tile_size" in msg and "tile_px" in msg and "overlap_px" in msg


def test_nested_values_are_applied_and_hash_changes():
    base = Config.from_dict({})
    cfg = Config.from_dict({"tiles": {"target_mpp": 1.0}, "storage": {"endpoint_url": "http://x"}})
    assert cfg.tiles == TileConfig(target_mpp=1.0)
    assert cfg.storage.endpoint_url == "http://x"
    assert cfg.hash() != base.hash() and base.hash() == Config().hash()


@pytest.mark.parametrize("key", ["key", "secret", "aws_secret_access_key", "token"])
def test_credentials_are_refused_in_config(key):
    with pytest.raises(ConfigError, match="credentials do not belong"):
        Config.from_dict({"storage": {key: "AKIA-SOMETHING"}})


def test_invalid_tile_values_are_refused():
    with pytest.raises(ConfigError):
        Config.from_dict({"tiles": {"tile_px": 224, "overlap_px": 224}})


def test_red_cell_range_is_two_increasing_sizes_or_null():
    assert Config.from_dict({"pipeline": {"red_cell_diameter_um": [4, 12]}}) \
        .pipeline.red_cell_diameter_um == (4, 12)
    assert Config.from_dict({"pipeline": {"red_cell_diameter_um": None}}) \
        .pipeline.red_cell_diameter_um is None
    for bad in ([10.5, 5.0], [0, 5], [7.5], "x"):
        with pytest.raises(ConfigError, match="red_cell_diameter_um"):
            Config.from_dict({"pipeline": {"red_cell_diameter_um": bad}})


def test_shipped_default_yaml_is_complete_and_equals_the_defaults():
    import yaml

    from tests.conftest import ROOT

    data = yaml.safe_load((ROOT / "jobs/configs/default.yaml").read_text())
    assert Config.from_dict(data) == Config()
    def keys(tree: dict, prefix: str = "") -> set[str]:  # every key, nested ones too
        return {k for key, value in tree.items() for k in
                ({prefix + key} | (keys(value, f"{prefix}{key}.") if isinstance(value, dict)
                                   else set()))}

    assert keys(data) == keys(Config().to_dict())


@pytest.mark.parametrize("tree, says", [
    ({"pipeline": {"min_nucleated": "abc"}}, "pipeline.min_nucleated: expected a whole number, "
                                             "got 'abc'"),
    ({"pipeline": {"min_nucleated": "200"}}, "got '200' (YAML"),
    ({"cells": {"work_mpp": "1e-3"}}, "cells.work_mpp: expected a number, got '1e-3' (YAML"),
    ({"cells": {"work_mpp": -1}}, "cells.work_mpp: expected a number of 0 or more, got -1"),
    ({"cells": {"work_mpp": 0}}, "cells.work_mpp must be positive"),
    ({"cells": {"merge_um": float("nan")}}, "cells.merge_um: expected a number of 0 or more"),
    ({"cells": {"threshold_floor": 80}}, "threshold_floor (80) must not exceed"),
    ({"pipeline": {"classifier": {"tta": "yes"}}}, "pipeline.classifier.tta: expected true or "
                                                   "false, got 'yes'"),
    ({"pipeline": {"classifier": {"batch_size": 64.0}}}, "batch_size: expected a whole number"),
    ({"pipeline": {"classifier": {"model": 5}}}, "pipeline.classifier.model: expected text"),
    ({"pipeline": {"stages": "cells"}}, "pipeline.stages: expected a list, got 'cells'"),
    ({"pipeline": {"stages": ["cells", "cels"]}}, "pipeline.stages must name one or both of "
                                                  "cells, tiles; got ['cells', 'cels']"),
    ({"pipeline": {"stages": []}}, "pipeline.stages must name one or both"),
    ({"pipeline": {"red_cell_diameter_um": [5, "x"]}}, "red_cell_diameter_um[1]: expected a "
                                                       "number"),
    ({"pipeline": {"red_cell_diameter_um": [5]}}, "expected a list of 2, got [5]"),
    ({"pipeline": {"threshold_samples": 0}}, "pipeline.threshold_samples must be at least 1"),
    ({"tissue": {"thumbnail_mpp": 0}}, "tissue.thumbnail_mpp must be positive"),
    ({"tissue": {"min_saturation": 5}}, "tissue.min_saturation is an HSV fraction from 0 to 1"),
    ({"storage": {"endpoint_url": "minio:9000"}}, "must be a URL with its scheme"),
    ({"storage": {"endpoint_url": "http://AKIA:secret@minio:9000"}}, "holds credentials"),
    ({"storage": {"retries": True}}, "storage.retries: expected a whole number, got True"),
])
def test_a_value_of_the_wrong_kind_or_out_of_range_is_refused_by_name(tree, says):
    """A config file is written by hand: a value of the wrong kind (text for a number, a
    number for a switch) or a negative size is refused when the config is read, naming the
    key, where it would have failed mid-run or run with a meaningless setting."""
    with pytest.raises(ConfigError) as err:
        Config.from_dict(tree)
    assert says in str(err.value)


def test_numbers_of_either_kind_and_null_where_allowed_are_taken():
    cfg = Config.from_dict({"cells": {"work_mpp": 1, "max_blur_um": None},
                            "pipeline": {"red_cell_diameter_um": [5, 10.5],
                                         "lobe_merge_um": None}})
    assert cfg.cells.work_mpp == 1 and cfg.cells.max_blur_um is None
    assert cfg.pipeline.red_cell_diameter_um == (5, 10.5) and cfg.pipeline.lobe_merge_um is None


@pytest.mark.parametrize("job, argv, says", [
    ("process_slides", ["--mpp", "72"], "argument --mpp: expected µm/px from 0.02 to 50.0"),
    ("process_slides", ["--mpp", "0"], "argument --mpp: expected µm/px"),
    ("inventory", ["--workers", "0"], "argument --workers: expected 1 or more, got 0"),
    ("cell_gallery", ["--output", "o", "--slide", "s", "--per-class", "-1"],
     "argument --per-class: expected 1 or more, got -1"),
    ("classify_cells", ["--images", "i", "--output", "o", "--max-ood-percent", "150"],
     "argument --max-ood-percent: expected a percentage from 0 to 100, got '150'"),
    ("classify_cells", ["--images", "i", "--output", "o", "--batch-size", "many"],
     "argument --batch-size: expected a whole number, got 'many'"),
    ("train_cell_classifier", ["--data", "d", "--output", "o", "--lr", "0"],
     "argument --lr: expected a number above 0, got 0"),
    ("train_mil", ["--task", "regression", "--labels", "l", "--output", "o", "--epochs", "0"],
     "argument --epochs: expected 1 or more, got 0"),
])
def test_a_hand_typed_argument_out_of_range_is_refused_before_the_job_starts(job, argv, says,
                                                                            capsys):
    """What a person types on the command line is checked as the config is: a pixel size
    outside what a scanner gives (72 is a DPI), a count below one, a share over 100 %."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"jobs.{job}").main(argv)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_a_config_file_missing_or_not_yaml_is_refused_in_a_sentence(tmp_path, capsys):
    from jobs import inventory

    broken, latin = tmp_path / "broken.yaml", tmp_path / "latin.yaml"
    broken.write_text("pipeline: [1, 2\n")
    latin.write_bytes("# Dr. Müller's settings\npipeline:\n  stages: [tiles]\n".encode("latin-1"))
    for path, says in ((tmp_path / "nope.yaml", "config file not found: "),
                       (broken, "broken.yaml is not valid YAML: "),
                       (latin, "latin.yaml is not valid YAML: ")):  # it was a traceback
        assert inventory.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                               "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err


def test_a_config_file_saved_as_utf16_is_read(tmp_path):
    """Windows' Notepad saves 'Unicode' as UTF-16 with a byte-order mark: it is read as the
    same file in UTF-8 is (read as this machine's text, it was a traceback)."""
    from jobs.common import config_from_yaml

    text = "# Dr. Müller's settings\npipeline:\n  stages: [tiles]\n"
    (tmp_path / "utf8.yaml").write_text(text, encoding="utf-8")
    (tmp_path / "utf16.yaml").write_text(text, encoding="utf-16")
    utf8, utf16 = (config_from_yaml(str(tmp_path / n)) for n in ("utf8.yaml", "utf16.yaml"))
    assert tuple(utf16.pipeline.stages) == tuple(utf8.pipeline.stages) == ("tiles",)
