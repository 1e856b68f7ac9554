"""Peak memory of process_slides against the number of slides: 64 synthetic smears vs 320, each
run as one stream per branch over all its slides (the default ``pipeline.slides_per_chunk`` 0;
``--chunk N`` splits them into chunks of N).

    python benchmarks/pipeline_memory.py [--small 64] [--large 320] [--chunk N] [--tag T]

Runs the job in a subprocess for each size (tiny untrained models: memory, not accuracy, is
measured), samples the RSS of the driver and of its whole process tree (Ray's GCS, raylet and
workers) every 0.2 s, and prints the peaks and the large/small ratio as JSON. Streaming should keep
the ratio near 1 (the target is <= 1.3). Writes
benchmarks/results/pipeline_memory-<host>-<date>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402

CONFIG = """
pipeline:
  slides_per_chunk: {chunk}
  classifier: {{model: deepheme-tiny, batch_size: 128}}
  encoder: {{model: dinov2-tiny, batch_size: 32}}
"""


def rss_tree(pid: int) -> tuple[int, int]:
    """(RSS of ``pid``, RSS of ``pid`` and all its descendants) in bytes, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
        rss[int(name)] = pages * page
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return rss.get(pid, 0), total


def make_slides(folder: str, n: int, seed: int = 0) -> None:
    from engine.slides.writer import write_pyramid_tiff

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = np.full((1536, 2048, 3), (236, 232, 240), np.uint8)
    yy, xx = np.mgrid[:1536, :2048]
    for _ in range(400):  # red cells
        cy, cx = rng.integers(0, 1536), rng.integers(0, 2048)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 15 ** 2] = (215, 150, 160)
    for _ in range(40):   # nucleated cells
        cy, cx = rng.integers(20, 1516), rng.integers(20, 2028)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 18 ** 2] = (95, 60, 175)
    master = os.path.join(folder, "slide-0000.tif")
    write_pyramid_tiff(img, master, 0.25)
    for i in range(1, n):
        os.link(master, os.path.join(folder, f"slide-{i:04d}.tif"))


def measure(n: int, work: str, chunk: int) -> dict:
    inp, out = os.path.join(work, f"in-{n}"), os.path.join(work, f"out-{n}")
    make_slides(inp, n)
    cfg = os.path.join(work, "bench.yaml")
    with open(cfg, "w") as fh:
        fh.write(CONFIG.format(chunk=chunk))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.process_slides", "--input", inp,
                             "--output", out, "--config", cfg, "--allow-untrained"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks = [0, 0]

    def sample():
        while proc.poll() is None:
            d, t = rss_tree(proc.pid)
            peaks[0], peaks[1] = max(peaks[0], d), max(peaks[1], t)
            time.sleep(0.2)

    th = threading.Thread(target=sample)
    th.start()
    stdout = proc.communicate()[0]
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"process_slides failed for n={n}:\n{stdout[-2000:]}")
    seconds = time.time() - t0
    return {"slides": n, "seconds": round(seconds, 1),
            "slides_per_hour": round(n / seconds * 3600),
            "peak_driver_rss_mib": round(peaks[0] / 2**20, 1),
            "peak_tree_rss_mib": round(peaks[1] / 2**20, 1),
            # the job's "N ok, M failed of K processed" line (review counts may follow it)
            "summary": next((ln for ln in reversed(stdout.splitlines()) if " processed" in ln),
                            stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from engine.config import PipelineConfig

    p.add_argument("--small", type=int, default=64)
    p.add_argument("--large", type=int, default=320)
    p.add_argument("--chunk", type=int, default=PipelineConfig().slides_per_chunk)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hemeflow-bench-") as work:
        small = measure(args.small, work, args.chunk)
        large = measure(args.large, work, args.chunk)
    result = {
        "benchmark": "pipeline_memory", "host": platform.node(), "cpus": os.cpu_count(),
        "date": dt.date.today().isoformat(), "slides_per_chunk": args.chunk, "small": small,
        "large": large,
        "driver_ratio": round(large["peak_driver_rss_mib"] / small["peak_driver_rss_mib"], 3),
        "tree_ratio": round(large["peak_tree_rss_mib"] / small["peak_tree_rss_mib"], 3),
        "target": "tree_ratio <= 1.3",
    }
    write_result(result, f"pipeline_memory-cpu{os.cpu_count()}-{result['date']}", args.tag)


if __name__ == "__main__":
    main()
