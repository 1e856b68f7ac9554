"""Each model alone on random tensors: images/s and peak GPU memory in fp32, bf16,
bf16 + channels_last, bf16 + channels_last + torch.compile, and the same compiled with CUDA
graphs with ``--cudagraphs`` (``mode="reduce-overhead"``: one replay per batch instead of a
launch per kernel; the ResNeXt-50 step at 96 px looked launch-bound on the H200). The baseline
is fp32, same run. A mode that fails is recorded as ``<mode>_error`` and the others still run.

    python benchmarks/model_throughput.py [--models deepheme-resnext50 dinov2-vits14] [--batch 256]
        [--pipeline-steps] [--cudagraphs]

The 'nanoGPT bench' switch: inputs are random tensors already on the device, so this is the
model's ceiling; pipeline_e2e compares the whole job against it.

``--pipeline-steps`` also times the pipeline's model step (ClassifyCells, EncodeTiles) called as
Ray Data calls it: read-only uint8 numpy batches in host memory, crops mixed with 5 % marker
rows, against bf16 + channels_last alone. Each call holds one forward pass (``passes_per_call``
1, as before session 11) or four, which the step pipelines on a GPU (the next pass's pixels are
gathered into pinned memory and copied on a side stream while the model runs). Calls are
full, or with ``ragged`` every other one has a random 1 .. rows (session 4's mix, harsher than
the pipeline's: Ray Data cuts a stream of blocks into full batches and one remainder per
bundle). The padding to 32-row buckets is on throughout (session 4: without it, x0.14).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import write_result  # noqa: E402


def bench(module, x, steps: int, amp: bool, warmup: int = 3) -> float:
    """Images/s of ``module`` on the batch ``x`` (CUDA or CPU), after ``warmup`` passes."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        for _ in range(warmup):
            module(x)
        sync()
        t = time.time()
        for _ in range(steps):
            module(x)
        sync()
    return steps * x.shape[0] / (time.time() - t)


def bench_step(name: str, batch: int, steps: int, bucket: int = 32, passes: int = 1,
               ragged: bool = False, seed: int = 0, chunks: int = 0, graphs: bool = False
               ) -> dict:
    """Rows/s of the pipeline step for ``name`` on host uint8 batches of ``batch`` x
    ``passes`` rows, as Ray Data hands them over (read-only, 5 % marker rows among the crops),
    each call ``passes`` forward passes of ``batch`` rows; with ``ragged`` every other call has
    a random 1 .. ``batch`` x ``passes`` rows (see the module doc). With ``chunks``, each call
    is a whole block as the job hands it since session 27: an Arrow table whose columns hold
    that many chunks (made before the timing: the producing actor makes them), read in place;
    a classifier's crops packed as `DetectCells` packs them since session 32 (none in a
    marker's row).
    With ``graphs``, the model actor's ``cuda_graphs`` (each padded shape a captured CUDA
    graph; the bucket must be the actor's own, 32). CUDA when present."""
    import numpy as np

    from engine.cells import KIND_CELL
    from engine.models import get_spec
    from engine.pipeline.steps import ClassifyCells, EncodeTiles

    spec = get_spec(name)
    rng = np.random.default_rng(seed)
    px, rows = spec.input_px, batch * passes
    pool = [rng.integers(0, 256, (rows, px, px, 3), dtype=np.uint8) for _ in range(4)]
    for a in pool:
        a.flags.writeable = False
    classify = spec.task == "classification"
    t0 = time.perf_counter()
    step = (ClassifyCells(name, None, allow_untrained=True, batch_size=batch, graphs=graphs)
            if classify else
            EncodeTiles(name, None, allow_untrained=True, batch_size=batch, graphs=graphs))
    for predictor in getattr(step.predictor, "members", [step.predictor]):  # an ensemble's too
        predictor.bucket = bucket if predictor.cuda else 0
    start_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def batch_of(i: int, n: int) -> dict:
        b = {"task": np.zeros(n, np.int64)}
        if classify:
            b["crop"] = pool[i % 4][:n]
            b["kind"] = np.where(rng.random(n) < 0.05, "marker", KIND_CELL)
        else:
            b["image"] = pool[i % 4][:n]
        return b

    blocks = []
    if chunks:
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        from engine.pipeline.steps import packed_crops

        def chunk(b: dict) -> pa.Table:  # as the job's steps hand it on
            if not classify:
                return BlockAccessor.batch_to_block(b)
            crops, real = b.pop("crop"), b["kind"] == KIND_CELL  # `DetectCells`' packed crops:
            return BlockAccessor.batch_to_block(b).append_column(  # none in a marker's row
                "crop", packed_crops(crops[real], real))

        for i in range(4):
            b = batch_of(i, rows)
            blocks.append(pa.concat_tables([
                chunk({k: v[part] for k, v in b.items()})
                for part in np.array_split(np.arange(rows), chunks)]))

    def one(i: int) -> int:
        if chunks:
            return step(blocks[i % 4]).num_rows
        n = int(rng.integers(1, rows + 1)) if ragged and i % 2 == 0 else rows
        step(batch_of(i, n))
        return n

    one(0)
    sync()
    t = time.perf_counter()
    done = sum(one(i) for i in range(1, steps + 1))
    sync()
    members = getattr(step.predictor, "members", [step.predictor])
    kept = {"graphs_kept": all(p.graphs for p in members),
            "graphs_error": "; ".join(p.graphs_error for p in members if p.graphs_error)
            } if graphs and torch.cuda.is_available() else {}
    return {"bucket": bucket, "passes_per_call": passes, "ragged": ragged,
            "arrow_chunks": chunks, "cuda_graphs": graphs, **kept,
            "actor_start_s": round(start_s, 2),
            "rows_per_s": round(done / (time.perf_counter() - t))}


# (bucket, passes per call, ragged, chunks, CUDA graphs): session 4's ragged single pass
# first, then full calls of one pass and of four pipelined passes (numpy batches, as until
# session 27), a block of four chunks as an Arrow table (as the job hands its model actors
# their rows now), and the same replayed as CUDA graphs (``cuda_graphs``, session 29)
STEP_VARIANTS = ((32, 1, True, 0, False), (32, 1, False, 0, False), (32, 4, False, 0, False),
                 (32, 4, True, 0, False), (32, 4, False, 4, False), (32, 4, False, 4, True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deepheme-resnext50", "dinov2-vits14"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cudagraphs", action="store_true",
                   help="also time torch.compile(mode='reduce-overhead') (CUDA graphs)")
    p.add_argument("--pipeline-steps", action="store_true",
                   help="also time the pipeline's model steps on host uint8 batches")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("model_throughput needs a CUDA device")
    from engine.classes import DEEPHEME_CODES
    from engine.models import create_model

    def untrained(name):  # weights do not change the speed; a classifier needs its codes
        return create_model(name, allow_untrained=True, class_codes=DEEPHEME_CODES)

    results = []
    for name in args.models:
        model = untrained(name)
        size = model.spec.input_px
        row = {"model": name, "batch": args.batch, "input_px": size}
        for mode in ("fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile",
                     "bf16_channels_last_cudagraphs"):
            compiled = {"bf16_channels_last_compile": "default",
                        "bf16_channels_last_cudagraphs": "reduce-overhead"}.get(mode)
            if (compiled and args.no_compile) or (mode.endswith("cudagraphs")
                                                  and not args.cudagraphs):
                continue
            m = untrained(name).module.cuda().eval()
            x = torch.randn(args.batch, 3, size, size, device="cuda")
            if "channels_last" in mode:
                m, x = m.to(memory_format=torch.channels_last), x.contiguous(
                    memory_format=torch.channels_last)
            try:  # a compile mode that fails here costs its figure, not the others'
                if compiled:
                    m = torch.compile(m, mode=compiled)
                torch.cuda.reset_peak_memory_stats()
                rate = bench(m, x, args.steps, amp=mode != "fp32")
            except Exception as err:  # noqa: BLE001  (inductor and triton raise many kinds)
                row[f"{mode}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            else:
                row[f"{mode}_images_per_s"] = round(rate)
                row[f"{mode}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            del m, x
            torch.cuda.empty_cache()
        row["best_vs_fp32"] = round(max(v for k, v in row.items() if k.endswith("per_s"))
                                    / row["fp32_images_per_s"], 2)
        if args.pipeline_steps:
            alone = row["bf16_channels_last_images_per_s"]
            row["pipeline_step"] = [
                {**r, "vs_alone": round(r["rows_per_s"] / alone, 3)}
                for r in (bench_step(name, args.batch, 4 * args.steps // passes, bucket, passes,
                                     ragged, chunks=chunks, graphs=graphs)
                          for bucket, passes, ragged, chunks, graphs in STEP_VARIANTS)]
        results.append(row)
        print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    out = {"benchmark": "model_throughput", "gpu": gpu, "torch": torch.__version__,
           "date": dt.date.today().isoformat(), "results": results}
    path = write_result(out, f"model_throughput-{gpu}-{out['date']}", echo=False)
    print(f"written {path}")


if __name__ == "__main__":
    main()
