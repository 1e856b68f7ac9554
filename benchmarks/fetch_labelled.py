"""Labelled cell images on S3 brought to a training machine: `engine.train.data.fetch_labelled`
(one listing per folder, concurrent downloads, a rerun fetches only what changed) against a
plain loop of one GET per image (boto3), in the same run, both from a moto S3 server on
127.0.0.1 (in a process of its own).

    python benchmarks/fetch_labelled.py [--images 2000] [--tag T]

The images are PBC's (``../shared/data/pbc``), uploaded under ``images/<class>/`` with a
``labels.csv``. Prints JSON: images/s for the first fetch, for the plain loop and for a rerun
with nothing changed, and the ratios. The server is a local Python process, so the figures
measure per-request overhead and concurrency, not a real network's latency, where concurrent
requests gain more.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import moto_server, write_result  # noqa: E402

PBC = os.path.join(os.path.dirname(ROOT), "shared", "data", "pbc")
DUMMY = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
         "AWS_DEFAULT_REGION": "us-east-1"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--tag", default=f"cpu{os.cpu_count()}-{dt.date.today().isoformat()}")
    args = p.parse_args()
    os.environ.update(DUMMY)

    from engine.config import StorageConfig
    from engine.train.data import fetch_labelled

    server, endpoint, client = moto_server("cells")
    try:
        with open(os.path.join(PBC, "labels.csv"), newline="") as fh:
            rows = list(csv.DictReader(fh))
        rows = rows[::max(1, len(rows) // args.images)][:args.images]  # every class
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda r: client.upload_file(os.path.join(PBC, r["path"]), "cells",
                                                       f"lab/{r['path']}"), rows))
        table = io.StringIO()
        w = csv.DictWriter(table, fieldnames=["path", "code"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        client.put_object(Bucket="cells", Key="lab/labels.csv", Body=table.getvalue().encode())
        total = sum(os.path.getsize(os.path.join(PBC, r["path"])) for r in rows)
        storage = StorageConfig(endpoint_url=endpoint)
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            fetch_labelled("s3://cells/lab", storage, cache=os.path.join(tmp, "cache"))
            first = time.perf_counter() - t
            t = time.perf_counter()
            fetch_labelled("s3://cells/lab", storage, cache=os.path.join(tmp, "cache"))
            rerun = time.perf_counter() - t
            t = time.perf_counter()
            for r in rows:
                local = os.path.join(tmp, "plain", r["path"])
                os.makedirs(os.path.dirname(local), exist_ok=True)
                client.download_file("cells", f"lab/{r['path']}", local)
            plain = time.perf_counter() - t
    finally:
        server.terminate()
        server.wait()
    n = len(rows)
    result = {
        "benchmark": "fetch_labelled", "images": n, "megabytes": round(total / 1e6, 1),
        "folders": len({os.path.dirname(r["path"]) for r in rows}),
        "first_fetch_s": round(first, 2), "first_fetch_images_per_s": round(n / first, 1),
        "plain_loop_s": round(plain, 2), "plain_loop_images_per_s": round(n / plain, 1),
        "rerun_unchanged_s": round(rerun, 2),
        "first_fetch_vs_plain_loop": round(plain / first, 2),
        "rerun_vs_first_fetch": round(rerun / first, 3),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "server": "moto (its own process) on 127.0.0.1",
        "date": dt.date.today().isoformat(),
    }
    write_result(result, "fetch_labelled", args.tag)


if __name__ == "__main__":
    main()
