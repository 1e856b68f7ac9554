#!/usr/bin/env bash
# The reference cell classifier (#3) trained on the device machine in one call (README.md here).
#
#   bash benchmarks/device/train_run.sh
#
# Needs .devdata (carried): the PBC pack in .devdata/pbc-pack (python -m jobs.pack_cell_images)
# and albumentations for the device's Python in .devdata/site.tar.xz (bundle.py --set train).
# Steps:
#   1. benchmarks/train_throughput.py: ResNeXt-50 training crops/s alone, fed by BatchAugment on
#      the GPU, and fed by albumentations in 15 loader processes (the figure for the README);
#   2. K fold models (the teachers) with --augment device, their epochs fitted to the budget
#      from step 1's rate, scored alone and as an ensemble on the held-out test split;
#   3. one student distilled from the K-fold ensemble (the shippable single model: a 5-model
#      ensemble is 5 x 47 MB, over the 50 MB a reference may take), fine-tuned from the first
#      fold model at a lower learning rate, scored on the same split.
# Then $OUT holds run.log, summary.json, the card (model.json) of the student (with STUDENT=0:
# of the fold model), its fp16 weights in parts under 16 MiB (cat model.safetensors.part-* >
# model.safetensors) and the test split as
# the original images' paths (test_originals/labels.csv). SMALL=1 rehearses it on
# a CPU with the tiny model in about 3 minutes.
# FOLDS=1 STUDENT=0: one model on the split, given the whole budget (up to 200 epochs), and
# shipped as the student would be (the shipped reference was made so, in 7.3 min on an H100).
# ARCH=deepheme-resnext50-os16 FOLDS=1 STUDENT=0: the same from scratch with the last stage
# dilated (#3's next GPU experiment: a 6x6 final map of a crop; 135 s an epoch on the CPU
# where the plain network took 110 in an earlier session).
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/train_run_out}
mkdir -p "$OUT"
PY=${PY:-python3}
PACK=${PACK:-.devdata/pbc-pack}
WORK=${WORK:-/tmp/train_run}
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-560}  # seconds: every step ends by then, inside the call's 600
left() { echo $(( DEADLINE - SECONDS - ${1:-0} )); }  # seconds left, less a reserve
LOG="$OUT/run.log"
if [ "${SMALL:-0}" = 1 ]; then
  ARCH=deepheme-tiny FOLDS=${FOLDS:-2} FOLD_S=${FOLD_S:-25} STUDENT_S=${STUDENT_S:-30}
  LIMIT="--limit-per-class 60" BENCH="--arch deepheme-tiny --batch 32 --steps 5 --images 256 --loader-workers 2"
else
  # ARCH=deepheme-resnext50-os16: the same network with its last stage dilated (session 32
  # fine-tuned it on a CPU from the shipped weights, not from scratch: not kept)
  ARCH=${ARCH:-deepheme-resnext50}
  FOLDS=${FOLDS:-5} FOLD_S=${FOLD_S:-50} STUDENT_S=${STUDENT_S:-100}
  LIMIT="" BENCH="--arch $ARCH --batch 128 --steps 30 --images 2048 --loader-workers 15"
fi
STUDENT=${STUDENT:-1}  # 0: no student; the fold model(s) take its time (ship with FOLDS=1)
[ "$STUDENT" = 1 ] || { STUDENT_S=0; FOLD_S=100000; }  # the folds: whatever time is left
RUN=$([ "$STUDENT" = 1 ] && echo student || echo folds)  # the run whose model comes back
[ -f "$PACK/pack.json" ] || { echo "no $PACK/pack.json: run python -m jobs.pack_cell_images here and carry .devdata" >&2; exit 2; }
rm -rf "$WORK"
source benchmarks/device/common.sh
# albumentations and its needs, for the DataLoader baseline
use_site .devdata/site.tar.xz "${SITE:-/tmp/trainsite}" \
  "run 'python benchmarks/device/bundle.py --set train' here and carry .devdata"

{
  machine_header
  cat "$PACK/pack.json"; echo
  $PY -c "import torch, timm, numpy, albumentations; print('torch', torch.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'albumentations', albumentations.__version__, 'cuda', torch.cuda.is_available())"  # last: its status is the group's
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || exit 4

step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped, ${limit}s left" | tee -a "$LOG"; return 124; fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$WORK.$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
  grep -v '^{"epoch"' "$WORK.$name.log" | tail -n 40 | tee -a "$LOG"
  grep '^{"epoch"' "$WORK.$name.log" >>"$LOG"
  return $rc
}

# COMPILE=MODE (e.g. default): train with --compile MODE, after timing it in step 1 (its
# compile, about a minute cold, comes out of the throughput step's limit and each fold's first
# epoch); the plan then takes the compiled rate where it ran
COMPILE=${COMPILE:-}
if [ -n "$COMPILE" ]; then
  BENCH="$BENCH --compile $COMPILE"; TPUT_S=200; COMPILE_FLAG=(--compile "$COMPILE")
else
  TPUT_S=75; COMPILE_FLAG=()
fi
step throughput $TPUT_S $PY benchmarks/train_throughput.py $BENCH --data "$PACK" \
  --source-mpp 0.25 --tag device-train
read -r RATE COMPILED < <($PY -c "
import glob, json, os, sys
found = sorted(glob.glob('benchmarks/results/train_throughput-*device-train.json'),
               key=os.path.getmtime)
r = json.load(open(found[-1])) if found else {'crops_per_s': {'device': 0}}
c = r.get('compiled', {}).get(sys.argv[1], {})
print(c.get('device') or r['crops_per_s']['device'], int('device' in c))" "$COMPILE")
if [ -n "$COMPILE" ] && [ "${COMPILED:-0}" != 1 ]; then  # it failed or never ran: train eager
  echo "compile $COMPILE did not run in step 1: training without it" | tee -a "$LOG"
  COMPILE_FLAG=()
fi
# epochs (and minutes) that fit the budget: a fold's balanced epoch is the classes x its largest
# class (0.85 of the pack's, less the held-out fold), plus scoring the validation split
# The training minutes shrink to what is left: each run also pays for its set-up (preparing
# the pack, ~10 s; the first epoch's cuDNN planning, ~25 s on the H200, inside the minutes) and
# its scoring after training (OVERHEAD: seen on 2026-12-04, when fixed minutes overran a
# shorter DEADLINE and neither run came back scored).
# teachers' set-up and ensemble score, each fold's, the student's
OVERHEAD=$(( 30 + 15 * FOLDS + 45 * STUDENT ))
read -r FOLD_S STUDENT_S < <($PY -c "import sys; a, o, k, f, s = map(float, sys.argv[1:]); \
x = min(1.0, max(a - o, 0) / (k * f + s)); print(int(f * x), int(s * x))" \
  "$(left)" "$OVERHEAD" "$FOLDS" "$FOLD_S" "$STUDENT_S")
WARM=$(( ${#COMPILE_FLAG[@]} ? 60 : 30 ))  # the first epoch: cuDNN planning, and the compile
read -r EPOCHS STEP FOLD_MIN STUDENT_EPOCHS STUDENT_STEP STUDENT_MIN < <($PY - "${RATE:-0}" \
  "$FOLDS" "$FOLD_S" "$STUDENT_S" "$PACK" "$WARM" "$(( STUDENT ? 60 : 200 ))" <<'EOF'
import collections, csv, os, sys
rate, k, fold_s, student_s = float(sys.argv[1]) or 500.0, int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
warm, cap = float(sys.argv[6]), int(sys.argv[7])  # cap: most epochs
with open(os.path.join(sys.argv[5], "labels.csv"), newline="") as fh:
    counts = collections.Counter(r["code"] for r in csv.DictReader(fh) if r["code"] not in ("IG", "NEU"))
# one fold trains on all but its held-out fold; a single model (k = 1) on all but 15 %
share = 1 - 1 / k if k > 1 else 0.85
epoch_s = len(counts) * max(counts.values()) * 0.85 * share / rate * 1.1 + 0.2
teachers = max(4, min(cap, int((fold_s - warm) / epoch_s)))
student = max(4, min(60, int((student_s - warm) / (epoch_s * (1 + k / 3)))))  # + K teachers' passes
print(teachers, max(1, teachers // 4), round(fold_s / 60, 2),
      student, max(1, student // 4), round(student_s / 60, 2))
EOF
)
echo "rate ${RATE:-unknown} crops/s: teachers $EPOCHS epochs (step $STEP) in ${FOLD_S} s each," \
  "student $STUDENT_EPOCHS (step $STUDENT_STEP) in ${STUDENT_S} s" | tee -a "$LOG"

# COLOUR=strong: the wider stain and colour jitter (train_cell_classifier --colour strong)
common=(--data "$PACK" --arch $ARCH --local --augment device --batch-size 128
        --label-smoothing 0.1 --patience 100 --colour "${COLOUR:-standard}" $LIMIT
        "${COMPILE_FLAG[@]}")
step teachers $(left $(( STUDENT ? STUDENT_S + 45 : 15 ))) \
  $PY -m jobs.train_cell_classifier "${common[@]}" \
  --output "$WORK/folds" --folds "$FOLDS" --epochs "$EPOCHS" --lr-step-epochs "$STEP" \
  --max-minutes "$FOLD_MIN" --no-ood
teachers=()
for k in $(seq 0 $((FOLDS - 1))); do
  [ -f "$WORK/folds/fold-$k/model.safetensors" ] && teachers+=(--teacher "$WORK/folds/fold-$k/model.safetensors")
done
if [ ${#teachers[@]} -gt 0 ] && [ "$STUDENT" = 1 ]; then
  # the student starts from the first fold model (its few epochs fine-tune rather than learn
  # from scratch) and learns from the average of all of them
  # its minutes: what the teachers left, less its set-up and scoring
  STUDENT_MIN=$($PY -c "import sys; a, b = float(sys.argv[1]), int(sys.argv[2]); \
print(round(min(a, (b - 45) / 60), 2))" "$STUDENT_MIN" "$(left 15)")
  step student $(left 15) $PY -m jobs.train_cell_classifier "${common[@]}" \
    --output "$WORK/student" --epochs "$STUDENT_EPOCHS" --lr-step-epochs "$STUDENT_STEP" \
    --max-minutes "$STUDENT_MIN" "${teachers[@]}" \
    --init "${teachers[1]}" --lr 3e-4
fi

$PY - "$WORK" "$OUT" "$PACK" "$RUN" <<'EOF'
import csv, glob, json, os, sys
work, out, pack, run = sys.argv[1:]
# the held-out test rows as the original images (the pack's source), to score the student on
# them where they are: <files>/test_originals/labels.csv, absolute paths of the machine that
# made the pack
test = os.path.join(work, run, "test", "labels.csv")
if os.path.exists(test):
    source = json.load(open(os.path.join(pack, "pack.json")))["source"]
    with open(os.path.join(pack, "labels.csv"), newline="") as fh:
        original = {r["path"]: r["source_path"] for r in csv.DictReader(fh)}
    os.makedirs(os.path.join(out, "test_originals"), exist_ok=True)
    with open(test, newline="") as fh, \
            open(os.path.join(out, "test_originals", "labels.csv"), "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["path", "code"])
        for r in csv.DictReader(fh):
            rel = os.path.relpath(r["path"], os.path.abspath(pack))
            w.writerow([os.path.join(source, original[rel]), r["code"]])
summary = {}
for f in sorted(glob.glob("benchmarks/results/train_throughput-*device-train.json"))[-1:]:
    summary["train_throughput"] = json.load(open(f))
for run in ("folds", "student"):
    path = os.path.join(work, run, "evaluation.json")
    if os.path.exists(path):
        summary[run] = {name: {k: v for k, v in rep.items() if k != "confusion_matrix"}
                        for name, rep in json.load(open(path)).items()}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
for run, reps in summary.items():
    if run != "train_throughput":
        for name, rep in reps.items():
            print(run, name, "macro F1", rep.get("macro_f1"), "accuracy", rep.get("accuracy"),
                  "classes P,R > 0.8:", rep.get("classes_precision_recall_above_0_8"))
EOF
if [ -f "$WORK/$RUN/model.safetensors" ]; then
  cp "$WORK/$RUN/model.json" "$OUT/model.json"
  split -b 16000000 -a 2 "$WORK/$RUN/model.safetensors" "$OUT/model.safetensors.part-"
fi
ls -la "$OUT"
