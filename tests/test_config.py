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
