"""The device bundle (benchmarks/device/bundle.py) leaves out only what the engine never loads."""

import json
import subprocess
import sys

from benchmarks.device.bundle import STRIP, strip_site


def test_the_engines_ray_paths_load_nothing_the_bundle_strips():
    # what process_slides, the benchmarks and the Ray Train job import (a whole run from the
    # bundle is rehearsed by benchmarks/device/gpu_run.sh: benchmarks/device/README.md)
    code = (
        "import sys, json, ray, ray.data, ray.train, ray.train.torch\n"
        "import engine.pipeline.run, jobs.process_slides, jobs.train_cell_classifier\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('ray.')]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    stripped = {p.replace("/", ".") for p in STRIP}
    assert loaded and not [m for m in loaded if any(m.startswith(s) for s in stripped)]


def test_strip_site_removes_the_listed_folders_and_byte_code_only(tmp_path):
    for rel in STRIP + ["ray/data", "ray/dashboard/modules"]:
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "x.py").write_text("x = 1\n")
    (tmp_path / "ray/data/__pycache__").mkdir()
    (tmp_path / "ray/data/__pycache__/x.pyc").write_bytes(b"12345")
    removed = strip_site(str(tmp_path))
    assert removed == 6 * len(STRIP) + 5
    assert (tmp_path / "ray/data/x.py").exists() and (tmp_path / "ray/dashboard/modules").exists()
    assert not any((tmp_path / rel).exists() for rel in STRIP)
    assert not (tmp_path / "ray/data/__pycache__").exists()
