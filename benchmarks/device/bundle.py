"""Packs what the GPU device machine lacks into one archive small enough to travel with a call.

    python benchmarks/device/bundle.py [--python 3.12] [--set pipeline | train] [--out DIR]

The device tool carries at most 64 MiB per call, working tree included. Its image has torch,
timm, numpy, pyarrow, pandas, OpenCV, scipy and tifffile, but not Ray, OpenSlide, libvips or
simplejpeg, and Ray's wheel alone is 79 MB. This script downloads the wheels for the device's
Python (3.12, manylinux x86-64), installs them into one folder with pip (``--target``, no
dependencies resolved: the list below is the complete set of what is missing there), leaves out
the parts of Ray that a local job never loads (the Java jar, the dashboard's web client, RLlib,
Serve, Ray LLM), and writes ``<out>/site.tar.xz`` with a manifest. About 35 MB.

On the device, ``benchmarks/device/gpu_run.sh`` unpacks it to ``/tmp/site`` and puts it on
``PYTHONPATH``. The versions are the ones installed here, so both machines run the same code.
``--python 3.11`` makes a bundle for this machine, to test the bundle itself
(``tests/test_device_bundle.py`` checks the strip list; the README says how to try the whole
run in a bare virtual environment).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

# Missing on the device image (benchmarks/device/README.md lists what is there), per set:
# "pipeline" for gpu_run.sh (Ray's own needs that the image lacks come too: jsonschema and its
# helpers), "train" for train_run.sh (albumentations, for the DataLoader baseline it measures
# against, and its needs).
SETS = {
    "pipeline": ["ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
                 "openslide-python", "openslide-bin", "simplejpeg", "pyvips-binary", "cffi",
                 "pycparser"],
    "train": ["albumentations", "albucore", "pydantic", "pydantic-core", "annotated-types",
              "typing-inspection", "stringzilla", "simsimd"],
}
SDIST_ONLY = {"pipeline": ["pyvips"], "train": []}  # pure Python, built into a wheel here
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"]
# Parts of Ray a local Ray Data job never imports (paths inside site-packages).
STRIP = ["ray/jars", "ray/rllib", "ray/serve", "ray/llm", "ray/dashboard/client/build"]
CARRY_LIMIT = 64 * 2**20


def pinned(name: str) -> str:
    """``name==<the version installed here>`` (so both machines run the same release)."""
    try:
        return f"{name}=={md.version(name)}"
    except md.PackageNotFoundError:
        return name


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"],
                   check=True)


def strip_site(site: str) -> int:
    """Remove ``STRIP`` and byte-code caches from ``site``; returns the bytes removed."""
    removed = 0
    for rel in STRIP:
        path = os.path.join(site, rel)
        if os.path.isdir(path):
            removed += tree_bytes(path)
            shutil.rmtree(path)
    for root, dirs, _ in os.walk(site):
        for d in [d for d in dirs if d == "__pycache__"]:
            removed += tree_bytes(os.path.join(root, d))
            shutil.rmtree(os.path.join(root, d))
            dirs.remove(d)
    return removed


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def build(python: str, out: str, which: str = "pipeline") -> dict:
    os.makedirs(out, exist_ok=True)
    abi = "cp" + python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = os.path.join(tmp, "wheels"), os.path.join(tmp, "site")
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        target = ["--python-version", python, "--implementation", "cp", "--abi", abi,
                  "--abi", "abi3", "--abi", "none", *plat, "--only-binary=:all:"]
        names = [pinned(n) for n in SETS[which]]
        sdists = [pinned(n) for n in SDIST_ONLY[which]]
        pip("download", "--no-deps", *target, "-d", wheels, *names)
        if sdists:
            pip("wheel", "--no-deps", "-w", wheels, *sdists)
        files = sorted(os.path.join(wheels, f) for f in os.listdir(wheels))
        pip("install", "--no-deps", "--no-index", "--no-compile", "--target", site, *target,
            *files)
        installed = tree_bytes(site)
        removed = strip_site(site)
        archive = os.path.join(out, "site.tar.xz")
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for entry in sorted(os.listdir(site)):
                tar.add(os.path.join(site, entry), arcname=entry)
    manifest = {
        "python": python, "set": which, "packages": names + sdists,
        "stripped": STRIP, "installed_mb": round(installed / 1e6, 1),
        "removed_mb": round(removed / 1e6, 1),
        "archive_mb": round(os.path.getsize(archive) / 1e6, 1),
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", default="3.12", help="the device's Python (3.12 on the H200)")
    p.add_argument("--set", choices=sorted(SETS), default="pipeline",
                   help="pipeline: for gpu_run.sh; train: for train_run.sh")
    p.add_argument("--out", help="folder .gitignore ignores (default: .devbundle for the "
                                 "pipeline set, .devdata for the train set, beside its pack)")
    args = p.parse_args(argv)
    out = args.out or {"pipeline": ".devbundle", "train": ".devdata"}[args.set]
    manifest = build(args.python, out, args.set)
    manifest["fits_one_call"] = os.path.getsize(os.path.join(out, "site.tar.xz")) \
        < CARRY_LIMIT - 8 * 2**20  # leave room for the working tree
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
