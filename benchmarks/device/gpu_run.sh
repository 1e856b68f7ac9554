#!/usr/bin/env bash
# The GPU measurements for #7, as one command on the device machine (see README.md here).
#
#   bash benchmarks/device/gpu_run.sh [tests] [models] [tiles] [cells] [feed] [guard]
#   (default: the first four)
#
# Unpacks .devbundle/site.tar.xz (made here by bundle.py) to /tmp/site, then runs each part
# under its own time limit, going on when one fails, and copies the result files and logs to
# $OUT. SMALL=1 shrinks every run (a rehearsal on a CPU machine: model_throughput is skipped
# there, the rest runs on the CPU).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu_run_out}
mkdir -p "$OUT"
PY=${PY:-python3}
parts=${*:-tests models tiles cells}
export PYTHONUNBUFFERED=1

source benchmarks/device/common.sh
use_site .devbundle/site.tar.xz "${SITE:-/tmp/site}" \
  "run 'python benchmarks/device/bundle.py' here and carry .devbundle"

{
  machine_header
  $PY - <<'EOF'
import importlib.metadata as md
for n in ("torch", "timm", "numpy", "pyarrow", "ray", "openslide-python", "openslide-bin",
          "pyvips", "simplejpeg", "tifffile", "opencv-python-headless"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "MISSING")
import ray, openslide, pyvips, simplejpeg, torch  # noqa: E401, F401  (fail here, not mid-run)
print("cuda", torch.cuda.is_available())
EOF
} 2>&1 | tee "$OUT/env.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 4

gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [ "${SMALL:-0}" = 1 ]; then
  tiles="--slides 4 --size 4096 --encoder dinov2-tiny --batch 32"
  cells="--kind aspirate --specimen aspirate --slides 2 --size 4096 --classifier deepheme-tiny"
  cells="$cells --batch 32"
  feed="--seconds 2 --cells-size 2048 --tiles-size 8192"
else
  tiles="--slides 512 --size 24000 --encoder dinov2-vits14 --batch 256"  # ~100k tiles: the steady rate shows past the start-up
  # a marrow aspirate's density (45 nucleated cells and 9 platelets per megapixel: ~530k crops
  # over 6 slides, so the steady rate shows past the start-up), what DeepHeme reads; the
  # blood-film smear (8 per megapixel) asks 5x the pixels per cell. Typed aspirate, as a lab's
  # job is: detection then looks for pale nuclei too (release 0.5.0; x0.86 of its rate on a
  # CPU); runs before session 34 were untyped
  cells="--kind aspirate --specimen aspirate --slides 6 --size 40000"
  cells="$cells --classifier deepheme-resnext50 --batch 256"
  feed="--seconds 8"
fi
# BATCH=N: both models' forward passes of N rows, in the main runs and baselines alike (the
# e2e ratio's model-alone rate is measured at the same batch). At 256 a ResNeXt-50 pass at 96 px
# is ~250 kernels in ~5 ms of H200 time, ~20 us a kernel: a host thread slowed by the busy
# CPUs around it falls behind; at 512 each launch has twice the GPU time to hide behind
if [ -n "${BATCH:-}" ]; then
  tiles="$tiles --batch $BATCH"
  cells="$cells --batch $BATCH"
fi
# MPP=X: the synthetic slides' level-0 µm/px in every run (default 0.25, read as is; a 40x
# Aperio or Leica scan is 0.252-0.263, whose cell tiles the readers resample to 0.25)
if [ -n "${MPP:-}" ]; then
  tiles="$tiles --mpp $MPP"
  cells="$cells --mpp $MPP"
  feed="$feed --mpp $MPP"
fi
# the guard part: the tiles run as it stands here, a quarter of its slides, without the count
guard="${tiles/--slides 512/--slides 128} --baseline-set crash_guard=false"
# each branch with two model actors sharing the GPU (half a GPU each), against the defaults
# (one actor) in the same process. On the H200 on 2026-12-04 the classifier's actor was busy in
# its own function 34 s of the cells run's 55 while 60 blocks waited for it: the rest of its
# process's time went to Ray Data around the call (fetching blocks, storing outputs), which a
# second process does in parallel. The baseline run has session 27's untried changes (host
# CPUs for the model actors, detection batches of 64, whole Arrow blocks to the model actors)
tiles="$tiles --set pipeline.encoder.concurrency=2 --baseline-set pipeline.encoder.concurrency=1"
cells="$cells --set pipeline.classifier.concurrency=2"
cells="$cells --baseline-set pipeline.classifier.concurrency=1"
# GRAPHS=1: the main runs' model actors replay CUDA graphs (cuda_graphs; the baselines not)
if [ "${GRAPHS:-0}" = 1 ]; then
  tiles="$tiles --set pipeline.encoder.cuda_graphs=true"
  tiles="$tiles --baseline-set pipeline.encoder.cuda_graphs=false"
  cells="$cells --set pipeline.classifier.cuda_graphs=true"
  cells="$cells --baseline-set pipeline.classifier.cuda_graphs=false"
fi

step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}

for part in $parts; do
  case $part in
    # the module holding the GPU tests: the image lacks polars, which other test modules
    # import (on 2026-12-04 collecting tests/models so gave rc 1 after the 3 GPU tests passed);
    # nor pytest-xdist, whose options (-n 2 --dist loadgroup) the project's addopts give
    tests) step tests 60 $PY -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
             -m gpu tests/models/test_models.py ;;
    models) if [ "$gpu" = 1 ]; then
              # CUDAGRAPHS=1: also CUDA graphs (reduce-overhead; its compiles take ~1 min more)
              step models $(( ${CUDAGRAPHS:-0} ? 200 : 120 )) $PY benchmarks/model_throughput.py \
                --pipeline-steps $([ "${CUDAGRAPHS:-0}" = 1 ] && echo --cudagraphs)
            else echo "== models: skipped (no GPU)"; fi ;;
    tiles) step tiles 170 $PY benchmarks/pipeline_e2e.py --stages tiles --kind marrow $tiles --tag gpu-tiles ;;
    cells) step cells 190 $PY benchmarks/pipeline_e2e.py --stages cells $cells --tag gpu-cells ;;
    # not in the default set (about 70 s, no GPU needed): what the node's CPUs can feed, one
    # process against all of them at once (benchmarks/feed_capacity.py)
    feed) step feed 120 $PY benchmarks/feed_capacity.py --processes "$(nproc)" $feed --tag device ;;
    # not in the default set (about 150 s): what counting attempts costs a GPU node's tile
    # readers, against the same job without it (pipeline.crash_guard; release 0.8.9 waits for
    # the count only in an actor started again). 128 slides: two runs fit one limit
    guard) step guard 200 $PY benchmarks/pipeline_e2e.py --stages tiles --kind marrow $guard \
             --tag gpu-guard ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done

# Result files of today come back (at most 8 files come back from $OUT: logs are summarised).
find benchmarks/results -newer "$OUT/env.txt" -name '*.json' -exec cp {} "$OUT/" \;
ls -la "$OUT"
