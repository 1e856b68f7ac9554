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
    "engine.first_contact": ["torch", "ray", "openslide", "pyvips", "engine.slides"],
    "jobs.inventory": ["torch", "ray", "timm"],
    # torch and timm come with the model stages (`resolve_stages`), and with the jobs' main
    # below: their --help and argument errors answered after 4-6 s here, under 1.5 s without
    "jobs.process_slides": ["torch", "timm"],
    # what each Ray worker of the pipeline imports: scipy (0.37 s a process here) comes with
    # the splitting of touching nuclei (`engine.cells._split`), torch with the model steps
    "engine.pipeline.steps": ["torch", "timm", "scipy"],
    "jobs.evaluate_cell_classifier": ["torch", "timm"],
    "jobs.evaluate_embeddings": ["torch", "timm"],
    "jobs.predict_mil": ["torch", "timm"],
    "jobs.train_mil": ["torch", "timm"],
    "jobs.slide_summary": ["torch", "ray", "timm"],
    "jobs.compare_differentials": ["torch", "ray", "timm"],
    "engine.specimen": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.classes": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.pixel_size": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.focus": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.stain": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.report.agreement": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "jobs.estimate_pixel_size": ["torch", "ray", "timm", "openslide", "pyvips"],
    "jobs.cell_gallery": ["torch", "ray", "timm"],
    "jobs.export_cells": ["torch", "ray", "timm"],
    "jobs.slide_map": ["torch", "ray", "timm"],
    "jobs.case_differentials": ["torch", "ray", "timm"],
    "engine.report.maps": ["torch", "ray", "openslide", "pyvips", "fsspec"],
    "engine.models": ["ray", "openslide", "pyvips", "engine.slides"],
    "engine.models.saliency": ["ray", "openslide", "pyvips", "engine.slides"],
    # the GPU machine's image has no albumentations: training with --augment device needs none
    "engine.train.cell_classifier": ["ray", "openslide", "pyvips", "engine.slides",
                                     "albumentations"],
    "engine.train.batch_augment": ["ray", "openslide", "pyvips", "engine.slides",
                                   "albumentations"],
    # its --help and the data's errors without torch (5-9 s here): main imports it after them
    "jobs.train_cell_classifier": ["ray", "openslide", "pyvips", "albumentations", "torch",
                                   "timm", "sklearn"],
    # the model registry (its --model choices) without torch: `engine.models` imports each
    # name on first use
    "jobs.classify_cells": ["ray", "openslide", "pyvips", "albumentations", "torch", "timm"],
    "engine.train.evaluation": ["ray", "openslide", "pyvips", "engine.slides"],
    "engine.train.calibration": ["ray", "openslide", "pyvips", "engine.slides"],
}


def _loaded(modules: list[str]) -> subprocess.Popen:
    """A fresh interpreter that imports ``modules`` and prints every package it then holds."""
    code = ("import sys, json; import {}; print(json.dumps(sorted("
            "set(sys.modules) | {{m.split('.')[0] for m in sys.modules}})))")
    return subprocess.Popen([sys.executable, "-c", code.format(", ".join(modules))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, what) -> set[str]:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"import {what} failed:\n{stderr[-2000:]}"
    return set(json.loads(stdout))


def _layer(forbidden: list[str]) -> tuple[bool, ...]:
    """A rule's layer: whether it keeps out torch, Ray, the storage stack (fsspec) and the slide
    readers (engine.slides). Modules of one layer import about the same things."""
    return tuple(p in forbidden for p in ("torch", "ray", "fsspec", "engine.slides"))


@pytest.fixture(scope="module")
def loaded_with_peers():
    """Per module, what a fresh interpreter holds after importing it together with the other
    modules of its layer. None of a module's forbidden packages in the union means none for it
    alone, with one interpreter per layer instead of one per module (most of the time is
    torch's import); where the union holds one, the test imports that module alone to decide.
    The interpreters run side by side."""
    groups: dict[tuple, list[str]] = {}
    for module, forbidden in RULES.items():
        groups.setdefault(_layer(forbidden), []).append(module)
    procs = [(ms, _loaded(ms)) for ms in groups.values()]
    out = {}
    for ms, proc in procs:
        loaded = _result(proc, ms)
        out.update(dict.fromkeys(ms, loaded))
    return out


@pytest.mark.parametrize("module", sorted(RULES))
def test_module_does_not_import_forbidden_packages(module, loaded_with_peers):
    if loaded_with_peers[module] & set(RULES[module]):
        # the group broke the rule: import this module alone, to say whether it is the culprit
        loaded = _result(_loaded([module]), module)
        assert not loaded & set(RULES[module]), f"{module} imports {loaded & set(RULES[module])}"


def test_importing_engine_opens_no_backend_library():
    # backends are imported lazily, on first use (fsspec-style registry)
    code = "import sys, engine.slides; print('openslide' in sys.modules, 'pyvips' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_every_job_ends_a_refusal_in_a_sentence_not_a_traceback():
    """Each job's ``main`` is wrapped by ``jobs.common.job_main``, which turns an error hemeflow
    raises on purpose into ``hemeflow: error: ...`` and exit code 2 (a job without it printed a
    traceback for an output that is a file, say)."""
    import ast
    import pathlib

    jobs = pathlib.Path(__file__).resolve().parents[1] / "jobs"
    unwrapped = []
    for path in sorted(jobs.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                names = {getattr(d, "id", None) for d in node.decorator_list}
                if "job_main" not in names:
                    unwrapped.append(path.name)
    assert len(list(jobs.glob("*.py"))) > 20 and not unwrapped, unwrapped


def test_a_job_skips_the_last_collection_at_exit_only():
    """``job_main`` freezes the heap as its process exits (`jobs.common._no_collection_at_exit`:
    the interpreter's last collection took 1.0-1.5 s of a job's exit), and not before: a job
    called in-process, as tests call them, leaves the caller's collections as they were. A
    handler registered before the job runs after its own (atexit is last in, first out)."""
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('at exit', gc.get_freeze_count() > 0))\n"
            "from jobs.common import job_main\n"
            "main = job_main(lambda argv=None: 0)\n"
            "print('returned', main([]), gc.get_freeze_count())\n"
            "main([])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.splitlines() == ["returned 0 0", "at exit True"], out.stdout + out.stderr
