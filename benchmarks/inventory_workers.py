"""What `jobs.inventory` gets from opening more remote slides at once: its default for an S3
input (``REMOTE_WORKERS`` slides at a time) against 4 at a time (what it did before), each on
a fresh output, interleaved in one process, with each request held ``--latency-ms`` on its way
to the store.

    python benchmarks/inventory_workers.py [--slides 100] [--size 8000] [--latency-ms 30]
        [--repeats 2]

A moto S3 server is started in a process of its own on 127.0.0.1 and given ``--slides`` copies
of a synthetic pyramidal TIFF of ``--size`` px a side (`make_synthetic_slides.py`, JPEG
tiles; read by range from sparse copies: `engine.slides.header_copy`). moto answers from this
machine's CPUs at once, where S3 answers over a network after tens of ms: the jobs read it
through a proxy that holds each request (`benchmarks.common.delayed_endpoint`). ``0`` reads it
directly: what more threads cost where the store is instant and the CPUs bound the job. Both
ways must give the same rows (but for when each was read). Prints JSON and writes
``benchmarks/results/inventory_workers-<hardware>-<date>.json``.

``--mount-latency-ms`` reads the slides from a local folder instead, mounted through FUSE in a
process that holds each open and read that long (`benchmarks.common.delayed_mount`): a network
file system such as NFS or SMB, which the job's default takes for one (16 at a time). It needs
fusepy and libfuse 2, which hemeflow does not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import (delayed_endpoint, delayed_mount, moto_server,  # noqa: E402
                               result_head, unmount, write_result)
from benchmarks.inventory_rerun import run  # noqa: E402
from benchmarks.make_synthetic_slides import slide_bytes  # noqa: E402
from engine.slides.storage import FileEntry  # noqa: E402
from jobs.inventory import LOCAL_WORKERS, REMOTE_WORKERS, default_workers  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=100)
    p.add_argument("--size", type=int, default=8000, help="synthetic slides' side in px")
    p.add_argument("--latency-ms", type=float, default=30.0,
                   help="how long each request is held on its way to the store")
    p.add_argument("--mount-latency-ms", type=float,
                   help="read the slides from a FUSE mount holding each open and read this "
                        "long (a network file system), not from S3")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    ways = {"default": (), "four": ("--workers", str(LOCAL_WORKERS))}
    runs: dict[str, list[float]] = {w: [] for w in ways}
    mounted = args.mount_latency_ms is not None
    with tempfile.TemporaryDirectory(prefix="hemeflow-inventory-workers-") as folder, \
            contextlib.ExitStack() as stack:
        body = slide_bytes(folder, args.size)
        if mounted:
            source, endpoint = os.path.join(folder, "mount"), None
            os.makedirs(os.path.join(folder, "disk"))
            for i in range(args.slides):
                with open(os.path.join(folder, "disk", f"BM-{i:05d}.tif"), "wb") as fh:
                    fh.write(body)
            proc = delayed_mount(os.path.join(folder, "disk"), source, args.mount_latency_ms)
            stack.callback(unmount, source, proc)
            assert default_workers([FileEntry(f"{source}/BM-00000.tif")]) == REMOTE_WORKERS
        else:
            server, endpoint, client = moto_server("bench-workers")
            stack.callback(server.kill)
            source = "s3://bench-workers/slides"
            for i in range(args.slides):
                client.put_object(Bucket="bench-workers", Key=f"slides/BM-{i:05d}.tif", Body=body)
            if args.latency_ms:
                proxy, endpoint = delayed_endpoint(endpoint, args.latency_ms)
                stack.callback(proxy.kill)
        # a first run, not counted: imports, the store's clients and caches warmed
        run(source, os.path.join(folder, "warm-up"), endpoint)
        got = {}
        for r in range(args.repeats):  # interleaved, so that drift hits both alike
            for way, flags in ways.items():
                t0 = time.perf_counter()
                got[way] = run(source, os.path.join(folder, f"{way}-{r}"), endpoint, *flags)
                runs[way].append(round(time.perf_counter() - t0, 2))
        assert got["default"].equals(got["four"]), "the two ways gave different rows"
        assert (got["default"]["status"] == "ok").sum() == args.slides
    med = {w: statistics.median(v) for w, v in runs.items()}
    result = {**result_head("inventory_workers"),
              "store": (f"a local folder through FUSE (its own process) holding each open and "
                        f"read {args.mount_latency_ms:g} ms" if mounted else
                        "moto, its own process, 127.0.0.1" + (
                            f", behind a proxy holding each request {args.latency_ms:g} ms"
                            if args.latency_ms else "")),
              "slides": args.slides, "side_px": args.size, "object_bytes": len(body),
              "workers": {"default": REMOTE_WORKERS, "four": LOCAL_WORKERS},
              "seconds": runs, "slides_per_s": {w: round(args.slides / s, 1)
                                                for w, s in med.items()},
              "ratio_default_over_four": round(med["four"] / med["default"], 2)}
    write_result(result, f"inventory_workers-{result['hardware']}-{result['date']}", args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
