"""What the benchmark scripts share: where and how a result is written."""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def write_result(result: dict, name: str, tag: str = "", echo: bool = True) -> str:
    """Write ``result`` to ``benchmarks/results/<name>[-<tag>].json`` (printing it as JSON first
    with ``echo``); returns the path."""
    if echo:
        print(json.dumps(result, indent=2))
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}{'-' + tag if tag else ''}.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    return path
