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


@pytest.mark.parametrize("module", sorted(RULES))
def test_module_does_not_import_forbidden_packages(module):
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted(set(sys.modules) | {m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    assert not loaded & set(RULES[module]), f"{module} imports {loaded & set(RULES[module])}"


def test_importing_engine_opens_no_backend_library():
    # backends are imported lazily, on first use (fsspec-style registry)
    code = "import sys, engine.slides; print('openslide' in sys.modules, 'pyvips' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
