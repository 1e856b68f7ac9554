"""The import rules of docs/ARCHITECTURE: core and slides never pull in torch or ray."""

import json
import subprocess
import sys

import pytest

RULES = {
    "engine.config": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.tissue": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.tiling": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.schema": ["torch", "ray", "openslide", "pyvips"],
    "engine.slides": ["torch", "ray", "timm"],
    "engine.slides.inventory": ["torch", "ray", "timm"],
    "engine.outputs": ["torch", "ray", "timm"],
    "jobs.inventory": ["torch", "ray", "timm"],
    "engine.classes": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.pixel_size": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "jobs.estimate_pixel_size": ["torch", "ray", "timm", "openslide", "pyvips"],
    "jobs.cell_gallery": ["torch", "ray", "timm"],
    "engine.models": ["ray", "openslide", "pyvips", "engine.slides"],
    "engine.train.cell_classifier": ["ray", "openslide", "pyvips", "engine.slides"],
    "engine.train.evaluation": ["ray", "openslide", "pyvips", "engine.slides"],
    "engine.train.calibration": ["ray", "openslide", "pyvips", "engine.slides"],
}


@pytest.fixture(scope="module")
def loaded_by():
    """Per module, every package a fresh interpreter holds after importing only that module.
    The interpreters run side by side (each imports alone; most of the time is torch's import)."""
    code = ("import sys, json, {}; print(json.dumps(sorted("
            "set(sys.modules) | {{m.split('.')[0] for m in sys.modules}})))")
    procs = {m: subprocess.Popen([sys.executable, "-c", code.format(m)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in RULES}
    out = {}
    for m, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"import {m} failed:\n{stderr[-2000:]}"
        out[m] = set(json.loads(stdout))
    return out


@pytest.mark.parametrize("module", sorted(RULES))
def test_module_does_not_import_forbidden_packages(module, loaded_by):
    loaded = loaded_by[module]
    assert not loaded & set(RULES[module]), f"{module} imports {loaded & set(RULES[module])}"


def test_importing_engine_opens_no_backend_library():
    # backends are imported lazily, on first use (fsspec-style registry)
    code = "import sys, engine.slides; print('openslide' in sys.modules, 'pyvips' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
