"""The whole process_slides job on N synthetic slides: slides/hour, tiles/s, cells/s, peak RSS,
which stage bounds the run, and each model's rate in the job against the same model alone.

    python benchmarks/pipeline_e2e.py [--slides 8] [--size 16384] [--mpp 0.25]
        [--slide <a real slide> [--specimen blood] | --dicom] [--stages cells tiles]
        [--classifier deepheme-resnext50] [--encoder dinov2-vits14] [--batch 256] [--compile]
        [--baseline-chunk 64] [--baseline-set native_threads=0] [--set KEY=VALUE]

Slides come from ``make_synthetic_slides`` (``--dicom``: as DICOM series, a folder of one file
per level, each file hard-linked into N folders), or ``--slide`` (one slide, hard-linked N
times: distinct slide ids, same pixels). Models run with random weights (``--allow-untrained``:
speed, not accuracy, is measured). The baseline is ``model_throughput``'s measurement for the
same model, batch size, precision and device, run in this process after the job: random
tensors already on the device. Two ratios per model:

- ``e2e_ratio``: items / wall time of its branch, over the model-alone rate. This is the target
  (>= 0.8 on one GPU): it is high only when reading and detection keep the model fed.
- ``busy_ratio``: items / (the model actors' busy seconds), over the model-alone rate: what
  the actor loses to host-device transfer, preprocessing and batching when it is fed.
- ``steady_ratio``: the items after the first batch / the branch's wall time after it, over
  the model-alone rate: whether reading and detection keep up once every actor runs (None
  when less than 5 s, or a fifth of the wall, followed the first batch: too short a run to
  say, as batches finished during the start-up arrive in a burst). With the
  start-up seconds it gives ``items_for_e2e_0_8``, the archive size (in items) at which the
  end-to-end ratio would reach 0.8 (None: the steady rate itself is short of it).
- ``feed_per_actor_s`` and ``feed_actors_for_0_8``: items per busy second of one actor of the
  CPU stage that feeds the model (``detect``, or ``read`` for tiles), and how many such actors
  (CPUs) it takes to feed the model at 0.8 of its rate alone.

``--baseline-chunk N`` first runs the same job in the same process with
``pipeline.slides_per_chunk`` N (the earlier default was 64: model actors restart with every chunk)
and reports ``speedup_vs_baseline``, the ratio of slides/hour, one stream per branch over all
slides against it. ``--baseline-set KEY=VALUE`` (repeatable) does the same with any other
``pipeline`` setting changed for the baseline run (VALUE is JSON, or a plain string). The
baseline's ``models`` hold the same figures against the same model-alone rate.

``--s3`` serves the slides from a local S3 endpoint (moto's server, a separate process on
127.0.0.1) instead of the local disk and reports the object downloads per slide and the bytes
fetched, from the server's request log. ``--baseline-set storage.stage_shared=false`` compares
with each process staging its own copies.

Writes benchmarks/results/pipeline_e2e-<hardware>-<date>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402
from benchmarks.make_synthetic_slides import make_slide  # noqa: E402
from benchmarks.model_throughput import bench  # noqa: E402
from benchmarks.pipeline_memory import rss_tree  # noqa: E402


def model_alone(name: str, batch: int, compile: bool, steps: int = 20, amp: bool = True,
                checkpoint: str | None = None) -> float:
    """Images/s of ``name`` on random device tensors, as ``Predictor`` runs it: bf16 +
    channels_last on CUDA and on CPUs with native bf16 (unless ``amp`` is False), else fp32;
    an int8 ``checkpoint`` runs its int8 body and float head on the CPU."""
    import torch

    from engine.classes import DEEPHEME_CODES
    from engine.models import create_model
    from engine.models.inference import default_device, native_bf16

    model = create_model(name, checkpoint, allow_untrained=True, class_codes=DEEPHEME_CODES)
    size = model.spec.input_px
    if model.int8 is not None:
        head = model.module.get_classifier()
        return bench(lambda x: head(model.int8(x)), torch.randn(batch, 3, size, size), 2,
                     amp=False, warmup=1)
    device = default_device()
    cuda = device.type == "cuda"
    m = model.module.eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    bf16 = amp and native_bf16(device)
    if bf16:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    if cuda:
        return bench(torch.compile(m) if compile else m, x, steps, amp=bf16)
    return bench(m, x, 2, amp=bf16, warmup=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--size", type=int, default=16384, help="slide side in pixels (at --mpp)")
    p.add_argument("--mpp", type=float, default=0.25,
                   help="the slides' level-0 µm/px (a 40x Aperio or Leica scan: 0.252-0.263)")
    p.add_argument("--kind", choices=["smear", "aspirate", "marrow"], default="smear",
                   help="synthetic content (smear: a blood film, 8 nucleated cells per "
                        "megapixel; aspirate: a marrow aspirate, 45; marrow: H&E biopsy, for "
                        "the tiles branch)")
    p.add_argument("--slide", help="run on this slide file (hard-linked --slides times) instead "
                                   "of a synthetic one: a blood film built from BCCD's fields "
                                   "by jobs.build_smear_slide, say")
    p.add_argument("--dicom", action="store_true",
                   help="synthetic slides as DICOM series (local inputs only)")
    p.add_argument("--specimen", default="unknown",
                   help="the slides' specimen type (blood: a film's pale-platelet pass)")
    p.add_argument("--stages", nargs="+", default=["cells", "tiles"], choices=["cells", "tiles"])
    p.add_argument("--classifier", default="deepheme-resnext50")
    p.add_argument("--encoder", default="dinov2-vits14")
    p.add_argument("--batch", type=int, default=256, help="model batch size (both models)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model actors")
    p.add_argument("--read-concurrency", type=int, help="CPU read actors (default: CPUs - 1)")
    p.add_argument("--work", help="folder for slides and outputs (default: a temporary one)")
    p.add_argument("--baseline-chunk", type=int, default=0,
                   help="first run the job with this many slides per chunk, as a baseline")
    p.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE",
                   help="first run the job with this pipeline setting, as a baseline")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of both runs, before --baseline-set's changes "
                        "(pipeline.classifier.checkpoint=<int8.safetensors>, say)")
    p.add_argument("--s3", action="store_true",
                   help="serve the slides from a local S3 server (moto, on 127.0.0.1)")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()
    if args.dicom and (args.slide or args.s3):
        p.error("--dicom makes its own slides, on local disk")

    import ray
    import torch

    from engine.config import Config
    from engine.pipeline.run import RunMetrics, run_pipeline
    from engine.slides.inventory import MppOverrides
    from engine.slides.storage import list_files
    from engine.specimen import Specimens, parse_specimen

    cfg = Config.from_dict({"pipeline": {
        "stages": list(args.stages), "read_concurrency": args.read_concurrency,
        "classifier": {"model": args.classifier, "batch_size": args.batch,
                       "compile": args.compile},
        "encoder": {"model": args.encoder, "batch_size": args.batch, "compile": args.compile}}})
    cfg = with_settings(cfg, parse_settings(args.set))

    def run(slides: str, out: str, cfg: Config) -> tuple[list[dict], float, RunMetrics, int]:
        if args.s3:
            cfg = cfg.replace(storage=dataclasses.replace(cfg.storage, endpoint_url=endpoint))
        peak, running = [0], [True]

        def sample():
            while running[0]:
                peak[0] = max(peak[0], rss_tree(os.getpid())[1])
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        metrics = RunMetrics()
        t = time.perf_counter()
        rows = run_pipeline(list_files(slides, cfg.storage), out, cfg, MppOverrides(),
                            allow_untrained=True, log=lambda m: None, metrics=metrics,
                            specimens=Specimens(parse_specimen(args.specimen, "--specimen")))
        wall = time.perf_counter() - t
        running[0] = False
        sampler.join()
        return rows, wall, metrics, peak[0]

    baseline = None
    with tempfile.TemporaryDirectory(prefix="hemeflow-e2e-", dir=args.work) as work:
        slides = os.path.join(work, "slides")
        os.makedirs(slides)
        t = time.perf_counter()
        ext = os.path.splitext(args.slide)[1] if args.slide else ".tif"
        master = os.path.join(slides, f"slide-0000{ext}")
        if args.dicom:  # a folder a series, its files hard-linked into the others
            master = os.path.join(slides, "slide-0000")
            make_slide(master, args.size, kind=args.kind, mpp=args.mpp, dicom=True)
            for i in range(1, args.slides):
                os.makedirs(copy := os.path.join(slides, f"slide-{i:04d}"))
                for name in os.listdir(master):
                    os.link(os.path.join(master, name), os.path.join(copy, name))
        elif args.slide:
            shutil.copyfile(args.slide, master)
        else:
            make_slide(master, args.size, kind=args.kind, mpp=args.mpp)
        for i in range(1, 0 if args.dicom else args.slides):
            os.link(master, os.path.join(slides, f"slide-{i:04d}{ext}"))
        made_s = time.perf_counter() - t
        stack = contextlib.ExitStack()
        sizes = {n: os.path.getsize(os.path.join(slides, n)) for n in os.listdir(slides)}
        if args.s3:
            endpoint, requests = stack.enter_context(s3_server(slides, work))
            slides = "s3://slides/archive"

        ray.init(include_dashboard=False, log_to_driver=False)
        changed = baseline_settings(args)
        if changed:
            n = len(requests()) if args.s3 else 0
            b_rows, b_wall, b_metrics, _ = run(slides, os.path.join(work, "out-baseline"),
                                               with_settings(cfg, changed))
            baseline = {"settings": changed, "wall_s": round(b_wall, 1),
                        "slides_per_hour": round(len(b_rows) / b_wall * 3600),
                        **b_metrics.as_dict()}
            if args.s3:
                baseline["s3"] = downloads(requests()[n:], len(b_rows), sizes)
        n = len(requests()) if args.s3 else 0
        rows, wall, metrics, peak = run(slides, os.path.join(work, "out"), cfg)
        s3 = downloads(requests()[n:], len(rows), sizes) if args.s3 else None
        ray.shutdown()
        stack.close()

    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"{len(failed)} slide(s) failed: {failed[0]['error_message']}")
    m = metrics.as_dict()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu{os.cpu_count()}"
    result = {
        "benchmark": "pipeline_e2e", "device": device, "host": platform.node(),
        "cpus": os.cpu_count(), "date": dt.date.today().isoformat(),
        "args": vars(args), "make_slides_s": round(made_s, 1),
        "slides": len(rows), "wall_s": round(wall, 1),
        "slides_per_hour": round(len(rows) / wall * 3600),
        "peak_tree_rss_mib": round(peak / 2**20), **m, "models": []}
    if s3:
        result["s3"] = s3
    if baseline:
        result["baseline"] = baseline
        result["speedup_vs_baseline"] = round(result["slides_per_hour"]
                                             / baseline["slides_per_hour"], 2)
    if "tiles" in m["wall_s"]:
        result["tiles_per_s"] = round(m["items"]["tiles"] / m["wall_s"]["tiles"], 1)
    if "cells" in m["wall_s"]:
        result["cells_per_s"] = round(m["items"].get("cells", 0) / m["wall_s"]["cells"], 1)
    for stage, feed, branch, model, items in (
            ("classify", "detect", "cells", args.classifier, "cells"),
            ("encode", "read", "tiles", args.encoder, "tiles")):
        if stage not in m["busy_s"] or not m["items"].get(items):
            continue
        alone = model_alone(model, args.batch, args.compile,
                            checkpoint=cfg.pipeline.classifier.checkpoint if stage == "classify"
                            else cfg.pipeline.encoder.checkpoint)
        result["models"].append({"model": model, "stage": stage, "batch": args.batch,
                                 "compile": args.compile, "alone_per_s": round(alone, 1),
                                 **model_figures(m, stage, feed, branch, items, alone)})
        if baseline and baseline["busy_s"].get(stage) and baseline["items"].get(items):
            baseline.setdefault("models", []).append(
                {"model": model, "stage": stage,
                 **model_figures(baseline, stage, feed, branch, items, alone)})
    write_result(result, f"pipeline_e2e-{device.replace(' ', '_')}-{result['date']}", args.tag)


def model_figures(m: dict, stage: str, feed: str, branch: str, items: str, alone: float
                  ) -> dict:
    """One model's figures from a run's metrics ``m`` (`RunMetrics.as_dict`) against its rate
    ``alone`` (the module docstring says what each means)."""
    e2e = m["items"][items] / m["wall_s"][branch]
    busy = m["items"][items] / (m["busy_s"][stage] / m["actors"][stage])
    # after the first batch: its items came with the start-up, not at the steady rate
    startup = m["startup_s"].get(branch, 0.0)
    after = m["items"][items] - m["first_batch_items"].get(items, 0)
    rest = m["wall_s"][branch] - startup
    # a short remainder says little: batches finished during the start-up arrive in a burst
    steady = after / rest if after > 0 and rest >= max(5.0, 0.2 * m["wall_s"][branch]) \
        else None
    return {"e2e_per_s": round(e2e, 1), "busy_per_s": round(busy, 1),
            "e2e_ratio": round(e2e / alone, 3), "busy_ratio": round(busy / alone, 3),
            "startup_s": round(startup, 1), "steady_per_s": steady and round(steady, 1),
            "steady_ratio": steady and round(steady / alone, 3),
            "items_for_e2e_0_8": steady and items_for_ratio(0.8, alone, steady, startup),
            **feed_actors(feed, m["items"][items], m["busy_s"].get(feed), alone)}


def feed_actors(stage: str, items: int, busy_s: float | None, alone: float) -> dict:
    """What the CPU stage that feeds a model (detection, or tile reading) does per actor: items
    per busy second of one actor, and the actors it takes to feed the model at 0.8 of its rate
    alone (the CPUs per GPU a node needs for the target, at this run's cost per item)."""
    if not busy_s or not items:
        return {}
    per_actor = items / busy_s
    return {"feed_stage": stage, "feed_per_actor_s": round(per_actor, 1),
            "feed_actors_for_0_8": int(np.ceil(0.8 * alone / per_actor))}


def items_for_ratio(target: float, alone: float, steady: float, startup_s: float) -> int | None:
    """How many items a run needs for its end-to-end rate, ``N / (startup + N / steady)``, to
    reach ``target`` of the model-alone rate: start-up is paid once per run, so a longer archive
    amortises it. None when even the steady rate falls short."""
    if steady <= target * alone:
        return None
    return int(np.ceil(target * alone * startup_s / (1 - target * alone / steady)))


def with_settings(cfg, changed: dict):
    """``cfg`` with ``changed`` applied: keys are dotted paths from the config's top
    (``storage.stage_shared``, ``pipeline.classifier.amp``), or ``pipeline`` fields alone."""
    def put(obj, path: list[str], value):
        head = path[0]
        new = value if len(path) == 1 else put(getattr(obj, head), path[1:], value)
        return dataclasses.replace(obj, **{head: new})

    for key, value in changed.items():
        path = key.split(".")
        if not any(f.name == path[0] for f in dataclasses.fields(cfg)):
            path = ["pipeline", *path]
        cfg = put(cfg, path, value)
    return cfg


@contextlib.contextmanager
def s3_server(folder: str, work: str):
    """moto's S3 server on 127.0.0.1 in its own process, holding the files of ``folder`` under
    ``s3://slides/archive``; yields ``(endpoint, lines)``, ``lines()`` being the request lines
    logged so far (dummy credentials go into this process's environment, which Ray's
    workers inherit)."""
    import socket
    import subprocess

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench-key-id", AWS_SECRET_ACCESS_KEY="bench-secret",
                      AWS_DEFAULT_REGION="us-east-1")
    log_path = os.path.join(work, "moto.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                client.create_bucket(Bucket="slides")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
        for name in sorted(os.listdir(folder)):
            client.upload_file(os.path.join(folder, name), "slides", f"archive/{name}")

        def lines() -> list[str]:  # "GET /slides/archive/x 200": the request and its status
            with open(log_path) as fh:
                return [ln.split('"')[1].rsplit(" ", 1)[0] + " " + ln.split('"')[2].split()[0]
                        for ln in (re.sub(r"\x1b\[[0-9;]*m", "", raw) for raw in fh)
                        if ln.count('"') >= 2]

        yield endpoint, lines
    finally:
        proc.terminate()
        proc.wait(10)


def downloads(lines: list[str], slides: int, sizes: dict[str, int]) -> dict:
    """Whole-object GETs (status 200) of the slides among the server's request lines, and
    their bytes (``sizes``: object name -> bytes); and the range GETs (206) of sparse copies
    (`engine.slides.header_copy`), whose bytes the log does not give."""
    slide_gets = [ln.split() for ln in lines
                  if ln.startswith("GET /slides/archive/") and "?" not in ln.split()[1]]
    gets = [g[1].rsplit("/", 1)[-1] for g in slide_gets if g[-1] == "200"]
    return {"object_gets": len(gets), "gets_per_slide": round(len(gets) / max(slides, 1), 2),
            "mib_downloaded": round(sum(sizes[g] for g in gets) / 2**20, 1),
            "range_gets": sum(1 for g in slide_gets if g[-1] == "206"),
            "mib_of_slides": round(sum(sizes.values()) / 2**20, 1), "requests": len(lines)}


def baseline_settings(args) -> dict:
    """The settings the baseline run changes (empty: no baseline run); ``KEY`` is a
    ``pipeline`` field or ``section.field`` (``storage.stage_shared``)."""
    changed = {"slides_per_chunk": args.baseline_chunk} if args.baseline_chunk else {}
    return {**changed, **parse_settings(args.baseline_set)}


def parse_settings(items: list[str]) -> dict:
    """``KEY=VALUE`` items as a dict; VALUE is JSON, or a plain string."""
    changed = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            changed[key] = json.loads(value)
        except json.JSONDecodeError:
            changed[key] = value
    return changed


if __name__ == "__main__":
    main()
