"""Tiles/s for reading and measuring the tiles of one slide: the pipeline's reader (Ray Data,
one reader actor per core) against a plain single-process OpenSlide loop over the same grid,
in the same run.

    python benchmarks/read_tiles.py [--size 16384] [--target-mpp 0.25 --tile-px 1024]
        [--kind smear|aspirate|marrow] [--dicom] [--tag T]

Both sides read every planned tile, resize it to the model's size and measure its stained and
fat area; only those numbers travel back. Rates are steady state (the clock starts at the first
result, so imports and actor start-up are excluded on both sides; the rate including start-up is
printed too). Prints JSON with both rates and the ratio. Ours runs twice: with OpenSlide decoding
in the actors (``pipeline.direct_jpeg`` off, the baseline of ``direct_jpeg_speedup``), then as
configured. ``plain_ms_per_tile`` splits the plain loop's time between reading and the area
masks: one core's cost per tile, which says how many cores a GPU encoder needs to be fed.
``--dicom``: the slide is a DICOM series (a file per level, JPEG frames), as converters write
them, in place of a TIFF. ``--mount-latency-ms``: both sides read the slide through a FUSE
mount that holds each open and read that long (`benchmarks.common.delayed_mount`: a network
file system such as NFS or SMB; needs fusepy and libfuse 2).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import add_mount_arg, write_result  # noqa: E402


def n_tiles_total(total: int, counted: int) -> float:
    """Scale a steady-state time over ``counted`` tiles to all ``total`` tiles."""
    return total / max(counted, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--target-mpp", type=float, default=0.25)
    p.add_argument("--tile-px", type=int, default=512)
    p.add_argument("--readers", type=int, default=os.cpu_count())
    p.add_argument("--threads", type=int, default=1, help="reader threads per actor "
                   "(pipeline.read_threads)")
    p.add_argument("--threads-baseline", type=int,
                   help="also run ours (as configured) at this many threads per actor, for "
                        "the ratio of --threads to it in the same process")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kind", choices=["smear", "aspirate", "marrow"], default="smear",
                   help="synthetic slide content (marrow: the H&E biopsy the encoder reads)")
    p.add_argument("--dicom", action="store_true", help="a DICOM series, not a TIFF")
    add_mount_arg(p)
    p.add_argument("--tag", default="", help="suffix of the result file name")
    args = p.parse_args()

    import openslide
    import ray

    from benchmarks.make_synthetic_slides import make_slide
    from engine.cellularity import DEFAULT_RULES, tile_area_counts
    from engine.config import Config, TileConfig
    from engine.pipeline.steps import ReadTiles, read_tile
    from engine.tiling import plan_tiles

    work = tempfile.mkdtemp(prefix="hemeflow-read-")
    atexit.register(shutil.rmtree, work, True)  # the synthetic slide (after any unmount below)
    path = os.path.join(work, "slide.tif")
    t = time.time()
    make_slide(os.path.join(work, "slide") if args.dicom else path, args.size, kind=args.kind,
               dicom=args.dicom)
    if args.dicom:
        path = os.path.join(work, "slide", "level_0.dcm")
    made = time.time() - t
    if args.mount_latency_ms is not None:
        from benchmarks.common import delayed_mount, unmount

        mount = work + "-mount"
        proc = delayed_mount(work, mount, args.mount_latency_ms)
        atexit.register(unmount, mount, proc)
        path = mount + path[len(work):]
    cfg = Config()
    slide = openslide.OpenSlide(path)
    mpp = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    tiles = TileConfig(target_mpp=args.target_mpp, tile_px=args.tile_px, min_tissue_fraction=0)
    plan = plan_tiles(slide.dimensions, slide.level_downsamples, mpp, tiles)

    class Plain:  # what a script without hemeflow would do: OpenSlide in one process
        def read_region(self, level, x, y, w, h):
            rgba = np.asarray(slide.read_region((x, y), level, (w, h)))
            rgb = rgba[..., :3].copy()
            rgb[rgba[..., 3] == 0] = 255  # off the image: white glass, as the pipeline reads it
            return rgb

    plain_area, read_s, areas_s = 0, 0.0, 0.0
    for x, y in zip(plan.x, plan.y):  # the two parts timed apart: one core's cost per tile
        t = time.perf_counter()
        tile = read_tile(Plain(), plan.level, int(x), int(y), plan.read_px, plan.tile_px)
        t1 = time.perf_counter()
        plain_area += tile_area_counts(tile, plan.target_mpp)[0]
        read_s, areas_s = read_s + t1 - t, areas_s + time.perf_counter() - t1
    plain_s = read_s + areas_s

    ray.init(num_cpus=args.readers, include_dashboard=False, log_to_driver=False)
    tasks = [{"slide_id": "s", "uri": path, "task": i, "x": int(x), "y": int(y),
              "level": plan.level, "read_px": plan.read_px, "tile_px": plan.tile_px,
              "tile_mpp": plan.target_mpp, "tissue_fraction": 1.0,
              "stains": np.asarray(DEFAULT_RULES.stains, np.float32).ravel(),
              "nucleus_h_od": DEFAULT_RULES.nucleus_h_od}
             for i, (x, y) in enumerate(zip(plan.x, plan.y))]

    def ours(cfg: Config, threads: int = args.threads) -> tuple[float, float]:
        """Steady-state seconds for all tiles, and seconds including actor start-up."""
        ds = ray.data.from_items(tasks).map_batches(
            ReadTiles, fn_constructor_args=(cfg, False, threads),
            batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=args.readers),
            num_cpus=1)
        # steady state: the clock starts at the first batch, so actor start-up (imports,
        # opening the slide) is not counted, as the plain loop's imports are not
        area, counted, t, t_start = 0, 0, None, time.time()
        for batch in ds.iter_batches(batch_size=None):
            area += int(batch["cellular_px"].sum())
            if t is None:
                t = time.time()
            else:
                counted += len(batch["cellular_px"])
        assert area == plain_area, "both sides must measure the same pixels"
        return (time.time() - t) * n_tiles_total(len(plan), counted), time.time() - t_start

    # OpenSlide decoding in the actors first (the baseline of the direct decoding), then ours
    via_openslide_s, _ = ours(Config.from_dict({"pipeline": {"direct_jpeg": False}}))
    ours_s, ours_with_startup_s = ours(cfg)
    baseline_s = ours(cfg, args.threads_baseline)[0] if args.threads_baseline else None
    n = len(plan)
    result = {
        "benchmark": "read_tiles", "host": platform.node(), "cpus": os.cpu_count(),
        "date": dt.date.today().isoformat(), "slide_px": args.size,
        "slide_made_s": round(made, 1), "tiles": n, "tile_px": args.tile_px,
        "target_mpp": args.target_mpp, "level": plan.level, "read_px": plan.read_px,
        "kind": args.kind, "format": "dicom" if args.dicom else "tiff",
        "mount_latency_ms": args.mount_latency_ms,
        "plain_openslide_loop_tiles_per_s": round(n / plain_s, 1),
        "plain_ms_per_tile": {"read": round(1e3 * read_s / n, 3),
                              "area_masks": round(1e3 * areas_s / n, 3)},
        "hemeflow_tiles_per_s": round(n / ours_s, 1),
        "hemeflow_tiles_per_s_including_actor_startup": round(n / ours_with_startup_s, 1),
        "reader_actors": args.readers, "threads_per_actor": args.threads,
        "ratio": round(plain_s / ours_s, 3), "target": "ratio >= 1.5 on 2 cores",
        "hemeflow_via_openslide_tiles_per_s": round(n / via_openslide_s, 1),
        "ratio_via_openslide": round(plain_s / via_openslide_s, 3),
        "direct_jpeg_speedup": round(via_openslide_s / ours_s, 3),
    }
    if baseline_s:
        result.update({"baseline_threads_per_actor": args.threads_baseline,
                       "hemeflow_tiles_per_s_at_baseline_threads": round(n / baseline_s, 1),
                       "ratio_to_baseline_threads": round(baseline_s / ours_s, 3)})
    write_result(result, f"read_tiles-cpu{os.cpu_count()}-{result['date']}", args.tag)


if __name__ == "__main__":
    main()
