"""What an input list of S3 slides costs before a job starts: seconds to look up every listed
object (size and ETag, one request each), by `jobs.common.expand_inputs` (``STAT_THREADS``
lookups at once) against the same lookups one after another (what it did before), interleaved
in one process.

    python benchmarks/list_inputs.py [--objects 1000] [--repeats 3] [--tag T]
    python benchmarks/list_inputs.py --list s3://lab/slides.txt [--s3-endpoint URL] ...

With no ``--list``, a moto S3 server is started in a process of its own on 127.0.0.1 and
``--objects`` small objects are put in it. That server answers from this machine's CPUs in a
few ms, where S3 answers over a network in tens: the ratio here is a floor for what a lab's
store gives; ``--list`` measures on its own store. Prints JSON and writes
``benchmarks/results/list_inputs-<hardware>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, result_head, write_result  # noqa: E402
from engine.errors import SlideError  # noqa: E402
from engine.slides.storage import FileEntry, stat_file  # noqa: E402
from jobs.common import (STAT_THREADS, add_storage_args, expand_inputs,  # noqa: E402
                         read_uri_list, storage_from_args)

def one_by_one(list_uri: str, storage) -> list[FileEntry]:
    """The lookups as `expand_inputs` made them before: one after another."""
    entries = []
    for item in read_uri_list(list_uri, storage):
        try:
            entries.append(stat_file(item, storage))
        except SlideError:
            entries.append(FileEntry(item))
    return entries


def moto_list(objects: int, folder: str) -> tuple[subprocess.Popen, str, str]:
    """A moto server holding ``objects`` small objects; returns it, its URL and a list file."""
    server, endpoint, client = moto_server("bench-list")
    uris = []
    for i in range(objects):
        client.put_object(Bucket="bench-list", Key=f"slides/BM-{i:06d}.svs", Body=b"slide")
        uris.append(f"s3://bench-list/slides/BM-{i:06d}.svs")
    path = os.path.join(folder, "slides.txt")
    with open(path, "w") as fh:
        fh.write("\n".join(uris) + "\n")
    return server, endpoint, path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", help="a .txt or .csv list of a lab's slides (default: moto's)")
    p.add_argument("--objects", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="")
    add_storage_args(p)
    args = p.parse_args(argv)
    server = None
    with tempfile.TemporaryDirectory(prefix="hemeflow-list-inputs-") as folder:
        try:
            if args.list:
                list_uri = args.list
            else:
                server, args.s3_endpoint, list_uri = moto_list(args.objects, folder)
            storage = storage_from_args(args)
            n = len(expand_inputs(list_uri, storage))  # warm: the client and its connections
            runs: dict[str, list[float]] = {"one_by_one": [], "ours": []}
            for _ in range(args.repeats):  # interleaved, so that drift hits both alike
                for name, fn in (("one_by_one", one_by_one), ("ours", expand_inputs)):
                    t0 = time.perf_counter()
                    got = fn(list_uri, storage)
                    runs[name].append(round(time.perf_counter() - t0, 3))
                    assert len(got) == n and all(e.size is not None for e in got), name
        finally:
            if server is not None:
                server.kill()
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {**result_head("list_inputs"),
              "store": "a lab's (--list)" if args.list else "moto, its own process, 127.0.0.1",
              "objects": n, "threads": STAT_THREADS, "seconds": runs, "median_s": med,
              "ms_per_object": {k: round(1000 * v / n, 3) for k, v in med.items()},
              "ratio_one_by_one_over_ours": round(med["one_by_one"] / med["ours"], 3)}
    write_result(result, f"list_inputs-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
